. experiments/gpu_calls/common.sh
python3 -m pytest -q -p no:cacheprovider tests/oracle/test_hf_oracle.py tests/runtime/test_static_decode.py -k "cuda or window" 2>&1 | tail -4 | tee /tmp/runs/gpu_tests.log
A="experiment=acceptance model=phimoe model.weights=twin draft=phi_mini_moe_twin num_prompts=1 max_new_tokens=32 'experiment.only=[k1]'"
eval run phi_acc_noise0 100 $A model.twin.expert_noise=0
eval run phi_acc_noise005 100 $A model.twin.expert_noise=0.005
eval run phi_acc_draft_fp32 100 $A model.twin.expert_noise=0 draft.dtype=float32
grep -h "acceptance 0" /tmp/runs/phi_acc_*.log
pack
