"""AdamW with fp32 moments, global-norm clipping, a learning-rate schedule and a weight-decay mask.

The optimizer is ``clip -> adam (fp32 moments) -> + wd * param (masked) -> * -lr(step)``, i.e.
decoupled weight decay scaled by the scheduled learning rate (PyTorch AdamW / optax.adamw):

    p <- p - lr_t * (m̂_t / (sqrt(v̂_t) + eps) + wd * mask * p)

Config (attribute access, ml_collections-like; missing optional fields take ``DEFAULTS``):
learning_rate and train_steps are required; warmup_steps, schedule ('cosine' | 'linear' |
'constant' | 'wsd'), min_lr_ratio, decay_fraction (wsd only), b1, b2, eps, weight_decay,
grad_clip_norm (0 or None = off), decay_norms, decay_gated_norm, decay_embedding,
decay_a_log_dt_bias.

Weight-decay mask rules (first match wins), on parameter paths such as
``blocks/layers/0/mixer/norm/weight``:
  1. ``embed_VD``                          -> decay_embedding      (default False)
  2. ``A_log`` / ``dt_bias``               -> decay_a_log_dt_bias  (default False)
  3. ``.../mixer/norm/weight``             -> decay_gated_norm     (default False; the Gated
     DeltaNet output norm has a PLAIN gain initialised at 1, decaying it pulls the gain to 0)
  4. ``.../<name containing norm>/weight`` -> decay_norms        (default True; zero-centred
     RMSNorm, y = x̂(1 + w), so decaying w pulls the gain toward 1)
  5. anything else: decayed iff it is a matrix (ndim >= 2, not counting the stacked 'layers' axis).

The mask is a callable evaluated on whatever tree optax hands it, so one optimizer works on an
``nnx.State`` of ``nnx.Param`` Variables (``nnx.state(model, nnx.Param)``, as ``nnx.Optimizer.init``
passes) and on its pure-array form (``nnx.as_pure``, as ``nnx.Optimizer.update`` passes). On a
Variable tree the mask has one bool per Variable (a tree prefix of the params, which optax.masked
accepts) and the stacked axis is read from the 'axes' metadata; on a pure tree it has one bool per
array and a leaf under ``blocks`` is taken to carry one leading 'layers' axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

SCHEDULES = ("cosine", "linear", "constant", "wsd")

DEFAULTS: dict[str, Any] = {
    "warmup_steps": 0,
    "schedule": "cosine",
    "min_lr_ratio": 0.1,
    "decay_fraction": 0.2,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1e-8,
    "weight_decay": 0.1,
    "grad_clip_norm": 1.0,
    "decay_norms": True,
    "decay_gated_norm": False,
    "decay_embedding": False,
    "decay_a_log_dt_bias": False,
}
_REQUIRED = ("learning_rate", "train_steps")

# Parameter names with their own decay switch; every other 1-D leaf is a gain and is not decayed.
_EMBEDDING_NAMES = ("embed_VD",)
_GDN_DYNAMICS_NAMES = ("A_log", "dt_bias")
_STACKED_AXIS = "layers"
_STACKED_PARENT = "blocks"


def _get(cfg, name: str):
    if name in _REQUIRED:
        if not hasattr(cfg, name) or getattr(cfg, name) is None:
            raise ValueError(f"Optimizer config is missing the required field {name!r}.")
        return getattr(cfg, name)
    return getattr(cfg, name, DEFAULTS[name])


def validate(cfg) -> None:
    """Raises ValueError, one sentence per problem, for any bad optimizer setting."""
    errs = []
    lr, train = _get(cfg, "learning_rate"), _get(cfg, "train_steps")
    warmup, schedule = _get(cfg, "warmup_steps"), _get(cfg, "schedule")
    if not lr >= 0:
        errs.append(f"learning_rate={lr} must be non-negative.")
    if not isinstance(train, int) or isinstance(train, bool) or train <= 0:
        errs.append(f"train_steps={train!r} must be a positive integer.")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        errs.append(f"warmup_steps={warmup!r} must be a non-negative integer.")
    elif isinstance(train, int) and warmup > train:
        errs.append(f"warmup_steps={warmup} exceeds train_steps={train}.")
    if schedule not in SCHEDULES:
        errs.append(f"schedule={schedule!r} is unknown; expected one of {SCHEDULES}.")
    ratio = _get(cfg, "min_lr_ratio")
    if not 0.0 <= ratio <= 1.0:
        errs.append(f"min_lr_ratio={ratio} must be in [0, 1].")
    if schedule == "wsd":
        frac = _get(cfg, "decay_fraction")
        if not 0.0 < frac <= 1.0:
            errs.append(f"decay_fraction={frac} must be in (0, 1] for the 'wsd' schedule.")
        elif isinstance(train, int) and isinstance(warmup, int):
            decay = _wsd_decay_steps(train, frac)
            if warmup + decay > train:
                errs.append(
                    f"warmup_steps={warmup} plus the wsd decay of {decay} steps "
                    f"(decay_fraction={frac} of train_steps={train}) exceeds train_steps."
                )
    for name in ("b1", "b2"):
        v = _get(cfg, name)
        if not 0.0 <= v < 1.0:
            errs.append(f"{name}={v} must be in [0, 1).")
    if not _get(cfg, "eps") > 0:
        errs.append(f"eps={_get(cfg, 'eps')} must be positive.")
    if not _get(cfg, "weight_decay") >= 0:
        errs.append(f"weight_decay={_get(cfg, 'weight_decay')} must be non-negative.")
    clip = _get(cfg, "grad_clip_norm")
    if clip is not None and not clip >= 0:
        errs.append(f"grad_clip_norm={clip} must be non-negative (0 or None turns clipping off).")
    if errs:
        raise ValueError(" ".join(errs))


# ------------------------------------------------------------------------------------- schedule
def _wsd_decay_steps(train_steps: int, decay_fraction: float) -> int:
    return max(1, int(round(decay_fraction * train_steps)))


def make_schedule(cfg) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate (float32), for step counts starting at 0.

    Warmup: lr·s/W for s < W (0 at step 0, the peak at s = W). Then, with the progress
    p = clip((s - S0) / (train_steps - S0), 0, 1) and lr_min = min_lr_ratio·lr:
      cosine   lr_min + (lr - lr_min)·(1 + cos(π p))/2,  S0 = W
      linear   lr - (lr - lr_min)·p,                      S0 = W
      constant lr
      wsd      lr until S0 = train_steps - round(decay_fraction·train_steps), then linear to lr_min.
    Steps at or past train_steps stay at the final value.
    """
    validate(cfg)
    peak = float(_get(cfg, "learning_rate"))
    train, warmup = int(_get(cfg, "train_steps")), int(_get(cfg, "warmup_steps"))
    schedule = _get(cfg, "schedule")
    low = peak * float(_get(cfg, "min_lr_ratio"))
    if schedule == "wsd":
        decay_start = train - _wsd_decay_steps(train, float(_get(cfg, "decay_fraction")))
    else:
        decay_start = warmup

    def lr_fn(step):
        s = jnp.asarray(step, jnp.float32)
        p = jnp.clip((s - decay_start) / max(train - decay_start, 1), 0.0, 1.0)
        if schedule == "cosine":
            after = low + (peak - low) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        elif schedule == "constant":
            after = jnp.full_like(s, peak)
        else:  # linear, and the decay phase of wsd (p = 0 during its stable phase)
            after = peak - (peak - low) * p
        if warmup == 0:
            return after.astype(jnp.float32)
        return jnp.where(s < warmup, peak * s / warmup, after).astype(jnp.float32)

    return lr_fn


# ----------------------------------------------------------------------------------------- adam
class ScaleByAdamState(NamedTuple):
    count: jax.Array  # int32 number of updates so far
    mu: Any  # float32 first moments
    nu: Any  # float32 second moments


def scale_by_adam_fp32(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
    """Bias-corrected Adam direction m̂/(sqrt(v̂)+eps) with BOTH moments kept in float32.

    (optax.scale_by_adam's ``mu_dtype`` covers only the first moment; the second follows the
    parameter dtype, which would be bf16 for bf16 master weights.) Updates come back in each
    gradient's dtype.
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
        return ScaleByAdamState(
            count=jnp.zeros((), jnp.int32),
            mu=jax.tree.map(zeros, params),
            nu=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(
            lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates
        )
        count = state.count + 1
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1**t, 1 - b2**t
        out = jax.tree.map(
            lambda m, v, g: ((m / c1) / (jnp.sqrt(v / c2) + eps)).astype(g.dtype), mu, nu, updates
        )
        return out, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------- weight decay
def _key_name(k) -> str | None:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _names(path) -> tuple[str, ...]:
    """Path keys as strings, without the trailing '.value' of an nnx.Variable."""
    names = tuple(_key_name(k) for k in path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def _decayed(names: tuple[str, ...], leaf, cfg) -> bool:
    last = names[-1] if names else ""
    if last in _EMBEDDING_NAMES:
        return bool(_get(cfg, "decay_embedding"))
    if last in _GDN_DYNAMICS_NAMES:
        return bool(_get(cfg, "decay_a_log_dt_bias"))
    if last == "weight" and len(names) >= 3 and names[-2] == "norm" and names[-3] == "mixer":
        return bool(_get(cfg, "decay_gated_norm"))
    if last == "weight" and len(names) >= 2 and "norm" in names[-2]:
        return bool(_get(cfg, "decay_norms"))
    if isinstance(leaf, nnx.Variable):
        axes = leaf.get_metadata().get("axes")
        if axes is not None:
            return sum(a != _STACKED_AXIS for a in axes) >= 2
        leaf = leaf.get_value()
    # No axis names: a leaf under the scanned stack carries one leading 'layers' axis.
    return len(jnp.shape(leaf)) - (_STACKED_PARENT in names[:-1]) >= 2


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def weight_decay_mask(params_state, cfg) -> Any:
    """A tree of Python bools (True = decayed) matching ``params_state`` (module docstring rules).

    For an nnx.State of Variables the bools sit where the Variables sit (a prefix of the array
    tree); for a tree of arrays (pure dict, as_pure State) they replace the arrays.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _decayed(_names(path), leaf, cfg), params_state, is_leaf=_is_variable
    )


def describe_decay(params_state, cfg) -> list[tuple[str, bool]]:
    """[('blocks/layers/0/mixer/A_log', False), ...] for every parameter, for logging."""
    flat = jax.tree_util.tree_flatten_with_path(params_state, is_leaf=_is_variable)[0]
    return [("/".join(_names(path)), _decayed(_names(path), leaf, cfg)) for path, leaf in flat]


# ------------------------------------------------------------------------------------ assembly
def make_optimizer(cfg) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """(AdamW GradientTransformation, schedule_fn). See the module docstring for the update."""
    schedule_fn = make_schedule(cfg)
    parts = []
    clip = _get(cfg, "grad_clip_norm")
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(
        scale_by_adam_fp32(float(_get(cfg, "b1")), float(_get(cfg, "b2")), float(_get(cfg, "eps")))
    )
    wd = float(_get(cfg, "weight_decay"))
    if wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask=lambda tree: weight_decay_mask(tree, cfg)))
    parts.append(optax.scale_by_learning_rate(schedule_fn))
    return optax.chain(*parts), schedule_fn
