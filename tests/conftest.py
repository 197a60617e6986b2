"""Test setup: 8 fake CPU devices so sharding is exercised on any machine.

XLA_FLAGS must be set before JAX initialises its backends, hence at import time here. A persistent
compilation cache (in .pytest_cache, which a fresh checkout lacks) lets identical programs — the
same train step built by several tests, or by train.py subprocesses — compile once per session.

Under pytest-xdist (CI: ``python -m pytest -n auto --dist load`` on 2 cores) the suite is bound by
XLA compiles, so the scheduler below hands out work units rather than single tests: a unit is a
module (its module fixtures and jitted functions are then built on one worker, not on each), or a
named set of tests that build the same programs (they run back to back on one worker, and the later
ones find those programs in the persistent cache). Units go out longest first, so no long test
starts last while the other worker idles.
"""

import os

# The CPU runtime aborts the process when a collective's threads do not all reach its rendezvous
# within a termination timeout; 8 device threads on 2 busy cores may arrive late, so allow them
# 10 minutes. (The aborts once seen in test_expert_parallel_matches_single_device were a
# deadlock, not lateness: devices ran a cond's all-to-alls and an all-reduce in different orders;
# see ops/moe.py's _ep_body and tests/moe_testing.py's split_value_and_grad.)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)

# Tests that build the same compiled programs: one work unit each (see the module docstring).
_UNIT_OF = {
    # test_train.py's SMALL run on the 8-device data mesh: its init, train and eval steps.
    "tests/test_train.py::test_resume_is_exact": "SMALL run, 8 devices",
    "tests/test_train.py::test_cli_trains_resumes_and_survives_sigterm": "SMALL run, 8 devices",
    "tests/test_inference.py::test_eval_after_short_training": "SMALL run, 8 devices",
    # small_config() on one device: its init step.
    "tests/test_train.py::test_one_step_same_on_one_device_and_2x2x2_mesh": "small, 1 device",
    "tests/test_train.py::test_gradient_accumulation_equals_big_batch": "small, 1 device",
    # TPU compiles (never cached), one unit each.
    "tests/test_aot.py::test_train_step_compiles_for_v5p_2x2x1_with_fsdp_and_experts": "v5p",
    "tests/test_aot.py::test_cli_compiles_for_a_16_chip_v6e": "v6e",
}
# Rough seconds of one worker on a 2-core CPU with an empty cache (the sum of a unit's durations in
# a full ``-n auto --dist load`` run, 2026-11-29); only their order matters. A unit not listed counts
# 2 s per test.
_COST = {
    "small, 1 device": 230,
    "SMALL run, 8 devices": 190,
    "tests/test_model.py": 180,
    "tests/test_inference.py": 150,
    "tests/test_delta_rule_pallas.py": 145,
    "tests/test_delta_rule.py": 120,
    "v5p": 100,
    "tests/test_moe_ops.py": 90,
    "tests/test_moe_fused.py": 75,
    "tests/test_hf.py": 60,
    "tests/test_tpu_kernels.py": 55,
    "v6e": 50,
    "tests/test_losses.py": 40,
    "tests/test_optimizer.py": 15,
}


@pytest.fixture(scope="session")
def small_train_run(tmp_path_factory):
    """test_train's SMALL run trained by train.py to step 12 (checkpoints at 6 and 12): the
    command-line tests that need a trained workdir share this one train.py run (both are in the
    "SMALL run, 8 devices" unit, so on one worker) instead of training one each. Returns the workdir
    and the finished process; a test copies the workdir before it writes to it."""
    from test_train import _train_env, _train_run

    workdir = str(tmp_path_factory.mktemp("small_run") / "run")
    proc = _train_run(
        _train_env(), workdir, "--config.train_steps=12", "--config.checkpoint_every=6"
    )
    return workdir, proc


def unit_of(nodeid: str) -> str:
    return _UNIT_OF.get(nodeid.split("[")[0], nodeid.split("::")[0])


def pytest_collection_modifyitems(items):
    """Each unit's tests together, longest unit first: xdist hands units out in this order."""
    index: dict[str, int] = {}
    size: dict[str, int] = {}
    for i, item in enumerate(items):
        unit = unit_of(item.nodeid)
        index.setdefault(unit, i)
        size[unit] = size.get(unit, 0) + 1

    def key(i):
        unit = unit_of(items[i].nodeid)
        return -_COST.get(unit, 2 * size[unit]), index[unit], i

    items[:] = [items[i] for i in sorted(range(len(items)), key=key)]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist load`` in work units (see the module docstring); other modes are xdist's own."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return unit_of(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order, longest unit first
    return UnitScheduling(config, log)
