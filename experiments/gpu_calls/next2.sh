. experiments/gpu_calls/common.sh
run draft_len 520 experiment=draft_length max_new_tokens=24
pack
