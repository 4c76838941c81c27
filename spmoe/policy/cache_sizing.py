"""
Per-layer expert-cache sizes by dynamic programming (AdapMoE's DP-based cache management).

Terms: a *hit curve* of one MoE layer is h(s) for s = 1..len(h) slots: the hits a cache of s
slots of that layer scores on a profiled access sequence (beyond len(h) the curve is flat: more
slots than distinct experts buy nothing). Given a curve per layer and a budget of S slots, choose
s_l >= min_slots with sum s_l <= S maximizing sum_l h_l(s_l): a grouped knapsack, solved exactly
by DP over (layer, slots spent) in O(L * S * max_l len(h_l)).

Hit curves come from `lru_hit_curve`: an exact LRU simulation of every cache size at once
(Mattson's stack distances): an access hits a cache of s slots iff fewer than s distinct keys
were used since the key's previous access. An access is one *step*: a set of keys needed
together (one token's experts without SD, the union of the k+1 verified tokens' with SD).

Relation to AdapMoE (arXiv 2408.10284, `src/dp.py`): the paper's DP minimizes an analytical
expected number of on-demand loads per layer (from the next-layer prefetch accuracy, the share
of tokens left with one expert by adaptive gating and a uniform-residency assumption); here the
objective is the profiled LRU hit count, which already reflects the layer's routing skew and the
gated routes. The DP itself (layers x budget, min one slot per layer) is the same.

Pure python, no tensors.
"""

from __future__ import annotations

from typing import Collection, Hashable, Sequence


def lru_hit_curve(steps: Sequence[Collection[Hashable]], max_slots: int) -> list[int]:
    """h[s - 1] = hits of an LRU cache of s slots (s = 1..max_slots) over `steps`, in order.

    Keys repeated within one step count once (a step needs each key once)."""
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    stack: list[Hashable] = []  # most recently used first
    hits_at_distance = [0] * (max_slots + 1)  # [d]: accesses with stack distance d (1-based)
    for step in steps:
        for key in dict.fromkeys(step):
            if key in stack:
                depth = stack.index(key) + 1
                if depth <= max_slots:
                    hits_at_distance[depth] += 1
                stack.remove(key)
            stack.insert(0, key)
    curve, total = [], 0
    for s in range(1, max_slots + 1):
        total += hits_at_distance[s]
        curve.append(total)
    return curve


def _value(curve: Sequence[float], slots: int) -> float:
    return curve[min(slots, len(curve)) - 1] if slots >= 1 else 0.0


def choose_sizes(curves: Sequence[Sequence[float]], budget: int, min_slots: int = 1) -> list[int]:
    """Slots per layer maximizing sum_l curves[l](s_l), s.t. s_l >= min_slots and sum s_l <= budget.

    Each s_l is at most max(min_slots, len(curves[l])) (the curve is flat beyond its end). Among
    optimal allocations the DP keeps the first found (layers in order, smaller sizes first), so
    it may leave slots unused: see `spread_leftover`."""
    if min_slots < 1:
        raise ValueError(f"min_slots must be >= 1, got {min_slots}")
    if any(len(c) == 0 for c in curves):
        raise ValueError("every hit curve needs at least one point (s = 1)")
    num_layers = len(curves)
    if num_layers * min_slots > budget:
        raise ValueError(f"{budget} slots cannot give {num_layers} layers {min_slots} slot(s) each")
    neg = float("-inf")
    # best[j] = best total value of the layers so far using exactly j slots; choice[l][j] = s_l there
    best = [0.0] + [neg] * budget
    choice: list[list[int]] = []
    for curve in curves:
        cap = max(min_slots, len(curve))
        nxt, pick = [neg] * (budget + 1), [0] * (budget + 1)
        for j in range(budget + 1):
            for s in range(min_slots, min(cap, j) + 1):
                if best[j - s] == neg:
                    continue
                v = best[j - s] + _value(curve, s)
                if v > nxt[j]:
                    nxt[j], pick[j] = v, s
        best = nxt
        choice.append(pick)
    j = max(range(budget + 1), key=lambda i: (best[i], -i))  # optimum; fewest slots among ties
    sizes = [0] * num_layers
    for layer in range(num_layers - 1, -1, -1):
        sizes[layer] = choice[layer][j]
        j -= sizes[layer]
    return sizes


def total_value(curves: Sequence[Sequence[float]], sizes: Sequence[int]) -> float:
    return sum(_value(c, s) for c, s in zip(curves, sizes))


def spread_leftover(sizes: Sequence[int], budget: int, caps: Sequence[int]) -> list[int]:
    """Hand slots the DP left unused to layers below their cap, one at a time round-robin from
    the first layer (free insurance against routing the profile did not see)."""
    out = list(sizes)
    left = budget - sum(out)
    while left > 0 and any(s < c for s, c in zip(out, caps)):
        for i, cap in enumerate(caps):
            if left > 0 and out[i] < cap:
                out[i] += 1
                left -= 1
    return out
