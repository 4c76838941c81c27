. experiments/gpu_calls/common.sh
run ds_mtbench 470 experiment=datasets dataset=mtbench
pack
