"""The train state, its sharded initialisation, and the jitted train / eval steps.

The state is a plain dict pytree: ``params`` (an nnx.State of Params, fp32 master weights),
``opt`` (Optax state), ``step`` (int32), ``nonfinite_step`` (int32, -1 until a step sees a
non-finite loss or gradient) and ``nonfinite_leaves`` (int32 flags per gradient leaf at that step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qwen3next_jax import sharding
from qwen3next_jax.config import ModelConfig
from qwen3next_jax.model import Qwen3Next
from qwen3next_jax.training import evaluate, losses, optimizer

BATCH_AXES = ("batch", "seq")
ADDITIVE_AUX_KEYS = frozenset(
    {
        "loss",
        "ce",
        "mtp_loss",
        "mtp_loss_per_depth",
        "lb_loss",
        "z_loss",
        "num_tokens",
        "ce_sum",
        "ce_count",
        "mtp_sum",
        "mtp_count",
    }
)


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs: graphdef, abstract state + shardings, and the jitted steps."""

    model_cfg: ModelConfig
    graphdef: Any
    abstract_state: dict
    state_shardings: dict
    batch_sharding: NamedSharding
    init: Callable[[], dict]
    train_step: Callable[[dict, dict], tuple[dict, dict]]
    eval_step: Callable[[dict, dict], dict]
    grads_step: Callable  # (params, batch) -> (loss, aux, grads); for tests and diagnostics
    schedule: Callable
    param_paths: list[str]


def model_config_from(config: ml_collections.ConfigDict) -> ModelConfig:
    d = config.model.to_dict()
    return ModelConfig.from_dict(d)


def _param_shardings(abstract_params, mesh, rules):
    def one(var):
        axes = var.get_metadata().get("axes")
        spec = sharding.logical_to_spec(axes, rules, mesh) if axes else PartitionSpec()
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _opt_shardings(tx, abstract_opt, params_shardings, mesh):
    """Optimizer leaves that mirror a parameter take its sharding; the rest are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
        sh,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def build(config: ml_collections.ConfigDict, mesh) -> Trainer:
    """Abstract shapes first, then shardings, then jitted init / train / eval functions."""
    mcfg = model_config_from(config)
    ocfg = ml_collections.ConfigDict(config.optim.to_dict())
    ocfg.train_steps = config.train_steps
    tx, schedule = optimizer.make_optimizer(ocfg)
    lcfg = config.loss
    micro = int(config.micro_batches)
    global_lb = micro > 1 and lcfg.lb_scope == "global_batch" and lcfg.lb_coef > 0
    if micro > 1 and not global_lb:
        # Micro-batch scope: the LB and z terms are each micro-batch's own, averaged.
        lcfg = ml_collections.ConfigDict(lcfg.to_dict())
        lcfg.lb_coef = lcfg.lb_coef / micro
        lcfg.z_coef = lcfg.z_coef / micro
    rules = dict(sharding.DEFAULT_RULES)
    nonfinite_skip = config.nonfinite == "skip"

    def make_model(seed):
        return Qwen3Next(mcfg, rngs=nnx.Rngs(seed))

    abstract_model = nnx.eval_shape(lambda: make_model(0))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_paths = [
        "/".join(str(k.key if hasattr(k, "key") else k) for k in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    ]
    params_sh = _param_shardings(abstract_params, mesh, rules)
    num_leaves = len(param_paths)

    def init_fn():
        params = nnx.state(make_model(config.seed), nnx.Param)
        return {
            "params": params,
            "opt": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "nonfinite_step": jnp.full((), -1, jnp.int32),
            "nonfinite_leaves": jnp.zeros((num_leaves,), jnp.int32),
        }

    abstract_state = jax.eval_shape(init_fn)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = {
        "params": params_sh,
        "opt": _opt_shardings(tx, abstract_state["opt"], params_sh, mesh),
        "step": replicated,
        "nonfinite_step": replicated,
        "nonfinite_leaves": replicated,
    }
    batch_spec = sharding.logical_to_spec(BATCH_AXES, rules, mesh)
    batch_sh = NamedSharding(mesh, batch_spec)

    def with_mesh(fn):
        def wrapped(*args):
            with sharding.use_mesh(mesh, rules):
                return fn(*args)

        return wrapped

    init = jax.jit(with_mesh(init_fn), out_shardings=state_sh)

    def loss_of(params, batch, global_counts, global_tokens, n_tok, n_mtp):
        model = nnx.merge(graphdef, params)
        return losses.loss_fn(
            model,
            batch,
            lcfg,
            global_counts_LE=global_counts,
            global_tokens_L=global_tokens,
            num_tokens_global=n_tok,
            mtp_tokens_global=n_mtp,
        )

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def split_micro(batch):
        return jax.tree.map(lambda a: a.reshape(micro, a.shape[0] // micro, *a.shape[1:]), batch)

    def token_counts(batch):
        n_tok = jnp.sum(batch["loss_mask"]).astype(jnp.float32)
        n_mtp = (
            jnp.stack(
                [
                    jnp.sum(
                        losses.mtp_targets(
                            batch["targets"], batch["loss_mask"], batch["segment_ids"], d
                        )[1]
                    ).astype(jnp.float32)
                    for d in range(mcfg.num_mtp_layers)
                ]
            )
            if mcfg.num_mtp_layers
            else None
        )
        return n_tok, n_mtp

    def routing_counts(params, mbs):
        """Routing counts of the whole global batch (all micro-batches), without gradients."""

        def one(carry, mb):
            model = nnx.merge(graphdef, params)
            out = model(mb["inputs"], mb["segment_ids"], mb["positions"], compute_logits=False)
            c, t = carry
            return (c + out.router["counts_E"], t + out.router["num_tokens"]), None

        model = nnx.merge(graphdef, params)
        L = _num_moe_layers(model)
        zero = (jnp.zeros((L, mcfg.num_experts)), jnp.zeros((L,)))
        (counts, toks), _ = jax.lax.scan(one, zero, mbs)
        return jax.lax.stop_gradient(counts), jax.lax.stop_gradient(toks)

    def compute_grads(params, batch):
        """(loss, aux, grads) of the whole global batch; micro-batches are accumulated exactly."""
        n_tok, n_mtp = token_counts(batch)
        if micro == 1:
            (loss, aux), grads = grad_fn(params, batch, None, None, n_tok, n_mtp)
            return loss, aux, grads
        mbs = split_micro(batch)
        gc, gt = routing_counts(params, mbs) if global_lb else (None, None)

        def acc(carry, mb):
            g_acc, l_acc, aux_acc = carry
            (l, a), g = grad_fn(params, mb, gc, gt, n_tok, n_mtp)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            aux_acc = jax.tree.map(jnp.add, aux_acc, a)
            return (g_acc, l_acc + l, aux_acc), None

        first = jax.tree.map(lambda a: a[0], mbs)
        aux_shape = jax.eval_shape(lambda: grad_fn(params, first, gc, gt, n_tok, n_mtp)[0][1])
        zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        zeros_g = jax.tree.map(jnp.zeros_like, params)
        init = (zeros_g, jnp.zeros((), jnp.float32), zeros_aux)
        (grads, loss, aux), _ = jax.lax.scan(acc, init, mbs)
        # Terms normalised by global counts add up over micro-batches; ratios are averaged.
        additive = ADDITIVE_AUX_KEYS if global_lb else ADDITIVE_AUX_KEYS - {"lb_loss", "z_loss"}
        aux = {k: v if k in additive else v / micro for k, v in aux.items()}
        return loss, aux, grads

    def train_step_fn(state, batch):
        params = state["params"]
        loss, aux, grads = compute_grads(params, batch)
        grad_norm = optax.global_norm(grads)
        leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
        finite = jnp.isfinite(loss) & jnp.all(leaf_finite)
        updates, new_opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        if nonfinite_skip:
            new_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
            new_opt = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt, state["opt"])
        first_bad = (state["nonfinite_step"] < 0) & ~finite
        new_state = {
            "params": new_params,
            "opt": new_opt,
            "step": state["step"] + 1,
            "nonfinite_step": jnp.where(first_bad, state["step"], state["nonfinite_step"]),
            "nonfinite_leaves": jnp.where(
                first_bad, (~leaf_finite).astype(jnp.int32), state["nonfinite_leaves"]
            ),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "finite": finite.astype(jnp.float32),
            **{k: v for k, v in aux.items()},
        }
        return new_state, metrics

    train_step = jax.jit(
        with_mesh(train_step_fn),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )

    def eval_step_fn(params, batch):
        return evaluate.eval_sums(nnx.merge(graphdef, params), batch)

    grads_step = jax.jit(
        with_mesh(compute_grads), in_shardings=(params_sh, batch_sh), out_shardings=replicated
    )
    eval_step = jax.jit(
        with_mesh(eval_step_fn), in_shardings=(params_sh, batch_sh), out_shardings=replicated
    )
    return Trainer(
        model_cfg=mcfg,
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_sh,
        batch_sharding=batch_sh,
        init=init,
        train_step=train_step,
        eval_step=eval_step,
        grads_step=grads_step,
        schedule=schedule,
        param_paths=param_paths,
    )


def abstract_with_shardings(trainer: Trainer) -> dict:
    """ShapeDtypeStructs of the train state carrying their target shardings (for restore)."""

    def sub(sh, tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)

    return jax.tree.map(sub, trainer.state_shardings, trainer.abstract_state)


def _num_moe_layers(model: Qwen3Next) -> int:
    main = sum(m for _, m in model.block_kinds) * model.num_blocks
    return main + model.cfg.num_mtp_layers
