"""
Drafter: proposes k tokens with a draft model that keeps its own KV cache.

Invariant: the draft cache holds `seq[:num_cached]` of the engine's token sequence. `propose`
feeds `seq[num_cached:]` (at least the last emitted token) and then each new draft token but
the last, so afterwards the cache holds `seq + drafts[:-1]`. `rollback(n)` crops it to the first
n tokens, which the engine calls with the number still valid after acceptance.

Greedy drafting (temperature 0) returns no probabilities; sampling returns the draft
distribution q [K, V] the tokens were drawn from (needed by rejection sampling), computed on the
host with the engine's generator so runs are seeded-deterministic.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from spmoe.spec.kv import cache_kwarg, crop_to
from spmoe.spec.verify import probs_from_logits, sample


class ModelDrafter:
    def __init__(self, model: PreTrainedModel, device: torch.device, temperature: float, top_p: float):
        self.model = model
        self.device = device
        self.temperature = temperature
        self.top_p = top_p
        self._kv_kwarg = cache_kwarg(model)
        self.kv: DynamicCache | None = None
        self.num_cached = 0

    def _feed(self, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1,
                         **{self._kv_kwarg: self.kv})
        self.num_cached += len(ids)
        return out.logits[0, -1]  # [V]

    def begin(self, prompt_ids: list[int]) -> None:
        self.kv = DynamicCache(config=self.model.config)
        self.num_cached = 0
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
            crop_to(self.kv, num_valid)
            self.num_cached = num_valid
