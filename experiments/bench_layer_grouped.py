"""
Offloaded decode with the layer-grouped experts path on and off (`OffloadedExperts.layer_grouped`,
spmoe.offload.layer_slots): ms per token, host ms per step, aten operators per decode step, and
whether the two paths emit the same tokens and the same hit/miss counts.

    python -m experiments.bench_layer_grouped --model deepseek_v2_lite --hardware h200 --card rtx4080 \
        --methods lru_nosd:graphs lru_nosd --tokens 32 --rounds 2 --out $OUT/layer_grouped        # H200
    python -m experiments.bench_layer_grouped --model tiny_deepseek_v2 --dataset synthetic --hardware cpu \
        --card cpu --num-slots 6 --methods lru_nosd --tokens 16 --out /tmp/layer_grouped        # CPU

"route sync ms/token" = host time in the per-layer routes' device->host copy (`OffloadedExperts.route_sync_s`):
on a GPU it waits for the device (the previous graph segment, and the copies the compute stream waits
on), and it is part of "host ms/step", which is a step's time minus the final logits' sync only.

One process, one session (random weights). Per `method[:decode]` up to three cases (`--cases`):
`graphed` (pinned layers through `serve_layer`, their expert kernels as call-site CUDA graphs under
piecewise graphs, `OffloadedExperts.graph_experts`), `grouped` (the same, kernels launched eagerly) and
`loop` (one expert at a time, `layer_grouped` off), run in interleaved rounds (A B C C B A ...) after one
warm-up generation each (which also captures the graphs); tokens are compared with loop's of the same
round. Aten operators per step: one eager one-token decode forward
after a prefill, counted by a TorchDispatchMode (`experiments.hf_anchor.ops_per_decode_step`), on
the method's runtime (its evicting cache). With --floor, `gpu_resident[:decode]` without a budget
is timed too and efficiency = TPOT / (H2D bytes per token / link + that TPOT). With --profile, one
more generation of the first case per method runs with perf_counter sections and one under cProfile after the
timed rounds (so the timings are unprofiled); `profile.md` gets both (`experiments.host_profile`). Writes
`layer_grouped.csv` (one row per case and round) and `table.md` under --out; prints the table last.
A card's budget emulates a smaller card: reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import pstats
import statistics
from dataclasses import replace
from pathlib import Path

from experiments.hf_anchor import ops_per_decode_step
from experiments.host_profile import report, sections, sections_table
from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig
from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts
from spmoe.session import open_session
from spmoe.strategy import MethodContext
from spmoe.trace.metrics import summarize

log = logging.getLogger("bench_layer_grouped")


def method_case(spec: str, card, num_slots: int | None, worker_thread: bool) -> tuple[MethodConfig, object]:
    """'method[:decode]' -> (method config, hardware config at the card with that decode)."""
    name, decode = (spec.split(":") + ["eager"])[:2]
    method = replace(load_preset("method", name), num_slots=num_slots, worker_thread=worker_thread)
    return method, replace(card, decode=decode)


CASES = {"graphed": (True, True), "grouped": (True, False), "loop": (False, False)}  # (layer_grouped, graph_experts)


@contextlib.contextmanager
def switches(case: str):
    """The experts path of `case`: graphed (pinned layers' kernels as site graphs under piecewise graphs),
    grouped (one grouped launch per pinned layer), loop (one expert at a time)."""
    OffloadedExperts.layer_grouped, OffloadedExperts.graph_experts = CASES[case]
    try:
        yield
    finally:
        OffloadedExperts.layer_grouped, OffloadedExperts.graph_experts = True, True


def ops_per_step(session, method: MethodConfig, hw, case: str) -> int:
    """Aten operators of one eager decode step on `method`'s runtime at `hw` (its evicting cache)."""
    spec = get_strategy(method.name)
    ctx = MethodContext(replace(session.cfg, method=method, hardware=hw), session.target, session.device,
                        session.plan(hw, method.name), session.draft if spec.speculative else None)
    runtime = spec.build(ctx)
    try:
        with switches(case):
            return ops_per_decode_step(session, session.prompts[0])
    finally:
        runtime.close()


def _offloaded(session) -> list[OffloadedExperts]:
    return [m for m in session.target.model.modules() if isinstance(m, OffloadedExperts)]


def generate(session, method: MethodConfig, hw, tokens: int, prompts: int, k: int, case: str) -> dict:
    for m in _offloaded(session):  # modules built during the generation start at 0 too
        m.route_sync_s = 0.0
    with switches(case):
        gens, plan, _ = session.generate(method, hw, tokens, num_prompts=prompts, spec_cfg=SpecConfig(num_draft_tokens=k))
    sync_s = sum(m.route_sync_s for m in _offloaded(session))
    m = summarize([g.records for g in gens])
    num_tokens = sum(len(g.token_ids) for g in gens)
    return {"tpot_ms": m["tpot_ms"], "host_ms_per_step": m["host_ms_per_step"],
            "route_sync_ms_per_token": sync_s * 1e3 / max(num_tokens, 1),
            "sync_wait_ms_per_step": m["sync_wait_ms_per_step"], "stall_ms": m["stall_ms"],
            "h2d_gb_per_token": (m["h2d_bytes_per_token"] or 0) / 1e9, "hits": m["expert_hits"],
            "misses": m["expert_misses"], "num_slots": plan.num_slots, "tokens": [g.token_ids for g in gens]}


def table(rows: list[dict], card) -> str:
    lines = [f"card: {card.name}{' (emulated budget)' if card.emulated else ''}", "",
             ("| method | case | TPOT ms (median) | spread | host ms/step | route sync ms/token | sync wait ms/step |"
              " stall ms | H2D GB/token | efficiency | aten ops/step | hits | misses | tokens == loop |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["case"]), []).append(r)
    for (method, case), rs in groups.items():
        t = [r["tpot_ms"] for r in rs]
        med = statistics.median(t)
        eff = [r["efficiency"] for r in rs if r.get("efficiency") is not None]
        lines.append(f"| {method} | {case} | {med:.2f} | {(max(t) - min(t)) / med:.3f} | "
                     f"{statistics.median(r['host_ms_per_step'] for r in rs):.2f} | "
                     f"{statistics.median(r['route_sync_ms_per_token'] for r in rs):.2f} | "
                     f"{statistics.median(r['sync_wait_ms_per_step'] for r in rs):.2f} | "
                     f"{statistics.median(r['stall_ms'] for r in rs):.1f} | {rs[0]['h2d_gb_per_token']:.3f} | "
                     f"{statistics.median(eff) if eff else float('nan'):.2f} | {rs[0].get('ops_per_step', '')} | "
                     f"{rs[0]['hits']} | {rs[0]['misses']} | {all(r.get('same_tokens', True) for r in rs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek_v2_lite")
    ap.add_argument("--hf", nargs="*", default=[], metavar="KEY=INT",
                    help="integer overrides of the model preset's hf_config (e.g. a tiny model with 64 experts)")
    ap.add_argument("--draft", default="none")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--hardware", default="h200", help="the device the session opens on")
    ap.add_argument("--card", default="rtx4080", help="hardware preset of the offloaded cases (its budget)")
    ap.add_argument("--methods", nargs="+", default=["lru_nosd:graphs"], help="method[:decode]")
    ap.add_argument("--num-slots", type=int, default=None, help="cap on expert slots (default: the card's plan)")
    ap.add_argument("--inline-prefetch", action="store_true",
                    help="prefetch on the main thread (deterministic counts) instead of the worker thread")
    ap.add_argument("--floor", default=None, help="e.g. graphs: time gpu_resident with that decode, no budget")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--link-gb-per-s", type=float, default=None, help="default: the card's paced PCIe")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                    help="experts paths, timed in rounds A B C C B A; tokens are compared with loop's")
    ap.add_argument("--profile", action="store_true", help="profile one more generation of the first case per method")
    ap.add_argument("--out", default="results/layer_grouped")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = load_preset("hardware", args.card)
    model = load_preset("model", args.model)
    if args.hf:
        model = replace(model, hf_config={**model.hf_config, **{k: int(v) for k, v in (kv.split("=") for kv in args.hf)}})
    cfg = RunConfig(model=model, draft=load_preset("draft", args.draft),
                    dataset=load_preset("dataset", args.dataset), method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", args.hardware), routing=RoutingConfig(name="model"),
                    spec=SpecConfig(num_draft_tokens=args.k), num_prompts=args.prompts, check_lossless="false",
                    max_new_tokens=args.tokens)
    cases = {spec: method_case(spec, card, args.num_slots, not args.inline_prefetch) for spec in args.methods}
    session = open_session(cfg, [replace(cfg, method=m, hardware=hw) for m, hw in cases.values()])
    rows: list[dict] = []
    profiles: list[str] = []
    try:
        floor_ms = None
        if args.floor:
            hw = replace(cfg.hardware, gpu_budget_gib=None, decode=args.floor)
            generate(session, MethodConfig(name="gpu_resident"), hw, min(8, args.tokens), 1, args.k, "graphed")
            floor_ms = generate(session, MethodConfig(name="gpu_resident"), hw, args.tokens, args.prompts, args.k,
                                "graphed")["tpot_ms"]
            log.info("gpu_resident:%s %.2f ms/token", args.floor, floor_ms)
        link = args.link_gb_per_s or card.pcie_gb_per_s
        for spec, (method, hw) in cases.items():
            ops = {case: ops_per_step(session, method, hw, case) for case in args.cases}
            log.info("%s aten operators per decode step: %s", spec, ops)
            for case in args.cases:  # warm-up, graph capture
                generate(session, method, hw, min(8, args.tokens), 1, args.k, case)
            loop_tokens = {}
            for r in range(args.rounds):
                for case in (args.cases if r % 2 == 0 else args.cases[::-1]):
                    res = generate(session, method, hw, args.tokens, args.prompts, args.k, case)
                    if case == "loop":
                        loop_tokens[r] = res["tokens"]
                    eff = None
                    if floor_ms is not None and link:
                        eff = res["tpot_ms"] / (res["h2d_gb_per_token"] / link * 1e3 + floor_ms)
                    rows.append({"method": spec, "case": case, "round": r, "ops_per_step": ops[case],
                                 "efficiency": eff, **{k: v for k, v in res.items() if k != "tokens"},
                                 "_tokens": res["tokens"]})
                    log.info("%s %s round %d: %.2f ms/token, host %.2f ms/step", spec, case, r, res["tpot_ms"],
                             res["host_ms_per_step"])
            for row in rows:
                if row["method"] == spec and row["case"] != "loop" and row["round"] in loop_tokens:
                    row["same_tokens"] = row["_tokens"] == loop_tokens[row["round"]]
            if args.profile:
                case = args.cases[0]
                with sections({}) as totals_s:
                    generate(session, method, hw, args.tokens, args.prompts, args.k, case)
                profiles.append(sections_table(totals_s, args.tokens * args.prompts, f"{spec} {case}"))
                prof = cProfile.Profile()
                prof.runcall(generate, session, method, hw, args.tokens, args.prompts, args.k, case)
                profiles.append(report(pstats.Stats(prof), args.tokens * args.prompts, f"{spec} {case}"))
    finally:
        session.close()
    for row in rows:
        row.pop("_tokens", None)
    keys = sorted({k for r in rows for k in r})
    (out / "layer_grouped.csv").write_text("\n".join([",".join(keys)] + [
        ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]) + "\n")
    if profiles:
        (out / "profile.md").write_text("\n\n".join(profiles) + "\n")
        print("\n\n".join(profiles))
    text = table(rows, card)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
