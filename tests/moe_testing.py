"""Shared by the MoE op tests: small Pallas tiles for interpret mode."""

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
