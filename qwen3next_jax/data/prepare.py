"""Text files, folders and JSONL -> token shards (.npy) plus index.json, with a held-out eval split.

    python -m qwen3next_jax.data.prepare --input=PATH [--input=PATH ...] \
        --tokenizer=byte|PATH/tokenizer.json --out=DIR [--shard_tokens=N] [--eval_fraction=F]

Every document is tokenized and followed by EOS, then appended to the token stream of its split.
A document is a whole text file, or one line of a .jsonl file (its "text" field). Folders are read
recursively in sorted path order, skipping hidden entries and binary files (a NUL byte in the first
8 KiB). A document goes to the eval split when the 64-bit BLAKE2b hash of its UTF-8 text, as a
fraction of 2**64, is below eval_fraction: the split is deterministic, independent of the tokenizer
and of input order, and duplicate documents never straddle it. Documents with no tokens are skipped.

index.json holds: format, tokenizer (its spec), vocab_size, eos_id, dtype ("uint16" when every id
fits, else "uint32"), eval_fraction, inputs, num_files, documents, and splits.{train,eval} with
tokens, documents and shards (a list of {"file", "tokens"}). The output is written to a temporary
sibling folder and renamed into place, so a reader never sees a half-written corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from qwen3next_jax.data.tokenizers import HFTokenizer, Tokenizer, load_tokenizer

INDEX_FILE = "index.json"
INDEX_FORMAT = "qwen3next_jax.tokens.v1"
DEFAULT_SHARD_TOKENS = 1 << 24
DEFAULT_EVAL_FRACTION = 0.01
SPLITS = ("train", "eval")

# Tokenizing many documents per call lets a Rust tokenizer work in parallel.
_ENCODE_BATCH_DOCS = 256
_ENCODE_BATCH_CHARS = 1 << 23


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= (1 << 16) else np.dtype(np.uint32)


def is_eval_document(text: str, eval_fraction: float) -> bool:
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < eval_fraction * 2.0**64


def _is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_input_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files the inputs name, in order: folders expand to their sorted non-hidden text files."""
    paths = [Path(p).expanduser() for p in inputs]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"input path {p} does not exist.")
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*"), key=lambda q: q.relative_to(p).as_posix()):
                if f.is_file() and not _is_hidden(f.relative_to(p)) and not _is_binary(f):
                    files.append(f)
        elif _is_binary(p):
            raise ValueError(f"input file {p} looks binary (it holds NUL bytes), not text.")
        else:
            files.append(p)
    if not files:
        raise ValueError(
            f"no text files found in the inputs {', '.join(str(p) for p in paths)}; "
            "the corpus would be empty."
        )
    return files


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}).") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f'{path}:{lineno} has no "text" field.')
            if not isinstance(record["text"], str):
                raise ValueError(f'{path}:{lineno} has a "text" field that is not a string.')
            yield record["text"]


def _file_texts(path: Path) -> Iterator[str]:
    if _is_jsonl(path):
        yield from _jsonl_texts(path)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


class _ShardWriter:
    """Appends documents to one split's token stream, cutting it into shards of shard_tokens."""

    def __init__(self, split: str, out_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.split, self.out_dir, self.dtype = split, out_dir, dtype
        self.shard_tokens = shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0

    def add(self, tokens_L: np.ndarray) -> None:
        self.pending.append(tokens_L)
        self.pending_tokens += len(tokens_L)
        self.tokens += len(tokens_L)
        self.documents += 1
        if self.pending_tokens >= self.shard_tokens:
            stream_N = np.concatenate(self.pending)
            full = len(stream_N) // self.shard_tokens * self.shard_tokens
            for start in range(0, full, self.shard_tokens):
                self._write(stream_N[start : start + self.shard_tokens])
            self.pending = [stream_N[full:]]
            self.pending_tokens = len(stream_N) - full

    def close(self) -> dict[str, Any]:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}

    def _write(self, tokens_N: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"
        np.save(self.out_dir / name, np.ascontiguousarray(tokens_N, dtype=self.dtype))
        self.shards.append({"file": name, "tokens": int(len(tokens_N))})


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder.")
    if not any(out.iterdir()):
        return
    if not (out / INDEX_FILE).is_file():
        raise FileExistsError(
            f"output folder {out} is not empty and holds no prepared corpus; "
            "refusing to replace it."
        )
    if not overwrite:
        raise FileExistsError(
            f"output folder {out} already holds a prepared corpus; pass overwrite=True "
            "(--overwrite) to replace it."
        )


def _encode_documents(
    tokenizer: Tokenizer, texts: list[str], dtype: np.dtype
) -> Iterator[np.ndarray]:
    eos_1 = np.array([tokenizer.eos_id], dtype=dtype)
    for ids in tokenizer.encode_batch(texts):
        if ids:
            yield np.concatenate([np.asarray(ids, dtype=dtype), eos_1])
        else:
            yield eos_1[:0]


def prepare_corpus(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    tokenizer_spec: str | os.PathLike[str] | dict[str, Any] | Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenizes `inputs` into `out_dir` (see the module docstring) and returns the index written.

    Raises FileNotFoundError, FileExistsError or ValueError, each with a one-sentence message; the
    inputs, tokenizer and output folder are checked before any tokenization starts.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("no inputs given; pass at least one file or folder.")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}.")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    files = list_input_files(inputs)
    tokenizer = load_tokenizer(tokenizer_spec)
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, overwrite)
    # JSONL is checked whole up front so a bad line fails before hours of tokenization.
    for f in files:
        if _is_jsonl(f):
            for _ in _jsonl_texts(f):
                pass

    dtype = token_dtype(tokenizer.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        writers = {s: _ShardWriter(s, tmp, dtype, shard_tokens) for s in SPLITS}
        batch: list[str] = []
        batch_chars = 0

        def flush() -> None:
            nonlocal batch, batch_chars
            encoded = _encode_documents(tokenizer, batch, dtype)
            for text, tokens_L in zip(batch, encoded, strict=True):
                if len(tokens_L):
                    split = "eval" if is_eval_document(text, eval_fraction) else "train"
                    writers[split].add(tokens_L)
            batch, batch_chars = [], 0

        for f in tqdm.tqdm(files, desc="tokenizing", unit="file", disable=not progress):
            for text in _file_texts(f):
                if not text:
                    continue
                batch.append(text)
                batch_chars += len(text)
                if len(batch) >= _ENCODE_BATCH_DOCS or batch_chars >= _ENCODE_BATCH_CHARS:
                    flush()
        flush()
        splits = {s: w.close() for s, w in writers.items()}
        documents = sum(s["documents"] for s in splits.values())
        if documents == 0:
            raise ValueError(
                f"the {len(files)} input file(s) hold no documents (all empty); "
                "the corpus would be empty."
            )
        if splits["train"]["documents"] == 0:
            raise ValueError(
                f"all {documents} document(s) fell into the eval split; "
                f"lower eval_fraction (now {eval_fraction}) or add documents."
            )
        spec = tokenizer.to_json_spec()
        if isinstance(tokenizer, HFTokenizer):
            # The corpus keeps its own copy so it can be decoded even if the original moves.
            shutil.copyfile(tokenizer.path, tmp / "tokenizer.json")
        index = {
            "format": INDEX_FORMAT,
            "tokenizer": spec,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "eval_fraction": eval_fraction,
            "inputs": [str(Path(p).expanduser().resolve()) for p in inputs],
            "num_files": len(files),
            "documents": documents,
            "splits": splits,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames tmp to out; an existing corpus there is replaced only when overwrite is set."""
    if out.exists() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        # Another process may have published while we worked; re-check under the same rules.
        _check_out_dir(out, overwrite)
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:
        if out.exists():
            raise FileExistsError(
                f"output folder {out} appeared while preparing (another process wrote it)."
            ) from e
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3next_jax.data.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--input", action="append", required=True, help="file or folder; repeat")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--eval_fraction", type=float, default=DEFAULT_EVAL_FRACTION)
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared corpus")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        index = prepare_corpus(
            args.input,
            args.tokenizer,
            args.out,
            shard_tokens=args.shard_tokens,
            eval_fraction=args.eval_fraction,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    train, ev = index["splits"]["train"], index["splits"]["eval"]
    print(
        f"wrote {args.out}: {index['documents']} documents from {index['num_files']} files; "
        f"train {train['tokens']} tokens ({train['documents']} docs, {len(train['shards'])} "
        f"shards), eval {ev['tokens']} tokens ({ev['documents']} docs); "
        f"vocab {index['vocab_size']}, {index['dtype']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
