"""
The outside anchor of the runtime benchmark: transformers' own `generate` with its own experts
module on the engine's resident slots (no copy, the same bytes), and the count of aten operators
one decode forward dispatches (host work per step, views included).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

from spmoe.models.experts import find_experts
from spmoe.spec.kv import cache_kwarg


class _TokenClock(BaseStreamer):
    """Wall time of every `put`: the prompt first, then one per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFExperts:
    """Context: transformers' own experts modules (implementation `impl`) in place of the engine's,
    their fused weights strided views of the resident cache's slots (no copy)."""

    def __init__(self, session, cache, impl: str = "eager"):
        self.session, self.cache, self.impl = session, cache, impl
        self.ours: dict[int, nn.Module] = {}

    def __enter__(self):
        model, layout = self.session.target.model, self.session.target.layout
        cfg = copy.copy(model.config)
        cfg._experts_implementation = self.impl
        with torch.device("meta"):
            classes = {i: type(m) for i, m in find_experts(AutoModelForCausalLM.from_config(cfg)).items()}
        h, inter, numel, e_count = layout.hidden_size, layout.intermediate_size, layout.expert_numel, layout.num_experts
        built = {}  # every module is built before any is installed: a failure leaves the model as it was
        for layer in layout.moe_layers:
            slots = [self.cache.slot_of((layer, e)) for e in range(e_count)]
            if slots != list(range(slots[0], slots[0] + e_count)):
                raise RuntimeError(f"layer {layer}'s experts are not in consecutive slots: {slots}")
            storage = self.cache.storage
            base = storage.storage_offset() + slots[0] * numel
            with torch.device("meta"):
                hf = classes[layer](cfg)
            hf.gate_up_proj = nn.Parameter(storage.as_strided((e_count, 2 * inter, h), (numel, h, 1), base),
                                           requires_grad=False)  # [E, 2I, H]
            hf.down_proj = nn.Parameter(storage.as_strided((e_count, h, inter), (numel, inter, 1), base + 2 * inter * h),
                                        requires_grad=False)  # [E, H, I]
            built[layer] = hf
        for layer, hf in built.items():
            mlp = model.model.layers[layer].mlp
            self.ours[layer], mlp.experts = mlp.experts, hf
        return self

    def __exit__(self, *exc) -> None:
        for layer, experts in self.ours.items():
            self.session.target.model.model.layers[layer].mlp.experts = experts


@torch.inference_mode()
def hf_generate(session, prompts, num_tokens: int) -> dict:
    model, device = session.target.model, session.device
    tpots, tokens = [], []
    for p in prompts:
        clock = _TokenClock()
        out = model.generate(torch.tensor([p.token_ids], device=device), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, streamer=clock, pad_token_id=0, eos_token_id=None)
        tokens.append(out[0, len(p.token_ids):].tolist())
        tpots.append((clock.times[-1] - clock.times[1]) / (num_tokens - 1) * 1e3)
    return {"tpot_ms": statistics.fmean(tpots), "tokens": tokens}


class _OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched (views included: each costs host time)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.inference_mode()
def ops_per_decode_step(session, prompt) -> int:
    """aten operators one one-token decode forward of the target dispatches, after a prefill."""
    model, device = session.target.model, session.device
    kv = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    model(input_ids=torch.tensor([prompt.token_ids], device=device), use_cache=True, logits_to_keep=1, **{kw: kv})
    counter = _OpCount()
    with counter:
        model(input_ids=torch.tensor([prompt.token_ids[-1:]], device=device), use_cache=True, logits_to_keep=1,
              **{kw: kv})
    return counter.count
