"""Tokenizers that map text to token ids and back.

The bundled models use the byte tokenizer: token id i is the byte value i, so
every UTF-8 text encodes without unknown tokens and the vocabulary is 256.
"""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """Tokenizer whose tokens are the UTF-8 bytes of the text."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Decode ids to text, replacing incomplete UTF-8 sequences with U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes((token_id,))

    def to_dict(self) -> dict:
        return {"type": self.kind, "vocab_size": self.vocab_size}


def load_tokenizer(path: Path) -> ByteTokenizer:
    spec = json.loads(path.read_text(encoding="utf-8"))
    kind = spec.get("type")
    if kind != ByteTokenizer.kind:
        raise ValueError(f"{path}: unsupported tokenizer type {kind!r}; supported: 'byte'")
    return ByteTokenizer()


def save_tokenizer(tokenizer: ByteTokenizer, path: Path) -> None:
    path.write_text(json.dumps(tokenizer.to_dict(), indent=2) + "\n", encoding="utf-8")
