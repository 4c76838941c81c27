"""
Launch configurations of the one-row quantized GEMV kernels (`spmoe.runtime.quant_gemv`) on a draft's shapes.

    python -m experiments.sweep_quant_gemv --out results/spmoe_plus/quant_gemv_sweep     # CUDA + Triton

For each precision (int8; int4 in groups of --group-size) and each `LaunchConfig` of the grid (block_n x
block_k x num_warps x num_stages), one decoder layer of the draft preset (q, k, v, o, gate, up, down; random
weights, T = 1) is captured as one CUDA graph of --launches repetitions and timed by replays (median of
--reps); bf16 cuBLAS (`F.linear`) on the same shapes is the anchor. *Layer us* = time of the layer's seven
sites; *GB/s* = the bytes its weights (and scales) occupy / that time. Writes `sweep.csv` (every config)
and `table.md` (the best config per precision, the current `ROW_CONFIG`, bf16) under --out; the best
configs are what `ROW_CONFIG` should hold.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import logging
from pathlib import Path

import torch

from experiments.bench_expert_kernel import time_graph
from experiments.bench_quant_draft import site_shapes
from spmoe.io import write_text_atomic
from spmoe.models import int4
from spmoe.models.quantized_draft import quantize_rows
from spmoe.runtime import moe_gemv, quant_gemv
from spmoe.runtime.quant_gemv import LaunchConfig

log = logging.getLogger("sweep_quant_gemv")
GRID = {"block_n": (16, 32, 64), "block_k": (256, 512, 1024), "num_warps": (4, 8), "num_stages": (3,)}


def sites(shapes: list[tuple[int, int]], group: int, device: torch.device) -> dict[str, list]:
    """Per precision, the callables' arguments of every site: (x, weights...)."""
    out = {"bf16": [], "int8": [], "int4": []}
    for o, i in shapes:
        w = torch.randn(o, i, device=device, dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, i, device=device, dtype=torch.bfloat16)
        out["bf16"].append((x, w))
        out["int8"].append((x, *quantize_rows(w)))
        out["int4"].append((x, *int4.quantize(w, group), i))
    return out


def call(precision: str, args: tuple, config: LaunchConfig | None) -> None:
    if precision == "bf16":
        torch.nn.functional.linear(*args)
    elif precision == "int8":
        quant_gemv.int8_linear(*args, None, config)
    else:
        quant_gemv.int4_linear(*args, None, config)


def time_layer_us(precision: str, layer: list, config: LaunchConfig | None, launches: int, reps: int) -> float:
    """Median us of one pass over the layer's sites, from a CUDA graph of `launches` passes."""
    def passes() -> None:
        for _ in range(launches):
            for args in layer:
                call(precision, args, config)
    return time_graph([passes], reps) * 1e3 / launches


def layer_bytes(layer: list) -> int:
    """Bytes the sites' weights (and scales, offsets) occupy."""
    return sum(t.numel() * t.element_size() for args in layer for t in args[1:] if isinstance(t, torch.Tensor))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--launches", type=int, default=10)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default="results/spmoe_plus/quant_gemv_sweep")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available() or quant_gemv.triton is None:
        raise SystemExit("sweep_quant_gemv needs CUDA and Triton")
    torch.manual_seed(0)
    layer = sites(site_shapes(args.draft, 1)[:7], args.group_size, torch.device("cuda"))
    moe_gemv.use("auto")
    grid = [LaunchConfig(*c) for c in itertools.product(*GRID.values())]
    rows = []
    for precision in ("bf16", "int8", "int4"):
        current = quant_gemv.ROW_CONFIG.get(precision)
        configs = [None] if precision == "bf16" else [current] + [c for c in grid if c != current]
        nbytes = layer_bytes(layer[precision])
        for config in configs:
            try:
                us = time_layer_us(precision, layer[precision], config, args.launches, args.reps)
            except Exception as exc:  # a config the compiler refuses (registers, shared memory): skipped, logged
                log.warning("%s %s: %s", precision, config, str(exc).splitlines()[0][:200])
                continue
            rows.append({"precision": precision, **(vars(config) if config else {}), "layer_us": round(us, 2),
                         "gb_per_s": round(nbytes / us / 1e3, 1), "current": config is not None and config == current})
    out = Path(args.out)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["precision", *GRID, "layer_us", "gb_per_s", "current"], restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "sweep.csv", buf.getvalue())
    device = torch.cuda.get_device_name()
    lines = [f"# One-row quantized GEMV: one {args.draft} decoder layer (7 sites, T = 1), {device}",
             "", "| precision | config | layer us | GB/s |", "|---|---|---|---|"]
    for precision in ("bf16", "int8", "int4"):
        mine = [r for r in rows if r["precision"] == precision]
        picks = [("best", min(mine, key=lambda r: r["layer_us"]))] if mine else []
        picks += [("current", r) for r in mine if r["current"]]
        for label, r in picks:
            cfg = "cuBLAS" if precision == "bf16" else f"{label}: " + ", ".join(f"{k}={r[k]}" for k in GRID)
            lines.append(f"| {precision} | {cfg} | {r['layer_us']} | {r['gb_per_s']} |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "table.md", table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
