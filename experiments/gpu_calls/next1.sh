. experiments/gpu_calls/common.sh
python3 -m pytest -q -p no:cacheprovider tests/runtime/test_gqa_attention.py tests/runtime/test_graphs_offloaded_gpu.py tests/runtime/test_static_decode.py 2>&1 | tail -5 | tee /tmp/runs/gpu_tests.log
run fold 240 experiment=draft_length 'experiment.only=[lru_k4]' max_new_tokens=8 experiment.rounds=1 check_lossless=true hardware.attention=spmoe_sdpa
grep -E "rebuild|precaptured|memory:" /tmp/runs/fold.log | cut -c1-200
pack
