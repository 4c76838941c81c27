. experiments/gpu_calls/common.sh
run phi_twin 480 experiment=fig10_tpot model=phimoe model.weights=twin model.twin.expert_noise=0.02 draft=phi_mini_moe_twin hardware=rtx4090 max_new_tokens=16 'experiment.only=[spmoe,moe_infinity,lru,moe_infinity_nosd,lru_nosd]'
pack
