"""
Runtime benchmark (GPU; runs on the CPU with tiny presets): the engine's decode against
transformers' own `generate` on the same weights, the grouped expert path against the per-expert
path, offloaded methods at an emulated card, and the tie-aware lossless check on the GPU.

    python -m experiments.bench_runtime --out results/runtime            # Mixtral shape, H200
    python -m experiments.bench_runtime --model tiny --draft tiny --hardware cpu --card tiny_card \
        --tokens 6 --offload-tokens 4 --lossless-tokens 8 --out /tmp/bench   # CPU smoke run

One process, one loaded model (random weights). Phase 1, every expert resident (one
gpu_resident runtime held for the whole phase): cases `engine_grouped` (the engine; experts as one
grouped matmul per layer, no host sync), `engine_loop` (the engine; experts one at a time, a
routing sync per layer) and `hf_eager` (transformers' generate with its eager experts module,
whose weights are strided views of the same device slots: no copy, the same bytes), in
interleaved rounds (A B C C B A ...) after one warm-up generation each. Then the lossless check
(`spmoe.trace.lossless`) of the grouped and the per-expert engine on the lossless prompts.
Phase 2 (`--card`, a GPU budget emulating a smaller card): `lru_nosd`, `lru`, `spmoe` in
interleaved rounds, each with its runtime efficiency = TPOT / (H2D bytes per token / link
bandwidth + the resident engine's TPOT), the link being the paced PCIe rate when the card paces
copies. Writes `runtime.csv` (one row per case and round), `table.md` and `lossless.json` under
--out, and prints the table last. Budgets emulate smaller cards: reported as such.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig
from spmoe.engine import Engine
from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts, find_experts
from spmoe.session import open_session
from spmoe.spec.kv import cache_kwarg
from spmoe.strategy import MethodContext
from spmoe.trace.lossless import check_lossless
from spmoe.trace.metrics import summarize

log = logging.getLogger("bench_runtime")
RESIDENT_CASES = ("engine_grouped", "engine_loop", "hf_eager")


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


def engine_generate(engine: Engine, prompts, num_tokens: int, grouped: bool) -> dict:
    OffloadedExperts.grouped = grouped
    try:
        gens = [engine.generate(p.token_ids, num_tokens, i) for i, p in enumerate(prompts)]
    finally:
        OffloadedExperts.grouped = True
    m = summarize([g.records for g in gens])
    return {"tpot_ms": m["tpot_ms"], "host_ms_per_step": m["host_ms_per_step"],
            "sync_wait_ms_per_step": m["sync_wait_ms_per_step"], "tokens": [g.token_ids for g in gens], "gens": gens}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flush(rows: list[dict], out: Path) -> None:
    """runtime.csv rewritten after every row, so a run cut short keeps what it measured."""
    keys = sorted({k for r in rows for k in r})
    (out / "runtime.csv").write_text("\n".join([",".join(keys)] + [
        ",".join("" if r.get(k) is None else str(r[k]) for k in keys) for r in rows]) + "\n")


def resident_phase(session, args, rows: list[dict]) -> dict:
    """Phase 1 on one gpu_resident runtime; returns the lossless results."""
    device, cfg = session.device, session.cfg
    hw = replace(cfg.hardware, gpu_budget_gib=None)
    ctx = MethodContext(replace(cfg, method=MethodConfig(name="gpu_resident"), hardware=hw), session.target, device,
                        session.plan(hw, "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    prompts = session.prompts[: args.prompts]
    lossless_prompts = session.prompts[: args.lossless_prompts]
    try:
        engine = Engine(runtime, device)
        run = {"engine_grouped": lambda n, ps: engine_generate(engine, ps, n, True),
               "engine_loop": lambda n, ps: engine_generate(engine, ps, n, False)}

        def hf(n, ps):
            with HFExperts(session, runtime.cache, "eager"):
                return hf_generate(session, ps, n)

        run["hf_eager"] = hf
        ops = {"engine_grouped": ops_per_decode_step(session, prompts[0])}
        OffloadedExperts.grouped = False
        ops["engine_loop"] = ops_per_decode_step(session, prompts[0])
        OffloadedExperts.grouped = True
        with HFExperts(session, runtime.cache, "eager"):
            ops["hf_eager"] = ops_per_decode_step(session, prompts[0])
        log.info("aten operators per decode step: %s", ops)
        cases = list(RESIDENT_CASES)
        for case in RESIDENT_CASES:  # warm-up: kernels, allocator, autotuning
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
                rows.append({"phase": "resident", "case": case, "round": r, "tpot_ms": res["tpot_ms"],
                             "ops_per_step": ops[case],
                             "host_ms_per_step": res.get("host_ms_per_step"),
                             "sync_wait_ms_per_step": res.get("sync_wait_ms_per_step"),
                             })
                flush(rows, Path(args.out))
                log.info("%s round %d: %.2f ms/token", case, r, res["tpot_ms"])
        outputs = {case: run[case](args.lossless_tokens, lossless_prompts) for case in cases}
    finally:
        runtime.close()
    lossless = {}
    for case in ("engine_grouped", "engine_loop"):
        check = check_lossless(session, outputs[case]["gens"], temperature=0.0)
        lossless[case] = {**check.summary(), "max_tie_gap": max((t.gap for t in check.ties), default=None),
                          "loss_gaps": sorted(t.gap for t in check.losses)[:20],
                          "same_tokens_as_hf_eager": outputs[case]["tokens"] == outputs["hf_eager"]["tokens"]
                          if "hf_eager" in outputs else None}
        log.info("lossless %s: %s (%s)", case, check.lossless, check.reason)
    return lossless


def offload_phase(session, args, rows: list[dict], resident_tpot_ms: float) -> None:
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
            rows.append({"phase": f"offload@{hw.name}", "case": name, "round": r, "tpot_ms": m["tpot_ms"],
                         "host_ms_per_step": m["host_ms_per_step"], "sync_wait_ms_per_step": m["sync_wait_ms_per_step"],
                         "h2d_gb_per_token": (m["h2d_bytes_per_token"] or 0) / 1e9, "stall_ms": m["stall_ms"],
                         "acceptance_rate": m["acceptance_rate"], "runtime_efficiency": m["tpot_ms"] / floor_ms,
                         "num_slots": plan.num_slots, "peak_gpu_gib": None if peak is None else peak / 2**30})
            flush(rows, Path(args.out))
            log.info("%s round %d: %.1f ms/token", name, r, m["tpot_ms"])


def table(rows: list[dict]) -> str:
    by_case: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_case.setdefault((row["phase"], row["case"]), []).append(row)
    hf = [r["tpot_ms"] for r in rows if r["case"] == "hf_eager"]
    hf_median = statistics.median(hf) if hf else None
    lines = ["| phase | case | TPOT ms (median) | spread | host ms/step | sync wait ms/step | vs hf_eager | efficiency |"
             " aten ops/step |", "|---|---|---|---|---|---|---|---|---|"]
    for (phase, case), rs in by_case.items():
        t = [r["tpot_ms"] for r in rs]
        med = statistics.median(t)
        host = [r["host_ms_per_step"] for r in rs if r.get("host_ms_per_step") is not None]
        wait = [r["sync_wait_ms_per_step"] for r in rs if r.get("sync_wait_ms_per_step") is not None]
        eff = [r["runtime_efficiency"] for r in rs if r.get("runtime_efficiency") is not None]
        lines.append(f"| {phase} | {case} | {med:.2f} | {(max(t) - min(t)) / med:.3f} | "
                     f"{statistics.median(host) if host else float('nan'):.2f} | "
                     f"{statistics.median(wait) if wait else float('nan'):.2f} | "
                     f"{hf_median / med if hf_median else float('nan'):.2f}x | "
                     f"{statistics.median(eff) if eff else float('nan'):.2f} | {rs[0].get('ops_per_step', '')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--card", default="rtx4090", help="emulated card for phase 2 ('none' skips it)")
    ap.add_argument("--offload-methods", nargs="*", default=["lru_nosd", "lru", "spmoe"])
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    num_prompts = max(args.prompts, args.lossless_prompts)
    cfg = RunConfig(model=load_preset("model", args.model), draft=load_preset("draft", args.draft),
                    dataset=load_preset("dataset", args.dataset), method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", args.hardware), routing=RoutingConfig(name="model"),
                    spec=SpecConfig(num_draft_tokens=args.k), num_prompts=num_prompts, check_lossless="false",
                    max_new_tokens=max(args.tokens, args.offload_tokens, args.lossless_tokens))
    cases = [] if args.card == "none" else [
        replace(cfg, method=load_preset("method", m), hardware=load_preset("hardware", args.card))
        for m in args.offload_methods]
    t0 = time.perf_counter()
    session = open_session(cfg, cases)
    log.info("session open in %.1f s", time.perf_counter() - t0)
    rows: list[dict] = []
    try:
        lossless = resident_phase(session, args, rows)
        (out / "lossless.json").write_text(json.dumps(lossless, indent=1))
        resident = statistics.median(r["tpot_ms"] for r in rows if r["case"] == "engine_grouped")
        if cases:
            offload_phase(session, args, rows, resident)
    finally:
        session.close()
    meta = {"model": args.model, "weights": cfg.model.weights, "dtype": cfg.model.dtype, "draft": args.draft,
            "hardware": args.hardware, "card": args.card, "card_emulated": args.card != "none",
            "device": torch.cuda.get_device_name() if session.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "tokens": args.tokens, "prompts": args.prompts, "rounds": args.rounds,
            "offload_tokens": args.offload_tokens, "k": args.k, "dataset": args.dataset}
    md = table(rows)
    (out / "table.md").write_text(f"{json.dumps(meta)}\n\n{md}\n")
    print(json.dumps(lossless))
    print(md)


if __name__ == "__main__":
    main()
