"""
The decode loop every method runs through: prefill, then steps of draft -> verify -> accept ->
rollback, batch 1. Without a drafter a step drafts nothing (k = 0) and "verification" of the one
pending token is plain decoding, so SD and non-SD runs share every line of the loop.

Token bookkeeping: `seq` = prompt + emitted tokens. The target KV cache always holds
`seq[:-1]`; a step feeds `[seq[-1], d_1..d_k]` (k+1 positions, logits for all of them), accepts
n drafts, emits n+1 tokens (accepted drafts + the recovered or bonus token), and crops the
target cache back to `len(seq) - 1` of the new sequence (the drafter likewise, see
`spmoe.spec.drafter`). Greedy (temperature 0) is exact; sampling uses rejection sampling, so
the output distribution is the target's. The target's forward and cache are a decoder
(`spmoe.runtime.decoder`, picked by `hardware.decode`: a dynamic cache, a static one, or a static
one with CUDA graphs); the loop is the same for every choice.

Each step ends with its tokens on the host; then the step's transfer totals and per-layer
expert events are collected into a `StepRecord`. Methods differ only in the `Runtime` they plug
in (how experts are served) and whether they draft; the loop, timers and records are the same
for all, which is what makes comparisons fair. Under routing replay the runtime's
`accept_override` supplies each step's recorded number of accepted drafts. `reserve` sizes both
caches and captures, before any timed step, the graphs of every shape a step may feed (verify widths
1..k+1, the draft's `STEP_SHAPES`), whole-step graphs or piecewise ones captured dry
(`spmoe.runtime.decoder.StaticDecoder.precapture`).
"""

from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from spmoe.config import SpecConfig
from spmoe.runtime.decoder import make_decoder
from spmoe.spec.drafter import STEP_SHAPES, ModelDrafter
from spmoe.spec.verify import (
    AcceptResult,
    probs_from_logits,
    rejection_sample,
    verify_greedy,
)
from spmoe.strategy import Runtime
from spmoe.trace.records import StepRecord


@dataclass
class StepState:
    """What a draft-length chooser (`Runtime.choose_k`) sees before a step drafts."""

    step: int  # engine step index (1 = the first decode step)
    pos: int  # sequence length before the step
    max_k: int  # the bound: min(spec.num_draft_tokens, tokens still to emit - 1)


@dataclass
class Generation:
    token_ids: list[int]
    records: list[StepRecord]
    decode: str = "eager"  # the target decoder's mode (spmoe.runtime.decoder); the lossless check mirrors it
    kv_capacity: int | None = None  # a static target cache's positions (its attention spans all of them)


class Engine:
    def __init__(self, runtime: Runtime, device: torch.device, drafter: ModelDrafter | None = None,
                 spec: SpecConfig | None = None, seed: int = 0, decode: str = "eager"):
        self.runtime = runtime
        self.device = device
        self.drafter = drafter
        self.spec = spec or SpecConfig(num_draft_tokens=0)
        self.seed = seed
        if drafter is not None and self.spec.num_draft_tokens < 1:
            raise ValueError(f"spec.num_draft_tokens must be >= 1 with a draft model, got {self.spec.num_draft_tokens}")
        self._step_tokens = self.spec.num_draft_tokens + 1 if drafter is not None else 1  # positions a verify step feeds
        self.decode = decode
        self.decoder = make_decoder(runtime.model, device, decode, max_graph_tokens=self._step_tokens,
                                    events=runtime.events)
        self._sync_wait_ms = 0.0  # host time blocked on the device at the end of target forwards, this step

    def _max_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """Positions a sequence may reach: the prompt, the new tokens, and a last verify's drafts."""
        return prompt_len + max_new_tokens + self.spec.num_draft_tokens + 1

    def reserve(self, max_prompt_len: int, max_new_tokens: int) -> None:
        """Size the target's and the draft's KV caches once for the longest sequence of a run."""
        max_len = self._max_len(max_prompt_len, max_new_tokens)
        self.decoder.reserve(max_len)
        # every verify width a step may feed (k shrinks near the end and under adaptive k), captured before timing
        self.decoder.precapture([(t, t) for t in range(1, self._step_tokens + 1)])
        if self.drafter is not None:
            self.drafter.decoder.reserve(max_len)
            self.drafter.decoder.precapture(list(STEP_SHAPES))

    def _target(self, ids: list[int], num_logits: int) -> torch.Tensor:
        logits = self.decoder.forward(ids, num_logits).float()  # [num_logits, V]
        t_wait = time.perf_counter()
        logits = logits.cpu()  # [num_logits, V]; the host copy syncs the step
        self._sync_wait_ms += (time.perf_counter() - t_wait) * 1e3
        return logits

    def _accept(self, drafts: list[int], draft_probs, logits: torch.Tensor, gen: torch.Generator) -> AcceptResult:
        if self.runtime.accept_override is not None:  # routing replay: the trace's verification outcome
            return self.runtime.accept_override(drafts, logits)
        draft_ids = torch.tensor(drafts, dtype=torch.long)
        if self.spec.temperature == 0:
            return verify_greedy(draft_ids, logits)
        p = probs_from_logits(logits, self.spec.temperature, self.spec.top_p)  # [K+1, V]
        q = draft_probs if draft_probs is not None else torch.zeros(0, logits.shape[-1])
        return rejection_sample(draft_ids, q, p, gen)

    def _record(self, prompt_idx: int, step: int, phase: str, pos: int, emitted: int, t_start: float,
                t_step: float, **spec_fields) -> StepRecord:
        now = time.perf_counter()
        stats = self.runtime.collect()
        prefetched, dropped, wasted = self.runtime.prefetch_counts() if self.runtime.prefetch_counts else (0, 0, 0)
        return StepRecord(
            prompt_idx=prompt_idx, step=step, phase=phase, pos=pos, num_emitted=emitted,
            t_ms=(now - t_start) * 1e3, step_ms=(now - t_step) * 1e3,
            h2d_bytes=stats.h2d_bytes, copy_ms=stats.copy_ms, stall_ms=stats.stall_ms,
            num_prefetched=prefetched, num_dropped=dropped, num_wasted=wasted,
            layers=self.runtime.events.drain(), sync_wait_ms=self._take_sync_wait(), **spec_fields,
        )

    def _take_sync_wait(self) -> float:
        wait, self._sync_wait_ms = self._sync_wait_ms, 0.0
        return wait

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int, prompt_idx: int = 0) -> Generation:
        if not prompt_ids:
            raise ValueError("empty prompt")
        with _collector_paused():
            return self._generate(prompt_ids, max_new_tokens, prompt_idx)

    def _generate(self, prompt_ids: list[int], max_new_tokens: int, prompt_idx: int) -> Generation:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + prompt_idx)
        self.runtime.collect()
        self.runtime.events.drain()
        max_len = self._max_len(len(prompt_ids), max_new_tokens)
        self.decoder.begin(max_len)
        t_start = time.perf_counter()
        self.runtime.begin_step(0)
        first = self._accept([], None, self._target(prompt_ids, 1), gen).token_ids
        self.runtime.end_step()
        if self.drafter is not None:
            self.drafter.begin(prompt_ids, max_len)
        seq = prompt_ids + first
        records = [self._record(prompt_idx, 0, "prefill", 0, 1, t_start, t_start)]
        while len(seq) - len(prompt_ids) < max_new_tokens:
            t_step = time.perf_counter()
            remaining = max_new_tokens - (len(seq) - len(prompt_ids))
            k = min(self.spec.num_draft_tokens, remaining - 1) if self.drafter is not None else 0
            adaptive = k > 0 and self.runtime.choose_k is not None  # k in [0, bound], recorded as num_drafted
            if adaptive:
                k = max(0, min(k, int(self.runtime.choose_k(StepState(len(records), len(seq), k)))))
            self.runtime.begin_step(len(records))
            drafts, draft_probs = self.drafter.propose(seq, k, gen) if k > 0 else ([], None)
            t_verify = time.perf_counter()
            logits = self._target([seq[-1]] + drafts, k + 1)  # [k+1, V]
            self.runtime.end_step()
            result = self._accept(drafts, draft_probs, logits, gen)
            pos = len(seq) - 1
            self.decoder.crop(pos + 1 + result.num_accepted)
            if self.drafter is not None:
                self.drafter.rollback(len(seq) + min(result.num_accepted, max(k - 1, 0)))
            seq = seq + result.token_ids
            spec_fields = {}
            if k > 0 or adaptive:  # a last step with room for one token drafts nothing: no acceptance statistics
                spec_fields = dict(num_drafted=k, num_accepted=result.num_accepted, draft_ids=list(drafts),
                                   draft_ms=(t_verify - t_step) * 1e3, verify_ms=(time.perf_counter() - t_verify) * 1e3)
            records.append(self._record(prompt_idx, len(records), "decode", pos, len(result.token_ids), t_start,
                                        t_step, **spec_fields))
        return Generation(seq[len(prompt_ids):], records, self.decode,
                          self.decoder.capacity)


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while one sequence decodes: a full collection of a large
    interpreter heap can stall whichever step triggers it by hundreds of ms, which is not the method's
    time. Reference counting still frees almost everything; cycles wait for the next
    collection, after the sequence."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
