"""The built-in corpus: the running interpreter's standard library source, prepared once and cached.

Real text on every machine with no download. The selection is every *.py file under
sysconfig's "stdlib" path, outside site-packages / dist-packages, test folders, __pycache__ and
hidden folders, in sorted relative-path order, stopping before the first file that would push the
total past max_bytes. The cache lives in $QWEN3NEXT_JAX_CACHE/corpus/<key> (default
~/.cache/qwen3next_jax), where <key> names the Python version, the tokenizer's fingerprint and a
hash of the selected files' paths and sizes, so a new interpreter or tokenizer gets its own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

from qwen3next_jax.data.prepare import INDEX_FILE, prepare_corpus
from qwen3next_jax.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_MAX_BYTES = 30 * (1 << 20)
BUILTIN_EVAL_FRACTION = 0.02
CACHE_ENV = "QWEN3NEXT_JAX_CACHE"
_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3next_jax").expanduser()


def builtin_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The standard library files the built-in corpus is made of (deterministic for an install)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    selected: list[Path] = []
    total = 0
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        candidates.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    for f in sorted(candidates, key=lambda p: p.relative_to(root).as_posix()):
        size = f.stat().st_size
        if total + size > max_bytes:
            break
        selected.append(f)
        total += size
    if not selected:
        raise FileNotFoundError(
            f"no Python standard library source (*.py) found under {root}; prepare a corpus with "
            "python -m qwen3next_jax.data.prepare and point the data directory at it instead."
        )
    return selected


def _cache_key(tokenizer: Tokenizer, files: list[Path], max_bytes: int) -> str:
    manifest: dict[str, Any] = {
        "python": sys.version,
        "tokenizer": tokenizer.fingerprint,
        "max_bytes": max_bytes,
        "eval_fraction": BUILTIN_EVAL_FRACTION,
        "files": [(str(f), f.stat().st_size) for f in files],
    }
    digest = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()[:12]
    major, minor = sys.version_info[:2]
    return f"stdlib-py{major}{minor}-{tokenizer.fingerprint}-{digest}"


def builtin_corpus_dir(
    tokenizer_spec: str | os.PathLike[str] | dict[str, Any] | Tokenizer = "byte",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> Path:
    """A prepared-corpus folder of the standard library source, built on first use.

    cache_dir replaces the cache root (default: $QWEN3NEXT_JAX_CACHE or ~/.cache/qwen3next_jax).
    Safe under concurrency: processes that race each build in a temporary folder, the first
    rename wins and the others reuse its result.
    """
    tokenizer = load_tokenizer(tokenizer_spec)
    files = builtin_corpus_files(max_bytes)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out = root / "corpus" / _cache_key(tokenizer, files, max_bytes)
    if (out / INDEX_FILE).is_file():
        return out
    try:
        prepare_corpus(
            files, tokenizer, out, eval_fraction=BUILTIN_EVAL_FRACTION, progress=progress
        )
    except FileExistsError:
        if not (out / INDEX_FILE).is_file():
            raise
    return out
