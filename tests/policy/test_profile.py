"""Cutoff profiles: content keys (every keyed setting changes the key, identical settings and a
renamed preset do not), the cache (hit, miss, reprofile, atomic files), the copy check against the
measured bandwidth, and hidden-map files keyed the same way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import spmoe.policy.profile as profile_mod
from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.cache_key import content_key
from spmoe.config import CutoffConfig, MethodConfig, RoutingConfig
from spmoe.policy.cutoff import Profile
from spmoe.policy.profile import check_copy, load_or_measure, measure_bandwidth_gb_per_s, profile_fields
from spmoe.predict.hidden_map import load_or_fit
from spmoe.session import open_session

TRACES = Path(__file__).resolve().parents[2] / "results" / "real_pair" / "traces"


def _cfg():
    cfg = tiny_run_config(method="spmoe")
    cfg.model.weights = "random"
    cfg.draft = load_preset("draft", "tiny")
    cfg.method = MethodConfig(name="spmoe")
    return cfg


def _hf(hf_config: dict, family: str):
    return AutoConfig.for_model(family, **hf_config)


def _key(cfg, device: str = "cpu (x86_64)", slots: int = 12, top_k: int = 2, maps: bool = False) -> str:
    target = _hf(cfg.model.hf_config, cfg.model.family)
    draft = _hf(cfg.draft.hf_config, cfg.draft.family)
    return content_key(profile_fields(cfg, target, draft, device, slots, top_k, maps))


def _changed(setting: str):
    """A config (and _key kwargs) that differs from _cfg() in exactly one keyed setting."""
    cfg, kw = _cfg(), {}
    if setting == "model_shape":
        cfg.model.hf_config = {**cfg.model.hf_config, "hidden_size": 96}
    elif setting == "draft_shape":
        cfg.draft.hf_config = {**cfg.draft.hf_config, "intermediate_size": 64}
    elif setting == "weights":
        cfg.model.weights = "twin"
    elif setting == "twin_noise":
        cfg.model.weights = "twin"
        cfg.model.twin = dataclasses.replace(cfg.model.twin, expert_noise=0.3)
    elif setting == "dtype":
        cfg.model.dtype = "bfloat16"
    elif setting == "draft_dtype":
        cfg.draft.dtype = "bfloat16"
    elif setting == "seed":
        cfg.seed = 1
    elif setting == "routing":
        cfg.routing = RoutingConfig(name="replay", trace_path=f"{TRACES}/humaneval_k1.npz")
    elif setting == "pacing":
        cfg.hardware = dataclasses.replace(cfg.hardware, pace_pcie=True, pcie_gb_per_s=25.0)
    elif setting == "decode":
        cfg.hardware = dataclasses.replace(cfg.hardware, decode="graphs")
    elif setting == "capture_point":
        cfg.method.capture_point = "attn_out"
    elif setting == "device":
        kw["device"] = "NVIDIA H200"
    elif setting == "slots":
        kw["slots"] = 13
    elif setting == "predict_top_k":
        kw["top_k"] = 3
    elif setting == "hidden_maps":
        kw["maps"] = True
    return cfg, kw


SETTINGS = ["model_shape", "draft_shape", "weights", "twin_noise", "dtype", "draft_dtype", "seed", "routing",
            "pacing", "decode", "capture_point", "device", "slots", "predict_top_k", "hidden_maps"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_each_keyed_setting_changes_the_key(setting):
    cfg, kw = _changed(setting)
    assert _key(cfg, **kw) != _key(_cfg())


def test_identical_settings_share_a_key_and_preset_names_do_not_matter():
    a, b = _cfg(), _cfg()
    b.model.name, b.draft.name = "renamed_model", "renamed_draft"
    b.method.cutoff = CutoffConfig(mode="auto", reprofile=True)  # how a profile is obtained is not what it is
    assert _key(a) == _key(b)


def test_the_trace_file_contents_are_keyed():
    a, b = _changed("routing")[0], _changed("routing")[0]
    b.routing = RoutingConfig(name="replay", trace_path=f"{TRACES}/humaneval_k3.npz")
    assert _key(a) != _key(b)


def test_the_format_version_is_keyed(monkeypatch):
    before = _key(_cfg())
    monkeypatch.setattr(profile_mod, "PROFILE_VERSION", 99)
    assert _key(_cfg()) != before


# -- the cache -----------------------------------------------------------------------------------

def _ctx(tmp_path, reprofile: bool = False):
    cfg = _cfg()
    cfg.method.cutoff = CutoffConfig(mode="auto", profile_dir=str(tmp_path), reprofile=reprofile)
    return SimpleNamespace(cfg=cfg)


PROFILE = Profile(1.0, 2.0, 3.0, 4, 8, 2, 12, [0.9] * 4, 1 << 20, 50.0, 0.02, "ok")


def test_cache_hit_miss_and_reprofile(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return dataclasses.replace(PROFILE, expert_load_ms=3.0 + len(calls))

    fields = {"a": 1}
    first = load_or_measure(_ctx(tmp_path), fields, measure)
    assert not first.reused and len(calls) == 1
    again = load_or_measure(_ctx(tmp_path), fields, measure)
    assert again.reused and again.key == first.key and again.profile == first.profile and len(calls) == 1
    other = load_or_measure(_ctx(tmp_path), {"a": 2}, measure)
    assert not other.reused and other.key != first.key and len(calls) == 2
    redo = load_or_measure(_ctx(tmp_path, reprofile=True), fields, measure)
    assert not redo.reused and redo.key == first.key and redo.profile.expert_load_ms == 6.0
    assert load_or_measure(_ctx(tmp_path), fields, measure).profile.expert_load_ms == 6.0  # the re-take replaced it
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"profile-{k}.json" for k in (first.key, other.key))
    entry = json.loads((tmp_path / f"profile-{first.key}.json").read_text())
    assert entry["fields"] == fields and entry["key"] == first.key


def test_a_file_stored_for_other_fields_is_a_miss(tmp_path):
    fields = {"a": 1}
    first = load_or_measure(_ctx(tmp_path), fields, lambda: PROFILE)
    path = tmp_path / f"profile-{first.key}.json"
    entry = json.loads(path.read_text())
    entry["fields"] = {"a": "something else"}  # as a hash collision would look
    path.write_text(json.dumps(entry))
    assert not load_or_measure(_ctx(tmp_path), fields, lambda: PROFILE).reused


def test_summary_keys():
    s = profile_mod.ProfileRecord(dataclasses.replace(PROFILE, copy_check="flagged"), "abc", reused=True).summary()
    assert s["profile_key"] == "abc" and s["profile_flagged"] is True and s["profile_expert_load_ms"] == 3.0
    assert s["profile_copy_estimate_ms"] == 0.02 and s["profile_layer_recall"] == [0.9] * 4


# -- the copy check ------------------------------------------------------------------------------

def _measures(*values):
    it = iter(values)
    return lambda: next(it)


def test_copy_check():
    assert check_copy(_measures(6.5), 6.4) == (6.5, "ok")
    assert check_copy(_measures(13.9, 6.6), 6.4) == (6.6, "ok")  # a cold first measurement is re-taken
    assert check_copy(_measures(13.9, 12.0), 6.4) == (12.0, "flagged")
    assert check_copy(_measures(3.0, 3.1), 6.4) == (3.1, "flagged")  # too fast is as suspect as too slow
    assert check_copy(_measures(13.9), None) == (13.9, "skipped")


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_draft_time_runs_through_the_runs_decoder(decode, monkeypatch):
    """t_d times the draft as the run's drafter runs it: a decoder of the run's `hardware.decode` mode, every
    one-token forward after the same cached prefix."""
    made, lengths = [], []
    real = profile_mod.make_decoder

    def spy(model, device, mode, **kw):
        decoder = real(model, device, mode, **kw)
        made.append((mode, type(decoder).__name__))
        forward = decoder.forward
        decoder.forward = lambda ids, n: lengths.append(decoder.length) or forward(ids, n)
        return decoder

    monkeypatch.setattr(profile_mod, "make_decoder", spy)
    torch.manual_seed(0)
    preset = load_preset("draft", "tiny")
    model = AutoModelForCausalLM.from_config(_hf(preset.hf_config, preset.family)).eval()
    ms = profile_mod.draft_forward_ms(model, torch.device("cpu"), decode)
    assert ms > 0 and made == [(decode, "DynamicDecoder" if decode == "eager" else "StaticDecoder")]
    assert lengths[0] == 0 and set(lengths[1:]) == {profile_mod.DRAFT_PREFIX}  # the prefill, then the prefix


def test_bandwidth_measurement_on_cpu():
    dst = torch.empty(4, 1 << 16, dtype=torch.float32)  # 1 MiB
    gb_per_s = measure_bandwidth_gb_per_s(torch.device("cpu"), dst, dst.numel() * 4)
    assert 0.01 < gb_per_s < 10_000


# -- hidden maps ---------------------------------------------------------------------------------

def test_maps_keyed_by_fields_and_written_atomically(tmp_path, monkeypatch):
    fitted = []

    def fit(value: float):
        def run():
            fitted.append(value)
            return {0: torch.full((3, 2), value), 2: torch.zeros(3, 2)}
        return run

    a = load_or_fit(tmp_path, {"hidden": 64}, fit(1.0))
    assert load_or_fit(tmp_path, {"hidden": 64}, fit(9.0))[0][0, 0] == 1.0 and fitted == [1.0]  # hit
    b = load_or_fit(tmp_path, {"hidden": 96}, fit(2.0))  # other fields: another file
    assert b[0][0, 0] == 2.0 and sorted(a) == sorted(b) == [0, 2] and fitted == [1.0, 2.0]
    assert len(list(tmp_path.glob("maps-*.safetensors"))) == 2

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("spmoe.predict.hidden_map.os.replace", failing_replace)
    with pytest.raises(OSError):
        load_or_fit(tmp_path, {"hidden": 128}, fit(3.0))
    assert len(list(tmp_path.iterdir())) == 2  # no temp file left, no half-written entry


@pytest.mark.parametrize("draft,ratio", [("int8_self_fp32", 32 / 8), ("int4_self_fp32", 32 / 4)])
def test_verify_layer_time_of_a_quantized_copy_scales_by_its_bits(draft, ratio):
    """A quantized copy's weights are buffers: counted as parameters its layer has almost none, which scaled
    t_v by about 1e5 (DeepSeek-V2-Lite: t_v 19.7 s against t_d 0.2 ms). The copy runs the target's own
    layers, on bits / dtype bits of their bytes."""
    cfg = tiny_run_config("tiny_deepseek_v2", num_prompts=1, max_new_tokens=4)
    cfg.draft = load_preset("draft", draft)
    s = open_session(cfg)
    try:
        layer, layout = s.draft.model.layers[0], s.target.layout
        assert profile_mod.verify_layer_ms(0.5, layer, layout, cfg.draft.quant_bits) == 0.5 * ratio
        assert profile_mod.verify_layer_ms(0.5, layer, layout, None) > 100 * 0.5  # what the dense rule made of it
    finally:
        s.close()


def test_verify_layer_time_of_a_dense_draft_scales_by_active_parameters():
    cfg = _cfg()
    draft = AutoModelForCausalLM.from_config(_hf(cfg.draft.hf_config, cfg.draft.family))
    layer = draft.model.layers[0]
    layout = SimpleNamespace(dtype=torch.float32, top_k=2, expert_numel=300)
    attn = sum(p.numel() for p in layer.self_attn.parameters())
    mlp = sum(p.numel() for p in layer.mlp.parameters())
    assert profile_mod.verify_layer_ms(2.0, layer, layout, None) == pytest.approx(2.0 * (attn + 600) / (attn + mlp))
