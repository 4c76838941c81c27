"""SP-MoE: predictor accuracy on tiny twins, losslessness in every mode and ablation, non-twin maps,
profiled per-layer recall (calibration and routing-trace replay)."""

from __future__ import annotations

import json

import pytest
from conftest import open_with_reference, tiny_run_config

from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.config import (
    CutoffConfig,
    MethodConfig,
    RoutingConfig,
    SpecConfig,
    TraceConfig,
    TwinConfig,
)
from spmoe.policy.profile import load_profile
from spmoe.trace.accuracy import trace_layer_recall
from spmoe.trace.metrics import summarize
from spmoe.trace.routing import load_trace


def _session(weights: str, noise: float = 0.05, model: str = "tiny", draft: str = "tiny"):
    cfg = tiny_run_config(model, num_prompts=2, max_new_tokens=24)
    cfg.model.weights = weights
    cfg.model.twin = TwinConfig(expert_noise=noise)
    cfg.draft = load_preset("draft", draft)
    s = open_with_reference(cfg, 24)
    return s


@pytest.fixture(scope="module")
def twin():
    s = _session("twin", 0.05)
    yield s
    s.close()


def _spmoe(s, k=1, **kw):
    kw.setdefault("cutoff", CutoffConfig(mode="all"))
    method = MethodConfig(name="spmoe", num_slots=12, **kw)
    gens, _, _ = s.generate(method, s.cfg.hardware, 24, spec_cfg=SpecConfig(num_draft_tokens=k))
    return [g.token_ids for g in gens], summarize([g.records for g in gens])


def test_predictor_accurate_on_close_twins_and_near_chance_when_unrelated(twin):
    _, close = _spmoe(twin)
    unrelated = _session("random")
    try:
        _, far = _spmoe(unrelated)
    finally:
        unrelated.close()
    chance = 1 / twin.target.layout.num_experts
    assert close["predictor_top1_accuracy"] > 0.8
    assert far["predictor_top1_accuracy"] < chance + 0.15
    assert close["predictor_recall"] > far["predictor_recall"] + 0.2
    assert close["prefetch_waste"] < far["prefetch_waste"]


@pytest.mark.parametrize("mode,layer", [("off", None), ("fixed", 1), ("all", None), ("auto", None)])
@pytest.mark.parametrize("k", [1, 3])
def test_lossless_in_every_cutoff_mode(twin, mode, layer, k):
    tokens, summary = _spmoe(twin, k=k, cutoff=CutoffConfig(mode=mode, layer=layer))
    assert tokens == twin.reference
    if mode == "off":
        assert summary["prefetch_hits"] == 0 and "predictor_recall" not in summary
    if mode == "fixed":  # layers 0 and 1 only: nothing predicted deeper
        assert summary["predictor_top1_by_layer"].keys() <= {0, 1}
    expected = {"off": -1, "fixed": 1, "all": len(twin.target.layout.moe_layers) - 1}
    assert twin.last_extra["cutoff_mode"] == mode
    if mode in expected:
        assert twin.last_extra["cutoff_layer"] == expected[mode]


def test_auto_profile_measures_recall_per_layer(twin, tmp_path):
    tokens, _ = _spmoe(twin, cutoff=CutoffConfig(mode="auto", profile_dir=str(tmp_path)))
    assert tokens == twin.reference
    [path] = tmp_path.glob("profile-*.json")
    recall = load_profile(path).layer_recall
    assert len(recall) == len(twin.target.layout.moe_layers)
    assert min(recall) > 0.6  # close twins: the draft's hidden states route almost like the target's
    extra = twin.last_extra  # the summary records the profile it used
    assert path.name == f"profile-{extra['profile_key']}.json" and extra["profile_reused"] is False
    assert extra["profile_expert_load_ms"] > 0 and extra["profile_bandwidth_gb_per_s"] > 0
    assert extra["profile_copy_check"] == "skipped" and extra["profile_flagged"] is False  # tiny experts
    _spmoe(twin, cutoff=CutoffConfig(mode="auto", profile_dir=str(tmp_path)))
    assert twin.last_extra["profile_reused"] is True and twin.last_extra["profile_key"] == extra["profile_key"]
    _spmoe(twin, cutoff=CutoffConfig(mode="auto", profile_dir=str(tmp_path), reprofile=True))
    assert twin.last_extra["profile_reused"] is False and twin.last_extra["profile_key"] == extra["profile_key"]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # replaced in place, no temp files left


def test_replayed_run_takes_recall_from_the_trace(tmp_path):
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=12)
    cfg.draft = load_preset("draft", "tiny")
    cfg.spec = SpecConfig(num_draft_tokens=2)
    cfg.trace = TraceConfig(routing=True)
    method = MethodConfig(name="spmoe", num_slots=8, worker_thread=False, cutoff=CutoffConfig(mode="all"))
    s = open_session(cfg)
    try:
        s.generate(method, cfg.hardware, 12)
        s.last_routing.save(tmp_path / "routing_trace.npz")
    finally:
        s.close()
    cfg.routing = RoutingConfig(name="replay", trace_path=str(tmp_path))
    s = open_session(cfg)
    try:
        method.cutoff = CutoffConfig(mode="auto", profile_dir=str(tmp_path / "profiles"))
        s.generate(method, cfg.hardware, 12)
        [path] = (tmp_path / "profiles").glob("profile-*.json")
        assert json.loads(path.read_text())["fields"]["routing"]["name"] == "replay"
        expected = trace_layer_recall(load_trace(tmp_path), len(s.target.layout.moe_layers))
        assert load_profile(path).layer_recall == expected
    finally:
        s.close()


@pytest.mark.parametrize("worker,batched", [(True, True), (False, True), (True, False), (False, False)])
def test_lossless_with_every_runtime_ablation(twin, worker, batched):
    tokens, summary = _spmoe(twin, k=2, worker_thread=worker, batched_io=batched)
    assert tokens == twin.reference
    assert summary["prefetch_hits"] + summary["late_prefetches"] > 0


@pytest.mark.parametrize("point", ["attn_out", "residual", "ffn_input"])
def test_capture_points(twin, point):
    tokens, summary = _spmoe(twin, capture_point=point)
    assert tokens == twin.reference
    assert 0 <= summary["predictor_top1_accuracy"] <= 1


def test_non_twin_pair_uses_a_fitted_map(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # a fresh ~/.cache/spmoe
    s = _session("random", model="tiny_qwen3_moe", draft="tiny_qwen3")
    try:
        tokens, summary = _spmoe(s)
        assert tokens == s.reference
        assert summary["predictor_top1_accuracy"] is not None
    finally:
        s.close()
    maps = tmp_path / ".cache" / "spmoe" / "maps"
    assert len(list(maps.glob("maps-*.safetensors"))) == 1


def test_changed_shape_under_the_same_preset_name_gets_new_caches(tmp_path, monkeypatch):
    """Maps and profiles are keyed by content: a wider target under the same preset name is fitted
    and profiled anew instead of reusing (and crashing on) the narrower one's files."""
    monkeypatch.setenv("HOME", str(tmp_path))
    auto = CutoffConfig(mode="auto", profile_dir=str(tmp_path / ".cache" / "spmoe" / "profiles"))
    for hidden in (64, 96):
        cfg = tiny_run_config("tiny_qwen3_moe", num_prompts=1, max_new_tokens=6)
        cfg.model.weights = "random"
        cfg.model.hf_config = {**cfg.model.hf_config, "hidden_size": hidden}
        cfg.draft = load_preset("draft", "tiny_qwen3")
        s = open_session(cfg)
        try:
            gens, _, _ = s.generate(MethodConfig(name="spmoe", num_slots=8, worker_thread=False, cutoff=auto),
                                    cfg.hardware, 6)
            assert len(gens[0].token_ids) == 6
        finally:
            s.close()
    assert len(list((tmp_path / ".cache" / "spmoe" / "maps").glob("maps-*.safetensors"))) == 2
    assert len(list((tmp_path / ".cache" / "spmoe" / "profiles").glob("profile-*.json"))) == 2


@pytest.mark.gpu
def test_spmoe_on_gpu_is_lossless_with_tiny_cache(gpu):
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=24)
    cfg.hardware.device = "cuda"
    cfg.model.weights = "twin"
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    try:
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident_sd"), cfg.hardware, 24,
                               spec_cfg=SpecConfig(num_draft_tokens=2))
        for slots in (2, 3, 6):
            gens, _, _ = s.generate(MethodConfig(name="spmoe", num_slots=slots, cutoff=CutoffConfig(mode="all")),
                                    cfg.hardware, 24, spec_cfg=SpecConfig(num_draft_tokens=2))
            assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
    finally:
        s.close()
