. experiments/gpu_calls/common.sh
run mx_k5_gate 240 experiment=spmoe_plus hardware=rtx4090 hardware.pace_pcie=true spec.num_draft_tokens=5 'experiment.only=[moe_infinity_nosd,spmoe_plus]'
run ds16_gate_profile 200 experiment=spmoe_plus model=deepseek_v2_lite hardware=rtx4080 experiment.profile=true 'experiment.only=[plus_nosd_nohost,plus_auto]'
pack
