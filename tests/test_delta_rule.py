"""Gated delta rule: chunked form, decode step and dispatcher against the token-by-token reference,
which is itself checked against a float64 numpy transcription of spec §2.4.6."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3next_jax.ops import delta_rule as dr


def make_inputs(seed, B=2, T=65, H=2, HV=4, K=16, V=16, dtype=np.float32):
    """Random numpy inputs of the model's form: unit-norm q/k, beta in (0,1), g <= 0.

    numpy keeps test setup free of XLA compilations; state0 is float32 whatever dtype is.
    """
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(rng.standard_normal((B, T, H, K)))
    k = unit(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, HV, V))
    g = -rng.uniform(0.0, 0.7, (B, T, HV))
    beta = rng.uniform(0.05, 0.95, (B, T, HV))
    state0 = rng.standard_normal((B, HV, K, V)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype) if dtype != np.float32 else x.astype(np.float32)
    return tuple(cast(x) for x in (q, k, v, g, beta)) + (state0,)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.cache
def jitted(fn, **kw):
    return jax.jit(functools.partial(fn, **kw))


def run(fn, q, k, v, g, beta, state0=None, segment_ids=None, chunk_size=64, **kw):
    f = jitted(fn, chunk_size=chunk_size, **kw)
    return f(q, k, v, g, beta, initial_state=state0, segment_ids=segment_ids)


def numpy_reference(q, k, v, g, beta, state0, segment_ids, scale):
    """Spec §2.4.6 token by token in float64, with the documented segment semantics."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    S = np.zeros((B, HV, K, V)) if state0 is None else np.array(state0, np.float64)
    o = np.zeros((B, T, HV, V))
    seg = None if segment_ids is None else np.asarray(segment_ids)
    for b in range(B):
        for t in range(T):
            if seg is not None:
                if seg[b, t] == 0:
                    continue
                if t > 0 and seg[b, t] != seg[b, t - 1]:
                    S[b] = 0.0
            for j in range(HV):
                h = j // (HV // H)
                S[b, j] *= np.exp(g[b, t, j])
                u = beta[b, t, j] * (v[b, t, j] - S[b, j].T @ k[b, t, h])
                S[b, j] += np.outer(k[b, t, h], u)
                o[b, t, j] = S[b, j].T @ (scale * q[b, t, h])
    return o, S


# Two rows: boundaries inside a chunk (30), on a chunk edge (64), a document crossing a chunk
# edge (64..150 over 128), interior padding (150..160) and trailing padding (195..200). The
# second row starts with padding, so its initial state must be dropped.
DOCS_ROW0 = [(1, 0, 30), (2, 30, 64), (3, 64, 150), (0, 150, 160), (4, 160, 195), (0, 195, 200)]
DOCS_ROW1 = [(0, 0, 5), (7, 5, 100), (8, 100, 200)]


def segment_row(docs, T=200):
    row = np.zeros(T, np.int32)
    for sid, a, b in docs:
        row[a:b] = sid
    return row


SEGMENT_IDS = np.stack([segment_row(DOCS_ROW0), segment_row(DOCS_ROW1)])


def test_recurrent_matches_float64_numpy():
    q, k, v, g, beta, s0 = make_inputs(0, T=37, K=8, V=8)
    seg = np.array([[1] * 10 + [2] * 20 + [0] * 7, [0] * 3 + [5] * 34], np.int32)
    for segment_ids in (None, seg):
        o, s = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0, segment_ids)
        o_ref, s_ref = numpy_reference(q, k, v, g, beta, s0, segment_ids, 8**-0.5)
        assert rel(o, o_ref) < 1e-5
        assert rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("T", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_recurrent(T, with_state):
    q, k, v, g, beta, s0 = make_inputs(T, T=T)
    s0 = s0 if with_state else None
    o_ref, s_ref = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0)
    o, s = run(dr.chunk_gated_delta_rule, q, k, v, g, beta, s0)
    assert o.shape == v.shape and s.shape == (2, 4, 16, 16) and s.dtype == jnp.float32
    assert rel(o, o_ref) < 1e-5
    assert rel(s, s_ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunk_sizes(chunk_size):
    q, k, v, g, beta, s0 = make_inputs(3, T=50)
    o_ref, s_ref = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0)
    o, s = run(dr.chunk_gated_delta_rule, q, k, v, g, beta, s0, chunk_size=chunk_size)
    assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5


def test_value_head_j_reads_key_head_j_div_r():
    q, k, v, g, beta, s0 = make_inputs(4, T=40, H=2, HV=6)
    rep = lambda x: np.repeat(x, 3, axis=2)  # repeat_interleave: value head j <- key head j // 3
    for fn in (dr.recurrent_gated_delta_rule, dr.chunk_gated_delta_rule):
        o, s = run(fn, q, k, v, g, beta, s0)
        o_ref, s_ref = run(fn, rep(q), rep(k), v, g, beta, s0)
        assert rel(o, o_ref) < 1e-6 and rel(s, s_ref) < 1e-6
    # A tiled mapping (j mod H) must not agree.
    tile = lambda x: np.tile(x, (1, 1, 3, 1))
    o_tiled, _ = run(dr.recurrent_gated_delta_rule, tile(q), tile(k), v, g, beta, s0)
    assert rel(o_tiled, o_ref) > 1e-2


@pytest.mark.parametrize(
    "fn", [dr.recurrent_gated_delta_rule, dr.chunk_gated_delta_rule], ids=["recurrent", "chunk"]
)
def test_packed_rows_equal_documents_run_alone(fn):
    q, k, v, g, beta, s0 = make_inputs(5, T=200)
    o, s = run(fn, q, k, v, g, beta, s0, SEGMENT_IDS)
    for b, docs in enumerate((DOCS_ROW0, DOCS_ROW1)):
        real_docs = [(sid, a, e) for sid, a, e in docs if sid != 0]
        for sid, a, e in docs:
            if sid == 0:
                assert np.all(np.asarray(o[b, a:e]) == 0.0)
                continue
            doc = [x[b : b + 1, a:e] for x in (q, k, v, g, beta)]
            init = s0[b : b + 1] if a == 0 else None
            o_doc, s_doc = numpy_reference(*doc, init, None, 16**-0.5)
            assert rel(o[b : b + 1, a:e], o_doc) < 1e-5, (b, sid)
            if (sid, a, e) == real_docs[-1]:
                assert rel(s[b : b + 1], s_doc) < 1e-5


def test_padding_is_a_no_op():
    # Removing the padding tokens (and the garbage in them) changes no real output nor the state.
    q, k, v, g, beta, s0 = make_inputs(6, B=1, T=90)
    seg = np.array([1] * 40 + [0] * 10 + [2] * 30 + [0] * 10, np.int32)[None]
    pad = seg == 0
    garbage = lambda x, val: np.where(pad.reshape(pad.shape + (1,) * (x.ndim - 2)), val, x).astype(
        np.float32
    )
    inputs = (
        garbage(q, 3.0),
        garbage(k, -2.0),
        garbage(v, 1e3),
        garbage(g, -40.0),
        garbage(beta, 1.0),
    )
    keep = np.flatnonzero(~pad[0])
    packed = tuple(x[:, keep] for x in inputs)
    for fn in (dr.recurrent_gated_delta_rule, dr.chunk_gated_delta_rule):
        o, s = run(fn, *inputs, s0, seg)
        o_ref, s_ref = run(fn, *packed, s0, seg[:, keep])
        assert rel(o[:, keep], o_ref) < 1e-6 and rel(s, s_ref) < 1e-6
        assert np.all(np.asarray(o[0, pad[0]]) == 0.0)


def test_step_matches_recurrent():
    q, k, v, g, beta, s0 = make_inputs(7, T=20)
    o_ref, s_ref = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0)
    step = jax.jit(dr.gated_delta_rule_step)
    state, outs = s0, []
    for t in range(q.shape[1]):
        o_t, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o_t)
    assert rel(np.stack(outs, axis=1), o_ref) < 1e-5
    assert rel(state, s_ref) < 1e-5


def _loss(fn, chunk_size, segment_ids):
    def loss(q, k, v, g, beta, s0):
        o, s = fn(
            q, k, v, g, beta, initial_state=s0, segment_ids=segment_ids, chunk_size=chunk_size
        )
        # Nonlinear in o and s so every cotangent entry differs.
        return jnp.sum(jnp.sin(o) * o) + jnp.sum(jnp.cos(s))

    return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


@pytest.mark.parametrize("segmented", [False, True])
def test_chunk_gradients_match_recurrent(segmented):
    q, k, v, g, beta, s0 = make_inputs(8, T=200)
    seg = SEGMENT_IDS if segmented else None
    grads_ref = _loss(dr.recurrent_gated_delta_rule, 64, seg)(q, k, v, g, beta, s0)
    grads = _loss(dr.chunk_gated_delta_rule, 64, seg)(q, k, v, g, beta, s0)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state0"), grads, grads_ref, strict=True):
        assert rel(a, b) < 2e-5, name
    if segmented:
        # Row 1 starts with padding: the initial state reaches nothing, and padding gets no grad.
        assert np.all(np.asarray(grads[5][1]) == 0.0)
        assert np.all(np.asarray(grads[2][0, 150:160]) == 0.0)


def test_chunk_mxu_tpu_path_matches_recurrent_to_bf16_accuracy():
    """The TPU path ("chunk_mxu": bf16 Gram products, fp32 inverse and state) keeps outputs,
    final state and every gradient within bf16 rounding of the fp32 reference, segments on."""
    q, k, v, g, beta, s0 = make_inputs(12, T=200)
    mxu = functools.partial(dr.gated_delta_rule, backend="chunk_mxu")
    o_ref, s_ref = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0, SEGMENT_IDS)
    o, s = run(mxu, q, k, v, g, beta, s0, SEGMENT_IDS)
    assert 1e-7 < rel(o, o_ref) < 1e-2 and rel(s, s_ref) < 1e-2  # bf16 really was used
    grads_ref = _loss(dr.recurrent_gated_delta_rule, 64, SEGMENT_IDS)(q, k, v, g, beta, s0)
    grads = _loss(mxu, 64, SEGMENT_IDS)(q, k, v, g, beta, s0)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "state0"), grads, grads_ref, strict=True):
        assert rel(a, b) < 2e-2, name


@pytest.mark.slow
def test_chunk_vjp_keeps_only_inputs_and_chunk_states():
    """Saved activations and peak temporaries of the custom VJP vs autodiff through the scan."""
    B, T, H, HV, K, V, C = 1, 1024, 2, 4, 16, 16, 32
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (spec(B, T, H, K), spec(B, T, H, K), spec(B, T, HV, V), spec(B, T, HV), spec(B, T, HV))

    def forward(core):
        return lambda q, k, v, g, beta: dr._chunk_impl(q, k, v, g, beta, None, None, None, C, core)

    def saved_bytes(core):
        # The VJP closure returned from jit holds exactly the residuals.
        lowered = jax.jit(lambda *a: jax.vjp(forward(core), *a)[1]).lower(*args)
        return lowered.compile().memory_analysis().output_size_in_bytes

    def grad_temp_bytes(core):
        loss = lambda *a: sum(jnp.sum(jnp.square(x)) for x in forward(core)(*a))
        lowered = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).lower(*args)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    inputs_bytes = 4 * (2 * T * H * K + T * HV * V + 2 * T * HV + T)
    states_bytes = 4 * (T // C) * HV * K * V
    lean = saved_bytes(dr._chunk_core)
    assert lean <= 1.5 * (inputs_bytes + states_bytes), (lean, inputs_bytes + states_bytes)
    lean_temp, plain_temp = (
        grad_temp_bytes(dr._chunk_core),
        grad_temp_bytes(dr._chunk_core_autodiff),
    )
    assert lean_temp < 0.5 * plain_temp, (lean_temp, plain_temp)


def test_output_dtype_follows_v():
    q, k, v, g, beta, s0 = make_inputs(9, T=30, dtype=jnp.bfloat16)
    for fn in (dr.recurrent_gated_delta_rule, dr.chunk_gated_delta_rule):
        o, s = run(fn, q, k, v, g, beta, s0)
        assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, _ = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0)
    assert rel(o, o_ref) < 1e-2


def test_dispatcher():
    q, k, v, g, beta, s0 = make_inputs(10, T=65)
    o_ref, s_ref = run(dr.recurrent_gated_delta_rule, q, k, v, g, beta, s0)
    for backend in ("auto", "chunk", "recurrent"):
        o, s = run(dr.gated_delta_rule, q, k, v, g, beta, s0, backend=backend)
        assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5, backend
    with pytest.raises(ValueError, match="Unknown gated delta rule backend 'cuda'"):
        dr.gated_delta_rule(q, k, v, g, beta, backend="cuda")


def test_bad_shapes_raise():
    q, k, v, g, beta, s0 = make_inputs(11, T=8, H=16, HV=32)
    fn = dr.chunk_gated_delta_rule
    with pytest.raises(
        ValueError, match="v has 30 heads, which is not a multiple of q/k's 16 heads"
    ):
        fn(q, k, v[:, :, :30], g[:, :, :30], beta[:, :, :30])
    with pytest.raises(ValueError, match="k has shape"):
        fn(q, k[:, :4], v, g, beta)
    with pytest.raises(ValueError, match=r"g has shape \(2, 8, 16\)"):
        fn(q, k, v, g[:, :, :16], beta)
    with pytest.raises(ValueError, match="initial_state has shape"):
        fn(q, k, v, g, beta, initial_state=s0[:, :, :8])
    with pytest.raises(ValueError, match="segment_ids has shape"):
        fn(q, k, v, g, beta, segment_ids=np.ones((2, 7), np.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        fn(q, k, v, g, beta, segment_ids=np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fn(q, k, v, g, beta, chunk_size=0)
    with pytest.raises(ValueError, match="state has shape"):
        dr.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], s0[:, :8])
