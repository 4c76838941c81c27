"""
The decode loop every method runs through: prefill, then one token per step (greedy), batch 1.

Each step ends with the new token on the host (the only host sync the loop itself makes), then
the step's transfer totals and per-layer expert events are collected into a `StepRecord`.
Methods differ only in the `Runtime` they plug in (how experts are served); the loop, the
timers and the records are the same for all, which is what makes comparisons fair.

Timing: `t_ms` of a record is wall time since the prompt started, taken after the step's token
reached the host. TPOT (see `spmoe.trace.metrics`) uses the first and last decode records.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from spmoe.strategy import Runtime
from spmoe.trace.records import StepRecord


@dataclass
class Generation:
    token_ids: list[int]
    records: list[StepRecord]


class Engine:
    def __init__(self, runtime: Runtime, device: torch.device):
        self.runtime = runtime
        self.device = device
        # transformers >= 5.2x renamed `past_key_values` to `cache`; the GPU image has 5.17
        params = inspect.signature(runtime.model.forward).parameters
        self._kv_kwarg = "cache" if "cache" in params else "past_key_values"

    def _forward(self, ids: list[int], kv: DynamicCache) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.device)  # [1, T]
        out = self.runtime.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._kv_kwarg: kv})
        return out.logits[0, -1]  # [V]

    def _record(self, prompt_idx: int, step: int, phase: str, pos: int, t_start: float, t_step: float) -> StepRecord:
        now = time.perf_counter()
        stats = self.runtime.collect()
        return StepRecord(
            prompt_idx=prompt_idx, step=step, phase=phase, pos=pos, num_emitted=1,
            t_ms=(now - t_start) * 1e3, step_ms=(now - t_step) * 1e3,
            h2d_bytes=stats.h2d_bytes, copy_ms=stats.copy_ms, stall_ms=stats.stall_ms,
            layers=self.runtime.events.drain(),
        )

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, prompt_idx: int = 0) -> Generation:
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.runtime.collect()
        self.runtime.events.drain()
        kv = DynamicCache(config=self.runtime.model.config)
        t_start = time.perf_counter()
        token = int(self._forward(prompt_ids, kv).argmax())
        records = [self._record(prompt_idx, 0, "prefill", 0, t_start, t_start)]
        tokens = [token]
        while len(tokens) < max_new_tokens:
            t_step = time.perf_counter()
            pos = len(prompt_ids) + len(tokens) - 1
            token = int(self._forward([token], kv).argmax())
            tokens.append(token)
            records.append(self._record(prompt_idx, len(records), "decode", pos, t_start, t_step))
        return Generation(tokens, records)
