"""Hydra composition of the real conf/: every preset composes into a typed RunConfig."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from experiments.presets import CONF_DIR, load_preset, preset_names
from spmoe.config import HardwareConfig, ModelConfig, RunConfig, register_configs
from spmoe.methods import STRATEGIES, get_strategy

register_configs()


def _compose(*overrides: str) -> RunConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_default_is_the_cpu_tiny_run():
    cfg = _compose()
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.name, cfg.hardware.device, cfg.max_new_tokens) == ("tiny", "cpu", 100)


@pytest.mark.parametrize("group", ["model", "draft", "dataset", "method", "hardware", "logger"])
def test_every_preset_composes(group):
    names = preset_names(group)
    assert names
    for name in names:
        cfg = _compose(f"{group}={name}")
        node = getattr(cfg, group)
        assert node.name == name, f"{group}/{name}.yaml has name={node.name!r}"
        assert node == load_preset(group, name)  # the Hydra-free loader agrees with Hydra


def test_method_presets_match_the_registry():
    get_strategy("gpu_resident")
    assert set(preset_names("method")) == set(STRATEGIES)


def test_overrides_are_typed():
    cfg = _compose("model=mixtral", "hardware=rtx4090", "seed=3", "method.num_slots=7")
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.hardware, HardwareConfig)
    assert cfg.model.hf_config["num_local_experts"] == 8
    assert (cfg.hardware.gpu_budget_gib, cfg.seed, cfg.method.num_slots) == (24, 3, 7)
    with pytest.raises(ConfigCompositionException):
        _compose("seed=not_a_number")
    with pytest.raises(ConfigCompositionException):
        _compose("method.no_such_key=1")


def test_unknown_group_option_lists_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        _compose("method=nope")
    assert "gpu_resident" in str(err.value) and "lru_nosd" in str(err.value)


def test_load_preset_errors():
    with pytest.raises(ValueError, match="valid: .*mixtral"):
        load_preset("model", "mixtral_9000")
    with pytest.raises(ValueError, match="unknown config group"):
        load_preset("modle", "tiny")


def test_presets_are_real_transformers_shapes():
    from spmoe.models.build import hf_config, skeleton
    from spmoe.config import parse_dtype

    expected_experts = {"mixtral": 32 * 8, "phimoe": 32 * 16, "deepseek_v2_lite": 26 * 64, "tiny_deepseek_v2": 2 * 8,
                        "qwen3_moe": 48 * 128, "olmoe": 16 * 64}
    for name, total in expected_experts.items():
        mcfg = load_preset("model", name)
        model, layout = skeleton(hf_config(mcfg), parse_dtype(mcfg.dtype))
        assert len(layout.keys) == total, name
    mixtral = load_preset("model", "mixtral")
    model, layout = skeleton(hf_config(mixtral), parse_dtype(mixtral.dtype))
    assert layout.expert_bytes == 3 * 4096 * 14336 * 2  # 352 MB per expert in bf16
    assert Path(CONF_DIR / "config.yaml").is_file()
