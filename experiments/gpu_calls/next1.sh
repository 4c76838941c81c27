. experiments/gpu_calls/common.sh
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_rope_table.py tests/oracle/test_hf_oracle.py -k "cuda or rope" 2>&1 | tail -8 | tee /tmp/runs/gpu_tests.log
A="experiment=acceptance model=phimoe model.weights=twin draft=phi_mini_moe_twin model.twin.expert_noise=0.02 num_prompts=1 max_new_tokens=32 'experiment.only=[k1]'"
eval run phi_acc_auto 150 $A
eval run phi_acc_torch 150 $A hardware.expert_kernel=torch
eval run phi_acc_eager 150 $A hardware.decode=eager
grep -h "acceptance" /tmp/runs/phi_acc_*.log | tail -6
pack
