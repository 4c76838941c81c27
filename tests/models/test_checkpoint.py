"""Tests for spmoe.models.checkpoint: tiny transformers MoE models saved to disk and read back."""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from spmoe.models.checkpoint import Checkpoint, CheckpointError
from tiny_families import tiny_hf_config

CONFIGS = {f: (lambda f=f: tiny_hf_config(f, num_layers=2, num_experts=4))
           for f in ("mixtral", "phimoe", "qwen3_moe", "olmoe", "deepseek_v2")}
LEGACY_BLOCK = {"mixtral", "phimoe"}  # hub checkpoints use block_sparse_moe.* and w1/w3/w2
FUSED_RE = re.compile(r"^(.*layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")


def build(family: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # make every tensor (norms included) distinct from its init value
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def non_expert_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if ".mlp.experts." not in k}


def expert_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    return [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def write_fused(model: nn.Module, path: Path) -> Path:
    path.mkdir()
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(path / "model.safetensors"))
    return path


def legacy_state_dict(model: nn.Module, family: str) -> dict[str, torch.Tensor]:
    """The fused state dict converted to the per-expert hub layout with legacy non-expert names."""
    block = family in LEGACY_BLOCK
    names = ("w1", "w3", "w2") if block else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        t = t.detach()
        m = FUSED_RE.match(key)
        if m is None:
            if block:
                key = key.replace(".mlp.", ".block_sparse_moe.")
                if family == "phimoe":
                    key = key.replace(".block_sparse_moe.router.weight", ".block_sparse_moe.gate.weight")
            out[key] = t.clone().contiguous()
            continue
        base = f"{m[1]}{'block_sparse_moe' if block else 'mlp'}.experts"
        for e in range(t.shape[0]):
            if m[2] == "gate_up_proj":
                rows = t.shape[1] // 2
                out[f"{base}.{e}.{names[0]}.weight"] = t[e, :rows].clone().contiguous()
                out[f"{base}.{e}.{names[1]}.weight"] = t[e, rows:].clone().contiguous()
            else:
                out[f"{base}.{e}.{names[2]}.weight"] = t[e].clone().contiguous()
    return out


def write_legacy_sharded(model: nn.Module, family: str, path: Path) -> Path:
    """Per-expert legacy layout, split over two shards listed by model.safetensors.index.json."""
    path.mkdir()
    sd = legacy_state_dict(model, family)
    shards: dict[str, dict[str, torch.Tensor]] = {"model-00001-of-00002.safetensors": {},
                                                   "model-00002-of-00002.safetensors": {}}
    names = sorted(shards)
    for i, (k, v) in enumerate(sorted(sd.items())):
        shards[names[i % 2]][k] = v
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write(model: nn.Module, family: str, layout: str, path: Path) -> Path:
    if layout == "save_pretrained":
        model.save_pretrained(path)
        return path
    if layout == "fused":
        return write_fused(model, path)
    return write_legacy_sharded(model, family, path)


def store_views(experts: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [2I, H] and down [H, I] as views into one flat buffer, like a host store slot."""
    _, two_i, h = experts.gate_up_proj.shape
    flat = torch.full((two_i * h + h * (two_i // 2),), float("nan"), dtype=dtype)
    return flat[: two_i * h].view(two_i, h), flat[two_i * h:].view(h, two_i // 2)


# -- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["save_pretrained", "fused", "legacy"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_round_trip(family: str, layout: str, tmp_path: Path) -> None:
    model = build(family)
    ckpt = Checkpoint.open(write(model, family, layout, tmp_path / "ckpt"))

    moe = dict(expert_layers(model))
    for layer in range(len(model.model.layers)):
        assert ckpt.has_experts(layer) == (layer in moe)
    assert not ckpt.has_experts(len(model.model.layers))
    for layer, experts in moe.items():
        for e in range(experts.gate_up_proj.shape[0]):
            gate_up, down = store_views(experts, torch.float32)
            ckpt.read_expert(layer, e, gate_up, down)
            assert torch.equal(gate_up, experts.gate_up_proj[e])
            assert torch.equal(down, experts.down_proj[e])

    keys = non_expert_keys(model)
    sd = ckpt.non_expert_state_dict(keys, "cpu", torch.float32)
    assert set(sd) == keys
    ref = model.state_dict()
    for k in keys:
        assert torch.equal(sd[k], ref[k]), k


def test_save_pretrained_writes_legacy_names_for_phimoe(tmp_path: Path) -> None:
    """The PhiMoE router is mlp.router in transformers 5 but block_sparse_moe.gate on disk."""
    model = build("phimoe")
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    if "model.layers.0.block_sparse_moe.gate.weight" not in keys:
        pytest.skip("this transformers version writes PhiMoE's router under its new name")
    sd = Checkpoint.open(tmp_path).non_expert_state_dict({"model.layers.0.mlp.router.weight"}, "cpu", torch.float32)
    assert torch.equal(sd["model.layers.0.mlp.router.weight"], model.model.layers[0].mlp.router.weight)


def test_load_into_model_without_experts_bf16(tmp_path: Path) -> None:
    """The intended use: non-expert weights into a model whose experts were replaced, experts into a store."""
    model = build("deepseek_v2")
    ckpt = Checkpoint.open(write_legacy_sharded(model, "deepseek_v2", tmp_path / "ckpt"))
    stripped = copy.deepcopy(model).to(torch.bfloat16)
    for layer in stripped.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp.experts = nn.Module()  # holds no parameters, like the engine's module
    with torch.no_grad():
        for p in stripped.parameters():
            p.zero_()
    sd = ckpt.non_expert_state_dict(set(stripped.state_dict()), "cpu", torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    stripped.load_state_dict(sd, strict=True)
    ref = model.state_dict()
    for k, v in stripped.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    for layer, experts in expert_layers(model):
        gate_up, down = store_views(experts, torch.bfloat16)
        ckpt.read_expert(layer, 3, gate_up, down)
        assert torch.equal(gate_up, experts.gate_up_proj[3].to(torch.bfloat16))
        assert torch.equal(down, experts.down_proj[3].to(torch.bfloat16))


def test_tied_embeddings_without_lm_head(tmp_path: Path) -> None:
    model = build("qwen3_moe", tie_word_embeddings=True)
    model.tie_weights()
    model.save_pretrained(tmp_path)
    ckpt = Checkpoint.open(tmp_path)
    assert "lm_head.weight" in model.state_dict()
    sd = ckpt.non_expert_state_dict(non_expert_keys(model), "cpu", torch.float32)
    assert torch.equal(sd["lm_head.weight"], model.model.embed_tokens.weight)


def test_unexpected_keys_are_logged_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = build("mixtral")
    tmp_path.joinpath("ckpt").mkdir()
    sd = legacy_state_dict(model, "mixtral")
    sd["model.some_extra.weight"] = torch.zeros(3)
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    with caplog.at_level(logging.DEBUG, logger="spmoe.models.checkpoint"):
        Checkpoint.open(tmp_path / "ckpt").non_expert_state_dict(non_expert_keys(model), "cpu", torch.float32)
    assert "model.some_extra.weight" in caplog.text


# -- errors -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixtral() -> nn.Module:
    return build("mixtral")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does_not_exist"):
        Checkpoint.open(tmp_path / "does_not_exist")


def test_directory_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_is_named(mixtral: nn.Module, tmp_path: Path, damage: str) -> None:
    write_legacy_sharded(mixtral, "mixtral", tmp_path / "ckpt")
    victim = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    data = victim.read_bytes()
    victim.write_bytes({"garbage": bytes(range(256)) * 4, "truncated": data[: len(data) - 100],
                        "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Checkpoint.open(tmp_path / "ckpt")


def test_index_naming_missing_file(mixtral: nn.Module, tmp_path: Path) -> None:
    write_legacy_sharded(mixtral, "mixtral", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        Checkpoint.open(tmp_path / "ckpt")


def test_duplicate_key_across_files(mixtral: nn.Module, tmp_path: Path) -> None:
    model_dir = tmp_path / "ckpt"
    write_fused(mixtral, model_dir)
    save_file({"model.norm.weight": torch.zeros(32)}, str(model_dir / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight.*extra.safetensors|extra.safetensors.*model.norm"):
        Checkpoint.open(model_dir)


@pytest.mark.parametrize("layout", ["fused", "legacy"])
def test_missing_expert_tensor(mixtral: nn.Module, tmp_path: Path, layout: str) -> None:
    if layout == "fused":
        sd = {k: v.detach().clone() for k, v in mixtral.state_dict().items()}
        del sd["model.layers.1.mlp.experts.down_proj"]
    else:
        sd = legacy_state_dict(mixtral, "mixtral")
        del sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    (tmp_path / "ckpt").mkdir()
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "ckpt")
    experts = mixtral.model.layers[1].mlp.experts
    gate_up, down = store_views(experts, torch.float32)
    with pytest.raises(CheckpointError, match=r"layer 1 expert 2.*model\.safetensors") as err:
        ckpt.read_expert(1, 2, gate_up, down)
    assert "gate_up_proj" in str(err.value) and "w1" in str(err.value) and "gate_proj" in str(err.value)
    ckpt.read_expert(0, 2, gate_up, down)  # other layers still readable
    assert torch.equal(down, mixtral.model.layers[0].mlp.experts.down_proj[2])


def test_missing_non_expert_key(mixtral: nn.Module, tmp_path: Path) -> None:
    sd = legacy_state_dict(mixtral, "mixtral")
    del sd["model.layers.0.self_attn.q_proj.weight"]
    (tmp_path / "ckpt").mkdir()
    save_file(sd, str(tmp_path / "ckpt" / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight.*model\.safetensors"):
        ckpt.non_expert_state_dict(non_expert_keys(mixtral), "cpu", torch.float32)


@pytest.mark.parametrize("layout", ["fused", "legacy"])
def test_shape_mismatch_and_out_of_range(mixtral: nn.Module, tmp_path: Path, layout: str) -> None:
    ckpt = Checkpoint.open(write(mixtral, "mixtral", layout, tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"\[96, 32\].*\[64, 32\]|\[48, 32\].*\[32, 32\]"):
        ckpt.read_expert(0, 1, torch.empty(64, 32), torch.empty(32, 48))
    with pytest.raises(CheckpointError, match="layer 0 expert 4"):
        ckpt.read_expert(0, 4, torch.empty(96, 32), torch.empty(32, 48))
