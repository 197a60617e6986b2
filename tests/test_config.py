"""ModelConfig: validation messages, the 80B preset, and Hugging Face config.json conversion."""

import dataclasses
import re

import pytest

from qwen3next_jax.config import FULL, LINEAR, ModelConfig, qwen3_next_80b_a3b, tiny


def _raises(match: str, **kw):
    with pytest.raises(ValueError, match=re.escape(match)):
        tiny(**kw)


# ------------------------------------------------------------------------------------ validation
def test_tiny_and_default_are_valid():
    tiny()
    ModelConfig()


def test_heads_not_multiple_of_kv_heads():
    _raises(
        "num_attention_heads=6 is not a multiple of num_key_value_heads=4",
        num_attention_heads=6,
        num_key_value_heads=4,
    )


def test_linear_value_heads_not_multiple_of_key_heads():
    _raises(
        "linear_num_value_heads=3 is not a multiple of linear_num_key_heads=2",
        linear_num_value_heads=3,
    )


def test_layer_types_length_mismatch():
    _raises(
        "layer_types has 3 entries but num_hidden_layers=4",
        layer_types=(LINEAR, LINEAR, FULL),
    )


def test_bad_layer_type():
    _raises("layer_types contains 'mamba'", layer_types=(LINEAR, "mamba", LINEAR, FULL))


def test_experts_per_tok_exceeds_experts():
    _raises("num_experts_per_tok=9 exceeds num_experts=8", num_experts_per_tok=9)


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_partial_rotary_factor_out_of_range(factor):
    _raises(f"partial_rotary_factor={factor} must be in (0, 1]", partial_rotary_factor=factor)


def test_partial_rotary_factor_odd_rotary_dim():
    # head_dim 32 * 0.09375 = 3: rotate-half needs an even width.
    _raises("must be a positive even number", partial_rotary_factor=0.09375)


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_bad_dtype(field):
    _raises(f"{field}='bf16' must be one of", **{field: "bf16"})


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("hidden_size", 0, "hidden_size=0 must be a positive integer."),
        ("num_experts", -2, "num_experts=-2 must be a positive integer."),
        ("head_dim", 32.0, "head_dim=32.0 must be a positive integer."),
        ("num_mtp_layers", -1, "num_mtp_layers=-1 must be non-negative."),
        ("rms_norm_eps", 0.0, "rms_norm_eps=0.0 must be positive."),
        ("remat_policy", "some", "remat_policy='some' must be one of"),
        ("attention_backend", "flash", "attention_backend='flash' must be one of"),
        ("gdn_backend", "triton", "gdn_backend='triton' must be one of 'auto', 'chunk'"),
        ("moe_backend", "gmm", "moe_backend='gmm' must be one of 'auto', 'ragged_dot'"),
        ("mlp_only_layers", (4,), "mlp_only_layers contains 4, outside 0..3."),
        ("moe_capacity_factor", 0.0, "moe_capacity_factor=0.0 must be positive or None."),
    ],
)
def test_other_mistakes(field, value, msg):
    _raises(msg, **{field: value})


def test_one_sentence_per_mistake():
    """The message is a single sentence naming the offending values, not a traceback dump."""
    with pytest.raises(ValueError) as info:
        tiny(num_attention_heads=6, num_key_value_heads=4)
    msg = str(info.value)
    assert msg.count(".") == 1 and msg.endswith(".") and "\n" not in msg


def test_from_dict_unknown_field():
    d = tiny().to_dict()
    d["num_heads"] = 4
    with pytest.raises(ValueError, match="Unknown ModelConfig field 'num_heads'"):
        ModelConfig.from_dict(d)


def test_dict_round_trip():
    cfg = tiny(layer_types=(LINEAR, FULL, LINEAR, FULL), mlp_only_layers=(1,))
    d = cfg.to_dict()
    assert isinstance(d["layer_types"], list)
    back = ModelConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.layer_types, tuple) and isinstance(back.mlp_only_layers, tuple)


def test_frozen_and_replace_validates():
    cfg = tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    with pytest.raises(ValueError, match="num_experts_per_tok=20 exceeds num_experts=8"):
        cfg.replace(num_experts_per_tok=20)


def test_resolved_layer_types_from_interval():
    cfg = tiny(num_hidden_layers=8, full_attention_interval=4)
    assert cfg.resolved_layer_types == (LINEAR, LINEAR, LINEAR, FULL) * 2
    assert tiny(num_hidden_layers=3, full_attention_interval=1).resolved_layer_types == (FULL,) * 3


# ------------------------------------------------------------------------------------ 80B preset
def test_80b_preset_matches_spec():
    cfg = qwen3_next_80b_a3b()
    assert cfg == ModelConfig()
    assert cfg.hidden_size == 2048
    assert cfg.num_hidden_layers == 48
    types = cfg.resolved_layer_types
    assert len(types) == 48
    assert [i for i, t in enumerate(types) if t == FULL] == list(range(3, 48, 4))
    assert all(t == LINEAR for i, t in enumerate(types) if i % 4 != 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 2, 256)
    assert cfg.rotary_dim == 64
    assert cfg.rope_theta == 1e7
    assert cfg.attn_output_gate
    assert cfg.max_position_embeddings == 262144
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (16, 32)
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim) == (128, 128)
    assert (cfg.gdn_key_dim, cfg.gdn_value_dim) == (2048, 4096)
    assert cfg.linear_conv_kernel_dim == 4
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (512, 10, 512)
    assert cfg.shared_expert_intermediate_size == 512
    assert cfg.norm_topk_prob
    assert cfg.mlp_only_layers == ()
    assert cfg.vocab_size == 151936
    assert cfg.tie_word_embeddings is False
    assert cfg.rms_norm_eps == 1e-6
    assert cfg.num_mtp_layers == 1
    assert cfg.initializer_range == 0.02
    # Overrides go through validation.
    assert qwen3_next_80b_a3b(num_mtp_layers=0).num_mtp_layers == 0


# --------------------------------------------------------------------------------- Hugging Face
def _real_hf_config(**changes):
    """Shaped like the released Qwen3-Next-80B-A3B config.json (transformers v4 layout)."""
    d = {
        "architectures": ["Qwen3NextForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "decoder_sparse_step": 1,
        "eos_token_id": 151645,
        "full_attention_interval": 4,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 5120,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_next",
        "moe_intermediate_size": 512,
        "norm_topk_prob": True,
        "num_attention_heads": 16,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "num_hidden_layers": 48,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 512,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    d.update(changes)
    return d


def _same_architecture(a: ModelConfig, b: ModelConfig):
    """Equal up to layer_types being explicit in one and derived in the other."""
    assert a.resolved_layer_types == b.resolved_layer_types
    assert a.replace(layer_types=None) == b.replace(layer_types=None)


def test_from_hf_config_real_80b():
    cfg = ModelConfig.from_hf_config(_real_hf_config())
    _same_architecture(cfg, qwen3_next_80b_a3b())
    assert cfg.num_mtp_layers == 1  # num_nextn_predict_layers absent -> 1
    assert isinstance(cfg.rope_theta, float) and cfg.rope_theta == 1e7


def test_from_hf_config_v5_rope_parameters_and_layer_types():
    d = _real_hf_config(num_nextn_predict_layers=2)
    del d["rope_theta"], d["partial_rotary_factor"]
    d["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "partial_rotary_factor": 0.5,
    }
    d["layer_types"] = [FULL if (i + 1) % 4 == 0 else LINEAR for i in range(48)]
    cfg = ModelConfig.from_hf_config(d)
    assert cfg.rope_theta == 5e6
    assert cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 128
    assert cfg.num_mtp_layers == 2
    assert cfg.resolved_layer_types == qwen3_next_80b_a3b().resolved_layer_types


def test_from_hf_config_path_and_overrides(tmp_path):
    import json

    p = tmp_path / "config.json"
    p.write_text(json.dumps(_real_hf_config()))
    cfg = ModelConfig.from_hf_config(str(p), dtype="float32", num_mtp_layers=0)
    assert cfg.dtype == "float32" and cfg.num_mtp_layers == 0
    assert cfg.hidden_size == 2048


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        tiny(
            layer_types=(FULL, LINEAR, LINEAR, FULL),
            mlp_only_layers=(2,),
            tie_word_embeddings=True,
            num_mtp_layers=2,
            norm_topk_prob=False,
            shared_expert_intermediate_size=0,
            partial_rotary_factor=0.5,
        ),
        qwen3_next_80b_a3b(),
    ],
)
def test_hf_config_round_trip(cfg):
    hf = cfg.to_hf_config()
    assert hf["model_type"] == "qwen3_next"
    # Fields HF has no name for (numerics, execution knobs) travel as overrides.
    knobs = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name
        in (
            "dtype",
            "param_dtype",
            "gdn_chunk_size",
            "router_init_normalize",
            "scan_layers",
            "remat_policy",
            "attention_backend",
            "gdn_backend",
            "moe_backend",
            "moe_capacity_factor",
            "attn_output_gate",
        )
    }
    back = ModelConfig.from_hf_config(hf, **knobs)
    _same_architecture(back, cfg)
    # And HF -> ours -> HF is the identity on the HF dict.
    assert ModelConfig.from_hf_config(hf).to_hf_config() == hf


def test_from_hf_config_rejects_other_model_types():
    with pytest.raises(
        ValueError, match=re.escape("model_type='qwen2_moe'; expected 'qwen3_next'")
    ):
        ModelConfig.from_hf_config(_real_hf_config(model_type="qwen2_moe"))


def test_from_hf_config_rejects_rope_scaling_and_sparse_step():
    with pytest.raises(ValueError, match="rope_scaling=.* is not supported"):
        ModelConfig.from_hf_config(
            _real_hf_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})
        )
    with pytest.raises(ValueError, match="decoder_sparse_step=2 is not supported"):
        ModelConfig.from_hf_config(_real_hf_config(decoder_sparse_step=2))


def test_from_hf_config_validates():
    with pytest.raises(ValueError, match="num_attention_heads=6 is not a multiple"):
        ModelConfig.from_hf_config(_real_hf_config(num_attention_heads=6, num_key_value_heads=4))
