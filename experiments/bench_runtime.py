"""
Runtime benchmark (GPU; runs on the CPU with tiny presets): the engine's decode against
transformers' own `generate` on the same weights, eager against CUDA-graph decode
(`hardware.decode`), offloaded methods at an emulated card, and the tie-aware lossless check.

    python -m experiments.bench_runtime --models mixtral deepseek_v2_lite --drafts mistral_7b none \
        --cards none --out results/runtime/graphs                       # H200
    python -m experiments.bench_runtime --models tiny --drafts tiny --hardware cpu --cards tiny_card \
        --tokens 6 --offload-tokens 4 --lossless-tokens 8 --out /tmp/bench   # CPU smoke run

One process; per model one session (random weights), closed before the next. Phase 1, every
expert resident (one gpu_resident runtime held for the phase), cases in interleaved rounds
(A B C C B A ...) after one warm-up generation each (which also captures the graphs):
`engine_eager` (the engine, dynamic KV cache; experts as one grouped matmul per layer, no host
sync), `engine_graphs` (the same over a static KV cache, each decode step a CUDA graph replay),
`engine_graphs_torch` (the same with torch's grouped GEMM for the experts instead of the Triton
decode kernels, `hardware.expert_kernel=torch`), `hf_eager` (transformers' generate with its eager experts module on the same device slots,
`experiments.hf_anchor`), and
with a draft `engine_eager_sd` / `engine_graphs_sd` (k = --k; draft and target both graphed);
optional `engine_static` and `engine_loop` (experts one at a time). Then the forward phase: one
target forward of T = --forward-tokens positions (a verify of T - 1 drafts) after the first
prompt, per decoder (eager, static, graphs) in interleaved rounds, with the graphs' logits compared
bit for bit with the static decoder's. Then the lossless check (`spmoe.trace.lossless`, one
reference per model) of the engine cases. Phase 2 (`--cards`, a GPU budget emulating a smaller
card): `lru_nosd`, `lru`, `spmoe` (or `method:decode` cases, e.g. `lru_nosd:graphs`) in
interleaved rounds with runtime efficiency = TPOT / (H2D bytes per token / link bandwidth + the
resident engine's TPOT, the graphed one's when it ran). Writes `runtime.csv` (one row per
model, case and round), `table.md` and `lossless.json` under --out, and prints the table last.
Budgets emulate smaller cards: reported as such.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from experiments.hf_anchor import HFExperts, hf_generate, ops_per_decode_step
from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig
from spmoe.engine import Engine
from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts
from spmoe.runtime import moe_gemv
from spmoe.runtime.decoder import make_decoder
from spmoe.session import open_session
from spmoe.spec.drafter import ModelDrafter
from spmoe.strategy import MethodContext
from spmoe.trace.lossless import ReferenceRuntime, check_lossless
from spmoe.trace.metrics import summarize

log = logging.getLogger("bench_runtime")


def engine_generate(engine: Engine, prompts, num_tokens: int, grouped: bool = True, kernel: str = "auto") -> dict:
    """`kernel`: the expert kernel (`hardware.expert_kernel`) while this engine decodes; its graphs are captured
    under it, so an engine keeps one kernel for all its calls."""
    OffloadedExperts.grouped = grouped
    moe_gemv.use(kernel)
    replays_before = _replays(engine)
    try:
        gens = [engine.generate(p.token_ids, num_tokens, i) for i, p in enumerate(prompts)]
    finally:
        OffloadedExperts.grouped = True
        moe_gemv.use("auto")
    m = summarize([g.records for g in gens])
    return {"tpot_ms": m["tpot_ms"], "host_ms_per_step": m["host_ms_per_step"],
            "sync_wait_ms_per_step": m["sync_wait_ms_per_step"], "graph_replays": _replays(engine) - replays_before,
            "tokens": [g.token_ids for g in gens], "gens": gens}


def _replays(engine: Engine) -> int:
    draft = engine.drafter.decoder if engine.drafter is not None else None
    return sum(d.num_replays for d in (engine.decoder, draft) if d is not None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush(rows: list[dict], out: Path) -> None:
    """runtime.csv rewritten after every row, so a run cut short keeps what it measured."""
    keys = sorted({k for r in rows for k in r})
    (out / "runtime.csv").write_text("\n".join([",".join(keys)] + [
        ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]) + "\n")


def engine_cases(session, runtime, args) -> dict:
    """Case name -> fn(num_tokens, prompts) -> result dict, for the cases asked for and possible here."""
    device, spec = session.device, SpecConfig(num_draft_tokens=args.k)
    engines = {"engine_eager": Engine(runtime, device), "engine_loop": Engine(runtime, device),
               "engine_static": Engine(runtime, device, decode="static"),
               "engine_graphs": Engine(runtime, device, decode="graphs"),
               "engine_graphs_torch": Engine(runtime, device, decode="graphs")}
    if session.draft is not None:
        for mode in ("eager", "graphs"):
            drafter = ModelDrafter(session.draft, device, 0.0, 1.0, decode=mode)
            engines[f"engine_{mode}_sd"] = Engine(runtime, device, drafter, spec, decode=mode)
    longest = max(len(p.token_ids) for p in session.prompts)
    for e in engines.values():  # one cache size for every prompt and length: graphs are captured once
        e.reserve(longest, max(args.tokens, args.lossless_tokens))
    run = {name: (lambda n, ps, e=e, g=name != "engine_loop", k="torch" if name.endswith("_torch") else "auto":
                  engine_generate(e, ps, n, g, k)) for name, e in engines.items()}

    def hf(n, ps):
        with HFExperts(session, runtime.cache, "eager"):
            return hf_generate(session, ps, n)

    run["hf_eager"] = hf
    return run


def timed_cases(run: dict, args) -> list[str]:
    extra = [c for c in ("engine_eager_sd", "engine_graphs_sd") if c in run] if args.sd else []
    return [c for c in list(args.cases) + extra if c in run]


def resident_phase(session, args, rows: list[dict], model: str) -> dict:
    """Phase 1 and the forward phase on one gpu_resident runtime; returns the lossless results."""
    device, cfg = session.device, session.cfg
    hw = replace(cfg.hardware, gpu_budget_gib=None)
    ctx = MethodContext(replace(cfg, method=MethodConfig(name="gpu_resident"), hardware=hw), session.target, device,
                        session.plan(hw, "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    prompts = session.prompts[: args.prompts]
    lossless_prompts = session.prompts[: args.lossless_prompts]
    outputs = {}
    try:
        run = engine_cases(session, runtime, args)
        ops = {"engine_eager": ops_per_decode_step(session, prompts[0])}
        log.info("%s: aten operators per eager decode step: %s", model, ops)
        cases = timed_cases(run, args)
        for case in list(cases):  # warm-up: kernels, allocator, autotuning, graph capture
            try:
                run[case](min(8, args.tokens), prompts[:1])
            except Exception:  # the anchor only: an engine failure is a failure
                if case != "hf_eager":
                    raise
                log.exception("transformers generate failed on this version: no anchor")
                cases.remove(case)
        for r in range(args.rounds):
            for case in (cases if r % 2 == 0 else cases[::-1]):
                _sync(device)
                res = run[case](args.tokens, prompts)
                rows.append({"model": model, "phase": "resident", "case": case, "round": r, "tpot_ms": res["tpot_ms"],
                             "ops_per_step": ops.get(case), "host_ms_per_step": res.get("host_ms_per_step"),
                             "sync_wait_ms_per_step": res.get("sync_wait_ms_per_step"),
                             "graph_replays": res.get("graph_replays")})
                flush(rows, Path(args.out))
                log.info("%s %s round %d: %.2f ms/token (graph replays %s)", model, case, r, res["tpot_ms"],
                         res.get("graph_replays"))
        forward_phase(session, runtime, args, rows, model)
        if args.lossless_prompts:
            checked = [c for c in cases if c.startswith("engine") and not c.endswith("_torch")] + (["engine_static"] if "engine_graphs" in cases
                                                                      and "engine_static" not in cases else [])
            outputs = {case: run[case](args.lossless_tokens, lossless_prompts) for case in checked}
    finally:
        runtime.close()
    lossless = {}
    with ReferenceRuntime(session) as reference:
        for case in (c for c in outputs if c.startswith("engine")):
            check = check_lossless(session, outputs[case]["gens"], temperature=0.0, reference=reference)
            lossless[case] = {**check.summary(), "max_tie_gap": max((t.gap for t in check.ties), default=None),
                              "loss_gaps": sorted(t.gap for t in check.losses)[:20],
                              **{f"same_tokens_as_{o}": outputs[case]["tokens"] == outputs[o]["tokens"]
                                 for o in ("engine_eager", "engine_static") if o in outputs and o != case}}
            log.info("%s lossless %s: %s (%s)", model, case, check.lossless, check.reason)
    return lossless


@torch.inference_mode()
def forward_phase(session, runtime, args, rows: list[dict], model: str) -> None:
    """One target forward of T positions after the first prompt (a verify of T - 1 drafts), per decoder,
    timed to its logits on the host; the graphs' logits compared with the static decoder's."""
    device, prompt = session.device, session.prompts[0].token_ids
    max_t = max(args.forward_tokens)
    decoders = {mode: make_decoder(runtime.model, device, mode, max_graph_tokens=max_t, events=runtime.events)
                for mode in ("eager", "static", "graphs")}
    for d in decoders.values():
        d.begin(len(prompt) + max_t)
        d.forward(prompt, 1)
    runtime.events.drain()

    def once(d, ids):
        _sync(device)
        t0 = time.perf_counter()
        logits = d.forward(ids, len(ids)).float().cpu()  # [T, V]
        ms = (time.perf_counter() - t0) * 1e3
        d.crop(len(prompt))
        runtime.events.drain()
        return ms, logits

    names = list(decoders)
    for t in args.forward_tokens:
        ids = prompt[-t:]
        base = {m: once(decoders[m], ids)[1] for m in names}  # warm-up (captures the graph)
        same = bool(torch.equal(base["graphs"], base["static"]))
        diff = float((base["graphs"] - base["eager"]).abs().max())
        for r in range(args.rounds):
            for m in (names if r % 2 == 0 else names[::-1]):
                times = [once(decoders[m], ids)[0] for _ in range(args.forward_reps)]
                rows.append({"model": model, "phase": f"forward_T{t}", "case": m, "round": r,
                             "forward_ms": statistics.median(times), "forward_min_ms": min(times),
                             "graph_replays": getattr(decoders[m], "num_replays", None),
                             "graphs_equal_static": same, "max_abs_diff_vs_eager": diff})
                flush(rows, Path(args.out))
        log.info("%s forward T=%d: %s", model, t, {m: round(statistics.median(
            r["forward_ms"] for r in rows if r["phase"] == f"forward_T{t}" and r["case"] == m and r["model"] == model), 2)
            for m in names})


def offload_phase(session, args, rows: list[dict], resident_tpot_ms: float, model: str, card: str) -> None:
    """Offloaded methods at `card`; runtime efficiency against the resident TPOT (the compiled engine's
    where it ran: the compute that cannot overlap)."""
    hw = load_preset("hardware", card)
    link_gb_per_s = hw.pcie_gb_per_s if hw.pace_pcie and hw.pcie_gb_per_s else args.pinned_gb_per_s
    methods = {name: (load_preset("method", name.split(":")[0]), replace(hw, decode=(name.split(":") + ["eager"])[1]))
               for name in args.offload_methods}  # "method[:decode]"
    spec = SpecConfig(num_draft_tokens=args.k)
    for m, case_hw in methods.values():  # warm-up; spmoe profiles its cutoff here (cached for the rounds)
        session.generate(m, case_hw, min(4, args.offload_tokens), num_prompts=1, spec_cfg=spec)
    names = list(methods)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            gens, plan, peak = session.generate(*methods[name], args.offload_tokens,
                                                num_prompts=args.offload_prompts, spec_cfg=spec)
            m = summarize([g.records for g in gens])
            floor_ms = (m["h2d_bytes_per_token"] or 0) / (link_gb_per_s * 1e9) * 1e3 + resident_tpot_ms
            rows.append({"model": model, "phase": f"offload@{hw.name}", "case": name, "round": r,
                         "tpot_ms": m["tpot_ms"], "host_ms_per_step": m["host_ms_per_step"],
                         "sync_wait_ms_per_step": m["sync_wait_ms_per_step"],
                         "h2d_gb_per_token": (m["h2d_bytes_per_token"] or 0) / 1e9, "stall_ms": m["stall_ms"],
                         "acceptance_rate": m["acceptance_rate"], "runtime_efficiency": m["tpot_ms"] / floor_ms,
                         "num_slots": plan.num_slots, "peak_gpu_gib": None if peak is None else peak / 2**30})
            flush(rows, Path(args.out))
            log.info("%s round %d: %.1f ms/token", name, r, m["tpot_ms"])


def _median(rs: list[dict], key: str) -> float:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


def table(rows: list[dict]) -> str:
    """Generation cases (TPOT) first, then the forward phase (ms per target forward of T positions)."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["phase"], row["case"]), []).append(row)
    lines = [("| model | phase | case | TPOT ms (median) | spread | host ms/step | sync wait ms/step | vs hf_eager |"
              " efficiency | aten ops/step | graph replays |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (model, phase, case), rs in groups.items():
        if "tpot_ms" not in rs[0]:
            continue
        t = [r["tpot_ms"] for r in rs]
        med = statistics.median(t)
        hf = [r["tpot_ms"] for r in rows if r["case"] == "hf_eager" and r["model"] == model and r["phase"] == phase]
        lines.append(f"| {model} | {phase} | {case} | {med:.2f} | {(max(t) - min(t)) / med:.3f} | "
                     f"{_median(rs, 'host_ms_per_step'):.2f} | {_median(rs, 'sync_wait_ms_per_step'):.2f} | "
                     f"{statistics.median(hf) / med if hf else float('nan'):.2f}x | "
                     f"{_median(rs, 'runtime_efficiency'):.2f} | {rs[0].get('ops_per_step') or ''} | "
                     f"{rs[-1].get('graph_replays', '')} |")
    lines += ["", ("| model | forward | decoder | ms (median of rounds' medians) | min ms | vs eager |"
                   " graphs == static (bits) | max abs diff vs eager |"), "|---|---|---|---|---|---|---|---|"]
    for (model, phase, case), rs in groups.items():
        if "forward_ms" not in rs[0]:
            continue
        eager = _median(groups[(model, phase, "eager")], "forward_ms")
        med = _median(rs, "forward_ms")
        lines.append(f"| {model} | {phase} | {case} | {med:.2f} | {min(r['forward_min_ms'] for r in rs):.2f} | "
                     f"{eager / med:.2f}x | {rs[0]['graphs_equal_static']} | {rs[0]['max_abs_diff_vs_eager']:.4g} |")
    return "\n".join(lines)


def run_model(model: str, draft: str, card: str, args, rows: list[dict]) -> dict:
    """Open one session for `model` (with `draft`, or none), run its phases (the offloaded one at `card`
    unless 'none'), close it; the lossless results."""
    num_prompts = max(args.prompts, args.lossless_prompts)
    cfg = RunConfig(model=load_preset("model", model), draft=load_preset("draft", draft),
                    dataset=load_preset("dataset", args.dataset), method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", args.hardware), routing=RoutingConfig(name="model"),
                    spec=SpecConfig(num_draft_tokens=args.k), num_prompts=num_prompts, check_lossless="false",
                    max_new_tokens=max(args.tokens, args.offload_tokens, args.lossless_tokens))
    cases = [] if card == "none" else [
        replace(cfg, method=load_preset("method", m.split(":")[0]), hardware=load_preset("hardware", card))
        for m in args.offload_methods]
    t0 = time.perf_counter()
    session = open_session(cfg, cases)
    log.info("%s session open in %.1f s", model, time.perf_counter() - t0)
    try:
        lossless = resident_phase(session, args, rows, model)
        floor = [r["tpot_ms"] for r in rows if r["model"] == model and r["phase"] == "resident"
                 and r["case"] == ("engine_graphs" if "engine_graphs" in args.cases else "engine_eager")]
        if cases and floor:
            offload_phase(session, args, rows, statistics.median(floor), model, card)
    finally:
        session.close()
        del session
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return lossless


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mixtral"])
    ap.add_argument("--drafts", nargs="+", default=["mistral_7b"], help="one per model ('none': no SD cases)")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--cards", nargs="+", default=["rtx4090"],
                    help="per model, the emulated card of phase 2 ('none' skips it)")
    ap.add_argument("--offload-methods", nargs="*", default=["lru_nosd", "lru", "spmoe"],
                    help="method[:decode], e.g. lru_nosd:graphs")
    ap.add_argument("--cases", nargs="*", default=["engine_eager", "engine_graphs", "hf_eager"],
                    help="resident cases (also: engine_static, engine_loop)")
    ap.add_argument("--sd", action=argparse.BooleanOptionalAction, default=True,
                    help="add engine_eager_sd and engine_graphs_sd where the model has a draft")
    ap.add_argument("--forward-tokens", type=int, nargs="*", default=[1, 2, 3, 4])
    ap.add_argument("--forward-reps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--offload-tokens", type=int, default=16)
    ap.add_argument("--offload-prompts", type=int, default=1)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--lossless-prompts", type=int, default=3)
    ap.add_argument("--lossless-tokens", type=int, default=48)
    ap.add_argument("--pinned-gb-per-s", type=float, default=53.8, help="link bandwidth when copies are not paced")
    ap.add_argument("--out", default="results/runtime")
    args = ap.parse_args()
    if len(args.drafts) != len(args.models) or len(args.cards) not in (1, len(args.models)):
        ap.error("--drafts needs one draft per model, --cards one card per model (or one for all)")
    cards = args.cards * len(args.models) if len(args.cards) == 1 else args.cards
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    lossless = {}
    for model, draft, card in zip(args.models, args.drafts, cards):
        lossless[model] = run_model(model, draft, card, args, rows)
        (out / "lossless.json").write_text(json.dumps(lossless, indent=1))
    meta = {"models": args.models, "drafts": args.drafts, "weights": "random", "hardware": args.hardware,
            "cards": cards, "cards_emulated": [c != "none" for c in cards],
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "tokens": args.tokens,
            "prompts": args.prompts, "rounds": args.rounds, "offload_tokens": args.offload_tokens, "k": args.k,
            "forward_reps": args.forward_reps, "dataset": args.dataset}
    md = table(rows)
    (out / "table.md").write_text(f"{json.dumps(meta)}\n\n{md}\n")
    keep = ("lossless", "token_agreement", "same_tokens_as_engine_eager", "same_tokens_as_engine_static")
    print(json.dumps({m: {c: {k: v for k, v in r.items() if k in keep}
                          for c, r in cases.items()} for m, cases in lossless.items()}))
    print(md)


if __name__ == "__main__":
    main()
