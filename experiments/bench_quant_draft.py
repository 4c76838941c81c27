"""
Quantized-draft benchmark (GPU): one decode forward's linear layers of a dense draft, bf16 against
spmoe_plus's int8 and int4 sites with and without the fused kernel (`spmoe.runtime.quant_gemv`).

    python -m experiments.bench_quant_draft --draft mistral_7b --out results/spmoe_plus/quant_draft_kernel

The draft's linear layers (shapes from its preset's config: per layer q, k, v, o, gate, up, down; then the
LM head; random weights) are built as `nn.Linear` in bf16, then quantized (`spmoe.plus.draft_precision.
QuantLinear`, groups of --group-size for int4, one shared workspace). A *forward* = every site once on one
token's row (T = --tokens), in order. Cases, each captured as one CUDA graph and timed by replays (median
of --reps after warm-up), interleaved A B C D E E D C B A over --rounds:
- `bf16`: the bf16 sites (cuBLAS);
- `int8_dequant`, `int4_dequant`: the quantized sites dequantizing into the workspace, then cuBLAS
  (`hardware.expert_kernel=torch`);
- `int8_kernel`, `int4_kernel`: the quantized sites through the fused kernel (`hardware.expert_kernel=auto`).
Bandwidth = bytes the case's weights occupy / time. Checks: each quantized case's max relative error of
the last site's output against bf16, and kernel against dequant (same quantized weights). Writes
`cases.csv` and `table.md` under --out and prints the table last. On the CPU it runs tiny shapes as a smoke
test (no graphs, the kernel not served).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from experiments.presets import load_preset
from spmoe.io import write_text_atomic
from spmoe.models.draft import draft_hf_config
from spmoe.plus.draft_precision import QuantLinear, quantize_draft
from spmoe.runtime import moe_gemv

log = logging.getLogger("bench_quant_draft")
CASES = ("bf16", "int8_dequant", "int8_kernel", "int4_dequant", "int4_kernel")


def site_shapes(draft: str, layers: int | None) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of one forward of the draft preset, in order."""
    cfg = draft_hf_config(load_preset("draft", draft))
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    per_layer = [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim),
                 (inter, h), (inter, h), (h, inter)]
    return per_layer * (layers or cfg.num_hidden_layers) + [(cfg.vocab_size, h)]


def build(shapes: list[tuple[int, int]], device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    sites = nn.Sequential(*[nn.Linear(i, o, bias=False, device="meta", dtype=torch.bfloat16) for o, i in shapes])
    sites.to_empty(device=device)
    for site in sites:
        nn.init.normal_(site.weight, std=0.02)
    return sites


def forward(sites: nn.Sequential, xs: list[torch.Tensor]) -> torch.Tensor:
    """Every site on its own input row (shapes differ); returns the last output."""
    out = None
    for site, x in zip(sites, xs):
        out = site(x)
    return out


def weight_bytes(sites: nn.Module) -> int:
    total = 0
    for m in sites.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            total += m.nbytes
    return total


def timed(fn, reps: int, cuda: bool) -> float:
    """Median ms of `reps` calls."""
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--layers", type=int, default=None, help="draft layers (default: the preset's)")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="results/spmoe_plus/quant_draft_kernel")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shapes = site_shapes(args.draft, args.layers) if cuda else [(48, 32), (32, 48), (64, 32)] * 2
    xs = [torch.randn(args.tokens, i, device=device, dtype=torch.bfloat16) for _, i in shapes]
    models = {"bf16": build(shapes, device)}
    for bits in ("int8", "int4"):
        m = build(shapes, device)
        quantize_draft(m, bits, group_size=args.group_size)
        models[bits] = m
    kernel_of = {"bf16": "auto", "int8_dequant": "torch", "int8_kernel": "auto", "int4_dequant": "torch",
                 "int4_kernel": "auto"}
    model_of = {c: models[c.split("_")[0]] for c in CASES}
    calls, outputs = {}, {}
    for case in CASES:
        moe_gemv.use(kernel_of[case])
        with torch.no_grad():
            outputs[case] = forward(model_of[case], xs).float()
            if cuda:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    forward(model_of[case], xs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    forward(model_of[case], xs)
                calls[case] = graph.replay
            else:
                calls[case] = lambda c=case: forward(model_of[c], xs)
    moe_gemv.use("auto")
    ms: dict[str, list[float]] = {c: [] for c in CASES}
    for _ in range(args.rounds):
        for case in (*CASES, *reversed(CASES)):
            with torch.no_grad():
                ms[case].append(timed(calls[case], args.reps, cuda))
    ref = outputs["bf16"]
    rows = []
    for case in CASES:
        nbytes = weight_bytes(model_of[case])
        med = statistics.median(ms[case])
        base = case.split("_")[0]
        twin = outputs.get(f"{base}_dequant")
        rows.append({"case": case, "ms_per_forward": round(med, 3), "ms_min": round(min(ms[case]), 3),
                     "ms_max": round(max(ms[case]), 3), "weight_gb": round(nbytes / 1e9, 3),
                     "gb_per_s": round(nbytes / 1e9 / (med / 1e3), 1),
                     "rel_err_vs_bf16": float((outputs[case] - ref).abs().max() / ref.abs().max()),
                     "rel_err_vs_dequant": (float((outputs[case] - twin).abs().max() / twin.abs().max())
                                            if twin is not None and case.endswith("kernel") else None)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    lines = [",".join(header)] + [",".join("" if r[k] is None else str(r[k]) for k in header) for r in rows]
    write_text_atomic(out / "cases.csv", "\n".join(lines) + "\n")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    table = [f"# Quantized draft sites: {args.draft}, {len(shapes)} sites, T={args.tokens}, {device_name}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join("-" if r[k] is None else (f"{r[k]:.2e}" if "err" in k else str(r[k])) for k in header)
              + " |" for r in rows]
    write_text_atomic(out / "table.md", "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
