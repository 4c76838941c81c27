"""
Accept step of speculative decoding: pure tensor functions, no model code, no CUDA calls.

Terms:
- draft tokens: the K tokens x_0..x_{K-1} proposed by the draft model, x_i sampled from q_i.
- target distribution p_i: the target model's next-token distribution at draft position i,
  from one forward over [prefix, x_0..x_{K-1}], so there are K+1 of them (p_K follows x_{K-1}).
- accepted: a draft token kept as-is; acceptance stops at the first rejection.
- recovered token: the token resampled at the first rejected position i (greedy: argmax p_i;
  sampling: drawn from normalize(max(0, p_i - q_i))).
- bonus token: the extra target token emitted at position K when all K drafts are accepted
  (greedy: argmax p_K; sampling: drawn from p_K).

Invariants:
- len(token_ids) == num_accepted + 1 always: the accepted drafts plus exactly one
  recovered-or-bonus token, so every verify step makes progress.
- greedy: token_ids[j] == argmax(target_logits[j]) for every emitted position j.
- sampling: every emitted token is distributed exactly as p at its position (Leviathan et al.
  2023, Chen et al. 2023), whatever q is.

Shapes are batch-free (batch 1); a batched version would add a leading B dim to each.
Shape legend: K = number of draft tokens (K >= 0), V = vocab size, N = any row count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AcceptResult:
    num_accepted: int  # accepted draft tokens, 0..K
    token_ids: list[int]  # accepted drafts + one recovered-or-bonus token (len = num_accepted + 1)


def _check_draft_ids(draft_ids: Tensor) -> int:
    if draft_ids.dim() != 1:
        raise ValueError(f"draft_ids must have shape [K], got {tuple(draft_ids.shape)}")
    if draft_ids.dtype.is_floating_point or draft_ids.dtype.is_complex or draft_ids.dtype == torch.bool:
        raise ValueError(f"draft_ids must be an integer tensor, got dtype {draft_ids.dtype}")
    return draft_ids.shape[0]


def _check_target(name: str, target: Tensor, k: int) -> int:
    if target.dim() != 2 or target.shape[0] != k + 1:
        raise ValueError(
            f"{name} must have shape [K+1, V] = [{k + 1}, V] for K={k} draft tokens, got {tuple(target.shape)}"
        )
    return target.shape[1]


def _check_ids_in_vocab(draft_ids: Tensor, v: int) -> None:
    if draft_ids.numel():
        lo, hi = draft_ids.aminmax()
        if int(lo) < 0 or int(hi) >= v:
            raise ValueError(f"draft_ids must lie in [0, V={v}), got min {int(lo)}, max {int(hi)}")


def _first_false(mask: Tensor) -> int:
    """Index of the first False in a 1-D bool mask, or len(mask) when all True."""
    rejected = (~mask).nonzero()
    return int(rejected[0, 0]) if rejected.numel() else mask.shape[0]


def verify_greedy(draft_ids: Tensor, target_logits: Tensor) -> AcceptResult:
    """Accept the longest prefix where draft == argmax(target); then emit the argmax at the
    first mismatch (recovered) or at position K (bonus).

    draft_ids [K] integer, target_logits [K+1, V] (logits or probabilities: only argmax is used).
    """
    k = _check_draft_ids(draft_ids)
    _check_target("target_logits", target_logits, k)
    target_ids = target_logits.argmax(dim=-1)  # [K+1]
    n = _first_false(draft_ids.to(target_ids.device) == target_ids[:k])
    # draft_ids[:n] == target_ids[:n], so the emitted tokens are the target argmaxes.
    return AcceptResult(num_accepted=n, token_ids=target_ids[: n + 1].tolist())


def rejection_sample(
    draft_ids: Tensor, draft_probs: Tensor, target_probs: Tensor, generator: torch.Generator | None
) -> AcceptResult:
    """Standard speculative-sampling accept rule (Leviathan et al. 2023 / Chen et al. 2023).

    draft_ids [K] integer (x_i ~ q_i), draft_probs [K, V] (q), target_probs [K+1, V] (p).
    Draft x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), implemented as
    `u * q_i(x_i) < p_i(x_i)` with u ~ U[0, 1). Edge cases that follow from this:
    - q_i(x_i) == 0 (x_i could not have come from q): accepted iff p_i(x_i) > 0.
    - p_i(x_i) == 0: always rejected.   - p_i == q_i: always accepted (unless both are 0 at x_i).
    On the first rejection at i, the recovered token is drawn from normalize(max(0, p_i - q_i));
    if that residual is all zeros (p_i == q_i), it is drawn from p_i instead. If all K drafts are
    accepted (including K == 0), the bonus token is drawn from p_K.
    Every random draw uses `generator` (K uniforms, then one multinomial draw), so a seeded
    generator gives deterministic results. Rows of p and q need not be exactly normalized.
    """
    k = _check_draft_ids(draft_ids)
    v = _check_target("target_probs", target_probs, k)
    if tuple(draft_probs.shape) != (k, v):
        raise ValueError(f"draft_probs must have shape [K, V] = [{k}, {v}], got {tuple(draft_probs.shape)}")
    _check_ids_in_vocab(draft_ids, v)
    device = target_probs.device
    ids = draft_ids.to(device=device, dtype=torch.int64).unsqueeze(-1)  # [K, 1]
    p = target_probs.to(torch.float32)  # [K+1, V]
    q = draft_probs.to(device=device, dtype=torch.float32)  # [K, V]
    p_x = p[:k].gather(-1, ids).squeeze(-1)  # [K]
    q_x = q.gather(-1, ids).squeeze(-1)  # [K]
    u = torch.rand(k, generator=generator, device=device, dtype=torch.float32)  # [K]
    n = _first_false(u * q_x < p_x)
    if n < k:
        dist = (p[n] - q[n]).clamp_min(0.0)  # [V] residual
        if float(dist.sum()) <= 0.0:
            dist = p[n]
    else:
        dist = p[k]  # [V] bonus
    last = sample((dist / dist.sum()).unsqueeze(0), generator)  # [1]
    return AcceptResult(num_accepted=n, token_ids=draft_ids[:n].tolist() + last.tolist())


def probs_from_logits(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """[N, V] logits -> [N, V] float32 probabilities of softmax(logits / temperature), with
    top-p (nucleus) filtering: per row, keep the smallest set of most-probable tokens whose
    mass is >= top_p (always at least the top token), zero the rest, renormalize.
    top_p == 1 disables filtering. Ties at the nucleus boundary are broken by sort order.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [N, V], got {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0, got {temperature}; for temperature 0 use greedy decoding (verify_greedy)"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.to(torch.float32) / temperature, dim=-1)  # [N, V]
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [N, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [N, V] exclusive cumsum
    keep_sorted = mass_before < top_p  # [N, V]; column 0 always kept (0 < top_p)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [N, V]
    probs = probs * keep
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """[N, V] probabilities (non-negative, rows need not sum to 1) -> [N] int64 token ids."""
    if probs.dim() != 2:
        raise ValueError(f"probs must have shape [N, V], got {tuple(probs.shape)}")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # [N]
