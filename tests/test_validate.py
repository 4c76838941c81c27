"""Bad input is rejected before anything is loaded, each error naming the key, the value and what is
valid: config knobs (`spmoe.validate`), a routing trace's contents, a checkpoint whose tensors do not
match its config.json, and the prompt-truncation rule (BOS kept, nothing dropped silently).

"Before anything is loaded" is checked by making the non-expert materialization and the expert
store fail the test if they are reached (`guard`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.config import CutoffConfig, DatasetConfig, RoutingConfig, SpecConfig
from spmoe.data.prompts import load_prompts, truncate_left
from spmoe.data.tokenizer import ByteTokenizer
from spmoe.models.checkpoint import CheckpointError
from spmoe.session import open_session
from spmoe.trace.routing import TraceError, load_trace
from spmoe.validate import validate_config

TRACE = Path(__file__).resolve().parent.parent / "results" / "real_pair" / "traces" / "humaneval_k1.npz"




def rejects(cfg, exc=ValueError, *needles: str) -> str:
    with pytest.raises(exc) as err:
        open_session(cfg)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from: {msg}"
    return msg


def _cfg(method: str = "gpu_resident", **kw):
    """The tiny preset with random weights (no draft needed)."""
    cfg = tiny_run_config(method=method, **kw)
    cfg.model.weights = "random"
    return cfg


def _sd(method: str = "spmoe", **spec):
    cfg = _cfg(method)
    cfg.draft = load_preset("draft", "tiny")
    cfg.spec = SpecConfig(**spec)
    return cfg


# -- spec knobs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [-0.5, math.nan, math.inf])
def test_bad_temperature(guard, temperature):
    rejects(_sd(temperature=temperature), ValueError, "spec.temperature", ">= 0")


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, math.nan])
def test_bad_top_p(guard, top_p):
    rejects(_sd(top_p=top_p), ValueError, "spec.top_p", "0 < top_p <= 1")


@pytest.mark.parametrize("k", [0, -1, 65])
def test_bad_num_draft_tokens(guard, k):
    rejects(_sd(num_draft_tokens=k), ValueError, "spec.num_draft_tokens", f"={k}", "1..64")


def test_num_draft_tokens_unused_without_sd_still_not_negative(guard):
    cfg = _cfg("lru_nosd")
    cfg.spec = SpecConfig(num_draft_tokens=-3)
    rejects(cfg, ValueError, "spec.num_draft_tokens", ">= 0")


# -- method knobs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("top_k,needle", [(0, "1 to the target's expert count"), (100, "1..8")])
def test_predict_top_k_within_the_expert_count(guard, top_k, needle):
    cfg = _sd()
    cfg.method.predict_top_k = top_k
    rejects(cfg, ValueError, "method.predict_top_k", f"={top_k}", needle)


@pytest.mark.parametrize("slots,needle", [(0, ">= 1"), (33, "1..32")])
def test_num_slots_between_one_and_the_expert_count(guard, slots, needle):
    cfg = _cfg("lru_nosd")
    cfg.method.num_slots = slots
    rejects(cfg, ValueError, "method.num_slots", f"={slots}", needle)


@pytest.mark.parametrize("layer", [4, -2, None])
def test_fixed_cutoff_layer_within_depth(guard, layer):
    cfg = _sd()
    cfg.method.cutoff = CutoffConfig(mode="fixed", layer=layer)
    rejects(cfg, ValueError, "method.cutoff.layer", f"={layer}")


def test_fixed_cutoff_layer_names_the_depth(guard):
    cfg = _sd()
    cfg.method.cutoff = CutoffConfig(mode="fixed", layer=4)
    rejects(cfg, ValueError, "-1..3")


@pytest.mark.parametrize("key,value,needle", [
    ("capture_point", "mlp_out", "ffn_input"),
    ("timeout_s", 0.0, "seconds > 0"),
    ("gating_threshold", 1.5, "0 < threshold <= 1"),
])
def test_other_method_knobs(guard, key, value, needle):
    cfg = _sd()
    setattr(cfg.method, key, value)
    rejects(cfg, ValueError, f"method.{key}", needle)


@pytest.mark.parametrize("key,value,needle", [
    ("k_min", -1, "integer >= 0"),
    ("accept_prior", 1.5, "0 <= acceptance <= 1"),
    ("draft_min_agreement", 2.0, "0 <= agreement <= 1"),
    ("draft_group_size", 0, "integer >= 1"),
    ("host_threads", 0, "integer >= 1"),
    ("host_max_per_layer", -1, "integer >= 0"),
    ("nosd_eviction", "belady", "lru"),
])
def test_plus_knobs(guard, key, value, needle):
    cfg = _sd("spmoe_plus")
    setattr(cfg.method.plus, key, value)
    rejects(cfg, ValueError, f"method.plus.{key}", needle)


@pytest.mark.parametrize("name,mode,needle", [("tensorboard", "offline", "none, wandb"),
                                              ("wandb", "onlin", "offline, online, disabled")])
def test_logger_rejected_before_the_run(guard, name, mode, needle):
    cfg = _cfg()
    cfg.logger = dataclasses.replace(cfg.logger, name=name, mode=mode)
    rejects(cfg, ValueError, "logger", needle)


def test_unknown_cutoff_mode(guard):
    cfg = _sd()
    cfg.method.cutoff = CutoffConfig(mode="sometimes")
    rejects(cfg, ValueError, "method.cutoff.mode", "sometimes", "auto", "fixed")


# -- dataset, hardware, routing ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, -5])
def test_max_prompt_tokens_at_least_one(guard, value):
    cfg = _cfg()
    cfg.dataset = DatasetConfig(name="humaneval", max_prompt_tokens=value)
    rejects(cfg, ValueError, "dataset.max_prompt_tokens", f"={value}", ">= 1")


def test_chat_template_mode(guard):
    cfg = _cfg()
    cfg.dataset = DatasetConfig(name="humaneval", chat_template="sometimes")
    rejects(cfg, ValueError, "dataset.chat_template", "auto", "true", "false")


@pytest.mark.parametrize("key,value,needle", [
    ("gpu_budget_gib", 0.0, "GiB > 0"),
    ("pcie_gb_per_s", -1.0, "GB/s > 0"),
    ("reserve_mib", -1.0, "MiB >= 0"),
])
def test_hardware_knobs(guard, key, value, needle):
    cfg = _cfg("lru_nosd")
    cfg.hardware = dataclasses.replace(cfg.hardware, **{key: value})
    rejects(cfg, ValueError, f"hardware.{key}", needle)


def test_pacing_needs_a_bandwidth(guard):
    cfg = _cfg("lru_nosd")
    cfg.hardware = dataclasses.replace(cfg.hardware, pace_pcie=True, pcie_gb_per_s=None)
    rejects(cfg, ValueError, "hardware.pace_pcie", "pcie_gb_per_s")


def test_replay_needs_a_trace_path(guard):
    cfg = _cfg()
    cfg.routing = RoutingConfig(name="replay", trace_path=None)
    rejects(cfg, ValueError, "routing.trace_path", "routing_trace.npz")


def test_validate_config_accepts_every_preset_combination_it_is_given():
    cfg = _sd()
    validate_config(cfg)  # the tiny SD defaults are valid
    cfg.method.cutoff = CutoffConfig(mode="fixed", layer=-1)
    validate_config(cfg)


# -- truncation --------------------------------------------------------------------------------------

def test_truncation_keeps_bos_and_the_last_tokens():
    assert truncate_left([1, 10, 11, 12, 13], 3, bos_id=1) == ([1, 12, 13], 2)
    assert truncate_left([1, 10, 11], 3, bos_id=1) == ([1, 10, 11], 0)
    assert truncate_left([9, 10, 11, 12], 2, bos_id=1) == ([11, 12], 2)  # no BOS: the last tokens
    assert truncate_left([1, 10, 11], 1, bos_id=1) == ([11], 2)  # one token: the last one


def test_truncated_prompts_are_counted_and_logged(caplog):
    tok = ByteTokenizer(512)
    with caplog.at_level(logging.WARNING, logger="spmoe.data.prompts"):
        prompts = load_prompts(DatasetConfig(name="humaneval", max_prompt_tokens=16), tok, 512, 2, seed=0)
    for p in prompts:
        full = tok.encode(p.text)
        assert p.token_ids == [tok.bos_id] + full[-15:]
        assert p.truncated_tokens == len(full) - 16 > 0
    assert "truncated" in caplog.text and "max_prompt_tokens=16" in caplog.text


# -- routing trace contents --------------------------------------------------------------------------

def _corrupt(tmp_path: Path, **changes) -> Path:
    trace = dataclasses.replace(load_trace(TRACE), **changes)
    path = tmp_path / "bad.npz"
    trace.save(path)
    return path


def _decode_row(trace) -> int:
    return int(np.flatnonzero(trace.row_step > 0)[0])


@pytest.mark.parametrize("what", ["route_high", "route_negative", "predicted", "lookahead"])
def test_trace_ids_out_of_range(tmp_path, what):
    t = load_trace(TRACE)
    name = {"route_high": "routes", "route_negative": "routes"}.get(what, what)
    arr = getattr(t, name).copy()
    arr.flat[5] = {"route_high": t.num_experts + 1, "route_negative": -1, "predicted": t.num_experts,
                   "lookahead": -2}[what]
    with pytest.raises(TraceError, match=f"{name} holds 1 ids out of range"):
        load_trace(_corrupt(tmp_path, **{name: arr}))


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5])
def test_trace_weights_finite(tmp_path, value):
    t = load_trace(TRACE)
    w = t.route_weights.copy()
    w[3, 2, 1] = value
    with pytest.raises(TraceError, match=r"route_weights .* \[3, 2, 1\]"):
        load_trace(_corrupt(tmp_path, route_weights=w))


@pytest.mark.parametrize("accepted", [2, -1])
def test_trace_acceptance_within_k(tmp_path, accepted):
    t = load_trace(TRACE)
    acc = t.row_accepted.copy()
    row = _decode_row(t)
    acc[row] = accepted  # k = 1 in this trace
    with pytest.raises(TraceError, match=f"row {row} accepted {accepted} of k=1"):
        load_trace(_corrupt(tmp_path, row_accepted=acc))


def test_replay_of_a_bad_trace_fails_before_loading(guard, tmp_path):
    t = load_trace(TRACE)
    routes = t.routes.copy()
    routes[0, 0, 0] = 99
    cfg = _cfg()
    cfg.routing = RoutingConfig(name="replay", trace_path=str(_corrupt(tmp_path, routes=routes)))
    rejects(cfg, TraceError, "routes", "out of range", "0..7")


def test_every_case_of_a_replay_is_checked_against_the_trace_before_loading(guard):
    cfg = _sd("spmoe")  # k=1, the trace's
    cfg.routing = RoutingConfig(name="replay", trace_path=str(TRACE))
    other = dataclasses.replace(cfg, spec=SpecConfig(num_draft_tokens=2))
    with pytest.raises(TraceError, match=r"num_draft_tokens=1; replay with the same k \(got 2\)"):
        open_session(cfg, [other])


# -- checkpoint vs config.json -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    mcfg = tiny_run_config().model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mcfg.family, **mcfg.hf_config), dtype=torch.float32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return path


def _with_config(ckpt: Path, tmp_path: Path, **changes):
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    cfg = _cfg(max_new_tokens=2, num_prompts=1)
    cfg.model.weights, cfg.model.path = "checkpoint", str(path)
    return cfg


def test_checkpoint_with_the_wrong_expert_count(guard, ckpt, tmp_path):
    cfg = _with_config(ckpt, tmp_path, num_local_experts=4)
    msg = rejects(cfg, CheckpointError, "[8, 64]", "[4, 64]", "config.json")
    assert "gate.weight" in msg  # the router: the first tensor whose shape depends on the expert count


def test_checkpoint_with_the_wrong_hidden_size(guard, ckpt, tmp_path):
    cfg = _with_config(ckpt, tmp_path, hidden_size=32, head_dim=8)
    rejects(cfg, CheckpointError, "embed_tokens.weight", "64]", "32]", "config.json")


def test_checkpoint_expert_shapes_checked(ckpt, tmp_path):
    """Experts alone (non-expert tensors consistent): a wrong intermediate size names an expert tensor."""
    cfg = _with_config(ckpt, tmp_path, intermediate_size=48)
    rejects(cfg, CheckpointError, "experts.0.w1.weight", "[128, 64]", "[48, 64]")


# -- summaries record the knobs ----------------------------------------------------------------------

def test_summary_records_the_knobs_that_change_results(tmp_path):
    from spmoe.experiment import run_benchmark

    cfg = _cfg(max_new_tokens=2, num_prompts=1, check_lossless="false")
    cfg.dataset = DatasetConfig(name="humaneval", max_prompt_tokens=16)
    cfg.spec = SpecConfig(top_p=0.9)
    summary = run_benchmark(cfg, tmp_path)
    assert summary["top_p"] == 0.9 and summary["max_prompt_tokens"] == 16
    assert summary["prompt_tokens_truncated"] > 0 and summary["chat_template"] is False
    assert summary["dataset_source"] is None and summary["prompt_len"] is None


def test_sequence_longer_than_the_models_positions(guard):
    cfg = _cfg(max_new_tokens=100)
    cfg.dataset = DatasetConfig(name="humaneval", max_prompt_tokens=4000)  # tiny: 4096 positions
    rejects(cfg, ValueError, "dataset.max_prompt_tokens=4000", "4102 positions", "max_position_embeddings=4096")
