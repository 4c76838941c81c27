"""Shared fixtures: tiny configs built from the real presets in conf/, CPU, seeded."""

from __future__ import annotations

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():  # before spmoe imports Triton: its kernels run in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from experiments.presets import load_preset
from spmoe.config import MethodConfig, RunConfig

logging.getLogger("transformers").setLevel(logging.ERROR)
torch.set_num_threads(1)  # tiny matmuls: threads only add contention on 2-core CI boxes


def tiny_twin_config(num_prompts: int = 2, max_new_tokens: int = 16, expert_noise: float = 0.05) -> RunConfig:
    """The tiny target upcycled from the tiny draft: a pair whose drafts are accepted, so SD paths run."""
    from spmoe.config import TwinConfig

    cfg = tiny_run_config("tiny", num_prompts=num_prompts, max_new_tokens=max_new_tokens)
    cfg.model.weights = "twin"
    cfg.model.twin = TwinConfig(expert_noise=expert_noise)
    cfg.draft = load_preset("draft", "tiny")
    return cfg


def open_with_reference(cfg: RunConfig, num_tokens: int):
    """A session on cfg whose `reference` holds gpu_resident's greedy tokens per prompt: the oracle that
    equality tests compare every method with."""
    from spmoe.session import open_session

    s = open_session(cfg)
    gens, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, num_tokens)
    s.reference = [g.token_ids for g in gens]
    return s


def tiny_reference_session(model: str, draft: str, num_prompts: int, num_tokens: int):
    """`open_with_reference` on the tiny CPU run of `model` with the `draft` preset, `num_tokens` per prompt."""
    cfg = tiny_run_config(model, num_prompts=num_prompts, max_new_tokens=num_tokens)
    cfg.draft = load_preset("draft", draft)
    return open_with_reference(cfg, num_tokens)


def tiny_run_config(model: str = "tiny", method: str = "gpu_resident", weights: str = "random", **kw) -> RunConfig:
    """A tiny CPU run. The `tiny` preset is a twin of its draft for `python run.py`; tests get random
    weights (independent of any draft) unless they ask for `weights="twin"` and set a draft."""
    cfg = RunConfig(
        model=load_preset("model", model, weights=weights),
        dataset=load_preset("dataset", "synthetic", prompt_len=12),
        method=MethodConfig(name=method),
        hardware=load_preset("hardware", "cpu"),
        max_new_tokens=16,
        num_prompts=2,
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Profiles and hidden maps (under ~/.cache/spmoe) go to a per-session temp home."""
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))


class AllocatedTooEarly(AssertionError):
    pass


@pytest.fixture
def guard(monkeypatch):
    """Fail the test if the run gets as far as allocating weights (non-expert or expert store)."""
    import spmoe.session

    def materialize(*args, **kwargs):
        raise AllocatedTooEarly("non-expert weights were materialized before the bad input was rejected")

    class Store:
        def __init__(self, *args, **kwargs):
            raise AllocatedTooEarly("the expert store was allocated before the bad input was rejected")

    monkeypatch.setattr(spmoe.session, "materialize", materialize)
    monkeypatch.setattr(spmoe.session, "ExpertStore", Store)
