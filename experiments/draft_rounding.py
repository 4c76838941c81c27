"""How far bf16 rounding and the attention implementation move a random draft's greedy choice.

For each draft preset named on the command line: build it as a session does (seeded random weights, bf16, on
CUDA), teacher-force one seeded random sequence of `--positions` tokens, and compare the argmax at every position
between bf16 under transformers' SDPA (the baseline), bf16 under `spmoe_sdpa` (folded attention) and float32 (the
same weights upcast), and, for a sparse draft, how often a router picks another expert set in bf16 than in float32.
A model whose argmax flips with rounding at most positions cannot accept drafts from a twin that computes the same
function in another summation order, whatever the runtime. Prints one Markdown row per draft; --out writes them to
a file; --hf key=value overrides the draft's shape (e.g. fewer layers, to fit a CPU).

    python -m experiments.draft_rounding mistral_7b phi_mini_moe_twin --out results/.../draft_rounding.md
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from experiments.presets import load_preset
from spmoe.models.draft import build_draft, draft_hf_config
from spmoe.runtime import gqa_attention

HEADER = ("| draft | shape overrides | device | positions | top-1 agree: folded vs sdpa (bf16) | top-1 agree: fp32 vs bf16 "
          "| median fp32 top-1 margin | median max abs logit change bf16 vs fp32 | routes whose expert set differs, "
          "bf16 vs fp32 |\n|---|---|---|---|---|---|---|---|---|")


class RouteRecorder:
    """The expert ids [N, K] every router of `model` picked in its last forward, in layer order (empty for a dense
    model). Routers are the `mlp.router` / `mlp.gate` modules; one that returns (logits, weights, ids) gives its ids,
    one that returns logits gives their top-k."""

    def __init__(self, model: torch.nn.Module):
        self.picks: list[torch.Tensor] = []
        top_k = getattr(model.config, "num_experts_per_tok", None)
        for layer in model.model.layers:
            router = getattr(layer.mlp, "router", None) or getattr(layer.mlp, "gate", None)
            if top_k is not None and router is not None:
                router.register_forward_hook(lambda _m, _i, out: self.picks.append(
                    out[-1] if isinstance(out, tuple) else out.topk(top_k, dim=-1).indices))

    def take(self) -> list[torch.Tensor]:
        picks, self.picks = [p.sort(dim=-1).values for p in self.picks], []
        return picks


@torch.no_grad()
def measure(name: str, positions: int, seed: int, hf: dict) -> str:
    cfg = load_preset("draft", name)
    cfg = replace(cfg, hf_config={**cfg.hf_config, **hf})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_draft(cfg, draft_hf_config(cfg), device, seed)
    routes = RouteRecorder(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, positions), generator=gen).to(device)  # [1, P]
    gqa_attention.select(model, "sdpa")
    base = model(ids).logits[0].float()  # [P, V]
    base_picks = routes.take()  # per layer [P, K]
    gqa_attention.select(model, gqa_attention.NAME)
    folded = model(ids).logits[0].float()  # [P, V]
    routes.take()
    gqa_attention.select(model, "sdpa")
    model.float()
    full = model(ids).logits[0].float()  # [P, V]
    flips = [(a != b).any(dim=-1).float().mean().item() for a, b in zip(base_picks, routes.take())]
    flip_rate = f"{sum(flips) / len(flips):.3f}" if flips else "- (dense)"
    top2 = full.topk(2, dim=-1).values  # [P, 2]
    margin = (top2[:, 0] - top2[:, 1]).median().item()
    change = (base - full).abs().amax(dim=-1).median().item()
    agree_fold = (folded.argmax(-1) == base.argmax(-1)).float().mean().item()
    agree_fp32 = (full.argmax(-1) == base.argmax(-1)).float().mean().item()
    del model
    torch.cuda.empty_cache()
    shape = ", ".join(f"{k}={v}" for k, v in hf.items()) or "preset"
    return (f"| {name} | {shape} | {device.type} | {positions} | {agree_fold:.3f} | {agree_fp32:.3f} | {margin:.4f} "
            f"| {change:.4f} | {flip_rate} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("drafts", nargs="+", help="draft presets (conf/draft/*.yaml)")
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7, help="the session's draft seed is the run's seed + 7")
    ap.add_argument("--hf", action="append", default=[], metavar="KEY=VALUE", help="draft hf_config override")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    hf = dict(kv.split("=", 1) for kv in args.hf)
    hf = {k: yaml.safe_load(v) for k, v in hf.items()}
    rows = [HEADER, *(measure(d, args.positions, args.seed, hf) for d in args.drafts)]
    text = "\n".join(rows) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
