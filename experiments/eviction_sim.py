"""
Eviction policies against Belady on recorded routing, without a GPU: the policy-efficiency half of
DESIGN.md section 5 (bytes moved / oracle bytes) for every policy at several cache sizes.

    python -m experiments.eviction_sim --trace results/real_pair/traces/humaneval_k1.npz \
        --layers 32 --slots 21,69,111 --out results/eviction_sim

The access sequence is what a demand-only SD run would ask of the cache: per trace row (a prefill
or a verify step of k+1 positions) and per MoE layer of the target, the union of the routed
experts (layer l of an `--layers`-layer target reads trace layer m(l) = floor(l L_t / L_r), as
replay does). Prompts run back to back through one cache, as in a run; prefill accesses warm the
cache and are not counted, as in the oracle. Each policy runs in the engine's `ExpertCache`, so
the numbers are the bytes an `lru` / `spmoe` run would move without prefetch (prefetch hits and
waste shift them a little: the GPU's `lru` rows match these to 1%).
Writes `<out>/eviction.csv` and `<out>/eviction.md`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from analysis.oracle import belady_misses
from spmoe.io import write_text_atomic
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import POLICIES, make_policy
from spmoe.trace.replay import map_layer
from spmoe.trace.routing import RoutingTrace, load_trace
from spmoe.types import ExpertKey


def demand_accesses(trace: RoutingTrace, num_layers: int) -> list[tuple[ExpertKey, bool]]:
    """(key, counted) in run order: per row, per target layer, the sorted union of routed experts."""
    pos, _ = trace.row_starts()
    layer_of = [map_layer(l, num_layers, trace.num_layers) for l in range(num_layers)]
    out = []
    for row in range(len(trace.row_step)):
        routes = trace.routes[pos[row]: pos[row] + trace.row_positions[row]]  # [T, L_r, A]
        counted = bool(trace.row_step[row] > 0)
        for l, src in enumerate(layer_of):
            ids = sorted({int(e) for e in routes[:, src].flatten() if 0 <= e < trace.num_experts})
            out.extend(((l, e), counted) for e in ids)
    return out


def policy_misses(accesses: list[tuple[ExpertKey, bool]], num_slots: int, policy: str, num_layers: int) -> int:
    cache = ExpertCache(num_slots, 1, torch.float32, "cpu", make_policy(policy, range(num_layers)))
    misses = 0
    for key, counted in accesses:
        if cache.lookup(key) is None:
            cache.admit(key)
            misses += counted
    return misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default="results/real_pair/traces/humaneval_k1.npz")
    ap.add_argument("--layers", type=int, default=32, help="MoE layers of the target the trace is mapped onto")
    ap.add_argument("--slots", default="21,69,111")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--out", default="results/eviction_sim")
    args = ap.parse_args()
    trace = load_trace(args.trace)
    accesses = demand_accesses(trace, args.layers)
    counted = sum(c for _, c in accesses)
    rows = []
    for slots in [int(s) for s in args.slots.split(",")]:
        oracle = belady_misses(accesses, slots)
        rows.append({"slots": slots, "policy": "belady", "misses": oracle, "miss_rate": oracle / counted,
                     "policy_eff": 1.0})
        for policy in args.policies.split(","):
            misses = policy_misses(accesses, slots, policy, args.layers)
            rows.append({"slots": slots, "policy": policy, "misses": misses, "miss_rate": misses / counted,
                         "policy_eff": misses / oracle})
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out / "eviction.csv", df.to_csv(index=False, float_format="%.4g"))
    wide = df.pivot(index="policy", columns="slots", values="policy_eff").reindex(["belady", *args.policies.split(",")])
    head = (f"- trace: {args.trace} ({trace.meta.get('model')}, k={trace.meta.get('spec_k')}, "
            f"{trace.num_prompts} prompts), mapped onto {args.layers} MoE layers\n"
            f"- counted accesses (verify steps): {counted}; cells: policy efficiency = misses / Belady misses\n\n")
    write_text_atomic(out / "eviction.md", head + wide.to_markdown(floatfmt=".3f") + "\n")
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
