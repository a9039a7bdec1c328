"""The bytes each token of a ``tokenizers`` tokenizer stands for: what bits per byte divides by, read the same way
by the runtime (ONNX backend) and by distillation's evaluation."""

from __future__ import annotations

import functools
import json
from typing import Any


def byte_level_alphabet() -> list[str]:
    """The 256 characters of GPT-2's byte-level alphabet: the base tokens of every byte-level BPE vocabulary."""
    return list(_byte_level_table())


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenPieces:
    """The UTF-8 bytes each token id of a ``tokenizers.Tokenizer`` stands for, read from its vocabulary string as
    the tokenizer's decoder would turn it into text (byte-level BPE, byte fallback, metaspace); special added
    tokens stand for no bytes. ``spec`` is the parsed ``tokenizer.json``.

    This is what bits per byte divides by, on the runtime's side and on distillation's.
    """

    def __init__(self, tokenizer: Any, spec: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        added = spec.get("added_tokens")
        self._added = (
            {t["id"]: t for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)}
            if isinstance(added, list)
            else {}
        )
        self.special_ids = frozenset(i for i, t in self._added.items() if t.get("special"))
        decoders = json.dumps(spec.get("decoder"))
        self._byte_level = '"ByteLevel"' in decoders
        self._byte_fallback = '"ByteFallback"' in decoders
        self._metaspace = '"Metaspace"' in decoders or '"\\u2581"' in decoders or '"▁"' in decoders
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id in self.special_ids:
            return b""
        piece = self._cache.get(token_id)
        if piece is None:
            piece = self._cache[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> bytes:
        token = self.tokenizer.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._added:  # added tokens are stored as their literal text
            return token.encode("utf-8")
        if self._byte_level:
            table = _byte_level_table()
            if all(char in table for char in token):
                return bytes(table[char] for char in token)
            return token.encode("utf-8")
        if self._byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        if self._metaspace:
            return token.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
