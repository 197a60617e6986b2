"""Test setup: 8 fake CPU devices so sharding is exercised on any machine.

XLA_FLAGS must be set before JAX initialises its backends, hence at import time here. A persistent
compilation cache (in .pytest_cache, which a fresh checkout lacks) lets identical programs — the
same train step built by several tests, or by train.py subprocesses — compile once per session.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
CACHE_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
