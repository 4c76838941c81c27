"""experiments.diag_lossless on the tiny CPU model: an evicting lru_nosd agrees with the GPU-resident
reference bit for bit in float32 (every logit, every layer output), and a method perturbed at one
layer is reported as differing from that layer on."""

from __future__ import annotations

import csv

import pytest

from experiments import diag_lossless
from spmoe.models.experts import OffloadedExperts

ARGS = ["--model", "tiny", "--weights", "random", "--dataset", "synthetic", "--hardware", "cpu", "--decode", "static",
        "--method", "lru_nosd", "--num-slots", "6", "--prompts", "2", "--tokens", "6"]
PERTURBED_LAYER = 2


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method_decode", ["static", "graphs"])
def test_evicting_lru_nosd_is_bit_exact_in_float32(method_decode, tmp_path):
    s = diag_lossless.main([*ARGS, "--method-decode", method_decode, "--out", str(tmp_path)])
    assert s["run_misses"] > 0 and s["forced_method_misses"] == s["run_misses"]  # it evicts, in both passes
    positions, layers = _rows(tmp_path / "positions.csv"), _rows(tmp_path / "prefill_layers.csv")
    assert len(positions) == 2 * 6 and len(layers) == 2 * 4  # prompts x tokens, prompts x layers
    assert all(float(r["max_abs_logit_diff"]) == 0.0 for r in positions)
    assert all(float(r["max_abs_diff"]) == 0.0 for r in layers)
    assert all(r["first_differing_layer"] == "" for r in positions)
    assert s["num_differing_positions"] == 0 and s["num_method_not_reproducing_run"] == 0
    assert s["first_differing_position"] is None and s["prefill_first_differing_layer"] is None
    assert "first differing position: none" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "step_layers.csv").is_file()


def test_a_perturbed_layer_is_reported_where_it_differs(tmp_path, monkeypatch):
    """The offloaded path's expert outputs scaled at one layer (the reference serves its experts through the
    resident grouped path, so only the method changes): the diff starts at that layer, at the prefill."""
    routes = OffloadedExperts._routes

    def perturbed(self, *args, **kwargs):
        ys = routes(self, *args, **kwargs)  # [T, A, H]
        return ys * 1.01 if self.layer_idx == PERTURBED_LAYER else ys

    monkeypatch.setattr(OffloadedExperts, "_routes", perturbed)
    s = diag_lossless.main([*ARGS, "--out", str(tmp_path)])
    assert s["prefill_first_differing_layer"] == {"prompt": 0, "layer": PERTURBED_LAYER}
    assert s["prefill_max_abs_logit_diff"] > 0
    assert s["first_differing_position"]["position"] == 0
    assert s["first_differing_position"]["first_differing_layer"] == PERTURBED_LAYER
    layers = _rows(tmp_path / "prefill_layers.csv")
    assert all(float(r["max_abs_diff"]) == 0.0 for r in layers if int(r["layer"]) < PERTURBED_LAYER)
    assert all(float(r["max_abs_diff"]) > 0.0 for r in layers if int(r["layer"]) >= PERTURBED_LAYER)
    positions = _rows(tmp_path / "positions.csv")
    decode = [r for r in positions if r["phase"] == "decode"]
    assert all(r["first_differing_layer"] == str(PERTURBED_LAYER) for r in decode)  # every step, from that layer
