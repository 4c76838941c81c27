"""
Eviction policies against Belady on recorded routing, without a GPU: the policy-efficiency half of
DESIGN.md section 5 (bytes moved / oracle bytes) for every policy at several cache sizes.

    python -m experiments.eviction_sim --trace results/real_pair/traces/humaneval_k1.npz \
        --layers 32 --slots 21,69 --nosd-slots 62,111 --out results/eviction_sim

The access sequence is what a demand-only run would ask of the cache: per forward (with SD a trace
row: a prefill or a verify step of k+1 positions; without SD each committed token) and per MoE
layer of the target, the union of the routed experts (layer l of an `--layers`-layer target reads
trace layer m(l) = floor(l L_t / L_r), as replay does). Prompts run back to back through one
cache, as in a run; prefill accesses warm the cache and are not counted, as in the oracle. Each
policy runs in the engine's `ExpertCache`, so the numbers are the bytes an `lru` / `spmoe` run
would move without prefetch (prefetch hits and waste shift them a little; the one-prompt GPU
`lru` / `lru_nosd` rows are within 0-7% of these ten-prompt ones).
With `--hints` (SD only) each verify row is preceded by the draft's recorded predictions for it, which
`sd_lookahead` reads (spmoe_plus's eviction). Writes `<out>/eviction.csv` and `<out>/eviction.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from spmoe.trace.oracle import belady_misses
from spmoe.io import write_text_atomic
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy, policy_names
from spmoe.trace.replay import map_layer
from spmoe.trace.routing import RoutingTrace, load_trace
from spmoe.types import ExpertKey


def demand_accesses(trace: RoutingTrace, num_layers: int, speculative: bool = True) -> list[tuple[ExpertKey, bool]]:
    """(key, counted) in run order: per forward, per target layer, the sorted union of routed experts.
    A forward is a trace row (SD), or without SD each committed position of a verify row (the last
    emitted token and the accepted drafts), one at a time, as the non-SD replay walks them."""
    pos, _ = trace.row_starts()
    layer_of = [map_layer(l, num_layers, trace.num_layers) for l in range(num_layers)]
    out = []
    for row in range(len(trace.row_step)):
        start, accepted = int(pos[row]), int(trace.row_accepted[row])
        if speculative or accepted < 0:
            forwards = [(start, start + int(trace.row_positions[row]))]
        else:
            forwards = [(start + j, start + j + 1) for j in range(accepted + 1)]
        counted = bool(trace.row_step[row] > 0)
        for lo, hi in forwards:
            routes = trace.routes[lo:hi]  # [T, L_r, A]
            for l, src in enumerate(layer_of):
                ids = sorted({int(e) for e in routes[:, src].flatten() if 0 <= e < trace.num_experts})
                out.extend(((l, e), counted) for e in ids)
    return out


def hinted_accesses(trace: RoutingTrace, num_layers: int, perfect: bool = False) -> list[tuple]:
    """The SD demand accesses as ('access', key, counted), each verify row preceded by the draft's
    predictions for it at every layer, ('hint', row, layer, predicted ids), as the draft produces them
    before verification (what `sd_lookahead` eviction reads). `perfect`: the hints of every decode row
    are the experts it will actually route (an oracle for the coming step, the best any one-step
    predictor could give)."""
    pos, draft0 = trace.row_starts()
    layer_of = [map_layer(l, num_layers, trace.num_layers) for l in range(num_layers)]
    out = []
    for row in range(len(trace.row_step)):
        start, counted = int(pos[row]), bool(trace.row_step[row] > 0)
        routes = trace.routes[start:start + int(trace.row_positions[row])]  # [T, L_t, A]
        routed = [sorted({int(e) for e in routes[:, src].flatten() if 0 <= e < trace.num_experts}) for src in layer_of]
        if perfect and counted:
            out.extend(("hint", row, l, ids) for l, ids in enumerate(routed))
        for j in range(0 if perfect else int(trace.row_drafted[row])):
            for l, src in enumerate(layer_of):
                out.append(("hint", row, l, [int(e) for e in trace.predicted[draft0[row] + j, src] if e >= 0]))
        for l, ids in enumerate(routed):
            out.extend(("access", (l, e), counted) for e in ids)
    return out


def policy_misses(items: list[tuple], num_slots: int, policy: str, num_layers: int) -> int:
    """Counted misses of `policy` over accesses (key, counted) or hinted items (`hinted_accesses`);
    hints reach policies that read predictions (`predict`), the others ignore them."""
    cache = ExpertCache(num_slots, 1, torch.float32, "cpu", make_policy(policy, range(num_layers)))
    predict = getattr(cache.policy, "predict", None)
    misses = 0
    for item in items:
        if item[0] == "hint":
            if predict is not None:
                predict(*item[1:])
            continue
        key, counted = item[-2:]
        if cache.lookup(key) is None:
            cache.admit(key)
            misses += counted
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="results/real_pair/traces/humaneval_k1.npz")
    ap.add_argument("--layers", type=int, default=32, help="MoE layers of the target the trace is mapped onto")
    ap.add_argument("--slots", default="21,69", help="slot counts of SD runs (24 / 40 GiB beside the draft)")
    ap.add_argument("--nosd-slots", default="62,111", help="slot counts of non-SD runs (24 / 40 GiB)")
    ap.add_argument("--policies", default=",".join(policy_names()))
    ap.add_argument("--hints", action="store_true",
                    help="SD rows carry the draft's predictions (for sd_lookahead); only the SD slot counts run")
    ap.add_argument("--perfect-hints", action="store_true",
                    help="with --hints: each decode row's hints are the experts it will route (a one-step oracle)")
    ap.add_argument("--out", default="results/eviction_sim")
    args = ap.parse_args()
    trace = load_trace(args.trace)
    policies = args.policies.split(",")
    rows, counted_of = [], {}
    for mode, slot_list in (("SD", args.slots), ("no-SD", "" if args.hints else args.nosd_slots)):
        if not slot_list:
            counted_of[mode] = None
            continue
        items = hinted_accesses(trace, args.layers, args.perfect_hints) if args.hints else demand_accesses(
            trace, args.layers, speculative=mode == "SD")
        accesses = [item[-2:] for item in items if item[0] != "hint"]
        counted = counted_of[mode] = sum(c for _, c in accesses)
        for slots in [int(s) for s in slot_list.split(",") if s]:
            oracle = belady_misses(accesses, slots)
            for policy in ["belady", *policies]:
                misses = oracle if policy == "belady" else policy_misses(items, slots, policy, args.layers)
                rows.append({"mode": mode, "slots": slots, "column": f"{mode} {slots}", "policy": policy,
                             "accesses": counted, "misses": misses, "miss_rate": misses / counted,
                             "policy_eff": misses / oracle})
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out / "eviction.csv", df.to_csv(index=False, float_format="%.4g"))
    wide = df.pivot(index="policy", columns="column", values="policy_eff")
    wide = wide.reindex(index=["belady", *policies], columns=list(dict.fromkeys(df["column"])))
    head = (f"- trace: {args.trace} ({trace.meta.get('model')}, k={trace.meta.get('spec_k')}, "
            f"{trace.num_prompts} prompts), mapped onto {args.layers} MoE layers\n"
            f"- counted accesses (decode forwards): SD {counted_of['SD']}, no-SD {counted_of['no-SD']}"
            + ("; SD rows carry " + ("the experts they will route (a one-step oracle)" if args.perfect_hints else
                                     "the draft's predictions") + " (sd_lookahead reads them)" if args.hints else "") + "\n"
            "- cells: policy efficiency = misses / Belady misses for the same accesses and slots\n\n")
    write_text_atomic(out / "eviction.md", head + wide.to_markdown(floatfmt=".3f") + "\n")
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
