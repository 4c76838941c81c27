. experiments/gpu_calls/common.sh
run lossless_fold 500 experiment=lossless_gpu 'experiment.only=[spmoe,spmoe_plus]'
pack
