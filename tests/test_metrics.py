"""Parameter/FLOP counts against hand counts and the real model; peaks; throughput; the writer."""

import glob
import json
import math

import jax
import pytest
from flax import nnx

from qwen3next_jax.config import qwen3_next_80b_a3b, tiny
from qwen3next_jax.model import Qwen3Next
from qwen3next_jax.training import metrics

# Hand count for tiny(): D=64, V=512, 3 GDN + 1 attention layer, N=4, K=2, H=32, HK=2, HV=4,
# Dk=Dv=16, conv 4, 8 experts top-2 of width 32, shared expert 32, one MTP depth, untied.
GDN = 2 * 64 * 32 + 2 * 64 * 64 + 2 * 64 * 4 + 4 * (32 + 32 + 64) + 2 * 4 + 16 + 64 * 64
ATTN = 2 * 64 * 128 + 2 * 64 * 64 + 128 * 64 + 2 * 32
MOE_TOTAL = 64 * 8 + 8 * 3 * 64 * 32 + 3 * 64 * 32 + 64
MOE_ACTIVE = 64 * 8 + 2 * 3 * 64 * 32 + 3 * 64 * 32 + 64
NORMS = 2 * 64
OUTER = 2 * 512 * 64 + 64  # embedding, lm_head, final norm
MTP_EXTRA = 3 * 64 + 2 * 64 * 64  # two pre-fc norms + final norm, fc


def test_tiny_param_count_by_hand():
    counts = metrics.count_params(tiny())
    assert counts["total"] == OUTER + 3 * (GDN + MOE_TOTAL + NORMS) + ATTN + MOE_TOTAL + NORMS
    assert counts["active"] == OUTER + 3 * (GDN + MOE_ACTIVE + NORMS) + ATTN + MOE_ACTIVE + NORMS
    mtp = ATTN + MOE_TOTAL + NORMS + MTP_EXTRA
    assert counts["total_with_mtp"] == counts["total"] + mtp
    assert counts["total_with_mtp"] == 471_944


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "num_mtp_layers": 2}])
def test_param_count_equals_model(overrides):
    cfg = tiny(**overrides)
    model = nnx.eval_shape(lambda: Qwen3Next(cfg, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert metrics.count_params(cfg)["total_with_mtp"] == n


def test_published_80b_counts():
    counts = metrics.count_params(qwen3_next_80b_a3b())
    assert abs(counts["total"] / 80e9 - 1) < 0.02
    assert 3.0e9 <= counts["active"] <= 3.9e9
    # HF reports 81.3B for the released checkpoint, which includes the MTP head.
    assert abs(counts["total_with_mtp"] / 81.3e9 - 1) < 0.005


def test_tiny_flops_by_hand():
    T = 128
    lm_head = 2 * 64 * 512
    gdn = 2 * (2 * 64 * 32 + 2 * 64 * 64 + 2 * 64 * 4 + 64 * 64) + 2 * 4 * 128 + 8 * 4 * 16 * 16
    attn = 2 * (2 * 64 * 128 + 2 * 64 * 64 + 128 * 64) + 2 * T * 4 * 32  # causal half
    moe = 2 * 64 * 8 + 2 * 2 * 3 * 64 * 32 + 2 * 3 * 64 * 32 + 2 * 64
    mtp = 2 * 128 * 64 + attn + moe + lm_head
    expected = lm_head + 3 * gdn + attn + 4 * moe + mtp
    f = metrics.flops_per_token(tiny(), T)
    assert f["forward"] == expected == 663_168
    assert f["train"] == 3 * expected
    assert sum(f["breakdown"].values()) == f["forward"]
    assert f["breakdown"]["mtp"] == mtp


def test_flops_match_anchor_4_layer_proxy():
    # performance-anchors.md: 4 layers of the 80B shapes, no MTP, T=4096: 7.21B parameters and
    # ~3.66 GFLOP per trained token.
    cfg = qwen3_next_80b_a3b(num_hidden_layers=4, num_mtp_layers=0)
    assert round(metrics.count_params(cfg)["total"] / 1e9, 2) == 7.21
    assert abs(metrics.flops_per_token(cfg, 4096)["train"] / 3.66e9 - 1) < 0.02


@pytest.mark.parametrize(
    "kind, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("TPU v4", 275),
        ("TPU v5 lite", 197),
        ("TPU v5e", 197),
        ("TPU v5", 459),
        ("TPU v5p", 459),
        ("TPU v6 lite", 918),
        ("cpu", None),
        ("something new", None),
    ],
)
def test_peak_flops(kind, tflops):
    peak = metrics.peak_flops_per_device(kind)
    assert peak == (None if tflops is None else tflops * 1e12)


def test_peak_flops_of_cpu_device():
    assert metrics.peak_flops_per_device(jax.devices()[0]) is None


def test_throughput_math():
    t = metrics.Throughput(
        tokens_per_step=1000, flops_per_token=6e9, num_devices=4, peak_flops_per_device=1e15
    )
    out = t(2.0)
    assert out["tokens_per_s"] == 500.0
    assert out["tokens_per_s_per_device"] == 125.0
    assert out["tflops_per_device"] == pytest.approx(0.75, rel=1e-12)
    assert out["mfu"] == pytest.approx(7.5e-4, rel=1e-12)
    assert metrics.Throughput(1000, 6e9, 4)(2.0)["mfu"] is None


def test_metrics_writer(tmp_path):
    with metrics.MetricsWriter(tmp_path, total_steps=100, start_step=10) as w:
        w.write(20, {"loss": 2.5, "lr": 1e-3, "mfu": None, "counts_E": [1, 2], "bad": math.nan})
        w.write(30, {"loss": 2.25, "tokens_per_s": 1234.0, "mfu": 0.31})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "step": 20,
        "loss": 2.5,
        "lr": 1e-3,
        "mfu": None,
        "counts_E": [1.0, 2.0],
        "bad": None,
    }
    assert list(lines[1]) == ["step", "loss", "tokens_per_s", "mfu"]
    assert lines[1]["loss"] == 2.25 and lines[1]["mfu"] == 0.31
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_metrics_writer_non_chief_writes_nothing(tmp_path):
    w = metrics.MetricsWriter(tmp_path, total_steps=10, is_chief=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert list(tmp_path.iterdir()) == []


def test_write_config(tmp_path):
    path = metrics.write_config(tmp_path, {"b": 1, "a": {"c": [1, 2]}})
    with open(path) as f:
        text = f.read()
    assert json.loads(text) == {"a": {"c": [1, 2]}, "b": 1}
    assert path.endswith("config.json") and "\n  " in text
