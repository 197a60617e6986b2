"""The train step and loop: sharding invariance, exact gradient accumulation, exact resume,
preemption, and the command line end to end."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from qwen3next_jax import sharding
from qwen3next_jax.training import checkpointing, train_step
from qwen3next_jax.training.loop import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Every run below uses these values and a constant schedule, so the compiled train step does not
# depend on train_steps: the runs in this file (and train.py subprocesses, which share the
# persistent compilation cache set up in conftest.py) compile it once.
SMALL = {
    "global_batch_size": 8,
    "data.seq_len": 32,
    "optim.warmup_steps": 1,
    "optim.schedule": "constant",
    "optim.learning_rate": 1e-2,
    "eval_batches": 1,
    "log_every": 1,
}


def small_config(**overrides):
    c = default.get_config()
    c.train_steps = 4
    c.global_batch_size = 8
    c.data.seq_len = 32
    c.optim.warmup_steps = 1
    c.optim.schedule = "constant"
    c.optim.learning_rate = 1e-2
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_batches = 1
    c.async_checkpointing = False
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def random_batch(c, seed=0):
    rng = np.random.default_rng(seed)
    B, T = c.global_batch_size, c.data.seq_len
    seg = np.repeat(np.array([[1] * 20 + [2] * (T - 20)]), B, axis=0)
    seg[1, -5:] = 0  # some padding
    pos = np.where(seg == 1, np.arange(T), np.arange(T) - 20)
    return {
        "inputs": rng.integers(0, 257, (B, T)).astype(np.int32),
        "targets": rng.integers(0, 257, (B, T)).astype(np.int32),
        "segment_ids": seg.astype(np.int32),
        "positions": np.maximum(pos, 0).astype(np.int32),
        "loss_mask": (seg != 0).astype(np.int32),
    }


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_one_step_same_on_one_device_and_2x2x2_mesh():
    c = small_config()
    batch = random_batch(c)
    results = []
    for mesh in (
        sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
        sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2}),
    ):
        tr = train_step.build(c, mesh)
        state = tr.init()
        b = {k: jax.device_put(v, tr.batch_sharding) for k, v in batch.items()}
        state, m = tr.train_step(state, b)
        results.append((float(m["loss"]), jax.device_get(state["params"])))
    (l1, p1), (l8, p8) = results
    assert abs(l1 - l8) / abs(l1) < 1e-5
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_big_batch():
    batch = random_batch(small_config(), seed=1)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    out = []
    for micro in (1, 4):
        tr = train_step.build(small_config(micro_batches=micro), mesh)
        params = tr.init()["params"]
        loss, aux, grads = tr.grads_step(params, batch)
        out.append((float(loss), jax.device_get(aux), jax.device_get(grads)))
    (l1, a1, g1), (l4, a4, g4) = out
    assert abs(l1 - l4) / abs(l1) < 1e-5
    for key in ("ce", "mtp_loss", "lb_loss"):
        assert abs(float(a1[key]) - float(a4[key])) <= 1e-5 * abs(float(a1[key])), key
    assert float(a1["lb_loss"]) > 0
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        assert _rel(b, a) < 1e-4


def _metric_rows(workdir):
    """The complete rows of metrics.jsonl (none before the file exists; a row that is still
    being written, after the last newline, is skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]
    return [json.loads(line) for line in lines if line]


def _read_metrics(workdir):
    return {r["step"]: r for r in _metric_rows(workdir) if "loss" in r}


@pytest.mark.slow
def test_resume_is_exact(tmp_path):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    train_and_evaluate(small_config(), straight)
    train_and_evaluate(small_config(train_steps=2), resumed)
    train_and_evaluate(small_config(), resumed)  # resumes at step 2
    ms, mr = _read_metrics(straight), _read_metrics(resumed)
    assert sorted(ms) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert ms[step]["loss"] == mr[step]["loss"], step
    ckpt_a = checkpointing.Checkpointer(os.path.join(straight, "checkpoints"))
    ckpt_b = checkpointing.Checkpointer(os.path.join(resumed, "checkpoints"))
    assert ckpt_a.latest_step() == ckpt_b.latest_step() == 4
    mesh = sharding.make_mesh({"data": -1})
    tr = train_step.build(small_config(), mesh)
    abstract = train_step.abstract_with_shardings(tr)
    _, sa, _, _ = ckpt_a.restore(abstract)
    _, sb, _, _ = ckpt_b.restore(abstract)
    for a, b in zip(jax.tree.leaves(sa["params"]), jax.tree.leaves(sb["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train_cmd(workdir, *flags):
    return [
        sys.executable,
        "train.py",
        f"--workdir={workdir}",
        *(f"--config.{k}={v}" for k, v in SMALL.items()),
        *flags,
    ]


def _train_env():
    """This process's environment (8 fake devices, the compile cache) and matmul precision: the
    compiled programs' hash includes the precision, so with it train.py finds what the in-process
    runs of the same config (or an earlier train.py) compiled. On CPU, float32 results are equal."""
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_DEFAULT_MATMUL_PRECISION="highest")


def _train_run(env, workdir, *flags):
    cmd = _train_cmd(workdir, *flags)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_trains_resumes_and_survives_sigterm(small_train_run, tmp_path):
    shared, first = small_train_run  # train.py to step 12, checkpoints at 6 and 12 (conftest.py)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = _read_metrics(shared)
    assert sorted(metrics) == list(range(1, 13))
    assert metrics[12]["loss"] < metrics[1]["loss"] - 0.5  # byte-level loss falls from ~6.3
    assert os.path.isdir(os.path.join(shared, "checkpoints", "12"))
    assert os.path.exists(os.path.join(shared, "config.json"))
    wd = str(tmp_path / "run")
    shutil.copytree(shared, wd)  # the shared run stays as it was for other tests
    env = _train_env()
    # Same workdir, another model: refused in one sentence before anything compiles.
    other = _train_run(env, wd, "--config.train_steps=14", "--config.model.hidden_size=96")
    assert other.returncode == 1 and "Traceback" not in other.stderr, other.stderr[-3000:]
    assert "but the config expects" in other.stderr and "new --workdir" in other.stderr

    # Resume at step 12, then preemption: SIGTERM mid-run -> a final checkpoint and exit code 0.
    # One train.py run checks both (a resumed run that finishes normally is test_resume_is_exact's
    # in-process run; a fresh run that finishes normally is the one above).
    proc = subprocess.Popen(
        _train_cmd(wd, "--config.train_steps=100000", "--config.checkpoint_every=100000"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for a logged step after the resume point (the loop is running), not just a new row
    # being written: under load the gap between the two can be seconds.
    deadline = time.time() + 400
    while time.time() < deadline and max((r["step"] for r in _metric_rows(wd)), default=0) <= 12:
        time.sleep(1)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming at step 12" in out
    assert "preemption requested" in out
    # checkpoint_every=100000: a checkpoint past step 12 is the one the SIGTERM saved.
    step = checkpointing.Checkpointer(os.path.join(wd, "checkpoints")).latest_step()
    assert step is not None and step > 12


def test_bad_config_is_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible"):
        train_and_evaluate(small_config(global_batch_size=10, micro_batches=4), str(tmp_path))
    with pytest.raises(ValueError, match="vocabulary of 257 tokens but the model's vocab_size"):
        train_and_evaluate(small_config(**{"model.vocab_size": 100}), str(tmp_path))
