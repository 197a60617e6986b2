"""Shared by the MoE op tests: small Pallas tiles for interpret mode."""

import jax
import pytest

from qwen3next_jax.ops import moe_pallas


@pytest.fixture(autouse=True)
def small_pallas_tiles(monkeypatch):
    """Interpret-mode Pallas: small tiles keep the padded row count (and the test time) small,
    while the tests' D and F still span several blocks, so the column and contraction loops run
    more than once."""
    monkeypatch.setattr(moe_pallas, "TILE_M", 16)
    monkeypatch.setattr(moe_pallas, "BLOCK_N", 16)
    monkeypatch.setattr(moe_pallas, "BLOCK_K", 16)
    monkeypatch.setattr(moe_pallas, "TGMM_ROWS", 8)
    monkeypatch.setattr(moe_pallas, "TGMM_ROWS_PAIR", 8)


def split_value_and_grad(loss, argnums):
    """jax.value_and_grad(loss, argnums, has_aux=True) as two jitted programs: the value (and
    aux) alone, and the gradients alone. An expert-parallel op with more than two expert shards
    runs its all-to-alls inside lax.cond; XLA:CPU (jaxlib 0.10.2, 8 host devices) does not order
    a conditional's collectives against the program's other collectives, and in one program of
    value and gradients the backward's all-to-alls and the loss's all-reduce ran in different
    orders on different devices: a deadlock in about half the runs. In the gradient program the
    loss value is dead, so its only collectives run in data order."""
    value = jax.jit(loss)
    grads = jax.jit(jax.grad(lambda *a: loss(*a)[0], argnums=argnums))

    def fn(*args):
        return value(*args), grads(*args)

    return fn
