"""
Runtime benchmark (GPU; runs on the CPU with tiny presets): the engine's decode against
transformers' own `generate` on the same weights, eager against CUDA-graph decode
(`hardware.decode`), offloaded methods at an emulated card, and the tie-aware lossless check.

    python -m experiments.bench_runtime --models mixtral deepseek_v2_lite --drafts mistral_7b none \
        --card none --out results/runtime/graphs                       # H200
    python -m experiments.bench_runtime --models tiny --drafts tiny --hardware cpu --card tiny_card \
        --tokens 6 --offload-tokens 4 --lossless-tokens 8 --out /tmp/bench   # CPU smoke run

One process; per model one session (random weights), closed before the next. Phase 1, every
expert resident (one gpu_resident runtime held for the phase), cases in interleaved rounds
(A B C C B A ...) after one warm-up generation each (which also captures the graphs):
`engine_eager` (the engine, dynamic KV cache; experts as one grouped matmul per layer, no host
sync), `engine_graphs` (the same over a static KV cache, each decode step a CUDA graph replay),
`hf_eager` (transformers' generate with its eager experts module on the same device slots), and
with a draft `engine_eager_sd` / `engine_graphs_sd` (k = --k; draft and target both graphed);
optional `engine_static` and `engine_loop` (experts one at a time). Then the forward phase: one
target forward of T = --forward-tokens positions (a verify of T - 1 drafts) after the first
prompt, per decoder (eager, static, graphs) in interleaved rounds, with the graphs' logits compared
bit for bit with the static decoder's. Then the lossless check (`spmoe.trace.lossless`, one
reference per model) of the engine cases. Phase 2 (`--card`, a GPU budget emulating a smaller
card): `lru_nosd`, `lru`, `spmoe` in interleaved rounds with runtime efficiency = TPOT / (H2D
bytes per token / link bandwidth + the resident engine's TPOT). Writes `runtime.csv` (one row per
model, case and round), `table.md` and `lossless.json` under --out, and prints the table last.
Budgets emulate smaller cards: reported as such.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig
from spmoe.engine import Engine
from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts, find_experts
from spmoe.runtime.decoder import make_decoder
from spmoe.session import open_session
from spmoe.spec.drafter import ModelDrafter
from spmoe.spec.kv import cache_kwarg
from spmoe.strategy import MethodContext
from spmoe.trace.lossless import ReferenceRuntime, check_lossless
from spmoe.trace.metrics import summarize

log = logging.getLogger("bench_runtime")


class _TokenClock(BaseStreamer):
    """Wall time of every `put`: the prompt first, then one per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFExperts:
    """Context: transformers' own experts modules (implementation `impl`) in place of the engine's,
    their fused weights strided views of the resident cache's slots (no copy)."""

    def __init__(self, session, cache, impl: str = "eager"):
        self.session, self.cache, self.impl = session, cache, impl
        self.ours: dict[int, nn.Module] = {}

    def __enter__(self):
        model, layout = self.session.target.model, self.session.target.layout
        cfg = copy.copy(model.config)
        cfg._experts_implementation = self.impl
        with torch.device("meta"):
            classes = {i: type(m) for i, m in find_experts(AutoModelForCausalLM.from_config(cfg)).items()}
        h, inter, numel, e_count = layout.hidden_size, layout.intermediate_size, layout.expert_numel, layout.num_experts
        built = {}  # every module is built before any is installed: a failure leaves the model as it was
        for layer in layout.moe_layers:
            slots = [self.cache.slot_of((layer, e)) for e in range(e_count)]
            if slots != list(range(slots[0], slots[0] + e_count)):
                raise RuntimeError(f"layer {layer}'s experts are not in consecutive slots: {slots}")
            storage = self.cache.storage
            base = storage.storage_offset() + slots[0] * numel
            with torch.device("meta"):
                hf = classes[layer](cfg)
            hf.gate_up_proj = nn.Parameter(storage.as_strided((e_count, 2 * inter, h), (numel, h, 1), base),
                                           requires_grad=False)  # [E, 2I, H]
            hf.down_proj = nn.Parameter(storage.as_strided((e_count, h, inter), (numel, inter, 1), base + 2 * inter * h),
                                        requires_grad=False)  # [E, H, I]
            built[layer] = hf
        for layer, hf in built.items():
            mlp = model.model.layers[layer].mlp
            self.ours[layer], mlp.experts = mlp.experts, hf
        return self

    def __exit__(self, *exc) -> None:
        for layer, experts in self.ours.items():
            self.session.target.model.model.layers[layer].mlp.experts = experts


@torch.inference_mode()
def hf_generate(session, prompts, num_tokens: int) -> dict:
    model, device = session.target.model, session.device
    tpots, tokens = [], []
    for p in prompts:
        clock = _TokenClock()
        out = model.generate(torch.tensor([p.token_ids], device=device), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, streamer=clock, pad_token_id=0, eos_token_id=None)
        tokens.append(out[0, len(p.token_ids):].tolist())
        tpots.append((clock.times[-1] - clock.times[1]) / (num_tokens - 1) * 1e3)
    return {"tpot_ms": statistics.fmean(tpots), "tokens": tokens}


class _OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched (views included: each costs host time)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def ops_per_decode_step(session, prompt) -> int:
    """aten operators one one-token decode forward of the target dispatches, after a prefill."""
    model, device = session.target.model, session.device
    kv = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    model(input_ids=torch.tensor([prompt.token_ids], device=device), use_cache=True, logits_to_keep=1, **{kw: kv})
    counter = _OpCount()
    with counter:
        model(input_ids=torch.tensor([prompt.token_ids[-1:]], device=device), use_cache=True, logits_to_keep=1,
              **{kw: kv})
    return counter.count


def engine_generate(engine: Engine, prompts, num_tokens: int, grouped: bool = True) -> dict:
    OffloadedExperts.grouped = grouped
    replays_before = _replays(engine)
    try:
        gens = [engine.generate(p.token_ids, num_tokens, i) for i, p in enumerate(prompts)]
    finally:
        OffloadedExperts.grouped = True
    m = summarize([g.records for g in gens])
    return {"tpot_ms": m["tpot_ms"], "host_ms_per_step": m["host_ms_per_step"],
            "sync_wait_ms_per_step": m["sync_wait_ms_per_step"], "graph_replays": _replays(engine) - replays_before,
            "tokens": [g.token_ids for g in gens], "gens": gens}


def _replays(engine: Engine) -> int:
    draft = engine.drafter.decoder if engine.drafter is not None else None
    return sum(getattr(d, "num_replays", 0) for d in (engine.decoder, draft) if d is not None)


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
               "engine_graphs": Engine(runtime, device, decode="graphs")}
    if session.draft is not None:
        for mode in ("eager", "graphs"):
            drafter = ModelDrafter(session.draft, device, 0.0, 1.0, decode=mode)
            engines[f"engine_{mode}_sd"] = Engine(runtime, device, drafter, spec, decode=mode)
    run = {name: (lambda n, ps, e=e, g=name != "engine_loop": engine_generate(e, ps, n, g))
           for name, e in engines.items()}

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
            checked = [c for c in cases if c.startswith("engine")] + (["engine_static"] if "engine_graphs" in cases
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


def offload_phase(session, args, rows: list[dict], resident_tpot_ms: float, model: str) -> None:
    cfg, hw = session.cfg, load_preset("hardware", args.card)
    link_gb_per_s = hw.pcie_gb_per_s if hw.pace_pcie and hw.pcie_gb_per_s else args.pinned_gb_per_s
    methods = {m: load_preset("method", m) for m in args.offload_methods}
    spec = SpecConfig(num_draft_tokens=args.k)
    for m in methods.values():  # warm-up; spmoe profiles its cutoff here (cached for the rounds)
        session.generate(m, hw, min(4, args.offload_tokens), num_prompts=1, spec_cfg=spec)
    names = list(methods)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            gens, plan, peak = session.generate(methods[name], hw, args.offload_tokens,
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
    lines = ["| model | phase | case | TPOT ms (median) | spread | host ms/step | sync wait ms/step | vs hf_eager |"
             " efficiency | aten ops/step | graph replays |", "|---|---|---|---|---|---|---|---|---|---|---|"]
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
    lines += ["", "| model | forward | decoder | ms (median of rounds' medians) | min ms | vs eager |"
              " graphs == static (bits) | max abs diff vs eager |", "|---|---|---|---|---|---|---|---|"]
    for (model, phase, case), rs in groups.items():
        if "forward_ms" not in rs[0]:
            continue
        eager = _median(groups[(model, phase, "eager")], "forward_ms")
        med = _median(rs, "forward_ms")
        lines.append(f"| {model} | {phase} | {case} | {med:.2f} | {min(r['forward_min_ms'] for r in rs):.2f} | "
                     f"{eager / med:.2f}x | {rs[0]['graphs_equal_static']} | {rs[0]['max_abs_diff_vs_eager']:.4g} |")
    return "\n".join(lines)


def run_model(model: str, draft: str, args, rows: list[dict]) -> dict:
    """Open one session for `model` (with `draft`, or none), run its phases, close it; the lossless results."""
    num_prompts = max(args.prompts, args.lossless_prompts)
    cfg = RunConfig(model=load_preset("model", model), draft=load_preset("draft", draft),
                    dataset=load_preset("dataset", args.dataset), method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", args.hardware), routing=RoutingConfig(name="model"),
                    spec=SpecConfig(num_draft_tokens=args.k), num_prompts=num_prompts, check_lossless="false",
                    max_new_tokens=max(args.tokens, args.offload_tokens, args.lossless_tokens))
    cases = [] if args.card == "none" else [
        replace(cfg, method=load_preset("method", m), hardware=load_preset("hardware", args.card))
        for m in args.offload_methods]
    t0 = time.perf_counter()
    session = open_session(cfg, cases)
    log.info("%s session open in %.1f s", model, time.perf_counter() - t0)
    try:
        lossless = resident_phase(session, args, rows, model)
        resident = [r["tpot_ms"] for r in rows if r["case"] == "engine_eager" and r["model"] == model]
        if cases and resident:
            offload_phase(session, args, rows, statistics.median(resident), model)
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
    ap.add_argument("--card", default="rtx4090", help="emulated card for phase 2 ('none' skips it)")
    ap.add_argument("--offload-methods", nargs="*", default=["lru_nosd", "lru", "spmoe"])
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
    if len(args.drafts) != len(args.models):
        ap.error("--drafts needs one draft per model")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    lossless = {}
    for model, draft in zip(args.models, args.drafts):
        lossless[model] = run_model(model, draft, args, rows)
        (out / "lossless.json").write_text(json.dumps(lossless, indent=1))
    meta = {"models": args.models, "drafts": args.drafts, "weights": "random", "hardware": args.hardware,
            "card": args.card, "card_emulated": args.card != "none",
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
