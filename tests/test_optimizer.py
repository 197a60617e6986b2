"""Optimizer: which parameters are decayed (on the real model), the exact AdamW step, the
learning-rate schedules, clipping, and config validation."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3next_jax.config import tiny
from qwen3next_jax.model import Qwen3Next
from qwen3next_jax.training import optimizer as opt


def _cfg(**kw):
    base = dict(learning_rate=1.0, train_steps=110, warmup_steps=0, schedule="constant")
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="module")
def model():
    # Shapes from eval_shape, values from numpy: the tree of the real tiny model without paying
    # for eager RNG initialisation (slow on a busy 2-core CI box).
    abstract = nnx.eval_shape(lambda: Qwen3Next(tiny(), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


def _category(path: str) -> str:
    parts = path.split("/")
    if parts[-1] == "embed_VD":
        return "embedding"
    if parts[-1] in ("A_log", "dt_bias"):
        return "a_log_dt_bias"
    if parts[-3:] == ["mixer", "norm", "weight"]:
        return "gated_norm"
    if parts[-1] == "weight" and "norm" in parts[-2]:
        return "norm"
    return "matrix"


def _by_category(described):
    out = {}
    for path, decayed in described:
        out.setdefault(_category(path), set()).add(decayed)
    return out


def test_decay_mask_defaults_on_tiny_model(model):
    described = opt.describe_decay(nnx.state(model, nnx.Param), _cfg())
    paths = dict(described)
    # Every kind of leaf is present and classified as intended.
    assert _by_category(described) == {
        "embedding": {False},
        "a_log_dt_bias": {False},
        "gated_norm": {False},
        "norm": {True},
        "matrix": {True},
    }
    # Spot checks on exact paths, incl. the MTP norm named plain 'norm' (zero-centred, decayed).
    assert paths["embed_VD"] is False
    assert paths["lm_head_DV"] is True
    assert paths["final_norm/weight"] is True
    assert paths["mtp/0/norm/weight"] is True
    assert paths["mtp/0/pre_fc_norm_embedding/weight"] is True
    assert paths["mtp/0/layer/mixer/q_norm/weight"] is True
    assert paths["blocks/layers/0/mixer/norm/weight"] is False
    assert paths["blocks/layers/0/mixer/A_log"] is False
    assert paths["blocks/layers/0/mixer/dt_bias"] is False
    assert paths["blocks/layers/0/input_norm/weight"] is True
    assert paths["blocks/layers/0/ffn/router_DE"] is True
    assert paths["blocks/layers/3/mixer/k_norm/weight"] is True


def test_decay_mask_switches_flipped(model):
    cfg = _cfg(
        decay_norms=False, decay_gated_norm=True, decay_embedding=True, decay_a_log_dt_bias=True
    )
    described = opt.describe_decay(nnx.state(model, nnx.Param), cfg)
    assert _by_category(described) == {
        "embedding": {True},
        "a_log_dt_bias": {True},
        "gated_norm": {True},
        "norm": {False},
        "matrix": {True},
    }


def test_mask_same_on_variable_and_pure_trees(model):
    state = nnx.state(model, nnx.Param)
    cfg = _cfg()
    on_vars = jax.tree.leaves(opt.weight_decay_mask(state, cfg))
    on_pure = jax.tree.leaves(opt.weight_decay_mask(nnx.as_pure(state), cfg))
    assert on_vars == on_pure
    assert len(on_vars) == len(jax.tree.leaves(state))


def test_optimizer_applies_the_mask_through_nnx_optimizer(model):
    """Zero gradients: Adam's direction is 0, so the update is exactly -lr*wd*p on decayed leaves.

    nnx.Optimizer hands tx.init a State of Variables and tx.update pure arrays: both mask forms.
    """
    model = nnx.clone(model)
    cfg = _cfg(learning_rate=0.5, weight_decay=0.1, grad_clip_norm=1.0)
    tx, _ = opt.make_optimizer(cfg)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    decayed = dict(opt.describe_decay(nnx.state(model, nnx.Param), cfg))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
        optimizer.update(model, grads)

    step(model, optimizer)
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for key, p0 in before.items():
        path = "/".join(str(k) for k in key)
        expected = p0 * (1 - 0.5 * 0.1) if decayed[path] else p0
        np.testing.assert_allclose(after[key], expected, rtol=1e-6, atol=0, err_msg=path)


def _adamw_reference(p, grads, lr_list, b1, b2, eps, wd, decay):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lr_list, strict=True), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + (wd * p if decay else 0.0))
    return p


def test_adamw_steps_match_hand_computation():
    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
    cfg = _cfg(
        learning_rate=0.01,
        train_steps=10,
        warmup_steps=2,
        schedule="linear",
        min_lr_ratio=0.0,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=wd,
        grad_clip_norm=0.0,
    )
    tx, sched = opt.make_optimizer(cfg)
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(4,)).astype(np.float32),
    }
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(3)
    ]
    state = tx.init(params)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for g in grads:
        u, state = tx.update(g, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    lrs = [float(sched(s)) for s in range(3)]
    assert lrs == pytest.approx([0.0, 0.005, 0.01])
    for name, decay in (("w", True), ("b", False)):
        ref = _adamw_reference(
            params[name].astype(np.float64), [g[name] for g in grads], lrs, b1, b2, eps, wd, decay
        )
        np.testing.assert_allclose(np.asarray(p[name]), ref, rtol=1e-5, atol=1e-7)
    # Moments are float32 even for bf16 parameters.
    state16 = tx.init({"w": jnp.zeros((2, 2), jnp.bfloat16)})
    adam = next(s for s in state16 if isinstance(s, opt.ScaleByAdamState))
    assert adam.mu["w"].dtype == jnp.float32 and adam.nu["w"].dtype == jnp.float32


def test_clipping_bounds_global_norm():
    cfg = _cfg(grad_clip_norm=1.5, weight_decay=0.0, b1=0.9)
    tx, _ = opt.make_optimizer(cfg)
    params = {"a": jnp.zeros((3, 3)), "b": jnp.zeros((5,))}
    g = {"a": jnp.full((3, 3), 4.0), "b": jnp.arange(5.0)}
    norm = np.sqrt(9 * 16 + np.sum(np.arange(5.0) ** 2))
    _, state = tx.update(g, tx.init(params), params)
    adam = next(s for s in state if isinstance(s, opt.ScaleByAdamState))
    # mu after one step is (1 - b1) * clipped gradient.
    clipped = jax.tree.map(lambda m: m / 0.1, adam.mu)
    assert float(optax_global_norm(clipped)) == pytest.approx(1.5, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], np.full((3, 3), 4.0) * 1.5 / norm, rtol=1e-5)
    # A gradient already inside the ball is untouched.
    small = jax.tree.map(lambda x: x * 1e-3, g)
    _, state = tx.update(small, tx.init(params), params)
    adam = next(s for s in state if isinstance(s, opt.ScaleByAdamState))
    np.testing.assert_allclose(adam.mu["b"] / 0.1, small["b"], rtol=1e-5)


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # steps:    0    5    10   60    110  200
        ("cosine", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
        ("linear", [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("wsd", [0.0, 0.5, 1.0, 1.0, 0.1, 0.1]),
    ],
)
def test_schedule_values(schedule, expected):
    cfg = _cfg(
        learning_rate=1.0, warmup_steps=10, train_steps=110, schedule=schedule, min_lr_ratio=0.1
    )
    _, sched = opt.make_optimizer(cfg)
    got = [float(sched(s)) for s in (0, 5, 10, 60, 110, 200)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_cosine_quarter_and_wsd_decay_phase():
    cos = opt.make_schedule(_cfg(warmup_steps=10, schedule="cosine", min_lr_ratio=0.0))
    assert float(cos(35)) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)), abs=1e-6)
    # wsd: decay_fraction 0.2 of 110 = 22 steps, from step 88 to 110, linear to 0.1.
    wsd = opt.make_schedule(_cfg(warmup_steps=10, schedule="wsd", min_lr_ratio=0.1))
    assert float(wsd(88)) == pytest.approx(1.0)
    assert float(wsd(99)) == pytest.approx(0.55, abs=1e-6)
    # No warmup: the peak at step 0; jit-able on a traced step.
    lin = opt.make_schedule(_cfg(schedule="linear", min_lr_ratio=0.0))
    assert float(jax.jit(lin)(jnp.int32(0))) == 1.0
    assert float(jax.jit(lin)(jnp.int32(55))) == pytest.approx(0.5)


def test_works_with_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(dict(learning_rate=3e-4, train_steps=100, warmup_steps=10))
    tx, sched = opt.make_optimizer(cfg)  # every other field from DEFAULTS
    assert float(sched(10)) == pytest.approx(3e-4)
    assert float(sched(100)) == pytest.approx(3e-4 * opt.DEFAULTS["min_lr_ratio"])


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(schedule="step"), "schedule='step' is unknown"),
        (dict(warmup_steps=200), "warmup_steps=200 exceeds train_steps=110"),
        (dict(learning_rate=-1e-3), "learning_rate=-0.001 must be non-negative"),
        (dict(train_steps=0), "train_steps=0 must be a positive integer"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5"),
        (dict(b2=1.0), "b2=1.0 must be in"),
        (dict(weight_decay=-0.1), "weight_decay=-0.1"),
        (dict(grad_clip_norm=-1.0), "grad_clip_norm=-1.0"),
        (dict(schedule="wsd", warmup_steps=100, decay_fraction=0.2), "wsd decay of 22 steps"),
        (dict(schedule="wsd", decay_fraction=0.0), "decay_fraction=0.0"),
    ],
)
def test_bad_config_raises(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        opt.make_optimizer(_cfg(**kw))


def test_missing_learning_rate_raises():
    with pytest.raises(ValueError, match="missing the required field 'learning_rate'"):
        opt.make_optimizer(SimpleNamespace(train_steps=10))
