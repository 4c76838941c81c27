"""
Host time of offloaded decode with the cache's victim shortcuts on and off, side by side in one process.

    python -m experiments.bench_host_overhead --model tiny_deepseek_v2 --hf n_routed_experts=64 \
        num_experts_per_tok=6 num_hidden_layers=27 --hardware cpu --card cpu --num-slots 200 \
        --methods lru_nosd moe_infinity_nosd --tokens 16 --prompts 2 --rounds 4 --out /tmp/host_overhead

Cases, on the layer-grouped path: `shortcut` (LRU names its victim with `victim_where`, scanning its keys
in touch order; layer_distance scores only the farthest layer with an evictable key; MoE-Infinity's
priority victim computes each layer's factors once per call; expected_reuse and sd_lookahead take each layer's
best key from a heap, `spmoe.offload.layer_heaps`) and `listed` (the cache lists every
evictable key and the policy scores each with its plain rule), the rules the engine used before the
shortcuts. A method may name another eviction policy: `lru_nosd@layer_distance`. Rounds interleave (shortcut listed listed shortcut ...) after one warm-up
each; the machine's other load inflates some rounds, so the table gives the minimum beside the median.
"CPU ms/token" = the process's CPU time (`time.process_time`) per generated token with torch on one
thread (`--threads`): on a shared machine it moves far less with others' load than wall time.
Prefetch runs inline, so hit/miss counts are deterministic and must agree. Writes
`host_overhead.csv` and `table.md` under --out and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from experiments.bench_layer_grouped import generate, method_case
from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig
from spmoe.offload.eviction import ExpectedReusePolicy, LayerDistancePolicy, LruPolicy
from spmoe.offload.eviction_lookahead import SdLookaheadPolicy
from spmoe.offload.eviction_priority import PriorityPolicy
from spmoe.session import open_session

log = logging.getLogger("bench_host_overhead")


def _listed_priority_victim(self: PriorityPolicy, candidates):
    with self._lock:
        return min(candidates, key=lambda k: (self.score(k), self._last_use.get(k, 0)))


SHORTCUTS = [(LruPolicy, "victim_where", None), (LayerDistancePolicy, "victim_by_layer", None),
             (ExpectedReusePolicy, "victim_by_layer", None), (SdLookaheadPolicy, "victim_by_layer", None),
             (PriorityPolicy, "victim", _listed_priority_victim)]


@contextlib.contextmanager
def listed_victims():
    """The `listed` case: no LRU, layer_distance, expected_reuse or sd_lookahead shortcut, MoE-Infinity's victim
    through `score` per key."""
    saved = [(cls, name, cls.__dict__[name]) for cls, name, _ in SHORTCUTS]
    for cls, name, listed in SHORTCUTS:
        setattr(cls, name, listed)
    try:
        yield
    finally:
        for cls, name, value in saved:
            setattr(cls, name, value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_deepseek_v2")
    ap.add_argument("--hf", nargs="*", default=[], metavar="KEY=INT")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--hardware", default="cpu")
    ap.add_argument("--card", default="cpu")
    ap.add_argument("--methods", nargs="+", default=["lru_nosd", "moe_infinity_nosd"])
    ap.add_argument("--num-slots", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="/tmp/host_overhead")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card, model = load_preset("hardware", args.card), load_preset("model", args.model)
    if args.hf:
        model = replace(model, hf_config={**model.hf_config, **{k: int(v) for k, v in (kv.split("=") for kv in args.hf)}})
    cfg = RunConfig(model=model, draft=load_preset("draft", "none"), dataset=load_preset("dataset", args.dataset),
                    method=MethodConfig(name="gpu_resident"), hardware=load_preset("hardware", args.hardware),
                    routing=RoutingConfig(name="model"), spec=SpecConfig(num_draft_tokens=3),
                    num_prompts=args.prompts, check_lossless="false", max_new_tokens=args.tokens)
    cases = {}
    for spec in args.methods:
        name, _, eviction = spec.partition("@")
        method, hw = method_case(name, card, args.num_slots, False)
        cases[spec] = (replace(method, eviction=eviction) if eviction else method, hw)
    session = open_session(cfg, [replace(cfg, method=m, hardware=hw) for m, hw in cases.values()])
    rows: list[dict] = []
    try:
        for spec, (method, hw) in cases.items():
            for case in ("shortcut", "listed"):  # warm-up
                with listed_victims() if case == "listed" else contextlib.nullcontext():
                    generate(session, method, hw, min(8, args.tokens), 1, 3, "graphed")
            for r in range(args.rounds):
                for case in (("shortcut", "listed") if r % 2 == 0 else ("listed", "shortcut")):
                    with listed_victims() if case == "listed" else contextlib.nullcontext():
                        cpu0 = time.process_time()
                        res = generate(session, method, hw, args.tokens, args.prompts, 3, "graphed")
                        cpu_s = time.process_time() - cpu0
                    res["cpu_ms_per_token"] = cpu_s * 1e3 / (args.tokens * args.prompts)
                    rows.append({"method": spec, "case": case, "round": r, **res})
                    log.info("%s %s round %d: host %.2f ms/step, CPU %.2f ms/token", spec, case, r,
                             res["host_ms_per_step"], res["cpu_ms_per_token"])
    finally:
        session.close()
    same = {spec: len({(str(r["tokens"]), r["hits"], r["misses"]) for r in rows if r["method"] == spec}) == 1
            for spec in cases}
    keys = ["method", "case", "round", "tpot_ms", "host_ms_per_step", "cpu_ms_per_token", "hits", "misses"]
    (out / "host_overhead.csv").write_text("\n".join([",".join(keys)] + [
        ",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    lines = ["| method | case | CPU ms/token (median) | spread | host ms/step (median) | min | hits | misses |"
             " tokens and counts equal |", "|---|---|---|---|---|---|---|---|---|"]
    for spec in cases:
        for case in ("listed", "shortcut"):
            rs = [r for r in rows if r["method"] == spec and r["case"] == case]
            host, cpu = [r["host_ms_per_step"] for r in rs], [r["cpu_ms_per_token"] for r in rs]
            med = statistics.median(cpu)
            lines.append(f"| {spec} | {case} | {med:.2f} | {(max(cpu) - min(cpu)) / med:.3f} | "
                         f"{statistics.median(host):.2f} | {min(host):.2f} | {rs[0]['hits']} | {rs[0]['misses']} | "
                         f"{same[spec]} |")
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
