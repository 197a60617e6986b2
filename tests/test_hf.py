"""Parity with Hugging Face transformers' Qwen3NextForCausalLM, and checkpoint round trips."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import qwen3next_jax as q3n  # noqa: E402
from qwen3next_jax import hf as hf_lib  # noqa: E402

HF_KW = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    intermediate_size=96,
    rms_norm_eps=1e-6,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random HF model with every norm, A_log and dt_bias perturbed, saved and loaded by us."""
    torch.manual_seed(0)
    config = transformers.Qwen3NextConfig(**HF_KW)
    config._attn_implementation = "eager"
    model = transformers.Qwen3NextForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "A_log" in name or "dt_bias" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                # Larger than the 0.02 init so every path moves the logits visibly.
                p.normal_(0.0, 0.08, generator=gen)
    path = str(tmp_path_factory.mktemp("hf") / "model")
    model.save_pretrained(path)
    with pytest.warns(UserWarning, match="mtp"):
        ours = q3n.from_hf(path, jnp.float32)
    return model, ours, path


def test_logits_match_transformers(hf_pair):
    hf_model, ours, _ = hf_pair
    ids = np.random.default_rng(0).integers(0, HF_KW["vocab_size"], (2, 100))
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids)).logits.numpy()
    got = jax.jit(lambda m, x: m(x).logits)(ours, jnp.asarray(ids))
    assert got.shape == (2, 100, HF_KW["vocab_size"]) and got.dtype == jnp.float32
    assert _rel(got, ref) < 1e-4


def _hidden_in(rng):
    return rng.normal(size=(2, 37, HF_KW["hidden_size"])).astype(np.float32)


def test_gated_deltanet_block_matches(hf_pair):
    hf_model, ours, _ = hf_pair
    x = _hidden_in(np.random.default_rng(1))
    with torch.no_grad():
        ref = hf_model.model.layers[0].linear_attn(torch.tensor(x)).numpy()
    got = ours.layer(0).mixer(jnp.asarray(x))
    assert _rel(got, ref) < 1e-5


def test_gated_attention_block_matches(hf_pair):
    hf_model, ours, _ = hf_pair
    x = _hidden_in(np.random.default_rng(2))
    pos = np.broadcast_to(np.arange(37), (2, 37))
    layer = hf_model.model.layers[3]
    with torch.no_grad():
        emb = hf_model.model.rotary_emb(torch.tensor(x), torch.tensor(pos))
        mask = torch.full((37, 37), float("-inf")).triu(1)[None, None]
        ref = layer.self_attn(torch.tensor(x), emb, mask)[0].numpy()
    got = ours.layer(3).mixer(jnp.asarray(x), jnp.asarray(pos))
    assert _rel(got, ref) < 1e-5


def test_moe_block_matches(hf_pair):
    hf_model, ours, _ = hf_pair
    x = _hidden_in(np.random.default_rng(3))
    with torch.no_grad():
        ref = hf_model.model.layers[1].mlp(torch.tensor(x))
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    got, stats = ours.layer(1).ffn(jnp.asarray(x))
    assert _rel(got, ref) < 1e-5
    assert float(stats["counts_E"].sum()) == 2 * 37 * HF_KW["num_experts_per_tok"]


def test_to_hf_from_hf_is_bit_identical_and_loads_in_transformers(hf_pair, tmp_path):
    hf_model, ours, _ = hf_pair
    out = str(tmp_path / "export")
    q3n.to_hf(ours, out, max_shard_bytes=200_000)  # several shards + index
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    again = q3n.from_hf(out, jnp.float32)
    a, b = jax.tree.leaves(ours), jax.tree.leaves(again)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # transformers reads what we wrote (mtp.* ignored by it) and computes the same logits.
    reloaded = transformers.Qwen3NextForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(4).integers(0, HF_KW["vocab_size"], (1, 20))
    with torch.no_grad():
        ref = reloaded(torch.tensor(ids)).logits.numpy()
    assert _rel(ours(jnp.asarray(ids)).logits, ref) < 1e-4
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_nextn_predict_layers"] == 1


def test_bad_checkpoints_are_named(hf_pair, tmp_path):
    _, ours, _ = hf_pair
    out = str(tmp_path / "bad")
    q3n.to_hf(ours, out)
    tensors = {}
    reader = hf_lib.SafetensorsReader(out)
    for n in reader.names():
        tensors[n] = np.array(reader.get(n))
    del reader
    victim = "model.layers.1.linear_attn.A_log"
    missing = {k: v for k, v in tensors.items() if k != victim}
    hf_lib.write_safetensors(os.path.join(out, "model.safetensors"), missing)
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.linear_attn.A_log'"):
        q3n.from_hf(out)
    wrong = dict(tensors)
    wrong[victim] = np.zeros((3,), np.float32)
    hf_lib.write_safetensors(os.path.join(out, "model.safetensors"), wrong)
    with pytest.raises(ValueError, match=r"A_log' has shape \[3\]; expected \[4\]"):
        q3n.from_hf(out)
    extra = dict(tensors)
    extra["model.layers.1.surprise.weight"] = np.zeros((2,), np.float32)
    hf_lib.write_safetensors(os.path.join(out, "model.safetensors"), extra)
    with pytest.raises(ValueError, match="surprise"):
        q3n.from_hf(out)


def test_hf_command_writes_a_checkpoint_training_can_start_from(hf_pair, tmp_path):
    from flax import nnx

    from qwen3next_jax.training.checkpointing import restore_params

    _, ours, path = hf_pair
    out = str(tmp_path / "converted")
    assert hf_lib.main([f"--hf_dir={path}", f"--workdir={out}"]) == 0
    with open(os.path.join(out, "model_config.json")) as f:
        assert q3n.ModelConfig.from_dict(json.load(f)) == ours.cfg
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.state(ours, nnx.Param)
    )
    restored = restore_params(out, abstract)
    # The MTP head was freshly initialised on load, so compare everything else exactly.
    for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(nnx.state(ours, nnx.Param))[0],
        jax.tree.leaves(restored),
        strict=True,
    ):
        if "mtp" not in jax.tree_util.keystr(p):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hf_lib.main([f"--hf_dir={tmp_path / 'nope'}", f"--workdir={out}"]) == 1
