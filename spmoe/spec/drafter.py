"""
Drafter: proposes k tokens with a draft model that keeps its own KV cache.

Invariant: the draft cache holds `seq[:num_cached]` of the engine's token sequence. `propose`
feeds `seq[num_cached:]` (at least the last emitted token) and then each new draft token but
the last, so afterwards the cache holds `seq + drafts[:-1]`. `rollback(n)` crops it to the first
n tokens, which the engine calls with the number still valid after acceptance.

The forward and its cache are a decoder (`spmoe.runtime.decoder`, `decode` as the target's); a
draft step feeds one token, or two after a fully accepted step (the last draft and the bonus):
`STEP_SHAPES`, the (tokens, logits) shapes a run precaptures before timing.

After every draft forward is launched (before its logits are read), `on_forward` listeners are called
with whether it ran as a CUDA graph (`decoder.replayed`): a predictor's per-forward host work, which its
hooks do inline on an eager forward, follows a graph's replay there (`spmoe.predict.draft_router`).

Greedy drafting (temperature 0) returns no probabilities; sampling returns the draft
distribution q [K, V] the tokens were drawn from (needed by rejection sampling), computed on the
host with the engine's generator so runs are seeded-deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from spmoe.runtime.decoder import make_decoder
from spmoe.spec.verify import probs_from_logits, sample


STEP_SHAPES = ((1, 1), (2, 1))  # (tokens fed, logits kept) of every draft forward after the prompt


class ModelDrafter:
    def __init__(self, model: PreTrainedModel, device: torch.device, temperature: float, top_p: float,
                 decode: str = "eager", on_forward: list[Callable[[bool], None]] | None = None):
        self.model = model
        self.temperature = temperature
        self.top_p = top_p
        self.decoder = make_decoder(model, device, decode, max_graph_tokens=max(t for t, _ in STEP_SHAPES))
        self.on_forward = on_forward if on_forward is not None else []

    @property
    def num_cached(self) -> int:
        """Positions the draft's cache holds."""
        return self.decoder.length

    def _feed(self, ids: list[int]) -> torch.Tensor:
        logits = self.decoder.forward(ids, 1)[-1]  # [V]
        for listener in self.on_forward:
            listener(self.decoder.replayed)
        return logits

    def begin(self, prompt_ids: list[int], max_len: int | None = None) -> None:
        """Start a sequence of at most `max_len` positions (default: the prompt + 256)."""
        self.decoder.begin(max_len or len(prompt_ids) + 256)
        self._feed(prompt_ids)

    def propose(self, seq: list[int], k: int, generator: torch.Generator) -> tuple[list[int], torch.Tensor | None]:
        """k draft tokens after `seq`, and their distributions q [k, V] when sampling."""
        drafts, probs = [], []
        pending = seq[self.num_cached:]
        for _ in range(k):
            logits = self._feed(pending)
            if self.temperature == 0:
                token = int(logits.argmax())
            else:
                q = probs_from_logits(logits[None].float().cpu(), self.temperature, self.top_p)  # [1, V]
                token = int(sample(q, generator)[0])
                probs.append(q[0])
            drafts.append(token)
            pending = [token]
        return drafts, (torch.stack(probs) if probs else None)

    def rollback(self, num_valid: int) -> None:
        if num_valid < self.num_cached:
            self.decoder.crop(num_valid)
