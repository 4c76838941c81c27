"""
The real pair's routers: spherical k-means on captured FFN inputs, their hash and routing statistics.

Terms: a *router* is a layer's gate weight [E, H]; its rows are the unit k-means centroids of the
layer's FFN inputs (cosine k-means, k = num_experts) scaled by router_temperature / (median input
norm), so logits ~ router_temperature x cosine similarity. *Locality* is the fraction of
consecutive tokens sharing their top-1 expert.
Invariants: fitting is deterministic -- k-means++ init is seeded per layer (seed * 1000 + layer),
so the routers (and `routers_hash`, the build's weights hash) are bit-identical for a fixed torch
thread count.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spmoe.models.real_pair import PairConfig


def kmeans_cosine(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (k-means++ init, seeded): unit centroids [k, D] and assignments [N]."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    cent = [xn[torch.randint(len(xn), (1,), generator=gen).item()]]
    dist = torch.full((len(xn),), 2.0)
    for _ in range(1, k):
        dist = torch.minimum(dist, (1 - xn @ cent[-1]).clamp_min(0))
        probs = dist.double() / dist.double().sum() if dist.sum() > 0 else torch.full((len(xn),), 1 / len(xn))
        cent.append(xn[torch.multinomial(probs, 1, generator=gen).item()])
    c = torch.stack(cent)
    assign = torch.full((len(xn),), -1, dtype=torch.long)
    for _ in range(iters):
        new = (xn @ c.T).argmax(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, xn)
        filled = torch.bincount(assign, minlength=k) > 0
        c[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
    return c, assign


def fit_routers(feats: dict[int, torch.Tensor], cfg: PairConfig) -> dict[int, torch.Tensor]:
    """Router weight [E, H] per layer: unit k-means centroids of the layer's FFN inputs, scaled so
    that logits = router_temperature x cosine similarity (auto: 8 / typical norm)."""
    routers = {}
    for layer, x in sorted(feats.items()):
        cent, _ = kmeans_cosine(x, cfg.num_experts, cfg.kmeans_iters, cfg.seed * 1000 + layer)
        temp = cfg.router_temperature or 8.0
        routers[layer] = cent * (temp / x.norm(dim=-1).median())
    return routers


def routers_hash(routers: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in sorted(routers):
        h.update(routers[layer].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def routing_stats(x: torch.Tensor, router: torch.Tensor, top_k: int) -> dict[str, float]:
    """Expert-usage entropy (bits, of the top-k picks), mean cosine between tokens and their top-1
    router row, and locality (fraction of consecutive tokens sharing the top-1 expert)."""
    logits = x @ router.T
    top = logits.topk(top_k, dim=-1).indices
    use = torch.bincount(top.flatten(), minlength=router.shape[0]).double()
    p = use / use.sum()
    ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(router, dim=-1).T
    first = top[:, 0]
    return {"usage_entropy_bits": ent, "max_entropy_bits": math.log2(router.shape[0]),
            "mean_top1_cosine": float(cos.gather(1, first[:, None]).mean()),
            "locality": float((first[1:] == first[:-1]).double().mean())}
