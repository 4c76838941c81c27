. experiments/gpu_calls/common.sh
run acc_mixtral 150 experiment=acceptance model=mixtral model.weights=twin
run acc_deepseek 150 experiment=acceptance model=deepseek_v2_lite draft=int8_self
run pred_acc 200 experiment=predictor_accuracy
pack
