"""
The human-readable digest of a run summary: a few lines printed before the JSON line.

Invariants: every number comes from the summary dict (nothing is recomputed); a run whose cache
holds every expert says so, since it measures no offloading; emulated cards and replayed routing
are labelled.
"""

from __future__ import annotations


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def _bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def digest(s: dict) -> list[str]:
    if "error" in s:
        return [f"== {s['case']}: FAILED: {s['error']}"]
    if "skipped" in s:
        return [f"== {s['case']}: SKIPPED: {s['skipped']}"]
    name = s.get("case") or s["method"]
    card = s["hardware"] + (" (emulated" + (f", PCIe paced to {s['pcie_paced_gb_per_s']} GB/s" if s.get(
        "pcie_paced_gb_per_s") else "") + f" on {s['device']})" if s.get("hardware_emulated") else f" ({s['device']})")
    routing = "replayed routing" if s.get("routing") == "replay" else "the model's routing"
    lines = [f"== {name}: {s['method']} on {s['model']} ({s['weights']} weights, {routing}), draft {s.get('draft')},"
             f" {s['dataset']} x {s['num_prompts']} prompts x {s['max_new_tokens']} tokens, {card}"]
    rounds = s.get("rounds") or 1
    spread = f" [{_fmt(s.get('tpot_ms_min'), '.1f')}..{_fmt(s.get('tpot_ms_max'), '.1f')} over {rounds} rounds]" \
        if rounds > 1 else ""
    lines.append(f"   TPOT {_fmt(s.get('tpot_ms'), '.2f')} ms{spread} (p50 {_fmt(s.get('tpot_p50_ms'), '.2f')},"
                 f" p90 {_fmt(s.get('tpot_p90_ms'), '.2f')}), TTFT {_fmt(s.get('ttft_ms'), '.1f')} ms,"
                 f" {_fmt(s.get('tokens_per_s'), '.1f')} tokens/s")
    if s.get("acceptance_rate") is not None:
        lines.append(f"   SD: k={s.get('num_draft_tokens')}, acceptance {s['acceptance_rate']:.3f},"
                     f" mean acceptance length {_fmt(s.get('mean_acceptance_length'), '.2f')}")
    if s.get("cache_holds_all_experts"):
        lines.append(f"   NOTE: the cache holds all {s['num_experts_total']} experts: nothing is offloaded"
                     " (set a card with a budget, or method.num_slots)")
    else:
        lines.append(f"   experts: {s['num_slots']} slots for {s['num_experts_total']}; hits {s.get('expert_hits')},"
                     f" misses {s.get('expert_misses')}, prefetch hits {s.get('prefetch_hits')}"
                     f" (late {s.get('late_prefetches')}, wasted {s.get('wasted_prefetches')});"
                     f" H2D {_bytes(s.get('h2d_bytes_per_token'))}/token,"
                     f" stall {_fmt(s.get('stall_ms'), '.0f')} ms")
    if s.get("gpu_budget_bytes"):
        lines.append(f"   memory: peak {_bytes(s.get('peak_gpu_bytes'))} of a {_bytes(s['gpu_budget_bytes'])} budget"
                     + (" (emulated card)" if s.get("hardware_emulated") else ""))
    reason = s.get("lossless_reason")
    lines.append(f"   lossless: {s.get('lossless')}" + (f" ({reason})" if reason else ""))
    return lines
