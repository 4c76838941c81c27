. experiments/gpu_calls/common.sh
python -m experiments.draft_rounding mistral_7b phi_mini_moe_twin --out /tmp/runs/draft_rounding.md 2>&1 | tail -5
A="experiment=acceptance model=mixtral model.weights=twin num_prompts=1 max_new_tokens=32 'experiment.only=[k1]'"
eval run mix_acc_sdpa 100 $A hardware.attention=sdpa
eval run mix_acc_folded 100 $A
grep -h "acceptance 0\|acceptance 1" /tmp/runs/mix_acc_*.log
pack
