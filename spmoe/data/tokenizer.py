"""
Tokenizers: the checkpoint's own (transformers AutoTokenizer) when it ships one, else a
byte-level tokenizer for random-weight models.

ByteTokenizer: id = 3 + byte (0 = pad, 1 = bos, 2 = eos); vocabularies smaller than 259 fold
bytes modulo (vocab - 3). With random weights no tokenizer is "right"; bytes keep prompt
lengths honest (one token per byte, so HumanEval prompts are a few hundred tokens long).
`encode_chat` wraps a text as one user turn with the tokenizer's chat template (HF tokenizers that
ship one; `has_chat_template` says whether it exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_id: int | None  # the id `encode` puts first (None: the tokenizer adds no BOS)
    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...
    def encode_chat(self, text: str) -> list[int]: ...  # one user turn + the assistant prompt
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_id = 1
    has_chat_template = False

    def __init__(self, vocab_size: int):
        if vocab_size < 4:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 4, got {vocab_size}")
        self.vocab_size = vocab_size
        self._span = min(256, vocab_size - 3)

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + [3 + b % self._span for b in text.encode("utf-8")]

    def encode_chat(self, text: str) -> list[int]:
        raise ValueError("the byte-level tokenizer of a random-weight model has no chat template")

    def decode(self, ids: list[int]) -> str:
        return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")


def load_tokenizer(checkpoint_path: str | None, vocab_size: int) -> Tokenizer:
    if checkpoint_path and any((Path(checkpoint_path) / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(checkpoint_path, local_files_only=True)
        if len(hf) > vocab_size:
            raise ValueError(f"tokenizer in {checkpoint_path} has {len(hf)} tokens, the model's vocabulary {vocab_size}")
        return _HfTokenizer(hf)
    return ByteTokenizer(vocab_size)


class _HfTokenizer:
    def __init__(self, hf):
        self.hf = hf
        self.bos_id = hf.bos_token_id
        self.has_chat_template = bool(getattr(hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.hf(text)["input_ids"]

    def encode_chat(self, text: str) -> list[int]:
        out = self.hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)
