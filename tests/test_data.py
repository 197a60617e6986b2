"""Data: tokenizers, corpus preparation, the built-in corpus, and the grain pipeline (CPU, fast)."""

import json
import random
import string

import numpy as np
import pytest

from qwen3next_jax.data import corpus, pipeline, prepare
from qwen3next_jax.data.tokenizers import ByteTokenizer, load_tokenizer

E = 256  # byte tokenizer EOS
A, B, C, D, EE, F = (ord(c) for c in "abcdef")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _abc_corpus(tmp_path, **kw):
    """Documents "ab", "cde", "f" -> stream a b E c d e E f E."""
    src = tmp_path / "src"
    _write(src / "a.txt", "ab")
    _write(src / "b.txt", "cde")
    _write(src / "sub" / "c.md", "f")
    out = tmp_path / "out"
    kw.setdefault("eval_fraction", 0.0)
    return prepare.prepare_corpus([src], "byte", out, progress=False, **kw), out


def _random_docs(n, seed=0, lo=20, hi=80):
    rng = random.Random(seed)
    return [
        "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(lo, hi)))
        for _ in range(n)
    ]


def _jsonl_corpus(tmp_path, docs, eval_fraction=0.0, name="out"):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / name
    prepare.prepare_corpus(path, "byte", out, eval_fraction=eval_fraction, progress=False)
    return out


def _stream(out, split):
    return pipeline.TokenStream(out, split, pipeline.load_index(out)).read(0, 1 << 40)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _hf_tokenizer_file(tmp_path, special=("<|endoftext|>",)):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = ["the quick brown fox jumps over the lazy dog", "hello world", "def f(x): return x"]
    tok.train_from_iterator(sentences * 20, trainer=trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path, tok


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "héllo wörld ✓ 日本 🙂\n\tend"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    assert tok.encode("ab") == [97, 98]
    # EOS and out-of-range ids are skipped; invalid UTF-8 becomes U+FFFD.
    assert tok.decode([104, 256, 105, 999, -1]) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert tok.decode(np.array([0xE2, 0x9C], np.int32)) == "\ufffd"
    assert isinstance(load_tokenizer(tok.to_json_spec()), ByteTokenizer)
    assert tok.to_json_spec() == {"kind": "byte"}


def test_hf_tokenizer_round_trip(tmp_path):
    path, raw = _hf_tokenizer_file(tmp_path)
    tok = load_tokenizer(str(path))
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") == 0
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    text = "the lazy fox says hello wörld 🙂"
    ids = tok.encode(text)
    assert ids == raw.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "hello"]) == [ids, tok.encode("hello")]
    # A folder holding tokenizer.json and the recorded spec both rebuild the same tokenizer.
    assert load_tokenizer(path.parent).encode(text) == ids
    spec = tok.to_json_spec()
    assert spec["kind"] == "huggingface" and spec["path"] == str(path.resolve())
    assert load_tokenizer(spec).encode(text) == ids
    with pytest.raises(ValueError, match="changed since the spec was written"):
        load_tokenizer(spec | {"sha256": "0" * 64})


def test_hf_tokenizer_eos_preference_and_errors(tmp_path):
    path, raw = _hf_tokenizer_file(tmp_path, special=("<eos>", "</s>"))
    assert load_tokenizer(path).eos_id == raw.token_to_id("</s>")
    none_path, _ = _hf_tokenizer_file(tmp_path / "none", special=("<pad>",))
    with pytest.raises(ValueError, match="defines none of the end-of-document tokens"):
        load_tokenizer(none_path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = _write(tmp_path / "bad.json", "{not json")
    with pytest.raises(ValueError, match="is not a valid Hugging Face tokenizer.json"):
        load_tokenizer(bad)


# ---------------------------------------------------------------- preparation


def test_prepare_exact_shards_and_index(tmp_path):
    src = tmp_path / "src"
    _write(src / ".hidden" / "x.txt", "hidden folder")
    _write(src / ".y.txt", "hidden file")
    (src / "blob.bin").write_bytes(b"\x00\x01binary")
    index, out = _abc_corpus(tmp_path, shard_tokens=4)
    stream = [A, B, E, C, D, EE, E, F, E]
    assert index["splits"]["train"]["shards"] == [
        {"file": "train-00000.npy", "tokens": 4},
        {"file": "train-00001.npy", "tokens": 4},
        {"file": "train-00002.npy", "tokens": 1},
    ]
    assert index["splits"]["train"]["tokens"] == 9
    assert index["splits"]["train"]["documents"] == 3
    assert index["splits"]["eval"] == {"tokens": 0, "documents": 0, "shards": []}
    assert (index["documents"], index["num_files"]) == (3, 3)
    assert (index["vocab_size"], index["eos_id"], index["dtype"]) == (257, 256, "uint16")
    assert index["tokenizer"] == {"kind": "byte"}
    assert json.loads((out / "index.json").read_text()) == index
    shards = [
        np.load(out / s["file"], allow_pickle=False) for s in index["splits"]["train"]["shards"]
    ]
    assert all(s.dtype == np.uint16 for s in shards)
    assert np.concatenate(shards).tolist() == stream
    assert _stream(out, "train").tolist() == stream
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "train-00000.npy",
        "train-00001.npy",
        "train-00002.npy",
    ]
    # No temporary folders are left next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_prepare_jsonl_and_files_in_given_order(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "xy", "id": 1}\n\n{"text": ""}\n{"text": "z"}\n')
    txt = _write(tmp_path / "t.py", "q")
    out = tmp_path / "out"
    index = prepare.prepare_corpus([txt, jl], "byte", out, eval_fraction=0.0, progress=False)
    assert _stream(out, "train").tolist() == [ord("q"), E, ord("x"), ord("y"), E, ord("z"), E]
    assert index["documents"] == 3  # the empty text is skipped


def test_token_dtype():
    assert prepare.token_dtype(257) == np.uint16
    assert prepare.token_dtype(65536) == np.uint16
    assert prepare.token_dtype(65537) == np.uint32
    assert prepare.token_dtype(151_936) == np.uint32


def test_prepare_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"input path .*nope does not exist\."):
        prepare.prepare_corpus(tmp_path / "nope", "byte", out)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no text files found in the inputs"):
        prepare.prepare_corpus(tmp_path / "empty_dir", "byte", out)
    _write(tmp_path / "blank" / "a.txt", "")
    with pytest.raises(ValueError, match=r"the 1 input file\(s\) hold no documents"):
        prepare.prepare_corpus(tmp_path / "blank", "byte", out, progress=False)
    bad = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2 has no "text" field\.'):
        prepare.prepare_corpus(bad, "byte", out)
    broken = _write(tmp_path / "broken.jsonl", "{oops\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1 is not valid JSON"):
        prepare.prepare_corpus(broken, "byte", out)
    with pytest.raises(FileNotFoundError, match="tokenizer file"):
        prepare.prepare_corpus(tmp_path / "blank", tmp_path / "tok.json", out)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"a\x00b")
    with pytest.raises(ValueError, match="looks binary"):
        prepare.prepare_corpus(binary, "byte", out)
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        prepare.prepare_corpus(tmp_path / "blank", "byte", out, eval_fraction=1.0)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prepare_refuses_to_clobber(tmp_path):
    _, out = _abc_corpus(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a prepared corpus"):
        _abc_corpus(tmp_path)
    index, _ = _abc_corpus(tmp_path, overwrite=True, shard_tokens=100)
    assert len(index["splits"]["train"]["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "train-00000.npy"]
    other = tmp_path / "other"
    _write(other / "keep.txt", "user data")
    with pytest.raises(FileExistsError, match="holds no prepared corpus; refusing"):
        prepare.prepare_corpus(tmp_path / "src", "byte", other, overwrite=True)


def test_prepare_cli(tmp_path, capsys):
    _write(tmp_path / "src" / "a.txt", "ab")
    out = tmp_path / "out"
    argv = [f"--input={tmp_path / 'src'}", "--tokenizer=byte", f"--out={out}", "--quiet"]
    assert prepare.main([*argv, "--eval_fraction=0"]) == 0
    assert "1 documents from 1 files" in capsys.readouterr().out
    assert _stream(out, "train").tolist() == [A, B, E]
    assert prepare.main([f"--input={tmp_path / 'nope'}", f"--out={out}"]) == 1
    assert capsys.readouterr().err.strip().endswith("nope does not exist.")


def test_prepare_with_hf_tokenizer(tmp_path):
    path, raw = _hf_tokenizer_file(tmp_path)
    docs = ["hello world", "the quick brown fox"]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "out"
    index = prepare.prepare_corpus(jl, path, out, eval_fraction=0.0, progress=False)
    eos = raw.token_to_id("<|endoftext|>")
    expected = []
    for t in docs:
        expected += raw.encode(t, add_special_tokens=False).ids + [eos]
    assert _stream(out, "train").tolist() == expected
    assert index["tokenizer"]["kind"] == "huggingface"
    assert index["eos_id"] == eos
    assert (out / "tokenizer.json").read_bytes() == path.read_bytes()
    path.unlink()  # the corpus keeps its own copy
    assert (
        pipeline.corpus_tokenizer(out).decode(expected[:-1])
        == "hello world<|endoftext|>the quick brown fox"
    )


# ---------------------------------------------------------------- examples


def test_window_example_exact():
    ex = pipeline.window_example(np.array([A, B, E, C, D]), seq_len=4, eos_id=E)
    assert ex["inputs"].tolist() == [A, B, E, C]
    assert ex["targets"].tolist() == [B, E, C, D]
    assert ex["segment_ids"].tolist() == [1, 1, 1, 2]
    assert ex["positions"].tolist() == [0, 1, 2, 0]
    assert ex["loss_mask"].tolist() == [1, 1, 0, 1]
    assert all(v.dtype == np.int32 and v.shape == (4,) for v in ex.values())
    # A window opening on EOS, and two EOS in a row.
    ex = pipeline.window_example(np.array([E, 1, 2, E, E, 3]), seq_len=5, eos_id=E)
    assert ex["segment_ids"].tolist() == [1, 2, 2, 2, 3]
    assert ex["positions"].tolist() == [0, 0, 1, 2, 0]
    assert ex["loss_mask"].tolist() == [0, 1, 1, 0, 0]
    # A short (eval tail) window is padded with segment 0 and mask 0.
    ex = pipeline.window_example(np.array([5, E, 7]), seq_len=4, eos_id=E)
    assert ex["inputs"].tolist() == [5, E, 0, 0]
    assert ex["targets"].tolist() == [E, 7, 0, 0]
    assert ex["segment_ids"].tolist() == [1, 1, 0, 0]
    assert ex["positions"].tolist() == [0, 1, 0, 0]
    assert ex["loss_mask"].tolist() == [1, 0, 0, 0]


def test_train_batches_exact_at_document_boundaries(tmp_path):
    _, out = _abc_corpus(tmp_path, shard_tokens=4)  # windows cross shard boundaries
    it = pipeline.make_train_iterator(
        out, seq_len=4, batch_size=2, seed=0, model_vocab_size=257, shard_index=0, shard_count=1
    )
    batch = next(it)
    assert sorted(batch) == sorted(pipeline.EXAMPLE_KEYS)
    assert all(v.dtype == np.int32 and v.shape == (2, 4) for v in batch.values())
    # (9 - 1) // 4 = 2 windows: a b E c d and d e E f E, one epoch in some order.
    rows = sorted(range(2), key=lambda r: batch["inputs"][r, 0])
    got = {k: v[rows].tolist() for k, v in batch.items()}
    assert got["inputs"] == [[A, B, E, C], [D, EE, E, F]]
    assert got["targets"] == [[B, E, C, D], [EE, E, F, E]]
    assert got["segment_ids"] == [[1, 1, 1, 2], [1, 1, 1, 2]]
    assert got["positions"] == [[0, 1, 2, 0], [0, 1, 2, 0]]
    assert got["loss_mask"] == [[1, 1, 0, 1], [1, 1, 0, 1]]


# ---------------------------------------------------------------- training iterator


@pytest.fixture(scope="module")
def random_corpus(tmp_path_factory):
    return _jsonl_corpus(tmp_path_factory.mktemp("rand"), _random_docs(200), eval_fraction=0.2)


def _train(out, **kw):
    args = dict(
        seq_len=16, batch_size=4, seed=0, model_vocab_size=257, shard_index=0, shard_count=1
    )
    return pipeline.make_train_iterator(out, **(args | kw))


def _window_ids(batches, stream, seq_len):
    """Window index of every row, found by its first seq_len + 1 tokens."""
    lookup = {
        tuple(stream[i * seq_len : i * seq_len + seq_len + 1]): i
        for i in range((len(stream) - 1) // seq_len)
    }
    ids = []
    for b in batches:
        for inp, tgt in zip(b["inputs"], b["targets"], strict=True):
            ids.append(lookup[(*inp.tolist(), int(tgt[-1]))])
    return ids


def test_train_determinism_and_epoch_coverage(random_corpus):
    xs = _take(_train(random_corpus, seed=3), 5)
    _assert_batches_equal(xs, _take(_train(random_corpus, seed=3), 5))
    ys = _take(_train(random_corpus, seed=4), 5)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(xs, ys, strict=True))
    stream = _stream(random_corpus, "train").tolist()
    num_windows = (len(stream) - 1) // 16
    it = _train(random_corpus, batch_size=1)
    epoch1 = _window_ids(_take(it, num_windows), stream, 16)
    epoch2 = _window_ids(_take(it, num_windows), stream, 16)
    assert sorted(epoch1) == sorted(epoch2) == list(range(num_windows))
    assert epoch1 != epoch2  # reshuffled each epoch


def test_process_shards_are_disjoint_and_tile_the_global_batch(random_corpus):
    stream = _stream(random_corpus, "train").tolist()
    per_process = [
        _window_ids(_take(_train(random_corpus, shard_index=p, shard_count=3), 2), stream, 16)
        for p in range(3)
    ]
    assert sum(len(w) for w in per_process) == len(set().union(*map(set, per_process))) == 24
    # Step s of the three processes together is step s of one process with a 3x batch.
    single = _window_ids(_take(_train(random_corpus, batch_size=12), 2), stream, 16)
    for s in range(2):
        together = [w for ids in per_process for w in ids[4 * s : 4 * s + 4]]
        assert sorted(together) == sorted(single[12 * s : 12 * s + 12])
    with pytest.raises(ValueError, match="need 0 <= shard_index < shard_count"):
        _train(random_corpus, shard_index=3, shard_count=3)


def test_iterator_checkpoint_resumes_exactly(random_corpus):
    it = _train(random_corpus, seed=7)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 4)
    fresh = _train(random_corpus, seed=7)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)


def test_iterator_checkpoint_with_grain_handler(random_corpus, tmp_path):
    import grain
    from etils import epath

    it = _train(random_corpus, seed=1)
    _take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expected = _take(it, 3)
    fresh = handler.restore(epath.Path(tmp_path), item=_train(random_corpus, seed=1))
    _assert_batches_equal(_take(fresh, 3), expected)


def test_pipeline_errors(tmp_path, random_corpus):
    with pytest.raises(
        ValueError,
        match="the corpus uses a vocabulary of 257 tokens but the model's vocab_size is 256",
    ):
        _train(random_corpus, model_vocab_size=256)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _train(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="holds no index.json"):
        _train(tmp_path)
    _, out = _abc_corpus(tmp_path)
    with pytest.raises(
        ValueError, match="the training split holds 9 tokens, fewer than one window"
    ):
        _train(out, seq_len=9)
    with pytest.raises(ValueError, match="has no eval split"):
        pipeline.make_eval_batches(
            out, seq_len=4, batch_size=1, model_vocab_size=257, shard_index=0, shard_count=1
        )
    np.save(out / "train-00000.npy", np.array([A, B, E, C, D, EE, E, F, E], np.uint32))
    with pytest.raises(ValueError, match="holds uint32 tokens but index.json says uint16"):
        _train(out, seq_len=4)


# ---------------------------------------------------------------- eval split


def test_eval_split_is_disjoint_whole_documents(random_corpus):
    docs = _random_docs(200)
    tok = ByteTokenizer()

    def split_docs(split):
        text = tok.decode([t if t != E else ord("\n") for t in _stream(random_corpus, split)])
        return text.split("\n")[:-1]

    train, ev = split_docs("train"), split_docs("eval")
    assert set(train).isdisjoint(ev)
    assert sorted(train + ev) == sorted(docs)
    assert ev == [d for d in docs if prepare.is_eval_document(d, 0.2)]
    assert 20 < len(ev) < 60


def test_eval_batches_cover_every_target_once(random_corpus):
    stream = _stream(random_corpus, "eval")
    T, Bsz = 16, 4

    def evals(**kw):
        args = dict(seq_len=T, batch_size=Bsz, model_vocab_size=257, shard_index=0, shard_count=1)
        return list(pipeline.make_eval_batches(random_corpus, **(args | kw)))

    batches = evals()
    num_windows = -(-(len(stream) - 1) // T)
    assert len(batches) == -(-num_windows // Bsz)
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    valid = seg.reshape(-1) > 0
    assert valid.sum() == len(stream) - 1
    np.testing.assert_array_equal(inputs.reshape(-1)[valid], stream[:-1])
    np.testing.assert_array_equal(targets.reshape(-1)[valid], stream[1:])
    mask = np.concatenate([b["loss_mask"] for b in batches]).reshape(-1)
    assert mask[~valid].sum() == 0
    np.testing.assert_array_equal(mask[valid], (stream[:-1] != E).astype(np.int32))
    # Deterministic, capped by max_batches, and split across processes by global window index.
    _assert_batches_equal(evals(max_batches=2), batches[:2])
    wide = evals(batch_size=2 * Bsz)
    halves = [evals(shard_index=p, shard_count=2) for p in range(2)]
    assert len(halves[0]) == len(halves[1]) == len(wide)
    for b, w in enumerate(wide):
        for p in range(2):
            for k in pipeline.EXAMPLE_KEYS:
                np.testing.assert_array_equal(halves[p][b][k], w[k][p::2])


# ---------------------------------------------------------------- built-in corpus


def test_builtin_corpus_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    files = corpus.builtin_corpus_files(max_bytes=400_000)
    assert files == corpus.builtin_corpus_files(max_bytes=400_000)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"site-packages", "test", "tests"} & set(f.parts) for f in files)
    assert sum(f.stat().st_size for f in files) <= 400_000
    d = corpus.builtin_corpus_dir(max_bytes=400_000, progress=False)
    assert d.parent == tmp_path / "cache" / "corpus"
    index = pipeline.load_index(d)
    assert index["num_files"] == len(files)
    assert (
        index["splits"]["train"]["tokens"] + index["splits"]["eval"]["tokens"]
        == sum(len(f.read_bytes()) for f in files) + index["documents"]
    )
    mtime = (d / "index.json").stat().st_mtime_ns
    assert corpus.builtin_corpus_dir(max_bytes=400_000, progress=False) == d
    assert (d / "index.json").stat().st_mtime_ns == mtime
    batch = next(
        pipeline.make_train_iterator(
            d, seq_len=64, batch_size=2, seed=0, model_vocab_size=257, shard_index=0, shard_count=1
        )
    )
    assert batch["inputs"].shape == (2, 64)


@pytest.mark.slow
def test_worker_processes_yield_the_same_batches(random_corpus):
    expected = _take(_train(random_corpus, seed=5), 6)
    it = _train(random_corpus, seed=5, num_workers=2)
    got = _take(it, 3)
    state = it.get_state()
    got += _take(it, 3)
    _assert_batches_equal(got, expected)
    fresh = _train(random_corpus, seed=5, num_workers=2)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected[3:])
