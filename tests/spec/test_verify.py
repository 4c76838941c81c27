from __future__ import annotations

import pytest
import torch

from spmoe.spec.verify import (
    AcceptResult,
    probs_from_logits,
    rejection_sample,
    sample,
    verify_greedy,
)

V = 8


def _logits_for(ids: list[int], v: int = V) -> torch.Tensor:
    """[len(ids), v] logits whose argmax per row is ids[row]."""
    logits = torch.randn(len(ids), v, generator=torch.Generator().manual_seed(123))
    logits[torch.arange(len(ids)), torch.tensor(ids)] = 10.0
    return logits


def _one_hot(ids: list[int], v: int = V) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(ids), v).float()


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- verify_greedy


def test_greedy_all_accepted_emits_bonus():
    res = verify_greedy(torch.tensor([3, 1, 4]), _logits_for([3, 1, 4, 5]))
    assert res == AcceptResult(num_accepted=3, token_ids=[3, 1, 4, 5])


def test_greedy_first_mismatch_at_zero():
    res = verify_greedy(torch.tensor([2, 1, 4]), _logits_for([6, 1, 4, 5]))
    assert res == AcceptResult(num_accepted=0, token_ids=[6])


def test_greedy_mismatch_in_middle():
    res = verify_greedy(torch.tensor([3, 1, 4, 7]), _logits_for([3, 2, 4, 7, 0]))
    assert res == AcceptResult(num_accepted=1, token_ids=[3, 2])


def test_greedy_k0_emits_argmax():
    res = verify_greedy(torch.empty(0, dtype=torch.int64), _logits_for([5]))
    assert res == AcceptResult(num_accepted=0, token_ids=[5])


def test_greedy_output_is_target_argmax():
    g = _gen(7)
    for _ in range(50):
        k = int(torch.randint(0, 5, (1,), generator=g))
        logits = torch.randn(k + 1, 4, generator=g)
        draft = torch.randint(0, 4, (k,), generator=g)
        res = verify_greedy(draft, logits)
        assert len(res.token_ids) == res.num_accepted + 1
        assert res.token_ids == logits.argmax(-1)[: res.num_accepted + 1].tolist()


# ---------------------------------------------------------------- rejection_sample: certain outcomes


def test_rs_p_equals_q_always_accepts():
    g = _gen()
    q = torch.softmax(torch.randn(3, V, generator=g), -1)
    p = torch.cat([q, torch.softmax(torch.randn(1, V, generator=g), -1)])
    for _ in range(100):
        draft = sample(q, g)
        res = rejection_sample(draft, q, p, g)
        assert res.num_accepted == 3
        assert res.token_ids[:3] == draft.tolist()
        assert len(res.token_ids) == 4


def test_rs_one_hot_match_accepts_and_bonus_from_p_k():
    draft = torch.tensor([2, 5])
    res = rejection_sample(draft, _one_hot([2, 5]), _one_hot([2, 5, 7]), _gen())
    assert res == AcceptResult(num_accepted=2, token_ids=[2, 5, 7])


def test_rs_zero_target_prob_always_rejects_and_recovers_from_residual():
    # p_0(x_0) = 0: always reject; residual max(0, p - q) is supported on {1, 3} only.
    q = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    p = torch.tensor([[0.0, 0.3, 0.5, 0.2], [0.25, 0.25, 0.25, 0.25]])
    g = _gen()
    seen = set()
    for _ in range(200):
        res = rejection_sample(torch.tensor([0]), q, p, g)
        assert res.num_accepted == 0 and len(res.token_ids) == 1
        seen.add(res.token_ids[0])
    assert seen == {1, 3}


def test_rs_one_hot_mismatch_recovers_target_token():
    res = rejection_sample(torch.tensor([1, 2]), _one_hot([1, 2]), _one_hot([1, 6, 0]), _gen())
    assert res == AcceptResult(num_accepted=1, token_ids=[1, 6])


def test_rs_q_zero_at_draft_accepts_iff_p_positive():
    q = _one_hot([0])
    p_pos = torch.stack([_one_hot([3])[0], _one_hot([4])[0]])
    assert rejection_sample(torch.tensor([3]), q, p_pos, _gen()) == AcceptResult(1, [3, 4])
    # p(x) = 0 and q(x) = 0: rejected; residual max(0, p - q) = p here -> token 3.
    assert rejection_sample(torch.tensor([5]), q, p_pos, _gen()) == AcceptResult(0, [3])


def test_rs_zero_residual_falls_back_to_p():
    # p == q but both 0 at the draft token: rejected, residual all zeros -> sample from p_0.
    q = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    p = torch.cat([q, _one_hot([0], 4)])
    g = _gen()
    outs = {rejection_sample(torch.tensor([3]), q, p, g).token_ids[0] for _ in range(100)}
    assert outs == {1, 2}


def test_rs_k0_samples_bonus():
    res = rejection_sample(torch.empty(0, dtype=torch.int64), torch.empty(0, V), _one_hot([4]), _gen())
    assert res == AcceptResult(num_accepted=0, token_ids=[4])


# ---------------------------------------------------------------- rejection_sample: determinism


def _run_many(seed: int, n: int = 200) -> list[AcceptResult]:
    g = _gen(99)
    q = torch.softmax(torch.randn(3, V, generator=g), -1)
    p = torch.softmax(torch.randn(4, V, generator=g), -1)
    drafts = [sample(q, g) for _ in range(n)]
    gen = _gen(seed)
    return [rejection_sample(d, q, p, gen) for d in drafts]


def test_rs_seeded_determinism():
    a, b = _run_many(1), _run_many(1)
    assert a == b
    assert a != _run_many(2)


# ---------------------------------------------------------------- rejection_sample: distribution


def test_rs_emitted_tokens_follow_target_distribution():
    """Empirical law of emitted tokens matches p (not q), with drafts sampled from q (K=2)."""
    n = 15_000
    g = _gen(2023)
    # Far apart (TV ~0.4), yet acceptance (1 - TV ~0.6) stays high enough to also check the
    # tokens emitted after one and two acceptances.
    w = torch.rand(3, V, generator=g) + 0.1
    half = torch.tensor([1.0] * (V // 2) + [0.4] * (V // 2))
    p = w * half  # [3, V]: mass mostly on the low half
    q = w[:2] * half.flip(-1)  # [2, V]: mass mostly on the high half
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    assert _tv(p[0], q[0]) > 0.35 and _tv(p[1], q[1]) > 0.35

    drafts = torch.stack([torch.multinomial(q[i], n, replacement=True, generator=g) for i in range(2)], 1)  # [n, 2]
    first, second, third = torch.zeros(V), torch.zeros(V), torch.zeros(V)
    for d in drafts:
        res = rejection_sample(d, q, p, g)
        assert len(res.token_ids) == res.num_accepted + 1
        first[res.token_ids[0]] += 1
        if res.num_accepted >= 1:
            second[res.token_ids[1]] += 1
        if res.num_accepted == 2:
            third[res.token_ids[2]] += 1

    emp = first / n
    assert _tv(emp, p[0]) < 0.02
    assert _tv(emp, q[0]) > 0.3
    # Second token given the first was accepted: a fresh accept step at position 1 -> p_1.
    assert second.sum() > 6000
    assert _tv(second / second.sum(), p[1]) < 0.03
    assert _tv(second / second.sum(), q[1]) > 0.3
    # Bonus token given both accepted: drawn from p_2.
    assert third.sum() > 3000
    assert _tv(third / third.sum(), p[2]) < 0.04


# ---------------------------------------------------------------- probs_from_logits / sample


def test_probs_temperature_matches_softmax():
    logits = torch.randn(5, 11, generator=_gen(3)) * 3
    for t in (0.3, 1.0, 2.5):
        probs = probs_from_logits(logits, temperature=t, top_p=1.0)
        assert probs.dtype == torch.float32 and probs.shape == (5, 11)
        torch.testing.assert_close(probs, torch.softmax(logits / t, -1))
        torch.testing.assert_close(probs.sum(-1), torch.ones(5))


def test_probs_top_p_hand_case():
    base = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = base.log()
    probs = probs_from_logits(logits, temperature=1.0, top_p=0.7)  # {1, 3}: 0.8 >= 0.7
    torch.testing.assert_close(probs, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    probs = probs_from_logits(logits, temperature=1.0, top_p=0.85)  # {1, 3, 0}: 0.95
    torch.testing.assert_close(probs, torch.tensor([[0.15, 0.5, 0.0, 0.3]]) / 0.95)
    probs = probs_from_logits(logits, temperature=1.0, top_p=0.01)  # top token always kept
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))


def test_probs_top_p_rows_sum_to_one():
    probs = probs_from_logits(torch.randn(16, 32, generator=_gen(5)), temperature=0.7, top_p=0.9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(16))
    assert (probs >= 0).all()


def test_sample_shape_and_support():
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    out = sample(probs, _gen())
    assert out.dtype == torch.int64 and out.shape == (2,)
    assert out[0] == 1 and out[1] in (0, 2)


# ---------------------------------------------------------------- errors


def test_greedy_shape_errors():
    with pytest.raises(ValueError, match=r"target_logits must have shape \[K\+1, V\] = \[3, V\].*\(2, 8\)"):
        verify_greedy(torch.tensor([1, 2]), torch.randn(2, V))
    with pytest.raises(ValueError, match=r"draft_ids must have shape \[K\], got \(1, 2\)"):
        verify_greedy(torch.tensor([[1, 2]]), torch.randn(3, V))
    with pytest.raises(ValueError, match="integer"):
        verify_greedy(torch.tensor([1.0, 2.0]), torch.randn(3, V))


def test_rejection_sample_shape_errors():
    d = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[K, V\] = \[2, 8\], got \(2, 7\)"):
        rejection_sample(d, torch.rand(2, 7), torch.rand(3, V), None)
    with pytest.raises(ValueError, match=r"target_probs must have shape \[K\+1, V\].*got \(2, 8\)"):
        rejection_sample(d, torch.rand(2, V), torch.rand(2, V), None)
    with pytest.raises(ValueError, match=r"draft_ids must lie in \[0, V=8\)"):
        rejection_sample(torch.tensor([1, 8]), torch.rand(2, V), torch.rand(3, V), None)


def test_probs_from_logits_errors():
    logits = torch.randn(2, V)
    with pytest.raises(ValueError, match="temperature must be > 0.*greedy"):
        probs_from_logits(logits, temperature=0.0, top_p=1.0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            probs_from_logits(logits, temperature=1.0, top_p=bad)
    with pytest.raises(ValueError, match=r"logits must have shape \[N, V\], got \(8,\)"):
        probs_from_logits(torch.randn(V), temperature=1.0, top_p=1.0)
    with pytest.raises(ValueError, match=r"probs must have shape \[N, V\]"):
        sample(torch.rand(V), None)
