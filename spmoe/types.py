"""
Small shared types.

ExpertKey = (layer, expert): `layer` is the decoder-layer index in the target model (not the
index among MoE layers), `expert` the routed-expert index within that layer. Never pass a
bare int that mixes the two.
"""

from __future__ import annotations

ExpertKey = tuple[int, int]
