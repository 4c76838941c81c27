"""
Expert bytes per emitted token against draft length k and cache size, on recorded routing, without a GPU.

    python -m experiments.draft_length_sim --traces results/real_pair/traces/humaneval_k1.npz \
        results/real_pair/traces/humaneval_k3.npz --slots 21,40,49,62,70 --out results/spmoe_plus/draft_length_sim

Each trace is replayed as `experiments.eviction_sim` replays it (a verify step of k + 1 positions per
trace row, the union of its routed experts per MoE layer, the draft's predictions before it for
`sd_lookahead`), through the engine's `ExpertCache` at each slot count and policy; without SD (`k = 0`
rows, from the first trace) each committed token is a forward of its own. Cells: misses x expert bytes /
emitted tokens, where a step emits its accepted drafts plus one. Prefill rows warm the cache and are not
counted. Demand misses only: prefetch and host-computed experts move fewer bytes in a run, alike for
every k, so the table ranks k and slot counts, it does not predict a run's bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from experiments.eviction_sim import demand_accesses, hinted_accesses, policy_misses
from spmoe.io import write_text_atomic
from spmoe.trace.oracle import belady_misses
from spmoe.trace.routing import RoutingTrace, load_trace


def emitted_tokens(trace: RoutingTrace) -> int:
    """Tokens the counted (decode) rows emit: accepted drafts + 1 per row."""
    counted = trace.row_step > 0
    return int((trace.row_accepted[counted] + 1).sum())


def bytes_per_token(trace: RoutingTrace, speculative: bool, num_layers: int, slots: list[int], policies: list[str],
                    expert_bytes: int) -> list[dict]:
    items = hinted_accesses(trace, num_layers) if speculative else demand_accesses(trace, num_layers, speculative=False)
    accesses = [item[-2:] for item in items if item[0] != "hint"]
    emitted = emitted_tokens(trace)
    k = int(trace.meta.get("spec_k") or 0) if speculative else 0
    rows = []
    for num_slots in slots:
        for policy in ["belady", *policies]:
            misses = belady_misses(accesses, num_slots) if policy == "belady" else policy_misses(
                items, num_slots, policy, num_layers)
            rows.append({"k": k, "slots": num_slots, "policy": policy, "experts_per_token": sum(
                c for _, c in accesses) / emitted, "misses_per_token": misses / emitted,
                "gb_per_token": misses * expert_bytes / emitted / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", nargs="+", default=["results/real_pair/traces/humaneval_k1.npz",
                                                    "results/real_pair/traces/humaneval_k3.npz"])
    ap.add_argument("--layers", type=int, default=32, help="MoE layers of the target the trace is mapped onto")
    ap.add_argument("--expert-bytes", type=int, default=3 * 4096 * 14336 * 2,
                    help="default: a Mixtral-8x7B expert, bf16")
    ap.add_argument("--slots", default="21,40,49,62,70")
    ap.add_argument("--policies", default="lru,expected_reuse,layer_distance,sd_lookahead")
    ap.add_argument("--out", default="results/spmoe_plus/draft_length_sim")
    args = ap.parse_args()
    slots = [int(s) for s in args.slots.split(",") if s]
    policies = args.policies.split(",")
    traces = [load_trace(t) for t in args.traces]
    ks = [int(t.meta.get("spec_k") or 0) for t in traces]
    if min(ks) < 1 or len(set(ks)) != len(ks):
        raise SystemExit(f"--traces: SD traces of distinct k >= 1 (k = 0 is derived from the first); got k = {ks}")
    rows = bytes_per_token(traces[0], False, args.layers, slots, [p for p in policies if p != "sd_lookahead"],
                           args.expert_bytes)
    for trace in traces:
        rows += bytes_per_token(trace, True, args.layers, slots, policies, args.expert_bytes)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out / "draft_length.csv", df.to_csv(index=False, float_format="%.4g"))
    wide = df.pivot_table(index=["k", "policy"], columns="slots", values="gb_per_token", sort=False)
    per_token = df.drop_duplicates("k").set_index("k")["experts_per_token"]
    head = (f"- traces: {', '.join(args.traces)} ({traces[0].meta.get('model')}, {traces[0].num_prompts} prompts),"
            f" mapped onto {args.layers} MoE layers; expert {args.expert_bytes / 1e6:.0f} MB\n"
            f"- experts a token's forwards need (union per verify step / emitted tokens): "
            + ", ".join(f"k = {k}: {v:.1f}" for k, v in per_token.items()) + "\n"
            "- cells: GB per emitted token of demand misses (k = 0: no SD), columns: expert slots\n\n")
    write_text_atomic(out / "draft_length.md", head + wide.to_markdown(floatfmt=".2f") + "\n")
    print(head + wide.to_string(float_format=lambda x: f"{x:.2f}"))


if __name__ == "__main__":
    main()
