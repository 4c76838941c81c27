"""
Measuring the real pair: held-out NLL, greedy agreement, and the MoE-fication design comparison.

Terms: *greedy agreement* is the fraction of the target's greedy tokens that the draft also
predicts greedily given the target's prefix (teacher-forced) -- the per-token acceptance of greedy
speculative decoding. Design (a) is the upcycled target; design (b), *MoE-fication*, splits each
dense FFN's neurons into E balanced groups and keeps each token's top-k groups by true activation
mass (an oracle router, so an upper bound on any fitted router). Held-out text is GSM8K rows
1200..1231, disjoint from calibration.
Invariants: nothing here changes a model for good -- `compare_designs` swaps the draft's MLPs for
design (b) and always restores them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from spmoe.models.real_pair_calibration import calibration_ids, chat_ids
from spmoe.models.real_pair_routers import kmeans_cosine

if TYPE_CHECKING:
    from spmoe.models.real_pair import PairConfig

# a ShareGPT-style chat prompt (written here; not from the evaluation set)
SAMPLE_PROMPT = "Can you explain in a few sentences why the sky is blue?"
AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying productive when working from home.",
    "Write a short poem about the ocean.",
    "How do I reverse a list in Python?",
    "What are the main differences between a cat and a dog as pets?",
]


@torch.no_grad()
def mean_nll(model, seqs: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for s in seqs:
        logits = model(s[None]).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum"))
        count += len(s) - 1
    return total / count


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(ids[None], max_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):]


@torch.no_grad()
def greedy_agreement(target, draft, tok, prompts: list[str], n: int = 32) -> float:
    """Fraction of the target's greedy tokens that the draft also predicts greedily given the
    target's prefix (teacher-forced): the per-token acceptance of greedy speculative decoding."""
    hits, total = 0, 0
    for p in prompts:
        ids = chat_ids(tok, p)
        gen = greedy(target, ids, n)
        full = torch.cat([ids, gen])
        pred = draft(full[None]).logits[0, len(ids) - 1:-1].argmax(-1)
        hits += int((pred == gen).sum())
        total += len(gen)
    return hits / max(total, 1)


class _MoefiedMLP(torch.nn.Module):
    """Design (b), measured only: the dense FFN's neurons split into E balanced groups, each
    token keeping its top-k groups by *true* activation mass (an oracle router: an upper bound
    on any fitted router)."""

    def __init__(self, mlp, groups: torch.Tensor, num_groups: int, top_k: int):
        super().__init__()
        self.mlp, self.groups, self.num_groups, self.top_k = mlp, groups, num_groups, top_k

    def forward(self, x):
        m = self.mlp
        act = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        mass = torch.zeros(*act.shape[:-1], self.num_groups, dtype=act.dtype)
        mass.index_add_(-1, self.groups, act.abs())
        keep = mass.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(mass).scatter_(-1, keep, 1.0)[..., self.groups]
        return m.down_proj(act * mask)


def balanced_neuron_groups(act: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Group index per neuron: spherical k-means on neurons' |activation| profiles, then a greedy
    balanced assignment (I/k neurons per group)."""
    prof = act.abs().T  # [I, N]
    cent, _ = kmeans_cosine(prof, k, 15, seed)
    sim = torch.nn.functional.normalize(prof, dim=-1) @ cent.T  # [I, k]
    cap = [act.shape[1] // k] * k
    groups = torch.full((act.shape[1],), -1, dtype=torch.long)
    for flat in sim.flatten().argsort(descending=True).tolist():
        n, g = divmod(flat, k)
        if groups[n] < 0 and cap[g] > 0:
            groups[n] = g
            cap[g] -= 1
    return groups


@torch.no_grad()
def compare_designs(draft, tok, target, feats: dict[int, torch.Tensor], cfg: PairConfig) -> dict:
    """Held-out NLL (GSM8K rows 1200..1231, disjoint from calibration) and a greedy sample of:
    the dense draft, design (a) (this target) and design (b) (MoE-fication, oracle top-k groups)."""
    held = calibration_ids(tok, cfg, start=1200, count=32)
    sample_ids = chat_ids(tok, SAMPLE_PROMPT)
    res = {"dense": {"nll": mean_nll(draft, held)}, "a_upcycled": {"nll": mean_nll(target, held)}}
    res["dense"]["sample"] = tok.decode(greedy(draft, sample_ids, 40), skip_special_tokens=True)
    res["a_upcycled"]["sample"] = tok.decode(greedy(target, sample_ids, 40), skip_special_tokens=True)
    originals = {}
    for l, x in feats.items():
        mlp = draft.model.layers[l].mlp
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        originals[l] = mlp
        draft.model.layers[l].mlp = _MoefiedMLP(mlp, balanced_neuron_groups(act, cfg.num_experts, cfg.seed + l),
                                                cfg.num_experts, cfg.top_k)
    try:
        res["b_moefied_oracle"] = {"nll": mean_nll(draft, held),
                                   "sample": tok.decode(greedy(draft, sample_ids, 40), skip_special_tokens=True)}
    finally:
        for l, mlp in originals.items():
            draft.model.layers[l].mlp = mlp
    for v in res.values():
        v["ppl"] = math.exp(v["nll"])
    return res
