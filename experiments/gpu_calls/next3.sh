. experiments/gpu_calls/common.sh
run ds_sharegpt 500 experiment=datasets dataset=sharegpt
pack
