"""Pallas gated delta rule kernels, run in interpret mode on CPU against the pure-JAX reference,
plus a lowering check of every kernel to Triton IR for CUDA (no GPU needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_delta_rule import make_inputs, rel

from qwen3next_jax.ops import delta_rule as dr
from qwen3next_jax.ops import delta_rule_pallas as drp


def _value_and_grads(backend, chunk_size, segment_ids):
    def loss(q, k, v, g, beta, s0):
        kw = dict(segment_ids=segment_ids, chunk_size=chunk_size, backend=backend)
        o, s = dr.gated_delta_rule(q, k, v, g, beta, initial_state=s0, **kw)
        return jnp.sum(jnp.sin(o) * o) + jnp.sum(jnp.cos(s)), (o, s)

    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))


def test_kernels_match_reference_outputs_state_and_all_grads():
    # T = 100 with 32-token chunks: 4 chunks, the last one padded. Row 0 has boundaries inside a
    # chunk (20), on a chunk edge (64) and interior padding; row 1 starts with padding (drops the
    # initial state) and has a document crossing a chunk edge.
    q, k, v, g, beta, s0 = make_inputs(21, B=2, T=100, H=2, HV=4)
    seg = np.zeros((2, 100), np.int32)
    seg[0, :20], seg[0, 20:64], seg[0, 64:70], seg[0, 75:] = 1, 2, 3, 4
    seg[1, 3:50], seg[1, 50:] = 5, 6
    (_, (o_ref, s_ref)), g_ref = _value_and_grads("recurrent", 32, seg)(q, k, v, g, beta, s0)
    (_, (o, s)), grads = _value_and_grads("pallas_interpret", 32, seg)(q, k, v, g, beta, s0)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state0"), grads, g_ref, strict=True):
        assert rel(a, b) < 1e-4, name
    assert np.all(np.asarray(o[0, 70:75]) == 0.0)


@pytest.mark.parametrize(
    "tuning",
    [
        dict(split_intra=False),
        dict(dvl_in_state=False, seq_groups=4),
        dict(dqk_hv=False, wy_hv=False, bv_dqk=16),
        dict(dqk_hv=True, wy_hv=True, bv_dqk=16, gates_kernel=False),
        dict(fuse_bwd=True),
        dict(save_tinv=False, inv_power=True),
        dict(split_intra=False, inv_power=True),
        dict(solve_hv=False, inv_power=False, warps_intra=4),
        dict(partials="bfloat16"),
        dict(wy_compact=False, seq_groups=2),
        dict(wy_hv=False),
    ],
)
def test_kernel_options_match_reference(tuning):
    """The non-default kernel paths (the defaults run in the other tests): fused intra kernel,
    separate dv_local kernel (with the state passes split into 4 sequence groups; 2 groups with
    the first-order WY backward, so both forms of the reverse group kernel run), key-head grids
    for the dq/dk and WY kernels, dq/dk walking V in blocks, XLA gates, dq/dk and WY fused in one kernel, the inverse recomputed in the
    backward, row substitution, the inverse on a key-head grid, bf16 dq/dk partials (their
    gradients to bf16 accuracy), the WY backward in its first order and the reordered one
    on the key-head grid. Segments and pad."""
    q, k, v, g, beta, s0 = make_inputs(26, B=2, T=100, H=2, HV=4)
    seg = np.zeros((2, 100), np.int32)
    seg[0, :20], seg[0, 20:64], seg[0, 64:70], seg[0, 75:] = 1, 2, 3, 4
    seg[1, 3:50], seg[1, 50:] = 5, 6

    def loss(q, k, v, g, beta, s0):
        o, s = drp.pallas_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            initial_state=s0,
            segment_ids=seg,
            chunk_size=32,
            interpret=True,
            tuning=tuning,
        )
        return jnp.sum(jnp.sin(o) * o) + jnp.sum(jnp.cos(s)), (o, s)

    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True))
    (_, (o, s)), grads = f(q, k, v, g, beta, s0)
    (_, (o_ref, s_ref)), g_ref = _value_and_grads("recurrent", 32, seg)(q, k, v, g, beta, s0)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    tol = 1e-2 if tuning.get("partials") == "bfloat16" else 1e-4
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state0"), grads, g_ref, strict=True):
        assert rel(a, b) < tol, name


def test_kernels_without_segments_one_value_head_per_key_head():
    q, k, v, g, beta, s0 = make_inputs(22, B=1, T=40, H=2, HV=2)
    (_, (o_ref, s_ref)), g_ref = _value_and_grads("recurrent", 16, None)(q, k, v, g, beta, s0)
    (_, (o, s)), grads = _value_and_grads("pallas_interpret", 16, None)(q, k, v, g, beta, s0)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    for a, b in zip(grads, g_ref, strict=True):
        assert rel(a, b) < 1e-4


def test_bf16_inputs_keep_dtype_and_stay_close():
    q, k, v, g, beta, s0 = make_inputs(23, B=1, T=64, H=1, HV=2, dtype=jnp.bfloat16)
    f = jax.jit(lambda *a: drp.pallas_gated_delta_rule(*a, chunk_size=64, interpret=True))
    o, s = f(q, k, v, g, beta)
    o_ref, s_ref = jax.jit(dr.recurrent_gated_delta_rule)(q, k, v, g, beta)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel(o, o_ref) < 2e-2 and rel(s, s_ref) < 2e-2


@pytest.mark.parametrize(
    "H, HV, tuning, n_kernels",
    [
        (2, 4, {}, 9),
        (8, 16, {}, 11),
        (2, 4, dict(save_tinv=False, inv_power=True), 10),
        (2, 4, dict(inv_power=True, inv_dot="tf32x3"), 9),
        (2, 4, dict(solve_hv=False, partials="float32"), 9),
        (2, 4, dict(split_intra=False), 8),
        (2, 4, dict(dvl_in_state=False), 9),
        (2, 4, dict(dqk_hv=False, wy_hv=False), 9),
        (2, 4, dict(fuse_bwd=True), 8),
        (2, 4, dict(num_sms=8, wy_compact=False), 9),  # 64-column state passes, WY unordered
        (2, 4, dict(seq_groups=2), 13),  # + per-group end states and transitions, fwd and bwd
        (2, 4, dict(inv_dot="ieee", warps_intra=2), 9),
    ],
)
def test_every_kernel_lowers_to_triton_for_cuda(H, HV, tuning, n_kernels):
    """The Qwen3-Next shape (Dk = Dv = 128, HV = 2H, bf16, C = 64) through forward and backward:
    every pallas_call must lower to Triton IR (power-of-two tensors, supported primitives).
    4 forward kernels (inverse, W/U, state pass, output) and 5 backward ones (W/U from the saved
    inverse, v_new, reverse state pass, dq/dk, WY; save_tinv=False reruns the inverse too);
    with HV a power of two >= 16 also the gates kernel and its backward (else XLA computes the
    gates); split_intra=False: the forward's intra is one kernel."""
    spec = jax.ShapeDtypeStruct
    B, T, K = 1, 200, 128
    bf = jnp.bfloat16
    args = (spec((B, T, H, K), bf),) * 2 + (spec((B, T, HV, K), bf),)
    args += (spec((B, T, HV), jnp.float32),) * 2 + (spec((B, HV, K, K), jnp.float32),)

    def loss(q, k, v, g, beta, s0, seg):
        o, s = drp.pallas_gated_delta_rule(
            q, k, v, g, beta, initial_state=s0, segment_ids=seg, tuning=tuning
        )
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    traced = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).trace(*args, spec((B, T), jnp.int32))
    hlo = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == n_kernels


def test_auto_backend_picks_pallas_on_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(drp, "pallas_gated_delta_rule", lambda *a, **kw: calls.append(kw))
    q, k, v, g, beta, _ = make_inputs(24, T=8, dtype=jnp.bfloat16)
    dr.gated_delta_rule(q, k, v, g, beta)
    assert calls and calls[0]["interpret"] is False
    # float32 inputs and shapes the kernels cannot take fall back to the pure-JAX chunk path.
    for kw in (dict(), dict(K=8, V=8, dtype=jnp.bfloat16)):
        q, k, v, g, beta, _ = make_inputs(24, T=8, **kw)
        o, _ = jax.jit(dr.gated_delta_rule)(q, k, v, g, beta)
        assert o.shape == v.shape
    assert len(calls) == 1


def test_unsupported_inputs_raise():
    q, k, v, g, beta, _ = make_inputs(25, T=8, K=8, V=8)
    with pytest.raises(ValueError, match="Dk, Dv powers of two >= 16"):
        drp.pallas_gated_delta_rule(q, k, v, g, beta, interpret=True)
    q, k, v, g, beta, _ = make_inputs(25, T=8)
    with pytest.raises(ValueError, match="compiled Pallas kernels take 16-bit q, k, v"):
        drp.pallas_gated_delta_rule(q, k, v, g, beta)


def test_kernels_run_per_batch_shard_under_a_mesh():
    """Under a mesh the kernels run inside shard_map on each device's rows (GSPMD cannot split
    a Pallas call); results and gradients equal the single-device run."""
    from qwen3next_jax import sharding

    q, k, v, g, beta, s0 = make_inputs(26, B=4, T=40, H=2, HV=4)
    seg = np.ones((4, 40), np.int32)
    seg[1, 25:] = 2
    (_, (o_ref, s_ref)), g_ref = _value_and_grads("pallas_interpret", 32, seg)(q, k, v, g, beta, s0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])
    with sharding.use_mesh(mesh):
        fn = _value_and_grads("pallas_interpret", 32, seg)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, g, beta, s0))
        (_, (o, s)), grads = fn(q, k, v, g, beta, s0)
    assert rel(o, o_ref) < 1e-6 and rel(s, s_ref) < 1e-6
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state0"), grads, g_ref, strict=True):
        assert rel(a, b) < 1e-6, name


def test_auto_launch_config_widens_state_passes_on_full_grids():
    """bv_seq / warps 0 = auto: 64 columns (4 warps forward, 8 reverse) when B*HV*V/64 programs
    fill the GPU's multiprocessors, else 32 columns and 4 warps; explicit values win."""
    base = dict(Tp=64, H=16, HV=32, K=128, V=128, C=64, scale=1.0, store="bfloat16")
    wide = drp._Cfg(B=8, interpret=False, num_sms=132, **base)
    assert (wide.BVS, wide.WS, wide.WSB) == (64, 4, 8)
    narrow = drp._Cfg(B=1, interpret=False, num_sms=132, **base)
    assert (narrow.BVS, narrow.WS, narrow.WSB) == (32, 4, 4)
    pinned = drp._Cfg(B=8, interpret=False, bv_seq=32, warps_seq=2, **base)
    assert (pinned.BVS, pinned.WS, pinned.WSB) == (32, 2, 2)


def test_sequence_groups_default_and_bad_value():
    """One sequence group unless asked for (the split was slower wherever it was timed, even on
    a small grid); an explicit count must be a positive divisor of the chunks."""
    base = dict(H=2, HV=4, K=128, V=128, C=64, scale=1.0, store="bfloat16", interpret=False)
    small = drp._Cfg(B=1, Tp=64 * 64, num_sms=132, **base)  # 16 programs on 132 SMs
    assert small.G == 1
    assert drp._Cfg(B=1, Tp=64 * 64, seq_groups=8, **base).G == 8
    for bad in (0, 3):
        with pytest.raises(
            ValueError, match=f"seq_groups={bad} must be a positive divisor of the 64"
        ):
            drp._Cfg(B=1, Tp=64 * 64, seq_groups=bad, **base)
