"""Tokenizers behind one small interface: the built-in byte tokenizer and HF tokenizer.json.

A tokenizer is named by a spec: the string "byte", a path to a tokenizer.json (or to a folder
holding one), or the dict `Tokenizer.to_json_spec()` returns. Workdirs and prepared corpora store
the dict, so the same tokenizer can be rebuilt later and a changed file is caught by its sha256.
"""

from __future__ import annotations

import abc
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Tried in this order; Qwen ships <|endoftext|>, Llama/Mistral </s>, Gemma <eos>.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")

BYTE_EOS_ID = 256
BYTE_VOCAB_SIZE = 257


class Tokenizer(abc.ABC):
    """Text <-> token ids. Every document a corpus holds ends with `eos_id`."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit; every id is < vocab_size."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """The id appended after every document."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Short human-readable name, e.g. "byte" or "hf:tokenizer.json"."""

    @property
    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Stable identifier of the id mapping (independent of where a file lives)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS or any other special token added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; never raises on ids the tokenizer produced."""

    @abc.abstractmethod
    def to_json_spec(self) -> dict[str, Any]:
        """JSON-serialisable spec that `load_tokenizer` turns back into this tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0..255 are the bytes, 256 is EOS, vocab_size 257. No other specials.

    encode() replaces characters UTF-8 cannot encode (lone surrogates) by "?"; decode() skips ids
    outside 0..255 (EOS included) and turns invalid UTF-8 into U+FFFD.
    """

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB_SIZE

    @property
    def eos_id(self) -> int:
        return BYTE_EOS_ID

    @property
    def name(self) -> str:
        return "byte"

    @property
    def fingerprint(self) -> str:
        return "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_json_spec(self) -> dict[str, Any]:
        return {"kind": "byte"}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json; EOS is the first of EOS_CANDIDATES it defines."""

    def __init__(self, path: str | os.PathLike[str]):
        import tokenizers  # deferred: only needed when a tokenizer.json is used

        self.path = Path(path).resolve()
        self.sha256 = _sha256_file(self.path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as e:
            raise ValueError(
                f"{self.path} is not a valid Hugging Face tokenizer.json ({e})."
            ) from None
        for token in EOS_CANDIDATES:
            eos = self._tok.token_to_id(token)
            if eos is not None:
                self._eos_id = int(eos)
                break
        else:
            raise ValueError(
                f"{self.path} defines none of the end-of-document tokens "
                f"{', '.join(EOS_CANDIDATES)}; one of them is needed as EOS."
            )
        self._vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        # Added tokens may carry ids past the base vocabulary; the embedding must cover them all.
        max_id = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)
        self._vocab_size = max(self._vocab_size, max_id + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def name(self) -> str:
        return f"hf:{self.path.name}"

    @property
    def fingerprint(self) -> str:
        return f"hf-{self.sha256[:16]}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json_spec(self) -> dict[str, Any]:
        return {"kind": "huggingface", "path": str(self.path), "sha256": self.sha256}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_tokenizer_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"tokenizer file {p} does not exist (expected 'byte' or a path to a Hugging Face "
            "tokenizer.json)."
        )
    return p


def load_tokenizer(spec: str | os.PathLike[str] | dict[str, Any] | Tokenizer) -> Tokenizer:
    """Builds the tokenizer a spec names: "byte", a tokenizer.json path, or a to_json_spec() dict.

    A dict spec carrying a sha256 is checked against the file, so ids recorded with one
    tokenizer.json are never silently decoded with another.
    """
    if isinstance(spec, Tokenizer):
        return spec
    if isinstance(spec, dict):
        kind = spec.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "huggingface":
            tok = HFTokenizer(_resolve_tokenizer_file(spec["path"]))
            expected = spec.get("sha256")
            if expected and expected != tok.sha256:
                raise ValueError(
                    f"tokenizer file {tok.path} has sha256 {tok.sha256[:12]}... but the spec "
                    f"records {expected[:12]}...; it changed since the spec was written."
                )
            return tok
        raise ValueError(
            f"unknown tokenizer spec kind {kind!r} (expected 'byte' or 'huggingface')."
        )
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(_resolve_tokenizer_file(spec))
