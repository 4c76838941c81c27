"""Offline prompt sets: sizes, seeded selection, tokenization."""

from __future__ import annotations

import json

import pytest

from spmoe.config import DatasetConfig
from spmoe.data.prompts import DATASETS, load_prompts, sharegpt_first_turns
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


def _conversation(i: int, first: str, value: str) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": value}, {"from": "gpt", "value": "ok \u00e9"}]}


CONVERSATIONS = [
    _conversation(0, "human", "plain"),
    _conversation(1, "gpt", "a gpt opening is skipped"),
    _conversation(2, "human", "   \n"),  # blank: skipped
    _conversation(3, "human", 'quotes " and \\ backslashes, ] and } inside'),
    {"id": "c4", "conversations": []},  # no turns: skipped
    _conversation(5, "human", "multi-byte: \u00e9\u4e2d\U0001f600 " * 20),
    _conversation(6, "human", "x" * 3000),
    _conversation(7, "human", "last whole one"),
    _conversation(8, "human", "cut off by the truncation"),
]
EXPECTED = [(f"sharegpt/c{i}", CONVERSATIONS[i]["conversations"][0]["value"]) for i in (0, 3, 5, 6, 7)]


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_sharegpt_stream_matches_the_whole_file(tmp_path, chunk_chars, ascii_only):
    """The streamed read gives the first turns a read of the whole array gives, whatever the chunk size
    splits (escapes, multi-byte characters, values ending at a chunk's end), up to a truncated tail."""
    text = json.dumps(CONVERSATIONS, indent=2, ensure_ascii=ascii_only)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[:text.index('"c8"') + 30], encoding="utf-8")  # truncated inside the last conversation
    assert sharegpt_first_turns(path, 100, chunk_chars) == EXPECTED
    assert sharegpt_first_turns(path, 3, chunk_chars) == EXPECTED[:3]
    whole = tmp_path / "whole.json"
    whole.write_text(text, encoding="utf-8")
    assert sharegpt_first_turns(whole, 100, chunk_chars) == EXPECTED + [("sharegpt/c8", "cut off by the truncation")]
    cut_at_a_value = tmp_path / "cut.json"  # truncated right after a conversation's closing brace
    cut_at_a_value.write_text(text[:text.index('"c8"')].rstrip().rstrip("{").rstrip().rstrip(","), encoding="utf-8")
    assert sharegpt_first_turns(cut_at_a_value, 100, chunk_chars) == EXPECTED


def test_sharegpt_stream_stops_reading_after_the_conversations_it_needs(tmp_path):
    """Text well past the last conversation needed (beyond the file reader's read-ahead) is never decoded:
    bytes there that are not UTF-8 (which a whole-file read would fail on) do not matter."""
    text = json.dumps([CONVERSATIONS[0], _conversation(1, "human", "y" * (1 << 16))], indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_bytes(text[:-1].encode() + b",\n" + b"\xff" * (1 << 16))
    assert sharegpt_first_turns(path, 1, chunk_chars=256) == EXPECTED[:1]
    with pytest.raises(UnicodeDecodeError):
        path.read_text(encoding="utf-8")
