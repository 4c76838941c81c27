"""
Summary metrics from step records (DESIGN.md section 5).

- TPOT per prompt = (t of the last token - t of the first token) / (generated tokens - 1):
  prefill excluded (that is TTFT). Reported as the mean over prompts and p50/p90 across prompts.
- Expert events (hit, prefetch hit, late prefetch, miss; disjoint), H2D bytes, copy and stall
  time: decode steps only (prefill traffic is
  reported under `prefill_*`). `h2d_gb_per_s` = decode H2D bytes / time the copy engine spent
  copying them (the achieved bandwidth during loads).
- Acceptance rate = accepted / drafted; mean acceptance length = 1 + accepted / verify steps.
- Hit rate = (hits + prefetch hits) / needed. Prefetch coverage = (prefetch hits + late) /
  needed; waste = wasted / issued prefetches; predictor recall = |predicted & needed| / |needed|
  over predicted layers; top-1 accuracy per verify position the predictor covered.
- Host time per decode step = step wall time - time the host sat blocked on the device for the
  target's logits (`sync_wait_ms`): the host's own work (Python, launches, in-step syncs such as
  the per-expert path's routing copy). A step whose wait is near zero is host-bound: the device
  finished before the host did. `tpot_prompt_spread` = (max - min) / median of per-prompt TPOT.
- Unique experts per layer-step: distinct experts one decode/verify forward needed at one MoE
  layer (top_k without SD; up to the union of k+1 tokens' experts with SD).
"""

from __future__ import annotations

import statistics

from spmoe.trace.records import StepRecord


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(records_by_prompt: list[list[StepRecord]]) -> dict:
    tpots, ttfts = [], []
    decode_tokens, decode_ms = 0, 0.0
    hits = misses = h2d = pre_h2d = pre_misses = 0
    copy_ms = stall_ms = 0.0
    drafted = accepted = verify_steps = 0
    needed_per_layer: list[int] = []
    pf_hits = late = prefetched = dropped = wasted = 0
    top1 = {"ok": 0, "n": 0}
    top1_layer: dict[int, list[int]] = {}
    recall_hit = recall_n = 0
    host_ms: list[float] = []
    wait_ms: list[float] = []
    for records in records_by_prompt:
        prefill, decode = records[0], records[1:]
        n = sum(r.num_emitted for r in records)
        ttfts.append(prefill.t_ms)
        if n > 1:
            tpots.append((records[-1].t_ms - prefill.t_ms) / (n - 1))
            decode_tokens += n - 1
            decode_ms += records[-1].t_ms - prefill.t_ms
        pre_h2d += prefill.h2d_bytes
        pre_misses += sum(len(ev.misses) for ev in prefill.layers)
        wasted += sum(r.num_wasted for r in records)
        for r in decode:
            prefetched += r.num_prefetched
            dropped += r.num_dropped
            for ev in r.layers:
                pf_hits += len(ev.prefetch_hits)
                late += len(ev.late)
                if ev.predicted is not None:
                    recall_hit += len(set(ev.predicted) & set(ev.needed))
                    recall_n += len(ev.needed)
                if ev.top1_total:
                    top1["ok"] += ev.top1_correct
                    top1["n"] += ev.top1_total
                    acc = top1_layer.setdefault(ev.layer, [0, 0])
                    acc[0] += ev.top1_correct
                    acc[1] += ev.top1_total
            host_ms.append(r.step_ms - r.sync_wait_ms)
            wait_ms.append(r.sync_wait_ms)
            h2d += r.h2d_bytes
            copy_ms += r.copy_ms
            stall_ms += r.stall_ms
            hits += sum(len(ev.hits) for ev in r.layers)
            misses += sum(len(ev.misses) for ev in r.layers)
            needed_per_layer.extend(len(ev.needed) for ev in r.layers)
            if r.num_drafted is not None:
                drafted += r.num_drafted
                accepted += r.num_accepted or 0
                verify_steps += 1
    spec = verify_steps > 0
    needed = hits + misses + pf_hits + late
    prefetch = {}
    if prefetched or recall_n:
        prefetch = {
            "predictor_top1_accuracy": top1["ok"] / top1["n"] if top1["n"] else None,
            "predictor_recall": recall_hit / recall_n if recall_n else None,
            "predictor_top1_by_layer": {layer: ok / n for layer, (ok, n) in sorted(top1_layer.items())},
            "prefetch_coverage": (pf_hits + late) / needed if needed else None,
            "prefetch_waste": wasted / prefetched if prefetched else None,
            "prefetches_issued": prefetched,
            "prefetches_dropped": dropped,
        }
    return {
        "num_prompts": len(records_by_prompt),
        "num_generated_tokens": sum(sum(r.num_emitted for r in rs) for rs in records_by_prompt),
        "tpot_ms": statistics.fmean(tpots) if tpots else None,
        "tpot_p50_ms": _percentile(tpots, 0.5) if tpots else None,
        "tpot_p90_ms": _percentile(tpots, 0.9) if tpots else None,
        "tpot_prompt_spread": (max(tpots) - min(tpots)) / statistics.median(tpots) if tpots and statistics.median(tpots) > 0 else None,
        "host_ms_per_step": statistics.fmean(host_ms) if host_ms else None,
        "sync_wait_ms_per_step": statistics.fmean(wait_ms) if wait_ms else None,
        "ttft_ms": statistics.fmean(ttfts),
        "tokens_per_s": decode_tokens / decode_ms * 1e3 if decode_ms > 0 else None,
        "acceptance_rate": accepted / drafted if spec and drafted else None,
        "mean_acceptance_length": 1 + accepted / verify_steps if spec else None,
        "unique_experts_per_layer_step": statistics.fmean(needed_per_layer) if needed_per_layer else None,
        "expert_hits": hits,
        "expert_misses": misses,
        "expert_hit_rate": (hits + pf_hits) / needed if needed else None,
        "prefetch_hits": pf_hits,
        "late_prefetches": late,
        "wasted_prefetches": wasted,
        "h2d_bytes": h2d,
        "h2d_bytes_per_token": h2d / decode_tokens if decode_tokens else None,
        "h2d_gb_per_s": h2d / copy_ms / 1e6 if copy_ms > 0 else None,
        "copy_ms": copy_ms,
        "stall_ms": stall_ms,
        "prefill_h2d_bytes": pre_h2d,
        "prefill_expert_misses": pre_misses,
        **prefetch,
    }
