"""Rotary tables (spmoe.runtime.rope_table): Phi-3.5-MoE's host-computed rotary embedding, served from device
tables inside CUDA graphs, gives the stock forward's cos/sin bit for bit (default and longrope, on both sides of
longrope's switch); tables only grow and keep the old ones alive; other families are left alone; every supported
family's rotary embedding, as a capture runs it, reads no host tensor and makes no host sync (checked on the meta
device, so on the CPU); on CUDA a phimoe target is captured whole and replays the static decoder's tokens."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from conftest import tiny_run_config
from tiny_families import FAMILIES, tiny_hf_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, MixtralForCausalLM, PhimoeForCausalLM

from experiments.presets import load_preset
from spmoe.config import MethodConfig
from spmoe.runtime import rope_table

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
            "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 3.0, 4.0, 5.0],
            "short_mscale": 1.0, "long_mscale": 1.25}


def _phimoe(**attn) -> PhimoeForCausalLM:
    return PhimoeForCausalLM(tiny_hf_config("phimoe", 1, 2, max_position_embeddings=64, **attn)).eval()


def _windows(num_positions: int):
    """Decode and verify windows [1, T] at every offset that fits, and a whole prefill."""
    for t in (1, 3):
        for start in range(num_positions - t + 1):
            yield torch.arange(start, start + t)[None]
    yield torch.arange(num_positions)[None]


@pytest.mark.parametrize("rope", [None, LONGROPE], ids=["default", "longrope"])
def test_tables_give_the_stock_cos_and_sin_bit_for_bit(rope):
    model = _phimoe(**({"rope_parameters": rope} if rope else {}))
    rotary = model.model.rotary_emb
    x = torch.zeros(1, 1, 32)
    stock = {tuple(p[0].tolist()): rotary(x, p) for p in _windows(40)}
    rope_table.install(model, 40)
    table = rotary._spmoe_rope_table
    assert (table.short_positions is not None) == (rope is not None)
    for p in _windows(40):
        cos, sin = table(x, p)
        want_cos, want_sin = stock[tuple(p[0].tolist())]
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    if rope is not None:  # the windows on both sides of the switch really differ
        assert not torch.equal(stock[(14,)][0], table.cos[14][None, None])


def test_tables_only_grow_and_keep_the_old_ones_alive():
    model = _phimoe()
    rotary = model.model.rotary_emb
    rope_table.install(model, 16)
    first = rotary._spmoe_rope_table
    rope_table.install(model, 8)
    assert rotary._spmoe_rope_table is first
    rope_table.install(model, 32)
    grown = rotary._spmoe_rope_table
    assert grown.num_positions == 32 and grown.retired == [first] and grown.stock == first.stock
    x, p = torch.zeros(1, 1, 32), torch.arange(20, 23)[None]
    assert all(torch.equal(a, b) for a, b in zip(grown(x, p), rotary(x, p)))  # outside capture: the stock forward


def test_other_families_keep_their_rotary_forward():
    model = MixtralForCausalLM(tiny_hf_config("mixtral", 1, 2)).eval()
    forward = model.model.rotary_emb.forward
    rope_table.install(model, 16)
    assert not rope_table.needs_table(model)
    assert model.model.rotary_emb.forward == forward and not hasattr(model.model.rotary_emb, "_spmoe_rope_table")


class _HostReads(TorchDispatchMode):
    """Records every operator that copies a host tensor to the (meta) device, mixes the two, or syncs to the host."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = any(t.device.type == "cpu" and t.dim() > 0 for t in tensors)
        to_device = str(kwargs.get("device", "")) == "meta" or any(t.device.type == "meta" for t in tensors)
        if (on_host and to_device) or func is torch.ops.aten._local_scalar_dense.default:
            self.found.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_familys_rotary_embedding_reads_no_host_tensor_as_captured(family, monkeypatch):
    """The stock Phi-MoE rotary copies host frequencies (what CUDA graph capture refuses); with its tables it does
    not; no other family's does either way."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_hf_config(family, 1, 2))
    rotary = model.model.rotary_emb
    x, positions = torch.empty(1, 3, 32, device="meta"), torch.arange(5, 8, device="meta")[None]
    with _HostReads() as stock:
        rotary(x, positions)
    assert bool(stock.found) == (family == "phimoe"), stock.found
    rope_table.install(model, 16)
    monkeypatch.setattr(rope_table, "capturing", lambda x: True)
    with _HostReads() as tabled:
        rotary(x, positions)
    assert tabled.found == []


@pytest.mark.gpu
@pytest.mark.parametrize("method,num_slots", [("gpu_resident", None), ("lru_nosd", 6)])
def test_phimoe_decodes_under_graphs_as_its_static_decoder(gpu, caplog, method, num_slots):
    """On CUDA (bf16 tiny Phi-MoE): no capture fails, and the graphed tokens and events equal the static ones."""
    from spmoe.session import open_session

    cfg = tiny_run_config("tiny", hardware=load_preset("hardware", "h200"), num_prompts=2)
    cfg.model.family, cfg.model.dtype = "phimoe", "bfloat16"
    s = open_session(cfg)
    try:
        runs = {}
        for decode in ("static", "graphs"):
            with caplog.at_level(logging.INFO, logger="spmoe.runtime.decoder"):
                gens, _, _ = s.generate(MethodConfig(name=method, num_slots=num_slots),
                                        replace(s.cfg.hardware, decode=decode), 16)
            runs[decode] = [(g.token_ids, [ev.needed for r in g.records for ev in r.layers]) for g in gens]
        kind = "whole" if method == "gpu_resident" else "piecewise"
        assert f"PhimoeForCausalLM on cuda: CUDA graphs {kind}" in caplog.text
        assert "failed" not in caplog.text
        assert runs["graphs"] == runs["static"]
    finally:
        s.close()
