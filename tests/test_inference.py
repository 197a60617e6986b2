"""Prefill / cached decode / generate / MTP speculative decoding / eval.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax.config import LINEAR, tiny
from qwen3next_jax.inference import decode
from qwen3next_jax.inference.cache import gdn_cache_nbytes
from qwen3next_jax.inference.generate import generate
from qwen3next_jax.model import Qwen3Next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny(gdn_chunk_size=64)
M = 4  # decode steps after the prompt
MAX_LEN = 80  # one KV-cache size for every test, so decode_step compiles once
SEQ = 69  # reference sequence length (65 + M)


@pytest.fixture(scope="module")
def model():
    return Qwen3Next(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(model):
    """Two random sequences and the full-forward logits (causal: any prefix's logits are these)."""
    ids = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, SEQ)).astype(np.int32)
    logits = nnx.jit(lambda m, x: m(x).logits)(model, jnp.asarray(ids))
    return ids, np.asarray(logits)


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _prefill_and_decode(model, prompt, lengths, padding, cont):
    logits, _, caches = decode.prefill(model, prompt, lengths, max_len=MAX_LEN, padding=padding)
    out = [logits]
    for i in range(cont.shape[1]):
        logits, _, caches = decode.decode_step(model, caches, cont[:, i])
        out.append(logits)
    return np.stack([np.asarray(o) for o in out], axis=1), caches


@pytest.mark.parametrize("T", (63, 64, 65))
def test_prefill_then_decode_matches_forward(model, reference, T):
    ids, full = reference
    got, _ = _prefill_and_decode(model, ids[:, :T], None, "right", ids[:, T : T + M])
    assert _rel_err(got, full[:, T - 1 : T + M]) < 1e-4


@pytest.mark.parametrize("padding", ("right", "left"))
def test_ragged_prompts_do_not_leak_padding(model, reference, padding):
    ids, full = reference
    T, lengths = 64, np.array([64, 50])
    prompt = np.full((2, T), 7, np.int32)  # the padding token is deliberately a real id
    for b, n in enumerate(lengths):
        if padding == "right":
            prompt[b, :n] = ids[b, :n]
        else:
            prompt[b, T - n :] = ids[b, :n]
    cont = np.stack([ids[b, n : n + M] for b, n in enumerate(lengths)])
    got, _ = _prefill_and_decode(model, prompt, lengths, padding, cont)
    for b, n in enumerate(lengths):
        assert _rel_err(got[b], full[b, n - 1 : n + M]) < 1e-4, (padding, b)


def test_verify_then_partial_commit_rolls_back(model, reference):
    """k+1 tokens in one cached forward, then keep a different prefix per row: the next token's
    logits equal the full forward's (GDN states restored from the kept per-token states)."""
    ids, full = reference
    T = 64
    _, _, caches = decode.prefill(model, ids[:, :T], max_len=MAX_LEN)

    @nnx.jit
    def verify_commit(model, caches, toks, accepted):
        h, pending = decode.forward_cached(model, caches, toks)
        return model.logits(h), decode.commit(caches, pending, accepted)

    accepted = jnp.array([1, 3], jnp.int32)
    logits, caches = verify_commit(model, caches, jnp.asarray(ids[:, T : T + 4]), accepted)
    assert _rel_err(logits, full[:, T : T + 4]) < 1e-4
    assert np.asarray(caches.length).tolist() == [T + 2, T + 4]
    nxt = np.array([ids[b, T + int(a) + 1] for b, a in enumerate(accepted)])
    logits, _, caches = decode.decode_step(model, caches, nxt)
    for b, a in enumerate(np.asarray(accepted)):
        assert _rel_err(logits[b], full[b, T + a + 1]) < 1e-4


def test_gdn_cache_size_does_not_grow(model, reference):
    ids, _ = reference
    _, _, caches = decode.prefill(model, ids[:, :64], max_len=MAX_LEN)
    before = gdn_cache_nbytes(caches)
    for i in range(M):
        _, _, caches = decode.decode_step(model, caches, ids[:, 64 + i])
    assert gdn_cache_nbytes(caches) == before
    c = CFG
    n_gdn = sum(t == LINEAR for t in c.resolved_layer_types)
    per_row = (c.linear_conv_kernel_dim - 1) * (2 * c.gdn_key_dim + c.gdn_value_dim) * 4 + (
        c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    )
    assert before == n_gdn * 2 * per_row


def _check_stats(stats, max_new):
    # Every target forward (prefill included) yields its accepted drafts plus one token.
    np.testing.assert_array_equal(stats["steps"] + stats["accepted"], stats["generated"])
    np.testing.assert_array_equal(stats["generated"], max_new)
    assert stats["accept_hist"].sum() == stats["steps"].sum()


def test_generate_greedy_matches_stepwise_and_speculative(model, reference):
    ids, full = reference
    T, new = 64, 10
    prompt = ids[:, :T]
    plain, stats = generate(model, prompt, max_new_tokens=new, return_stats=True)
    plain = np.asarray(plain)
    assert plain.shape == (2, T + new)
    np.testing.assert_array_equal(plain[:, :T], prompt)
    _check_stats(stats, new)
    # Teacher-forced check: every new token is the argmax after the tokens before it.
    np.testing.assert_array_equal(plain[:, T], full[:, T - 1].argmax(-1))
    logits, _, caches = decode.prefill(model, prompt, max_len=MAX_LEN)
    for i in range(new - 1):
        logits, _, caches = decode.decode_step(model, caches, plain[:, T + i])
        np.testing.assert_array_equal(np.asarray(logits).argmax(-1), plain[:, T + i + 1])
    spec, stats = generate(model, prompt, max_new_tokens=new, mtp_draft_tokens=2, return_stats=True)
    np.testing.assert_array_equal(np.asarray(spec), plain)
    _check_stats(stats, new)


@pytest.mark.slow
@pytest.mark.parametrize("k", (1, 3))
def test_speculative_greedy_random_mtp(model, reference, k):
    # Prompt [2, 20] and 10 new tokens: the shapes of test_eos_and_sampling's plain run and
    # test_speculative_greedy_high_acceptance's k = 1, 3 runs (same graph), so no new compiles.
    ids, _ = reference
    prompt, new = ids[:, :20], 10
    plain = generate(model, prompt, max_new_tokens=new)
    spec, stats = generate(model, prompt, max_new_tokens=new, mtp_draft_tokens=k, return_stats=True)
    np.testing.assert_array_equal(np.asarray(spec), np.asarray(plain))
    _check_stats(stats, new)


@pytest.mark.slow
def test_eos_and_sampling(model, reference):
    ids, _ = reference
    prompt = ids[:, :20]
    plain = np.asarray(generate(model, prompt, max_new_tokens=10))
    eos = int(plain[0, 23])  # row 0 emits it as its 4th new token
    out, stats = generate(model, prompt, max_new_tokens=10, eos_id=eos, return_stats=True)
    out = np.asarray(out)
    first = np.argmax(plain[0, 20:] == eos)
    np.testing.assert_array_equal(out[0, : 21 + first], plain[0, : 21 + first])
    assert (out[0, 21 + first :] == eos).all()
    assert stats["generated"][0] == first + 1
    a = np.asarray(generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=3))
    b = np.asarray(generate(model, prompt, 10, temperature=1.0, top_p=0.9, seed=3))
    np.testing.assert_array_equal(a, b)
    assert ((a[:, 20:] >= 0) & (a[:, 20:] < CFG.vocab_size)).all()
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt, 4, top_p=0.0)
    with pytest.raises(ValueError, match="MTP"):
        generate(Qwen3Next(tiny(num_mtp_layers=0), rngs=nnx.Rngs(0)), prompt, 4, mtp_draft_tokens=1)


# ------------------------------------------------------------------- high MTP acceptance (slow)


def _train_periodic(model, steps=80, period=5, seed=0):
    """Trains main + MTP losses on one periodic token sequence so the MTP head becomes accurate."""
    import optax

    rs = np.random.RandomState(seed)
    pattern = rs.choice(CFG.vocab_size, period, replace=False)
    seq = np.tile(pattern, 64 // period + 2)[None, :26].repeat(4, 0)
    for b in range(4):
        seq[b] = np.roll(seq[b], b)
    x = jnp.asarray(seq[:, :-2])
    y1, y2 = jnp.asarray(seq[:, 1:-1]), jnp.asarray(seq[:, 2:])
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        def loss_fn(model):
            out = model(x)
            ce = optax.softmax_cross_entropy_with_integer_labels
            return ce(out.logits, y1).mean() + ce(out.mtp_logits[0], y2).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    for _ in range(steps):
        loss = train_step(model, opt)
    return float(loss), pattern


@pytest.mark.slow
def test_speculative_greedy_high_acceptance():
    model = Qwen3Next(CFG, rngs=nnx.Rngs(1))
    loss, pattern = _train_periodic(model)
    assert loss < 0.5
    prompt = np.stack([np.tile(pattern, 5)[:20], np.tile(pattern, 5)[2:22]]).astype(np.int32)
    plain = np.asarray(generate(model, prompt, max_new_tokens=10))
    for k in (1, 2, 3):
        spec, stats = generate(
            model, prompt, max_new_tokens=10, mtp_draft_tokens=k, return_stats=True
        )
        np.testing.assert_array_equal(np.asarray(spec), plain)
        _check_stats(stats, 10)
        assert stats["mean_accepted_per_step"] > 0.5 * k * 0.5, (k, stats)
        assert stats["steps"].max() < 10


# ------------------------------------------------------------------------------------ eval.py


def _run_eval(*args, timeout=600, script="eval.py"):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = ""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def _default_config_json(workdir):
    sys.path.insert(0, ROOT)
    from configs import default

    c = default.get_config()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(c.to_dict(), f, default=list)


def test_eval_cli_errors_are_one_sentence(tmp_path):
    r = _run_eval(f"--workdir={tmp_path / 'nope'}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "does not exist" in r.stderr
    r = _run_eval(f"--workdir={tmp_path}", "--mode=generate")
    assert r.returncode != 0 and "--prompt" in r.stderr and "Traceback" not in r.stderr
    _default_config_json(tmp_path)
    r = _run_eval(f"--workdir={tmp_path}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "checkpoints" in r.stderr


@pytest.mark.slow
def test_eval_after_short_training(small_train_run, tmp_path):
    # test_train's SMALL run, trained by train.py on its 8 fake devices to step 12: conftest.py's
    # session fixture, shared with test_train's command-line test (one worker runs both). eval.py
    # then runs on one device, in a copy of the workdir (this test rewrites its config.json).
    shared, r = small_train_run
    assert r.returncode == 0, r.stderr[-2000:]
    workdir = str(tmp_path / "run")
    shutil.copytree(shared, workdir)
    r = _run_eval(f"--workdir={workdir}")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(workdir, "eval.json")) as f:
        ev = json.load(f)
    assert ev["step"] == 12 and np.isfinite(ev["loss"])
    assert abs(ev["perplexity"] - np.exp(ev["loss"])) < 1e-6 * ev["perplexity"]
    assert "perplexity" in r.stdout
    r = _run_eval(
        f"--workdir={workdir}",
        "--mode=generate",
        "--prompt=def ",
        "--max_new_tokens=8",
        "--mtp_draft_tokens=2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("def ")
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        d = json.load(f)
    d["model"]["hidden_size"] = 96
    with open(path, "w") as f:
        json.dump(d, f)
    r = _run_eval(f"--workdir={workdir}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "but the config expects" in r.stderr and "96" in r.stderr
