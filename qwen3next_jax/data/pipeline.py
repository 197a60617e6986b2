"""Prepared corpus -> packed training and eval batches (grain, checkpointable).

Shape suffixes: B batch (per process), T seq_len, U = T + 1 window tokens, N stream tokens.

A split's shards, concatenated in index order, form one token stream in which every document ends
with EOS. Window i covers stream tokens [i*T, i*T + T + 1), so consecutive windows share one token
and, over an epoch, every token except the first is a target exactly once. Each window becomes one
example (all int32, shape [T]):

    inputs       window[:-1]
    targets      window[1:]; position t predicts targets[t] = the token after inputs[t]
    segment_ids  1, 2, 3, ... per document inside the window; a new document starts right AFTER
                 each EOS (the EOS belongs to the document it ends); 0 marks padding
    positions    0, 1, 2, ... restarting at every document start and at the window start
    loss_mask    1 where targets[t] is the next token of the same document; 0 where inputs[t] is
                 EOS (its target opens another document) and on padding

So the model never attends, convolves or predicts across a document boundary; a document cut by
the window start simply begins at position 0. Training windows are shuffled with a seed, reshuffled
every epoch, and repeated forever; eval windows are sequential and finite, the last one padded.

Multi-process: the global shuffled window stream is dealt round-robin, process p taking stream
elements p, p + P, p + 2P, ...; so processes see disjoint windows and the union of step s's
per-process batches is the same block of the global stream whatever P is (for a fixed B * P).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from qwen3next_jax.config import ConfigError
from qwen3next_jax.data.prepare import INDEX_FILE, INDEX_FORMAT, SPLITS
from qwen3next_jax.data.tokenizers import Tokenizer, load_tokenizer

EXAMPLE_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def load_index(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated index.json of a prepared corpus."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {d} does not exist.")
    path = d / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{d} holds no {INDEX_FILE}; prepare a corpus there with "
            "python -m qwen3next_jax.data.prepare."
        )
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg}).") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ConfigError(f"{path} is not a {INDEX_FORMAT} index (format {index.get('format')!r}).")
    for key in ("tokenizer", "vocab_size", "eos_id", "dtype", "splits"):
        if key not in index:
            raise ConfigError(f"{path} lacks the key {key!r}.")
    return index


def corpus_tokenizer(data_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer a prepared corpus was made with (its tokenizer.json copy when it has one)."""
    index = load_index(data_dir)
    spec = dict(index["tokenizer"])
    copy = Path(data_dir).expanduser() / "tokenizer.json"
    if spec.get("kind") == "huggingface" and copy.is_file():
        spec["path"] = str(copy)
    return load_tokenizer(spec)


def check_vocab(index: dict[str, Any], model_vocab_size: int) -> None:
    if index["vocab_size"] > model_vocab_size:
        raise ConfigError(
            f"the corpus uses a vocabulary of {index['vocab_size']} tokens but the model's "
            f"vocab_size is {model_vocab_size}."
        )


class TokenStream:
    """One split's shards as a single read-only token stream, memory-mapped lazily.

    Pickles as paths only, so grain worker processes open their own maps.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str, index: dict[str, Any]):
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}.")
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self.dtype = np.dtype(index["dtype"])
        shards = index["splits"][split]["shards"]
        self.files = [self.data_dir / s["file"] for s in shards]
        self.sizes = [int(s["tokens"]) for s in shards]
        self.ends = np.cumsum([0, *self.sizes])
        self._arrays: list[np.ndarray] | None = None
        self._open()  # validate eagerly so a bad corpus fails at construction

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"} | {"_arrays": None}

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            arrays = []
            for f, size in zip(self.files, self.sizes, strict=True):
                if not f.is_file():
                    raise FileNotFoundError(f"shard {f} listed in {INDEX_FILE} does not exist.")
                a = np.load(f, mmap_mode="r", allow_pickle=False)
                if a.dtype != self.dtype:
                    raise ConfigError(
                        f"shard {f} holds {a.dtype} tokens but {INDEX_FILE} says {self.dtype}."
                    )
                if a.ndim != 1 or len(a) != size:
                    raise ConfigError(
                        f"shard {f} holds {a.shape} tokens but {INDEX_FILE} says ({size},)."
                    )
                arrays.append(a)
            self._arrays = arrays
        return self._arrays

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32, crossing shard boundaries as needed."""
        arrays = self._open()
        stop = min(stop, len(self))
        pieces = []
        k = int(np.searchsorted(self.ends, start, side="right")) - 1
        while start < stop:
            lo = start - int(self.ends[k])
            hi = min(stop, int(self.ends[k + 1])) - int(self.ends[k])
            pieces.append(arrays[k][lo:hi])
            start += hi - lo
            k += 1
        if not pieces:
            return np.zeros((0,), np.int32)
        return np.concatenate(pieces).astype(np.int32)


def window_example(window_L: np.ndarray, seq_len: int, eos_id: int) -> dict[str, np.ndarray]:
    """One example from L <= seq_len + 1 consecutive tokens; a shorter window is padded."""
    T = seq_len
    n = max(len(window_L) - 1, 0)
    tokens_U = np.zeros((T + 1,), np.int32)
    tokens_U[: len(window_L)] = window_L
    inputs_T, targets_T = tokens_U[:-1], tokens_U[1:]
    valid_T = np.arange(T) < n
    is_eos_T = (inputs_T == eos_id) & valid_T
    starts_T = np.concatenate([[True], is_eos_T[:-1]])
    segment_ids_T = np.cumsum(starts_T).astype(np.int32)
    t_T = np.arange(T, dtype=np.int32)
    start_pos_T = np.maximum.accumulate(np.where(starts_T, t_T, 0))
    positions_T = t_T - start_pos_T
    return {
        "inputs": np.where(valid_T, inputs_T, 0).astype(np.int32),
        "targets": np.where(valid_T, targets_T, 0).astype(np.int32),
        "segment_ids": np.where(valid_T, segment_ids_T, 0).astype(np.int32),
        "positions": np.where(valid_T, positions_T, 0).astype(np.int32),
        "loss_mask": (valid_T & ~is_eos_T).astype(np.int32),
    }


class _WindowToExample:
    """Window index -> example; a picklable callable so grain workers can run it."""

    def __init__(self, stream: TokenStream, seq_len: int, eos_id: int):
        self.stream, self.seq_len, self.eos_id = stream, seq_len, eos_id

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.seq_len
        window_L = self.stream.read(start, start + self.seq_len + 1)
        return window_example(window_L, self.seq_len, self.eos_id)


def _process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # deferred: only the defaults need it

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ConfigError(f"need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}.")
    return shard_index, shard_count


def _check_sizes(seq_len: int, batch_size: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"seq_len must be positive, got {seq_len}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}.")


def train_dataset(
    data_dir: str | os.PathLike[str],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    model_vocab_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
) -> grain.IterDataset:
    """The infinite, batched training dataset; `batch_size` is per process.

    shard_index / shard_count default to jax.process_index() / jax.process_count().
    num_workers > 0 runs the window reads in grain worker processes: the same batches in the same
    order, but an iterator state only restores into an iterator with the same num_workers.
    """
    _check_sizes(seq_len, batch_size)
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    index = load_index(data_dir)
    check_vocab(index, model_vocab_size)
    stream = TokenStream(data_dir, "train", index)
    num_windows = (len(stream) - 1) // seq_len
    if num_windows < 1:
        raise ConfigError(
            f"the training split holds {len(stream)} tokens, fewer than one window of "
            f"seq_len + 1 = {seq_len + 1} tokens."
        )
    ds = grain.MapDataset.range(num_windows).seed(seed).shuffle().repeat()
    ds = ds[shard_index::shard_count].map(_WindowToExample(stream, seq_len, index["eos_id"]))
    # Windows are cheap memmap slices; reader threads would only contend for the GIL.
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if num_workers > 0:
        from absl import flags

        # grain's workers read absl flags; outside an absl app (tests, notebooks) none are parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Before batching, so workers deal out single windows round-robin and the batches match
        # num_workers=0 exactly (grain slices the source per worker).
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    it_ds = it_ds.batch(batch_size, drop_remainder=True)
    return it_ds


def make_train_iterator(
    data_dir: str | os.PathLike[str],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    model_vocab_size: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
) -> grain.DatasetIterator:
    """Iterator over training batches: dicts of EXAMPLE_KEYS -> int32 [batch_size, seq_len].

    A grain DatasetIterator: get_state() is a small JSON-able dict; set_state() on a fresh iterator
    built with the same arguments resumes with exactly the batches the original would have yielded.
    It also works with grain.checkpoint.CheckpointSave / CheckpointRestore inside an Orbax
    CheckpointManager.
    """
    return iter(
        train_dataset(
            data_dir,
            seq_len=seq_len,
            batch_size=batch_size,
            seed=seed,
            model_vocab_size=model_vocab_size,
            shard_index=shard_index,
            shard_count=shard_count,
            num_workers=num_workers,
        )
    )


def num_eval_windows(num_tokens: int, seq_len: int) -> int:
    return math.ceil((num_tokens - 1) / seq_len) if num_tokens > 1 else 0


def make_eval_batches(
    data_dir: str | os.PathLike[str],
    *,
    seq_len: int,
    batch_size: int,
    model_vocab_size: int,
    max_batches: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Finite iterator over the eval split: sequential windows, every eval target exactly once.

    Windows are padded (segment_ids 0, loss_mask 0) up to a whole number of global batches so every
    process yields the same number of full [batch_size, seq_len] batches; process p takes global
    windows p, p + P, ...; max_batches caps the batches per process.
    """
    _check_sizes(seq_len, batch_size)
    shard_index, shard_count = _process_shard(shard_index, shard_count)
    index = load_index(data_dir)
    check_vocab(index, model_vocab_size)
    stream = TokenStream(data_dir, "eval", index)
    if len(stream) < 2:
        raise ConfigError(
            f"the corpus in {data_dir} has no eval split ({len(stream)} eval tokens); prepare it "
            "with --eval_fraction > 0."
        )
    to_example = _WindowToExample(stream, seq_len, index["eos_id"])
    global_batch = batch_size * shard_count
    num_batches = math.ceil(num_eval_windows(len(stream), seq_len) / global_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for b in range(num_batches):
            rows = [
                to_example((b * batch_size + j) * shard_count + shard_index)
                for j in range(batch_size)
            ]
            yield {k: np.stack([r[k] for r in rows]) for k in EXAMPLE_KEYS}

    return batches()
