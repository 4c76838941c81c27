"""experiments.bench_quant_draft runs on the CPU (tiny shapes, no graphs) and writes its table: every case,
the quantized ones within their quantization error of bf16, the kernel cases equal to their dequantize twin
where the kernel does not serve."""

import csv
import sys

import torch

from experiments import bench_quant_draft


def test_bench_quant_draft_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_quant_draft", "--out", str(tmp_path), "--reps", "1", "--rounds", "1"])
    bench_quant_draft.main()
    rows = {r["case"]: r for r in csv.DictReader(open(tmp_path / "cases.csv"))}
    assert list(rows) == list(bench_quant_draft.CASES)
    assert float(rows["int8_dequant"]["rel_err_vs_bf16"]) < 0.05
    assert float(rows["int4_dequant"]["rel_err_vs_bf16"]) < 0.2
    assert float(rows["int8_kernel"]["rel_err_vs_dequant"]) == 0.0
    assert (tmp_path / "table.md").read_text().startswith("# Quantized draft sites")


def test_site_shapes_follow_the_draft_preset():
    shapes = bench_quant_draft.site_shapes("mistral_7b", 2)
    assert shapes[:7] == [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096),
                          (14336, 4096), (14336, 4096), (4096, 14336)]
    assert len(shapes) == 2 * 7 + 1 and shapes[-1] == (32000, 4096)


def test_sweep_sites_bytes_per_precision():
    from experiments import sweep_quant_gemv

    layer = sweep_quant_gemv.sites([(64, 256), (32, 256)], 128, torch.device("cpu"))
    bf16, int8, int4 = (sweep_quant_gemv.layer_bytes(layer[p]) for p in ("bf16", "int8", "int4"))
    assert bf16 == 2 * (64 + 32) * 256
    assert int8 == (64 + 32) * 256 + 2 * (64 + 32)  # int8 codes + row scales in the weight's dtype (bf16)
    assert int8 < bf16 and int4 < int8
