"""Offline prompt sets: sizes, seeded selection, tokenization."""

from __future__ import annotations

import pytest

from spmoe.config import DatasetConfig
from spmoe.data.prompts import DATASETS, load_prompts
from spmoe.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer(512)


@pytest.mark.parametrize("name,size", [("humaneval", 164), ("gsm8k", 1319), ("mtbench", 80), ("sharegpt", 2000)])
def test_real_datasets_load_offline_and_select_by_seed(name, size):
    cfg = DatasetConfig(name=name, max_prompt_tokens=64)
    a = load_prompts(cfg, TOK, 512, 3, seed=0)
    b = load_prompts(cfg, TOK, 512, 3, seed=0)
    c = load_prompts(cfg, TOK, 512, 3, seed=1)
    assert [p.prompt_id for p in a] == [p.prompt_id for p in b] != [p.prompt_id for p in c]
    assert all(0 < len(p.token_ids) <= 64 and p.text for p in a)
    with pytest.raises(ValueError, match=f"has {size} prompts"):
        load_prompts(cfg, TOK, 512, size + 1, seed=0)


def test_synthetic_and_errors():
    prompts = load_prompts(DatasetConfig(name="synthetic", prompt_len=7), TOK, 512, 2, seed=0)
    assert [len(p.token_ids) for p in prompts] == [7, 7]
    with pytest.raises(ValueError, match="valid: "):
        load_prompts(DatasetConfig(name="nope"), TOK, 512, 1, seed=0)
    assert set(DATASETS) == {"humaneval", "gsm8k", "mtbench", "sharegpt", "synthetic"}


def test_sharegpt_reads_first_human_turns_from_its_truncated_file():
    prompts = load_prompts(DatasetConfig(name="sharegpt", max_prompt_tokens=4096), TOK, 512, 2000, seed=0)
    ids = [p.prompt_id for p in prompts]
    assert len(set(ids)) == 2000 and all(i.startswith("sharegpt/") for i in ids)
    first = next(p for p in prompts if p.prompt_id == "sharegpt/QWJhYvA_0")  # the file's first conversation
    assert first.text.startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
