"""Data: tokenizers, corpus preparation, the built-in corpus, and the grain batch pipeline.

Names load lazily, so `python -m qwen3next_jax.data.prepare` neither imports grain nor warns about
running a module its package already imported.
"""

import importlib

_EXPORTS = {
    "Tokenizer": "tokenizers",
    "ByteTokenizer": "tokenizers",
    "HFTokenizer": "tokenizers",
    "load_tokenizer": "tokenizers",
    "prepare_corpus": "prepare",
    "builtin_corpus_dir": "corpus",
    "builtin_corpus_files": "corpus",
    "EXAMPLE_KEYS": "pipeline",
    "load_index": "pipeline",
    "corpus_tokenizer": "pipeline",
    "train_dataset": "pipeline",
    "make_train_iterator": "pipeline",
    "make_eval_batches": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
