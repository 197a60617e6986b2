"""Ahead-of-time TPU compiles from this CPU host: topologies, pod meshes, the train step, the CLI.

Needs libtpu (jax[tpu] at the installed JAX version, in requirements-dev.txt); nothing runs on a
TPU: XLA partitions and compiles the real TPU program for abstract devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from qwen3next_jax import sharding
from qwen3next_jax.training import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tpu_devices(topology, num_slices=1):
    return aot.topology_devices(topology, num_slices)


# Two layers, one Gated DeltaNet and one attention (+ the MTP layer): every kernel and sharding of
# the default model's train step, at about half the TPU compile time of its four layers.
TWO_LAYERS = {"num_hidden_layers": 2, "full_attention_interval": 2}


def small_config(**mesh):
    c = default.get_config()
    for k, v in TWO_LAYERS.items():
        c.model[k] = v
    c.global_batch_size = 16
    c.data.seq_len = 128  # splash attention tiles the sequence in blocks of 128
    for a, s in {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh}.items():
        c.mesh[a] = s
    return c


@pytest.mark.parametrize("bad", ["v5p:3x3x3", "v9:2x2", "eight chips"])
def test_bad_topology_is_one_sentence(bad):
    with pytest.raises(aot.AotError) as e:
        tpu_devices(bad)
    msg = str(e.value)
    assert bad in msg and "\n" not in msg and "expected a name like v5p:8x8x8" in msg


def test_ici_mesh_follows_the_torus_and_dcn_mesh_keeps_slices_together():
    devices = tpu_devices("v5p:2x2x2", num_slices=2)  # 2 slices of 8 chips
    assert len(devices) == 16 and devices[0].platform == "tpu"
    mesh = sharding.make_mesh({"fsdp": 4, "expert": 2}, devices, dcn_shape={"data": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 2, "tensor": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # Slice index is the data coordinate: fsdp gathers and the expert all-to-all never cross DCN.
    np.testing.assert_array_equal(
        slice_of, np.arange(2)[:, None, None, None] * np.ones_like(slice_of)
    )
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    one = sharding.make_mesh({"fsdp": -1, "expert": 2}, devices[:8])
    assert dict(one.shape)["fsdp"] == 4
    with pytest.raises(ValueError, match="dcn_mesh axis 'data' has size 0"):
        sharding.make_mesh({"fsdp": -1}, devices, dcn_shape={"data": 0})
    with pytest.raises(ValueError, match="needs TPU devices"):
        sharding.make_mesh({"data": -1}, jax.devices(), dcn_shape={"data": 2})


def _check_report(r, chips, chip):
    b = r["per_chip_bytes"]
    parts = ("arguments", "outputs", "temporaries", "generated_code")
    assert all(b[p] >= 0 for p in parts) and b["arguments"] > 0 and b["temporaries"] > 0
    assert b["total"] == sum(b[p] for p in parts)
    assert r["chips"] == chips and r["chip"] == chip
    assert r["fits"] and 0 < r["headroom_fraction"] < 1
    assert r["hbm_bytes_per_chip"] == aot.HBM_BYTES[chip]
    assert r["headroom_fraction"] == pytest.approx(1 - b["total"] / r["hbm_bytes_per_chip"])
    assert r["flops_per_step"]["model"] > 0 and r["flops_per_step"]["compiled"] > 0
    # The TPU kernels are what got compiled, although this host is a CPU.
    assert r["backends"] == {
        "attention": "splash",
        "gated_deltanet": "chunk_mxu",
        "moe": "megablox",
    }


@pytest.mark.slow
def test_train_step_compiles_for_v5p_2x2x1_with_fsdp_and_experts(tmp_path):
    c = small_config(fsdp=2, expert=2)
    # conftest's global "highest" is for fp32 references; TPU kernels reject it on bf16 operands,
    # and train.py runs at the default precision.
    with jax.default_matmul_precision("default"):
        report = aot.run(c, str(tmp_path), "v5p:2x2x1")
    _check_report(report, 4, "TPU v5p")
    assert report["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 1}
    with open(tmp_path / "aot_report.json") as f:
        assert json.load(f) == json.loads(json.dumps(report))
    # A program that does not fit is reported and refused in one sentence.
    too_big = {**report, "hbm_bytes_per_chip": 2**20, "fits": False}
    with pytest.raises(aot.AotError, match=r"GiB per chip but a TPU v5p chip has 0 GiB"):
        aot.check_fits(too_big)


@pytest.mark.slow
def test_cli_compiles_for_a_16_chip_v6e(tmp_path):
    args = [
        sys.executable,
        "train.py",
        f"--workdir={tmp_path}",
        "--aot_topology=v6e:4x4",
        "--config.global_batch_size=16",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.mesh.expert=2",
        *(f"--config.model.{k}={v}" for k, v in TWO_LAYERS.items()),
    ]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fits" in p.stdout
    with open(tmp_path / "aot_report.json") as f:
        _check_report(json.load(f), 16, "TPU v6e")


def test_cli_bad_topology_exits_with_one_sentence(tmp_path):
    args = [sys.executable, "train.py", f"--workdir={tmp_path}", "--aot_topology=v5p:3x3x3"]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --aot_topology='v5p:3x3x3' is not a TPU topology")
    assert not os.path.exists(tmp_path / "aot_report.json")


def test_out_of_hbm_compile_is_read_as_a_lower_bound():
    err = RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (79.35G) exceeds available HBM (31.25G)."
    )
    assert aot._compile_oom_bytes(err) == int(79.35 * 2**30)
    assert aot._compile_oom_bytes(RuntimeError("INTERNAL: something else")) is None
    report = {
        "compiled": False,
        "fits": False,
        "chip": "TPU v6e",
        "hbm_bytes_per_chip": aot.HBM_BYTES["TPU v6e"],
        "per_chip_bytes": {"total": int(79.35 * 2**30)},
    }
    with pytest.raises(aot.AotError, match=r"needs at least 79.3 GiB per chip but a TPU v6e"):
        aot.check_fits(report)


def test_report_names_the_attention_kernel_the_shapes_allow():
    from qwen3next_jax.training import train_step

    devices = tpu_devices("v5p:2x2x1")
    for seq_len, want in ((128, "splash"), (100, "xla (splash cannot take these shapes)")):
        c = small_config(fsdp=2, expert=2)
        c.data.seq_len = seq_len
        mesh = sharding.mesh_from_config(c, devices)
        got = aot._resolved_backends(train_step.model_config_from(c), mesh, 16, seq_len)
        assert got == {"attention": want, "gated_deltanet": "chunk_mxu", "moe": "megablox"}
