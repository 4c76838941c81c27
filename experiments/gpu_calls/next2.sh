. experiments/gpu_calls/common.sh
P="experiment=fig10_tpot model=phimoe model.weights=twin draft=phi_mini_moe_twin hardware=rtx4090 max_new_tokens=16"
run phi_graphs 300 $P model.twin.expert_noise=0.02 'experiment.only=[spmoe,moe_infinity,lru,moe_infinity_nosd,lru_nosd]'
run phi_noise005 200 $P model.twin.expert_noise=0.005 'experiment.only=[spmoe,moe_infinity,moe_infinity_nosd]'
grep -c "failed" /tmp/runs/phi_graphs.log
pack
