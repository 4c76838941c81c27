"""Bad input fails early, with a message naming what was wrong and what is valid; failed runs leave
no half-written files. Plus a positive round trip through a real (tiny) safetensors checkpoint.

All CPU, all tiny (the `tiny` preset: 4 layers x 8 experts, H=64). "Early" means before the
non-expert weights are materialized and before the host expert store is allocated, checked by
replacing both with functions that fail the test if they are reached (`guard`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

import spmoe.session as runner
import spmoe.io
from conftest import AllocatedTooEarly, tiny_run_config
from experiments.presets import CONF_DIR
from spmoe.experiment import run_benchmark
from spmoe.session import make_plan, open_session
from spmoe.config import DatasetConfig, parse_dtype
from spmoe.engine import Engine
from spmoe.io import write_json_atomic
from spmoe.models.build import hf_config, param_bytes, skeleton
from spmoe.models.checkpoint import CheckpointError
from spmoe.offload.budget import BudgetError
from spmoe.methods import get_strategy
from spmoe.strategy import MethodContext

GIB = 2**30
PROMPT_LEN = 12  # tiny_run_config's synthetic prompt length




@pytest.fixture
def no_store(monkeypatch):
    """Fail the test if the host expert store is allocated (non-expert weights may be)."""

    class Store:
        def __init__(self, *args, **kwargs):
            raise AllocatedTooEarly("the expert store was allocated before the bad input was rejected")

    monkeypatch.setattr(runner, "ExpertStore", Store)


def tmp_files(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".tmp")] if d.exists() else []


def fails(cfg, tmp_path: Path, exc: type[BaseException], *needles: str) -> str:
    """run_benchmark(cfg) raises `exc` whose message contains every needle; nothing is written."""
    out = tmp_path / "run"
    with pytest.raises(exc) as err:
        run_benchmark(cfg, out)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from the error message: {msg}"
    assert not (out / "summary.json").exists()
    assert not tmp_files(out)
    return msg


def plan_for(cfg):
    """The memory plan run_benchmark would make for cfg (without loading anything)."""
    hf_cfg = hf_config(cfg.model)
    model, layout = skeleton(hf_cfg, parse_dtype(cfg.model.dtype))
    return make_plan(cfg, hf_cfg, layout, param_bytes(model), PROMPT_LEN), layout


# -- names and scalar knobs ------------------------------------------------------------------------

def test_unknown_method(guard, tmp_path):
    fails(tiny_run_config(method="nope"), tmp_path, ValueError, "nope", "gpu_resident", "lru_nosd", "accelerate")


def test_unknown_dataset(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.dataset = DatasetConfig(name="nope")
    fails(cfg, tmp_path, ValueError, "dataset", "nope", "synthetic", "humaneval")


def test_unknown_model_family(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.model.family = "gpt2"
    fails(cfg, tmp_path, ValueError, "family", "gpt2", "mixtral", "qwen3_moe")


def test_unknown_model_weights(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.model.weights = "nope"
    fails(cfg, tmp_path, ValueError, "model.weights", "nope", "random", "checkpoint")


def test_unknown_dtype(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.model.dtype = "int8"
    fails(cfg, tmp_path, ValueError, "dtype", "int8", "float32", "bfloat16")


def test_unknown_eviction_policy_message(tmp_path):
    cfg = tiny_run_config(method="lru_nosd", max_new_tokens=2, num_prompts=1)
    cfg.method.eviction = "fifo"
    fails(cfg, tmp_path, ValueError, "eviction", "fifo", "lru", "lfu")


def test_unknown_eviction_policy_fails_early(guard, tmp_path):
    cfg = tiny_run_config(method="lru_nosd", max_new_tokens=2, num_prompts=1)
    cfg.method.eviction = "fifo"
    fails(cfg, tmp_path, ValueError, "eviction", "fifo", "lru", "lfu")


def test_zero_num_slots_fails_early(guard, tmp_path):
    cfg = tiny_run_config(method="lru_nosd", max_new_tokens=2, num_prompts=1)
    cfg.method.num_slots = 0
    fails(cfg, tmp_path, ValueError, "num_slots", "0")


def test_check_lossless_invalid(guard, tmp_path):
    fails(tiny_run_config(check_lossless="maybe"), tmp_path, ValueError, "check_lossless", "maybe", "auto", "true",
          "false")


def test_check_lossless_true_from_the_command_line(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from spmoe.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=[
            "check_lossless=true", "dataset=synthetic", "method=gpu_resident", "num_prompts=1", "max_new_tokens=2",
            "draft=tiny", "hardware=cpu", "routing=model"])
    cfg = OmegaConf.to_object(dcfg)
    assert run_benchmark(cfg, tmp_path)["lossless"] is True


def test_max_new_tokens_zero(guard, tmp_path):
    fails(tiny_run_config(max_new_tokens=0), tmp_path, ValueError, "max_new_tokens", ">= 1", "0")


def test_num_prompts_zero(guard, tmp_path):
    fails(tiny_run_config(num_prompts=0), tmp_path, ValueError, "num_prompts", ">= 1", "0")


def test_empty_synthetic_prompts_fail_early(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.dataset.prompt_len = 0
    fails(cfg, tmp_path, ValueError, "prompt_len")


def test_unknown_hf_config_key(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.model.hf_config = dict(cfg.model.hf_config, num_experts_per_tokn=4)  # typo of num_experts_per_tok
    fails(cfg, tmp_path, ValueError, "num_experts_per_tokn")


@pytest.mark.parametrize("method", ["lru", "gpu_resident_sd"])
def test_speculative_method_without_draft(guard, tmp_path, method):
    cfg = tiny_run_config(method=method)  # draft defaults to none
    assert cfg.draft.name == "none"
    fails(cfg, tmp_path, ValueError, method, "draft=", "tiny")


def test_twin_weights_without_draft(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.model.weights = "twin"
    fails(cfg, tmp_path, ValueError, "model.weights=twin", "draft=", "tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_without_cuda(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.hardware = replace(cfg.hardware, device="cuda")
    fails(cfg, tmp_path, ValueError, "cuda", "CUDA", "not available", "hardware=cpu")


def test_unsupported_device_type(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.hardware = replace(cfg.hardware, device="mps")
    fails(cfg, tmp_path, ValueError, "mps", "cpu", "cuda")


def test_unknown_device_string(guard, tmp_path):
    cfg = tiny_run_config()
    cfg.hardware = replace(cfg.hardware, device="tpu")
    fails(cfg, tmp_path, ValueError, "tpu", "hardware", "cpu", "cuda")


# -- checkpoints ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_model():
    """A transformers model of the tiny preset's shape, every tensor (norms included) perturbed."""
    mcfg = tiny_run_config().model
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mcfg.family, **mcfg.hf_config),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def ckpt(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    hf_model.save_pretrained(path)
    assert list(path.glob("*.safetensors"))
    return path


def ckpt_config(path, **kw):
    cfg = tiny_run_config(**{"max_new_tokens": 4, "num_prompts": 1, **kw})
    cfg.model.weights = "checkpoint"
    cfg.model.path = None if path is None else str(path)
    return cfg


def copy_ckpt(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


def test_checkpoint_without_path(guard, tmp_path):
    fails(ckpt_config(None), tmp_path, CheckpointError, "model.path", "checkpoint")


def test_checkpoint_path_does_not_exist(guard, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    fails(ckpt_config(missing), tmp_path, CheckpointError, str(missing))


def test_checkpoint_without_safetensors(ckpt, no_store, tmp_path):
    path = tmp_path / "config_only"
    path.mkdir()
    shutil.copy(ckpt / "config.json", path / "config.json")
    fails(ckpt_config(path), tmp_path, CheckpointError, str(path), "safetensors")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_named(ckpt, no_store, tmp_path, damage):
    path = copy_ckpt(ckpt, tmp_path)
    victim = path / "model.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-100] if damage == "truncated" else bytes(range(256)) * 8)
    fails(ckpt_config(path), tmp_path, CheckpointError, str(victim))


def _drop_expert_tensor(ckpt: Path, tmp_path: Path, key: str) -> Path:
    path = copy_ckpt(ckpt, tmp_path)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert key in sd, sorted(sd)[:20]
    del sd[key]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# transformers 5.24's save_pretrained writes Mixtral experts per expert, under the legacy names
MISSING_KEY = "model.layers.2.block_sparse_moe.experts.5.w3.weight"


def test_missing_expert_tensor_names_layer_and_expert(ckpt, tmp_path):
    path = _drop_expert_tensor(ckpt, tmp_path, MISSING_KEY)
    fails(ckpt_config(path), tmp_path, CheckpointError, "layer 2 expert 5", str(path), "model.safetensors")


def test_missing_expert_tensor_fails_before_the_store(ckpt, no_store, tmp_path):
    path = _drop_expert_tensor(ckpt, tmp_path, MISSING_KEY)
    fails(ckpt_config(path), tmp_path, CheckpointError, "layer 2 expert 5")


def test_checkpoint_round_trip_lossless(ckpt, tmp_path):
    top_k = tiny_run_config().model.hf_config["num_experts_per_tok"]
    cfg = ckpt_config(ckpt, method="lru_nosd", max_new_tokens=6, check_lossless="true")
    cfg.method.num_slots = top_k
    summary = run_benchmark(cfg, tmp_path)
    assert summary["weights"] == "checkpoint"
    assert summary["lossless"] is True
    assert summary["expert_misses"] > 0  # the small cache really loaded experts from the checkpoint store
    assert (tmp_path / "summary.json").is_file()


def test_checkpoint_logits_match_transformers(ckpt, hf_model):
    cfg = ckpt_config(ckpt, method="gpu_resident")
    session = open_session(cfg)
    try:
        plan = session.plan(cfg.hardware, "gpu_resident")
        runtime = get_strategy("gpu_resident").build(MethodContext(session.cfg, session.target, session.device, plan))
        try:
            ids = torch.tensor([session.prompts[0].token_ids])
            with torch.inference_mode():
                got = runtime.model(input_ids=ids, use_cache=False).logits
                want = hf_model(input_ids=ids, use_cache=False).logits
        finally:
            runtime.close()
    finally:
        session.close()
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_summary_reports_the_capped_cache_size(tmp_path):
    cfg = tiny_run_config(method="lru_nosd", max_new_tokens=2, num_prompts=1, check_lossless="false")
    cfg.method.num_slots = 2
    assert run_benchmark(cfg, tmp_path)["num_slots"] == 2


# -- memory budget -------------------------------------------------------------------------------

def test_budget_too_small_for_top_k(guard, tmp_path):
    cfg = tiny_run_config(method="lru_nosd")
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=1e-4)
    msg = fails(cfg, tmp_path, BudgetError, "top_k=2", "GiB", "non-expert weights", "KV cache", "reserve")
    assert re.search(r"\d+\.\d+ GiB", msg), msg
    assert re.search(r"at least \d+ MiB", msg), msg  # tells what budget would work


def test_budget_error_suggests_a_budget_that_fits(tmp_path):
    cfg = tiny_run_config(method="lru_nosd")
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=1e-4)
    with pytest.raises(BudgetError) as err:
        plan_for(cfg)
    need = int(re.search(r"at least (\d+) MiB", str(err.value))[1]) / 1024
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=need)
    plan, layout = plan_for(cfg)  # the suggested budget must be accepted
    assert plan.num_slots >= layout.top_k


def _budget_for_slots(cfg, slots: int) -> float:
    """A budget (GiB) that leaves room for exactly `slots` experts."""
    plan, layout = plan_for(replace(cfg, hardware=replace(cfg.hardware, gpu_budget_gib=None)))
    fixed = plan.non_expert_bytes + plan.draft_bytes + plan.kv_bytes + plan.activation_bytes + plan.reserve_bytes
    return (fixed + slots * layout.expert_bytes + layout.expert_bytes // 2) / GIB


def test_gpu_resident_over_budget_says_to_offload(guard, tmp_path):
    cfg = tiny_run_config(method="gpu_resident")
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=_budget_for_slots(cfg, 4))
    fails(cfg, tmp_path, BudgetError, "gpu_resident", "32 experts", "room for 4", "GiB", "offloading method")


def test_gpu_resident_over_budget_names_the_offloading_methods(guard, tmp_path):
    cfg = tiny_run_config(method="gpu_resident")
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=_budget_for_slots(cfg, 4))
    fails(cfg, tmp_path, BudgetError, "lru_nosd", "accelerate")


def test_same_budget_runs_with_an_offloading_method(tmp_path):
    cfg = tiny_run_config(method="lru_nosd", max_new_tokens=4, num_prompts=1)
    cfg.hardware = replace(cfg.hardware, gpu_budget_gib=_budget_for_slots(cfg, 4))
    summary = run_benchmark(cfg, tmp_path)
    assert summary["num_slots"] == 4
    assert summary["gpu_budget_bytes"] == int(cfg.hardware.gpu_budget_gib * GIB)
    assert summary["lossless"] is True


# -- nothing half-written --------------------------------------------------------------------------

def test_failed_summary_write_leaves_no_summary_and_no_temp_files(monkeypatch, tmp_path):
    real_replace = os.replace

    def replace_failing_on_summary(src, dst, *args, **kwargs):
        if Path(dst).name == "summary.json":
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(spmoe.io.os, "replace", replace_failing_on_summary)
    with pytest.raises(OSError, match="No space left"):
        run_benchmark(tiny_run_config(max_new_tokens=3, num_prompts=1), tmp_path)
    assert not (tmp_path / "summary.json").exists()
    assert not tmp_files(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["generations.jsonl", "trace.jsonl"]  # complete files, written first
    assert len((tmp_path / "trace.jsonl").read_text().splitlines()) == 3


def test_failed_first_write_leaves_nothing(monkeypatch, tmp_path):
    def no_rename(src, dst, *args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spmoe.io.os, "replace", no_rename)
    with pytest.raises(OSError):
        run_benchmark(tiny_run_config(max_new_tokens=2, num_prompts=1), tmp_path)
    assert os.listdir(tmp_path) == []


def test_engine_failure_mid_run_keeps_finished_prompts_only(monkeypatch, tmp_path):
    real_generate = Engine.generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second prompt: the first one's generation is done
            raise RuntimeError("boom in the engine")
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", generate)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        run_benchmark(tiny_run_config(method="gpu_resident", max_new_tokens=3, num_prompts=2), out)
    assert len(calls) == 2
    assert not (out / "summary.json").exists()  # never a summary for a failed run
    partial = out / "partial"  # but the finished prompt is kept, with the error
    assert len((partial / "generations.jsonl").read_text().splitlines()) == 1
    error = json.loads((partial / "error.json").read_text())
    assert "boom in the engine" in error["error"] and "in generate" in error["traceback"]
    assert not list(out.rglob("*.tmp"))


def test_atomic_writes_follow_the_umask(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_round_trip(tmp_path):
    import json

    path = tmp_path / "sub" / "summary.json"
    write_json_atomic(path, {"a": 1, "b": None})
    write_json_atomic(path, {"a": 2})  # replaces
    assert json.loads(path.read_text()) == {"a": 2}
    assert not tmp_files(path.parent)
