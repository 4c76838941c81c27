"""
The expected-value terms of one speculative step that spmoe_plus's latency models share: the draft
choice (`spmoe.plus.draft_choice`, once per run) and the adaptive k (`spmoe.plus.k_chooser`, per step).

Terms: E experts per layer, A routed per token, T tokens in one layer forward (the k + 1 verify
positions of a step with k draft tokens), a the acceptance per draft token (draft token i is accepted
with probability a given that tokens 0..i-1 were).
  u(T) = E (1 - (1 - A / E)^T)   expected distinct experts one layer forward of T tokens needs, tokens
                                 routed independently and uniformly (SP-MoE's union of the k + 1 tokens'
                                 experts: `spmoe.policy.cutoff.expected_union`, the one definition)
  n(k) = sum_{i=0..k} a^i        expected tokens a step with k draft tokens emits (the bonus token included)
Invariants: pure functions of their arguments; k = 0 (no draft) gives T = 1 and n = 1.
"""

from __future__ import annotations

from spmoe.policy.cutoff import expected_union as union_size

__all__ = ["expected_emitted", "union_size"]


def expected_emitted(acceptance: float, num_draft_tokens: int) -> float:
    """n(k): expected tokens emitted by a step with `num_draft_tokens` drafts of per-token `acceptance`."""
    return sum(acceptance ** i for i in range(num_draft_tokens + 1))
