"""experiments.diag_lossless on the tiny CPU model: an evicting lru_nosd agrees with the GPU-resident
reference bit for bit in float32 (every logit, every layer output and part), and a method perturbed at
one layer is reported as differing from that layer on, in the part that was perturbed."""

from __future__ import annotations

import csv

import pytest
import torch

from experiments import diag_lossless
from spmoe.models.experts import OffloadedExperts

ARGS = ["--model", "tiny", "--weights", "random", "--dataset", "synthetic", "--hardware", "cpu", "--decode", "static",
        "--method", "lru_nosd", "--num-slots", "6", "--prompts", "2", "--tokens", "6"]
PERTURBED_LAYER = 2
PART_COLUMNS = ("first_differing_part", "part_max_abs_diff", "fresh_difference")
NUM_FORWARDS = 2 * 6  # prompts x (prefill + 5 decode steps of one token)


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method_decode", ["static", "graphs"])
def test_evicting_lru_nosd_is_bit_exact_in_float32(method_decode, tmp_path):
    s = diag_lossless.main([*ARGS, "--method-decode", method_decode, "--out", str(tmp_path)])
    assert s["run_misses"] > 0 and s["forced_method_misses"] == s["run_misses"]  # it evicts, in both passes
    served = s["forced_method_layers_served"]  # the tiny cache evicts; every layer is served one way or the other
    assert served["grouped"] + served["per_expert"] > 0
    positions, layers = _rows(tmp_path / "positions.csv"), _rows(tmp_path / "prefill_layers.csv")
    assert len(positions) == 2 * 6 and len(layers) == 2 * 4  # prompts x tokens, prompts x layers
    assert all(float(r["max_abs_logit_diff"]) == 0.0 for r in positions)
    assert all(float(r["max_abs_diff"]) == 0.0 for r in layers)
    assert all(r["first_differing_layer"] == "" for r in positions)
    assert all(r[c] == "" for r in positions for c in PART_COLUMNS)  # the columns exist, empty
    assert s["first_differing_part_counts"] == {}
    assert s["num_differing_positions"] == 0 and s["num_method_not_reproducing_run"] == 0
    assert s["first_differing_position"] is None and s["prefill_first_differing_layer"] is None
    assert "first differing position: none" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "step_layers.csv").is_file()


def _perturb_experts(monkeypatch):
    """The offloaded path's expert outputs scaled at one layer (the reference serves its experts through the
    resident grouped path, so only the method changes)."""
    routes = OffloadedExperts._routes

    def perturbed(self, *args, **kwargs):
        ys = routes(self, *args, **kwargs)  # [T, A, H]
        return ys * 1.01 if self.layer_idx == PERTURBED_LAYER else ys

    monkeypatch.setattr(OffloadedExperts, "_routes", perturbed)


def test_a_perturbed_layer_is_reported_where_it_differs(tmp_path, monkeypatch):
    """Expert outputs perturbed at one layer: the diff starts at that layer, at the prefill, in every forward
    in the experts' output (their inputs, routes and weights identical), fresh each time."""
    _perturb_experts(monkeypatch)
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
    assert all(r["first_differing_part"] == "experts_out" and r["fresh_difference"] == "True" for r in positions)
    assert all(float(r["part_max_abs_diff"]) > 0 for r in positions)
    assert s["first_differing_part_counts"] == {"experts_out": {"forwards": NUM_FORWARDS, "fresh": NUM_FORWARDS}}
    assert s["first_differing_position"]["first_differing_part"] == "experts_out"
    assert "experts_out 12 (12 fresh)" in (tmp_path / "table.md").read_text()


def test_no_parts_and_no_layer_csvs(tmp_path, monkeypatch):
    _perturb_experts(monkeypatch)
    s = diag_lossless.main([*ARGS, "--no-parts", "--no-layer-csvs", "--out", str(tmp_path)])
    assert s["first_differing_part_counts"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["positions.csv", "summary.json", "table.md"]
    positions = _rows(tmp_path / "positions.csv")
    assert all(r["first_differing_layer"] == str(PERTURBED_LAYER) for r in positions)
    assert all(r[c] == "" for r in positions for c in PART_COLUMNS)


ROUTER_LAYER, ROUTER_STEP = 1, 2  # perturbed in prompt 0's decode step 2 only


@pytest.mark.parametrize("part", ["routes", "weights"])
def test_a_perturbed_router_is_named(part, tmp_path, monkeypatch):
    """The method's router at one layer and one decode step changes one route's expert (`routes`) or one
    route's weight (`weights`): that forward's first part is named so, fresh; the later forwards of that
    prompt first differ one layer later, in the attention (which reads the changed keys/values), not fresh."""
    force_static = diag_lossless.force_static
    calls = []

    def perturb(gate, args, output):
        logits, weights, index = output  # [T, E], [T, A], [T, A]
        calls.append(None)
        if len(calls) - 1 != ROUTER_STEP:  # one gate call per forward: the forward's index in the method's pass
            return None
        if part == "routes":
            index = index.clone()
            index[0, 1] = next(e for e in range(logits.shape[-1]) if e not in index[0].tolist())
        else:
            weights = weights.clone()
            weights[0, 0] *= 1.01
        return logits, weights, index

    def method_perturbed(runtime, *args, **kwargs):
        first = not calls  # the method's pass runs before the reference's
        handle = runtime.model.model.layers[ROUTER_LAYER].mlp.gate.register_forward_hook(perturb) if first else None
        try:
            return force_static(runtime, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(diag_lossless, "force_static", method_perturbed)
    s = diag_lossless.main([*ARGS, "--out", str(tmp_path)])
    positions = _rows(tmp_path / "positions.csv")
    by_step = {int(r["step"]): r for r in positions if r["prompt"] == "0"}
    assert all(by_step[f]["first_differing_layer"] == "" for f in range(ROUTER_STEP))
    assert (by_step[ROUTER_STEP]["first_differing_layer"], by_step[ROUTER_STEP]["first_differing_part"],
            by_step[ROUTER_STEP]["fresh_difference"]) == (str(ROUTER_LAYER), part, "True")
    later = [by_step[f] for f in range(ROUTER_STEP + 1, 6)]
    assert all((r["first_differing_layer"], r["first_differing_part"], r["fresh_difference"])
               == (str(ROUTER_LAYER + 1), "attn", "False") for r in later)
    assert all(r["first_differing_part"] == "" for r in positions if r["prompt"] == "1")
    assert s["first_differing_part_counts"] == {"attn": {"forwards": len(later), "fresh": 0},
                                                part: {"forwards": 1, "fresh": 1}}
    assert torch.isfinite(torch.tensor(float(by_step[ROUTER_STEP]["part_max_abs_diff"])))
