"""
Expert-kernel benchmark (GPU): one layer's decode-shape expert MLPs, as achieved weight bandwidth.

    python -m experiments.bench_expert_kernel --models mixtral deepseek_v2_lite --out results/runtime/expert_kernel

Per model (shapes from its preset; random bf16 weights) and tokens T = --tokens, each of --layers
layers holds its E experts in one slot storage [E, N] (rotated, so no layer's weights sit in L2);
routes are drawn at random (distinct experts per token). Kernels, each captured as one CUDA graph
over the layers and timed by replays (median of --reps, after warm-up), interleaved A B C C B A:
- `triton`: `grouped_expert_mlp` with the Triton decode kernels (`spmoe.runtime.moe_gemv`);
- `torch_grouped`: `grouped_expert_mlp` on torch's grouped GEMM (`hardware.expert_kernel=torch`);
- `cublas_loop`: per routed expert `F.linear` x2 (cuBLAS), the routes known on the host: a
  bandwidth anchor that no graph-capturable path can use (it needs the ids on the host).
Bandwidth = bytes of the distinct routed experts' weights / time. Checks, per model and T: each
kernel's relative error against float32 math on the same bf16 weights, and whether one expert
computed alone by `slot_expert_mlp` (the per-expert path) equals its rows in the layer's launch bit
for bit. Writes `kernels.csv` and `table.md` under --out and prints the table last.
"""

from __future__ import annotations

import argparse
import logging
import statistics
from pathlib import Path

import torch
from torch import nn

from experiments.presets import load_preset
from spmoe.models.build import hf_config
from spmoe.models.experts import ExpertLayout, expert_mlp, grouped_expert_mlp, slot_expert_mlp
from spmoe.runtime import moe_gemv

log = logging.getLogger("bench_expert_kernel")
KERNELS = ("triton", "torch_grouped", "cublas_loop")


def layout_for(model: str) -> ExpertLayout:
    cfg = hf_config(load_preset("model", model))
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "n_routed_experts", None) or cfg.num_experts
    return ExpertLayout((0,), experts, cfg.num_experts_per_tok, cfg.hidden_size, inter, torch.bfloat16)


def layer_fn(kernel: str, layout: ExpertLayout, x: torch.Tensor, index: torch.Tensor, storage: torch.Tensor,
             slot_of: torch.Tensor):
    """A zero-argument call computing the layer's [T, A, H] route outputs with `kernel`."""
    act = nn.SiLU()
    if kernel == "cublas_loop":
        ids = sorted({int(e) for e in index.flatten()})

        def loop():
            return [expert_mlp(x, *layout.split(storage[e]), act) for e in ids]
        return loop

    def grouped():
        moe_gemv.use("auto" if kernel == "triton" else "torch")
        try:
            return grouped_expert_mlp(x, index, storage, slot_of, layout, act)
        finally:
            moe_gemv.use("auto")
    return grouped


def check(layout: ExpertLayout, x: torch.Tensor, index: torch.Tensor, storage: torch.Tensor,
          slot_of: torch.Tensor) -> dict:
    """Relative errors against float32 math, and the per-expert path's bits against the layer launch."""
    act, num_tokens = nn.SiLU(), x.shape[0]
    want = torch.stack([torch.stack([expert_mlp(x[t:t + 1].float(), *layout.split(storage[int(e)].float()), act)[0]
                                     for e in index[t]]) for t in range(num_tokens)])  # [T, A, H]
    out = {}
    for kernel in ("triton", "torch_grouped"):
        got = layer_fn(kernel, layout, x, index, storage, slot_of)().float()
        out[f"rel_err_{kernel}"] = float((got - want).norm() / want.norm())
    e = int(index[0, 0])
    rows = [(t, a) for t in range(num_tokens) for a in range(layout.top_k) if int(index[t, a]) == e]
    layer = grouped_expert_mlp(x, index, storage, slot_of, layout, act)
    alone = slot_expert_mlp(x[[t for t, _ in rows]], *layout.split(storage[e]), act)
    out["per_expert_bits_equal"] = bool(torch.equal(alone, torch.stack([layer[t, a] for t, a in rows])))
    return out


def time_graph(fns: list, reps: int) -> float:
    """Median ms of one replay of a graph calling every fn once."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for f in fns:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_model(model: str, args, rows: list[dict]) -> None:
    layout = layout_for(model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    e, a, h = layout.num_experts, layout.top_k, layout.hidden_size
    storages = [torch.randn(e, layout.expert_numel, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                for _ in range(args.layers)]  # [E, N] per layer
    slot_of = torch.arange(e, device="cuda")
    for num_tokens in args.tokens:
        x = torch.randn(num_tokens, h, device="cuda", dtype=torch.bfloat16, generator=gen)  # [T, H]
        index = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:a] for _ in range(num_tokens)])  # [T, A]
        distinct = len({int(i) for i in index.flatten()})
        bytes_per_layer = distinct * layout.expert_bytes
        checks = check(layout, x, index, storages[0], slot_of)
        fns = {k: [layer_fn(k, layout, x, index, s, slot_of) for s in storages] for k in KERNELS}
        ms = {k: [] for k in KERNELS}
        for r in range(args.rounds):
            for k in (KERNELS if r % 2 == 0 else KERNELS[::-1]):
                ms[k].append(time_graph(fns[k], args.reps) / args.layers)
        for k in KERNELS:
            med = statistics.median(ms[k])
            rows.append({"model": model, "tokens": num_tokens, "kernel": k, "distinct_experts": distinct,
                         "ms_per_layer": med, "spread": (max(ms[k]) - min(ms[k])) / med,
                         "gb_per_s": bytes_per_layer / med / 1e6, **checks})
            log.info("%s T=%d %s: %.3f ms/layer, %.0f GB/s", model, num_tokens, k, med, bytes_per_layer / med / 1e6)
    del storages
    torch.cuda.empty_cache()


def table(rows: list[dict]) -> str:
    lines = ["| model | T | kernel | distinct experts | ms/layer | spread | GB/s | rel err triton | rel err torch |"
             " per-expert bits equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens']} | {r['kernel']} | {r['distinct_experts']} | {r['ms_per_layer']:.3f}"
                     f" | {r['spread']:.3f} | {r['gb_per_s']:.0f} | {r['rel_err_triton']:.1e} |"
                     f" {r['rel_err_torch_grouped']:.1e} | {r['per_expert_bits_equal']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mixtral", "deepseek_v2_lite"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/runtime/expert_kernel")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench_expert_kernel needs a CUDA device")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for model in args.models:
        bench_model(model, args, rows)
        keys = list(rows[0])
        (out / "kernels.csv").write_text("\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n")
    md = table(rows)
    (out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
