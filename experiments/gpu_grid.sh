#!/usr/bin/env bash
# The GPU measurements of SP-MoE, the baselines and routing replay: one stage per device call
# (each under 10 minutes on one H200; budgets are emulated as memory caps, PCIe is not paced).
#
#   bash experiments/gpu_grid.sh <stage> [out_root]        stages: replay_main replay_cutoff
#                                                                    replay_baselines twin_main deepseek deepseek16
#                                                                    followup_replay paced_replay eviction_replay
# Replay stages run a Mixtral-8x7B-shape model with random weights whose routing, acceptance and
# predictions come from the real SmolLM2 pair's HumanEval trace (30 layers mapped onto 32).
# Afterwards: python -m experiments.report_offload <out_root>/replay_main/* ... --out <out_root>/report
set -euo pipefail
stage=${1:?stage}
out=${2:-results/offload_grid}
trace=results/real_pair/traces/humaneval_k1.npz
bench="python -m experiments.bench_offload --num-prompts 1 --k 1"
sweep=spmoe_L0,spmoe_L8,spmoe_L16,spmoe_L24,spmoe_all,spmoe_off
case $stage in
  replay_main)  # #4 and #6: spmoe vs lru (SD) vs lru_nosd at 24 and 40 GiB, 100 tokens
    $bench --routing replay --trace $trace --budgets rtx4090,a100_40g --cases lru_nosd,lru,spmoe \
      --max-new-tokens 100 --out "$out/replay_main" ;;
  replay_cutoff)  # #4: the cutoff curve and the ablation switches at 24 GiB, 48 tokens; mixtral_offloading
    #               with SD needs >= 1 slot per layer, which only the 40 GiB budget leaves beside the draft
    $bench --routing replay --trace $trace --budgets rtx4090,a100_40g --cases lru,spmoe,mixtral_offloading \
      --first-budget-cases $sweep,spmoe_noworker,spmoe_nobatch,spmoe_lru --max-new-tokens 48 --out "$out/replay_cutoff" ;;
  replay_baselines)  # #5: every baseline with and without SD on the same replayed routing, 100 tokens
    $bench --routing replay --trace $trace --budgets rtx4090 --cases lru_nosd,lru,spmoe,mixtral_offloading,\
mixtral_offloading_nosd,moe_infinity,moe_infinity_nosd,adapmoe,adapmoe_nosd --max-new-tokens 100 \
      --out "$out/replay_baselines" ;;
  twin_main)  # #4/#6: the same comparison on a twinned pair (the draft's hidden states drive the routers)
    $bench --routing model --expert-noise 0.02 --budgets rtx4090 --cases lru_nosd,lru,spmoe,spmoe_attn_out,spmoe_residual \
      --max-new-tokens 100 --out "$out/twin_main" ;;
  deepseek)  # #4: DeepSeek-V2-Lite shape, int8 self-draft (15.9 GB: 16 GiB cannot hold it and the target), 24 GiB
    $bench --model deepseek_v2_lite --draft int8_self --routing model --budgets rtx4090 \
      --cases lru_nosd,lru,spmoe,spmoe_noworker,spmoe_nobatch,spmoe_all --max-new-tokens 100 --repeat-reference \
      --out "$out/deepseek" ;;
  followup_replay)  # #4/#5 re-measurements: AdapMoE with gating on the replayed weights (format-2 trace)
    #                  at 24 GiB; spmoe's auto cutoff with the version-3 profiler at 24 and 40 GiB
    $bench --routing replay --trace $trace --budgets rtx4090,a100_40g --cases lru,spmoe \
      --first-budget-cases adapmoe,adapmoe_nosd --max-new-tokens 100 --out "$out/followup_replay" ;;
  paced_replay)  # the replay_main comparison with the emulated cards' PCIe Gen4 link (25 GB/s) paced
    $bench --routing replay --trace $trace --budgets rtx4090 --cases lru_nosd,lru,spmoe --pace-pcie \
      --max-new-tokens 100 --out "$out/paced_replay" ;;
  eviction_replay)  # expected_reuse eviction (best in experiments.eviction_sim) against layer_distance, 24 and 40 GiB
    $bench --routing replay --trace $trace --budgets rtx4090,a100_40g --cases lru,spmoe,spmoe_er \
      --max-new-tokens 100 --out "$out/eviction_replay" ;;
  deepseek16)  # #4: DeepSeek-V2-Lite shape at 16 GiB with the int4 self-draft (8.7 GiB with its workspace)
    $bench --model deepseek_v2_lite --draft int4_self --routing model --budgets rtx4080 \
      --cases lru_nosd,lru,spmoe,spmoe_noworker,spmoe_all --max-new-tokens 100 --out "$out/deepseek16" ;;
  *) echo "unknown stage $stage; valid: replay_main replay_cutoff replay_baselines twin_main deepseek deepseek16 followup_replay paced_replay eviction_replay" >&2
     exit 2 ;;
esac
