"""Prompts through `datasets` (dataset=hf and the hub presets): local jsonl/parquet/csv files, errors
that name what was found, the offline failure of hub presets, chat templates."""

from __future__ import annotations

import json

import pytest

from experiments.presets import load_preset
from spmoe.config import DatasetConfig
from spmoe.data.hub import HUB_PRESETS, DatasetError
from spmoe.data.prompts import load_prompts
from spmoe.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer(512)
ROWS = [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "n": i} for i in range(6)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _hf(path, field="question", **kw) -> DatasetConfig:
    return DatasetConfig(name="hf", path=str(path), field=field, **kw)


def test_local_jsonl(jsonl):
    prompts = load_prompts(_hf(jsonl), TOK, 512, 3, seed=0)
    texts = {r["question"] for r in ROWS}
    assert len(prompts) == 3 and all(p.text in texts for p in prompts)
    assert all(p.token_ids == TOK.encode(p.text) for p in prompts)
    assert all(p.prompt_id.startswith("hf/") for p in prompts)
    again = load_prompts(_hf(jsonl), TOK, 512, 3, seed=0)
    assert [p.prompt_id for p in again] == [p.prompt_id for p in prompts]  # seeded


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_local_parquet_and_csv(tmp_path, fmt):
    import pandas as pd

    path = tmp_path / f"prompts.{fmt}"
    frame = pd.DataFrame(ROWS)
    frame.to_parquet(path) if fmt == "parquet" else frame.to_csv(path, index=False)
    prompts = load_prompts(_hf(path), TOK, 512, 6, seed=1)
    assert sorted(p.text for p in prompts) == sorted(r["question"] for r in ROWS)


def test_missing_path_names_what_the_directory_holds(jsonl):
    with pytest.raises(DatasetError, match=r"does not exist.*prompts\.jsonl"):
        load_prompts(_hf(jsonl.with_name("promts.jsonl")), TOK, 512, 1, seed=0)


def test_missing_field_names_the_columns(jsonl):
    with pytest.raises(DatasetError, match=r"'prompt' is not a column.*\['question', 'answer', 'n'\]"):
        load_prompts(_hf(jsonl, field="prompt"), TOK, 512, 1, seed=0)


def test_non_text_field(jsonl):
    with pytest.raises(DatasetError, match="holds int values"):
        load_prompts(_hf(jsonl, field="n"), TOK, 512, 1, seed=0)


def test_hf_needs_path_and_field(jsonl):
    with pytest.raises(DatasetError, match="dataset.path="):
        load_prompts(DatasetConfig(name="hf", field="question"), TOK, 512, 1, seed=0)
    with pytest.raises(DatasetError, match="dataset.field="):
        load_prompts(DatasetConfig(name="hf", path=str(jsonl)), TOK, 512, 1, seed=0)


@pytest.mark.parametrize("preset", HUB_PRESETS)
def test_hub_presets_fail_offline_with_one_clear_line(monkeypatch, preset):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = load_preset("dataset", preset)
    assert cfg.name == preset and cfg.path and cfg.field
    with pytest.raises(DatasetError) as err:
        load_prompts(cfg, TOK, 512, 1, seed=0)
    msg = str(err.value)
    assert f"dataset={preset}" in msg and "dataset=hf dataset.path=" in msg and "\n" not in msg


class ChatTokenizer(ByteTokenizer):
    """A byte tokenizer with a chat template: `<u>` + text + `<a>`."""

    has_chat_template = True

    def encode_chat(self, text: str) -> list[int]:
        return self.encode(f"<u>{text}<a>")


@pytest.mark.parametrize("mode,wrapped", [("auto", True), ("true", True), ("false", False)])
def test_chat_template_modes(jsonl, mode, wrapped):
    tok = ChatTokenizer(512)
    [p] = load_prompts(_hf(jsonl, chat_template=mode), tok, 512, 1, seed=0)
    assert p.token_ids == (tok.encode(f"<u>{p.text}<a>") if wrapped else tok.encode(p.text))


def test_chat_template_true_needs_one(jsonl):
    with pytest.raises(ValueError, match="no chat template"):
        load_prompts(_hf(jsonl, chat_template="true"), TOK, 512, 1, seed=0)
    [p] = load_prompts(_hf(jsonl, chat_template="auto"), TOK, 512, 1, seed=0)  # auto: none, so raw text
    assert p.token_ids == TOK.encode(p.text)


def test_connection_error_reads_as_offline(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'tatsu-lab/alpaca' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DatasetError, match="dataset=alpaca .*cannot be reached here.*dataset=hf dataset.path="):
        load_prompts(load_preset("dataset", "alpaca"), TOK, 512, 1, seed=0)


def test_local_directory_of_data_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    prompts = load_prompts(_hf(tmp_path / "data", split="test"), TOK, 512, 2, seed=0)
    assert all(p.text in {r["question"] for r in ROWS} for p in prompts)
