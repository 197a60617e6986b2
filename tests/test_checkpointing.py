"""Checkpointer round trips, keep-N, unfinalised and corrupted steps, preemption signals."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qwen3next_jax.config import ConfigError
from qwen3next_jax.training import checkpointing
from qwen3next_jax.training.checkpointing import Checkpointer, PreemptionGuard


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_state(mesh, scale=1.0):
    w_sharding = NamedSharding(mesh, P("data", "fsdp"))
    w_DF = jax.device_put(scale * jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16), w_sharding)
    b_F = jax.device_put(scale * jnp.ones((16,), jnp.bfloat16), NamedSharding(mesh, P("fsdp")))
    return {
        "params": {"w_DF": w_DF, "b_F": b_F},
        "opt": {"count": jnp.asarray(7, jnp.int32)},
        "rng": jax.random.key_data(jax.random.key(3)),
    }


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_round_trip_keeps_values_and_sharding(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "ckpt", save_every=10) as ckpt:
        assert ckpt.restore(checkpointing.abstract_like(state)) is None
        assert not ckpt.save(5, state, {"next_index": 5}, {})  # not a multiple of save_every
        assert ckpt.save(10, state, {"next_index": 10, "epoch": [1, 2]}, {"fingerprint": "ab"})
        ckpt.wait()
        assert ckpt.latest_step() == 10
        step, restored, data, meta = ckpt.restore(checkpointing.abstract_like(state))
    assert step == 10
    assert data == {"next_index": 10, "epoch": [1, 2]}
    assert meta == {"step": 10, "fingerprint": "ab"}
    assert_same(state, restored)
    w = restored["params"]["w_DF"]
    assert w.sharding.spec == P("data", "fsdp") and len(w.addressable_shards) == 8


def test_force_and_duplicate_step(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=100, async_save=False) as ckpt:
        assert ckpt.save(3, state, {}, {}, force=True)
        assert not ckpt.save(3, state, {}, {}, force=True)  # already saved: skipped, no error
        assert ckpt.latest_step() == 3


def test_keep_n(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, keep=2, save_every=1) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, state, {}, {})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]


def test_unfinalised_steps_are_ignored(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, {"i": 1}, {})
        ckpt.save(2, state, {"i": 2}, {})
        ckpt.wait()
        # A kill mid-save leaves Orbax's tmp folder; a non-atomic copy leaves a folder without
        # the commit marker. Neither may be loaded.
        shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-12345")
        shutil.copytree(tmp_path / "2", tmp_path / "4")
        os.remove(tmp_path / "4" / checkpointing.COMMIT_FILE)
        assert ckpt.latest_step() == 2
        step, _, data, _ = ckpt.restore(checkpointing.abstract_like(state))
    assert (step, data) == (2, {"i": 2})


# A failed tensorstore read can leave an Orbax callback on a closed asyncio loop; harmless.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_corrupted_newest_falls_back(tmp_path, mesh, damage):
    old, new = make_state(mesh, 1.0), make_state(mesh, 2.0)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, old, {"i": 1}, {})
        ckpt.save(2, new, {"i": 2}, {})
        ckpt.wait()
        files = glob.glob(str(tmp_path / "2" / "state" / "**" / "d" / "*"), recursive=True)
        assert files
        for f in files:
            if damage == "delete":
                os.remove(f)
            else:
                with open(f, "r+b") as fh:
                    fh.truncate(3)
        with pytest.warns(RuntimeWarning, match="step 2 .* unreadable"):
            step, restored, data, _ = ckpt.restore(checkpointing.abstract_like(old))
        assert (step, data) == (1, {"i": 1})
        assert_same(old, restored)
        # The bad step is moved aside, so the run can save step 2 again.
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, new, {"i": 2}, {})
        ckpt.wait()
        assert ckpt.latest_step() == 2
    assert any(n.startswith("2.corrupt-") for n in os.listdir(tmp_path))


def test_wrong_target_raises_and_moves_nothing(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, {}, {})
        ckpt.wait()
        wrong = {"something": jax.ShapeDtypeStruct((3,), jnp.float32)}
        with pytest.warns(RuntimeWarning), pytest.raises(ValueError):
            ckpt.restore(wrong)
        assert ckpt.all_steps() == [1]


def test_check_compatible_names_the_first_mismatch(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        ckpt.save(1, state, {}, {})
        abstract = checkpointing.abstract_like(state)
        ckpt.check_compatible(abstract, 1)  # same tree: silent
        # Another dtype restores by casting: still compatible.
        as_bf16 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), abstract)
        ckpt.check_compatible(as_bf16, 1)
        wider = dict(abstract, params=dict(abstract["params"]))
        wider["params"]["w_DF"] = jax.ShapeDtypeStruct((8, 24), jnp.float32)
        with pytest.raises(
            ConfigError,
            match=r"state/params/w_DF with shape \(8, 16\), but the config expects \(8, 24\)",
        ):
            ckpt.check_compatible(wider, 1)
        more = dict(abstract, extra=jax.ShapeDtypeStruct((2,), jnp.float32))
        with pytest.raises(ConfigError, match="has no array state/extra,"):
            ckpt.check_compatible(more, 1)
        fewer = dict(abstract, params={"w_DF": abstract["params"]["w_DF"]})
        with pytest.raises(ConfigError, match="holds array state/params/b_F,"):
            ckpt.check_compatible(fewer, 1)


def test_restore_params_only(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path / "checkpoints", save_every=1) as ckpt:
        ckpt.save(4, state, {}, {})
    params = checkpointing.restore_params(tmp_path, checkpointing.abstract_like(state["params"]))
    assert_same(state["params"], params)
    wrong = dict(checkpointing.abstract_like(state["params"]))
    wrong["b_F"] = jax.ShapeDtypeStruct((32,), jnp.bfloat16)
    with pytest.raises(ConfigError, match=r"stores state/params/b_F with shape \(16,\)"):
        checkpointing.restore_params(tmp_path, wrong)


def test_config_fingerprint_is_order_free():
    a = checkpointing.config_fingerprint({"x": 1, "y": [1, 2]})
    assert a == checkpointing.config_fingerprint({"y": [1, 2], "x": 1})
    assert a != checkpointing.config_fingerprint({"x": 2, "y": [1, 2]})


def test_preemption_guard_sets_flag_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signum == signal.SIGTERM
        with Checkpointer(tmp_path) as ckpt:
            assert checkpointing.should_stop(ckpt, guard, 1)
            assert ckpt.should_stop(1, guard)
            assert not ckpt.should_stop(1, None)
    assert signal.getsignal(signal.SIGTERM) is before


_CHILD = textwrap.dedent(
    """
    import sys, time
    from qwen3next_jax.training.checkpointing import PreemptionGuard
    with PreemptionGuard() as guard:
        print("ready", flush=True)
        deadline = time.time() + 30
        while not guard.requested and time.time() < deadline:
            time.sleep(0.01)
    print("stopping cleanly" if guard.requested else "timeout", flush=True)
    sys.exit(0 if guard.requested else 3)
    """
)


def test_sigterm_in_subprocess_exits_zero():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, cwd=repo, env=env
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopping cleanly" in out


def test_preemption_guard_sigint_twice_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested and guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
