"""
ExpertCache: a fixed pool of device slots holding expert weights, with pluggable eviction.

Terms: a *slot* holds one expert (a flat buffer of `slot_numel` elements); a *hit* is an
access to a resident key; a *miss* admits a key into a free slot or evicts a *victim* chosen by
the policy among resident, unpinned keys. A *pinned* slot is in use by the layer being
computed (or by an in-flight copy) and cannot be evicted.

With `slots_per_layer` the pool is partitioned: layer l owns its own slots (its free list and
its victims are its own), as in Mixtral-Offloading's per-layer caches and AdapMoE's DP-sized
per-layer caches; without it all layers share one pool.

Invariants: no allocation after __init__; a key maps to at most one slot; counters count
accesses made through `lookup`/`admit` only (`preload` does not count); every resident key has been
touched (`admit` touches it), so a policy with `victim_where` (LRU: the least recently touched
evictable key, without listing the candidates) names the victim `victim` would name; a policy with
`victim_by_layer` (layer_distance) gets the resident keys grouped by layer and scores only the
layers it must.
Candidates are listed in residency order (the order keys got their slots), which breaks the ties of
policies whose scores can tie. Copy ordering (never
overwrite a slot a kernel may still read) is the transfer engine's job, not this class's.
"""

from __future__ import annotations

from collections import Counter

import torch

from spmoe.offload.eviction import EvictionPolicy
from spmoe.types import ExpertKey


class NoEvictableSlot(RuntimeError):
    pass


class ExpertCache:
    def __init__(self, num_slots: int, slot_numel: int, dtype: torch.dtype, device: torch.device | str,
                 policy: EvictionPolicy, slots_per_layer: dict[int, int] | None = None):
        if num_slots < 1:
            raise ValueError(f"an expert cache needs at least one slot, got {num_slots}")
        if slots_per_layer is not None and (sum(slots_per_layer.values()) > num_slots
                                            or min(slots_per_layer.values()) < 1):
            raise ValueError(f"slots_per_layer {slots_per_layer} must give every layer >= 1 slot and sum to"
                             f" <= {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self.storage = torch.empty(num_slots, slot_numel, dtype=dtype, device=device)  # [S, N]
        self._slot_of: dict[ExpertKey, int] = {}
        self._resident_by_layer: dict[int, dict[ExpertKey, None]] = {}  # layer -> its resident keys, residency order
        self._key_of: list[ExpertKey | None] = [None] * num_slots
        self._partition = slots_per_layer
        self._free_of: dict[int | None, list[int]] = {}
        self._pool_of_slot: list[int | None] = [None] * num_slots
        if slots_per_layer is None:
            self._free_of[None] = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        else:
            start = 0
            for layer, n in slots_per_layer.items():
                self._free_of[layer] = list(range(start + n - 1, start - 1, -1))
                self._pool_of_slot[start:start + n] = [layer] * n
                start += n
        self._pins: dict[int, int] = dict.fromkeys(range(num_slots), 0)  # slot -> pins (every slot present)
        self._evictable_in: Counter[int | None] = Counter()  # pool -> resident, unpinned slots (O(1) can_admit)
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._slot_of

    def resident(self) -> list[ExpertKey]:
        return list(self._slot_of)

    def slot(self, slot: int) -> torch.Tensor:
        return self.storage[slot]

    def key_at(self, slot: int) -> ExpertKey | None:
        """The key slot `slot` holds, if any."""
        return self._key_of[slot]

    def slot_of(self, key: ExpertKey) -> int | None:
        """The slot holding `key`, without counting an access."""
        return self._slot_of.get(key)

    def lookup(self, key: ExpertKey) -> int | None:
        """The slot holding `key` (a hit, counted) or None (not counted: call `admit`)."""
        slot = self._slot_of.get(key)
        if slot is not None:
            self.hits += 1
            self.policy.touch(key)
        return slot

    def _pool(self, key: ExpertKey) -> int | None:
        if self._partition is None:
            return None
        if key[0] not in self._partition:
            raise ValueError(f"layer {key[0]} has no slots in this partitioned cache")
        return key[0]

    def _candidates(self, pool: int | None) -> list[ExpertKey]:
        pins = self._pins
        if pool is None:
            return [k for k, s in self._slot_of.items() if not pins[s]]
        return [k for k, s in self._slot_of.items() if not pins[s] and k[0] == pool]

    def _victim(self, pool: int | None) -> ExpertKey | None:
        """The policy's victim among the pool's evictable keys (None if there is none)."""
        where = getattr(self.policy, "victim_where", None)
        if where is not None:
            pins, slot_of = self._pins, self._slot_of
            if pool is None:
                return where(lambda k: k in slot_of and not pins[slot_of[k]])
            return where(lambda k: k[0] == pool and k in slot_of and not pins[slot_of[k]])
        by_layer = getattr(self.policy, "victim_by_layer", None)
        if by_layer is not None:
            pins, slot_of, resident = self._pins, self._slot_of, self._resident_by_layer
            return by_layer(resident if pool is None else {pool: resident.get(pool, {})}, lambda k: not pins[slot_of[k]])
        candidates = self._candidates(pool)
        return self.policy.victim(candidates) if candidates else None

    def has_free_slot(self, key: ExpertKey) -> bool:
        """Whether `key` could be admitted into a free slot, evicting nothing."""
        return bool(self._free_of[self._pool(key)])

    def can_admit(self, key: ExpertKey | None = None) -> bool:
        """Whether `key` (any key, unpartitioned) could get a slot now (a free one, or an unpinned victim)."""
        pool = None if key is None else self._pool(key)
        if self._partition is not None and key is None:
            return any(self._free_of.values()) or any(self._evictable_in.values())
        return bool(self._free_of[pool]) or self._evictable_in[pool] > 0

    def would_evict_sooner_needed(self, key: ExpertKey) -> bool:
        """Whether admitting `key` now (for use at its layer's next visit) would evict a key the
        policy expects to be needed before it. Only policies with `needed_before` can tell; with
        the others, and with a free slot, False."""
        needed_before = getattr(self.policy, "needed_before", None)
        pool = self._pool(key)
        if needed_before is None or self._free_of[pool] or not self._evictable_in[pool]:
            return False
        return needed_before(self._victim(pool), key)

    def admit(self, key: ExpertKey, count_miss: bool = True) -> tuple[int, ExpertKey | None]:
        """Make room for a missing `key`: (its slot, the evicted key or None).

        Counts a miss unless `count_miss` is False (a prefetch admits before anything is needed)."""
        if key in self._slot_of:
            raise ValueError(f"expert {key} is already resident")
        evicted = None
        pool = self._pool(key)
        if self._free_of[pool]:
            slot = self._free_of[pool].pop()
        else:
            evicted = self._victim(pool)
            if evicted is None:
                raise NoEvictableSlot(f"all {self.num_slots} slots are pinned; cannot admit {key}")
            slot = self._slot_of.pop(evicted)
            del self._resident_by_layer[evicted[0]][evicted]
            self.policy.on_evict(evicted)
            self.evictions += 1
            self._evictable_in[pool] -= 1
        self._evictable_in[pool] += self._pins[slot] == 0
        self._slot_of[key] = slot
        self._resident_by_layer.setdefault(key[0], {})[key] = None
        self._key_of[slot] = key
        self.misses += int(count_miss)
        self.policy.touch(key, demand=count_miss)
        return slot, evicted

    def access(self, key: ExpertKey) -> tuple[int, bool, ExpertKey | None]:
        """lookup, then admit on a miss: (slot, hit, evicted key)."""
        slot = self.lookup(key)
        if slot is not None:
            return slot, True, None
        slot, evicted = self.admit(key)
        return slot, False, evicted

    def preload(self, key: ExpertKey) -> int:
        """Admit without counting (initial residency, e.g. the GPU-resident reference)."""
        slot, _ = self.admit(key, count_miss=False)
        return slot

    def pin(self, slot: int) -> None:
        if self._pins[slot] == 0 and self._key_of[slot] is not None:
            self._evictable_in[self._pool_of_slot[slot]] -= 1
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        if self._pins[slot] <= 0:
            raise ValueError(f"slot {slot} is not pinned")
        self._pins[slot] -= 1
        if self._pins[slot] == 0 and self._key_of[slot] is not None:
            self._evictable_in[self._pool_of_slot[slot]] += 1
