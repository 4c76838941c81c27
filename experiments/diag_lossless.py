"""
Where do a method's numerics first differ from the GPU-resident reference, on identical inputs?

    python -m experiments.diag_lossless --model mixtral --weights twin --expert-noise 0.02 --dataset humaneval \
        --hardware h200 --method lru_nosd --num-slots 200 --prompts 10 --tokens 100 --out $OUT/diag   # H200
    python -m experiments.diag_lossless --model tiny --weights random --dataset synthetic --hardware cpu \
        --method lru_nosd --num-slots 6 --prompts 1 --tokens 8 --out /tmp/diag                         # CPU

The lossless check (`spmoe.trace.lossless`) teacher-forces the reference on the run's tokens and
compares its argmax with the run's token; it never sees the method's own logits. Here both are
teacher-forced on exactly the same inputs: the method generates (`Session.generate`, the run's
tokens), then a fresh runtime of the method (built as the session builds it, closed after; its
cache starts empty and misses and evicts during the forced run as in a run) and the GPU-resident
reference (`ReferenceRuntime`) each read every prompt + the run's tokens with the run's step
structure (`mirror_steps`) over a static cache of the run's capacity (`Generation.kv_capacity`),
through `forced_logits`, as the check does. Every decoder layer's output is recorded in every
forward (`spmoe.trace.layer_probe`), and with `--parts` (the default) its parts: the attention
block's output, the experts' input, routes and weights, the experts' output and the MoE block's
output. `--method-decode graphs` forces the method through the run's own decoder instead
(piecewise CUDA graphs, replayed across prompts as in the run); graphs cannot keep hooks, so only
its prefill's layers (and parts) are recorded then.

Terms: *position* j of a prompt = its j-th output token, predicted by forward `step(j)` (0 = the
prefill over the prompt); *logit diff* = max over the vocabulary of |method - reference| (float32
of the model's dtype); *margin* = the reference's top-1 minus top-2 logit; *first layer* = the
first decoder layer whose output differs in that forward; its *first part* = the first of its parts
that differs, in the order the layer computes them: `attn`, `experts_in` (the post-attention norm's
output, which the router reads too), `routes` (top-k ids), `weights` (top-k weights, same ids),
`experts_out` (the experts' weighted sum, on identical input, ids and weights: the expert kernel or
weights), `moe_out` (the block's output: shared experts, reshapes), else `residual` (every part
identical, the layer's output not); a difference is *fresh* when every earlier forward of the prompt
had an identical output at the layer before the first layer, so the first layer's attention read
identical keys and values (else it may be inherited through the KV cache). Writes under --out,
atomically: `positions.csv` (one row per prompt and position), `prefill_layers.csv` (one row per
prompt and layer: max |diff| over positions and at the last one), `step_layers.csv` (the same for
every recorded forward; neither with `--no-layer-csvs`), `table.md` (summary, prefill layers, the
first differing positions, the fresh differences) and `summary.json`; logs a 6-line summary.

Limits: routing is the model's own (replay is not supported). No drafter runs in the forced passes,
so a method that prefetches from the draft's predictions (spmoe) misses more there than in its run:
its numerics are compared, not its prefetching; the last summary line gives both miss counts.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import torch

from experiments.diag_compare import (
    Forced,
    forward_rows,
    part_counts,
    position_rows,
    step_layer_rows,
    summarize_diff,
    summary_lines,
    table,
    to_csv,
)
from experiments.presets import load_preset
from spmoe.config import MethodConfig, RoutingConfig, RunConfig, SpecConfig, TwinConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts
from spmoe.offload.layer_slots import LayerSlots
from spmoe.runtime.decoder import make_decoder
from spmoe.session import open_session
from spmoe.strategy import MethodContext, Runtime
from spmoe.trace.layer_probe import LayerProbe
from spmoe.trace.lossless import (
    ReferenceRuntime,
    forced_logits,
    mirror_steps,
    relative_eps_for,
    tolerance_for,
)

log = logging.getLogger("diag_lossless")


class ServiceCounter:
    """While open, counts how the method's offloaded layers are served through `OffloadedExperts._routes` (the
    eager paths; a layer whose kernels replay as a piecewise call-site graph is not counted): `grouped` (all of
    a layer's experts pinned, one launch over the slots) or `per_expert` (the provider's iterator). The two
    paths are meant to give equal bits."""

    def __init__(self) -> None:
        self.counts = {"grouped": 0, "per_expert": 0}
        self._original = None

    def __enter__(self) -> "ServiceCounter":
        original = self._original = OffloadedExperts._routes

        def counted(module, hidden_states, top_k_index, index_cpu, served, whole=None):
            self.counts["grouped" if isinstance(served, LayerSlots) else "per_expert"] += 1
            return original(module, hidden_states, top_k_index, index_cpu, served, whole)

        OffloadedExperts._routes = counted
        return self

    def __exit__(self, *exc) -> None:
        OffloadedExperts._routes = self._original


def build_method(session, method: MethodConfig, hw) -> Runtime:
    """A fresh runtime of `method` at `hw`, built as `Session.generate` builds it (routing: the model's)."""
    spec = get_strategy(method.name)
    drafts = session.drafts(hw, method)
    offer = session.draft_offer(hw, method) if spec.speculative and spec.accepts_draft else None
    cfg = replace(session.cfg, method=method, hardware=hw)
    ctx = MethodContext(cfg, session.target, session.device, session.plan(hw, method.name, method),
                        session.draft if drafts else None, None, offer)
    return spec.build(ctx)


def force_static(runtime: Runtime, session, gens: list, parts: bool = False) -> list[Forced]:
    """Every prompt through `forced_logits` (the check's path), every forward's layers (and their parts
    with `parts`) recorded."""
    out = []
    for prompt, gen in zip(session.prompts, gens):
        with LayerProbe(runtime.model, parts=parts) as probe:
            logits = forced_logits(runtime, session.device, prompt.token_ids, gen.token_ids, _steps(gen),
                                   gen.kv_capacity)  # [N, V]
        out.append(Forced(logits, probe.forwards, probe.parts))
    return out


@torch.inference_mode()
def force_graphs(runtime: Runtime, session, gens: list, parts: bool = False) -> list[Forced]:
    """`forced_logits`' loop through the run's own graphs decoder: one decoder for every prompt (its graphs
    captured and replayed across prompts as in the run), only the prefill's layers (and parts) recorded."""
    steps = [_steps(g) for g in gens]
    capacities = {g.kv_capacity for g in gens}
    if None in capacities or len(capacities) != 1:
        raise ValueError(f"--method-decode graphs needs a run over one static cache; the run's: {capacities}")
    max_fed = max((len(st.fed_ids) for ss in steps for st in ss), default=1)
    decoder = make_decoder(runtime.model, session.device, "graphs", max_graph_tokens=max_fed, events=runtime.events)
    decoder.allocate(capacities.pop())
    out = []
    for prompt, gen, ss in zip(session.prompts, gens, steps):
        decoder.begin(len(prompt.token_ids) + len(gen.token_ids) - 1 + max_fed)
        runtime.begin_step(0)
        with LayerProbe(runtime.model, parts=parts) as probe:  # removed before any graphed step
            logits = [decoder.forward(prompt.token_ids, 1).float().cpu()]  # [1, V]
        runtime.end_step()
        for i, st in enumerate(ss, start=1):
            length = decoder.length
            runtime.begin_step(i)
            step_logits = decoder.forward(st.fed_ids, len(st.fed_ids))  # [fed, V]
            runtime.end_step()
            decoder.crop(length + st.used)
            logits.append(step_logits[: st.used].float().cpu())
        out.append(Forced(torch.cat(logits), probe.forwards, probe.parts))
    return out


def _steps(gen):
    steps = mirror_steps(gen)
    if steps is None:
        raise ValueError("the run's step records do not cover its tokens: cannot mirror its steps")
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--weights", default=None, help="random | twin | checkpoint (default: the preset's)")
    ap.add_argument("--expert-noise", type=float, default=None, help="twin weights: model.twin.expert_noise")
    ap.add_argument("--model-path", default=None, help="checkpoint weights: model.path")
    ap.add_argument("--draft", default=None, help="default: the model's draft for twin weights, else none")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--hardware", default="h200", help="the device the session opens on (the reference's)")
    ap.add_argument("--card", default=None, help="hardware preset of the method (its budget; default: --hardware)")
    ap.add_argument("--decode", default=None, help="hardware.decode of both (default: the presets')")
    ap.add_argument("--expert-kernel", default=None, help="hardware.expert_kernel: auto | torch")
    ap.add_argument("--method", default="lru_nosd")
    ap.add_argument("--num-slots", type=int, default=None, help="cap on expert slots (default: the card's plan)")
    ap.add_argument("--method-decode", default="static", choices=("static", "graphs"),
                    help="how the method is forced: static (forced_logits, as the check) or graphs (the run's)")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--k", type=int, default=1, help="spec.num_draft_tokens (SD methods)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                    help="record every layer's parts (attention, routes, weights, experts, MoE block) and name the"
                         " first differing one")
    ap.add_argument("--no-layer-csvs", action="store_true",
                    help="skip step_layers.csv and prefill_layers.csv (fewer files under --out)")
    ap.add_argument("--out", default="results/diag_lossless")
    return ap.parse_args(argv)


def _hardware(name: str, args: argparse.Namespace):
    hw = load_preset("hardware", name)
    return replace(hw, decode=args.decode or hw.decode, expert_kernel=args.expert_kernel or hw.expert_kernel)


def run_config(args: argparse.Namespace) -> RunConfig:
    model = load_preset("model", args.model)
    if args.weights:
        model = replace(model, weights=args.weights)
    if args.expert_noise is not None:
        model = replace(model, twin=TwinConfig(expert_noise=args.expert_noise))
    if args.model_path:
        model = replace(model, path=args.model_path)
    draft = args.draft or (model.default_draft if model.weights == "twin" else "none")
    return RunConfig(model=model, draft=load_preset("draft", draft), dataset=load_preset("dataset", args.dataset),
                     method=MethodConfig(name="gpu_resident"), hardware=_hardware(args.hardware, args),
                     routing=RoutingConfig(name="model"), spec=SpecConfig(num_draft_tokens=args.k),
                     num_prompts=args.prompts, check_lossless="false", max_new_tokens=args.tokens, seed=args.seed)


def main(argv: list[str] | None = None) -> dict:
    """Run the diagnosis; returns the summary (also logged, and written to table.md)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    cfg = run_config(args)
    hw = _hardware(args.card or args.hardware, args)
    method = load_preset("method", args.method)
    if args.num_slots is not None:
        method = replace(method, num_slots=args.num_slots)
    session = open_session(cfg, [replace(cfg, method=method, hardware=hw)])
    try:
        gens, plan, _ = session.generate(method, hw, args.tokens, num_prompts=args.prompts)
        log.info("%s generated %d prompts x %d tokens (%d slots, decode %s, kv capacity %s)", method.name,
                 len(gens), args.tokens, plan.num_slots, gens[0].decode, gens[0].kv_capacity)
        runtime = build_method(session, method, hw)
        try:
            forced = force_graphs if args.method_decode == "graphs" else force_static
            with ServiceCounter() as served:
                method_passes = forced(runtime, session, gens, parts=args.parts)
            forced_misses = sum(len(ev.misses) for ev in runtime.events.drain())
        finally:
            runtime.close()
        with ReferenceRuntime(session) as reference:
            reference_passes = force_static(reference.get(), session, gens, parts=args.parts)
    finally:
        session.close()
    dtype = session.target.layout.dtype
    positions, layers, forwards = [], [], []
    for i, (gen, m, r) in enumerate(zip(gens, method_passes, reference_passes)):
        steps = step_layer_rows(i, m, r)
        fwd = forward_rows(i, m, r, steps)
        positions += position_rows(i, gen, m, r, steps, tolerance_for(dtype), relative_eps_for(dtype), fwd)
        layers += steps
        forwards += fwd
    s = summarize_diff(positions, [r for r in layers if r["step"] == 0])
    s["first_differing_part_counts"] = part_counts(forwards) if args.parts else None
    s["run_misses"] = sum(len(ev.misses) for g in gens for r in g.records for ev in r.layers)
    s["forced_method_misses"] = forced_misses
    s["forced_method_layers_served"] = served.counts
    title = (f"{method.name} ({plan.num_slots} slots, forced {args.method_decode}) vs gpu_resident:"
             f" {args.model} {cfg.model.weights}, {args.prompts} prompts x {args.tokens} tokens, {hw.name}")
    write_text_atomic(out / "positions.csv", to_csv(positions))
    if not args.no_layer_csvs:
        write_text_atomic(out / "step_layers.csv", to_csv(layers))
        write_text_atomic(out / "prefill_layers.csv", to_csv([r for r in layers if r["step"] == 0]))
    write_text_atomic(out / "table.md", table(s, positions, [r for r in layers if r["step"] == 0], title, forwards))
    write_json_atomic(out / "summary.json", {"title": title, **s})
    for line in summary_lines(s):
        log.info("%s", line)
    return s


if __name__ == "__main__":
    main()
