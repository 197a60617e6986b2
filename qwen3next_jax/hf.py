"""Hugging Face interop: safetensors checkpoints <-> Qwen3Next parameters.

``from_hf(path)`` reads ``config.json`` and one or many ``*.safetensors`` files (memory-mapped,
tensor by tensor, never the whole checkpoint twice), undoes HF's grouped ``in_proj_qkvz`` /
``in_proj_ba`` rows and per-head interleaved query|gate rows, stacks per-expert tensors, and maps
``mtp.*``. ``to_hf(model, path)`` writes the original names, layouts and shards back.

MTP naming: depth 0 uses the released names (``mtp.fc``, ``mtp.pre_fc_norm_*``, ``mtp.norm``,
``mtp.layers.0``); further depths, which no release has, use the prefix ``mtp.depth{d}.`` with the
same suffixes.

Command line: ``python -m qwen3next_jax.hf --hf_dir=DIR --workdir=OUT`` writes an Orbax checkpoint
(step 0) and the resolved config that train.py / eval.py start from.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct as pystruct
import warnings
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from qwen3next_jax.config import FULL, LINEAR, ModelConfig
from qwen3next_jax.model import MTPHead, Qwen3Next

# ------------------------------------------------------------------------- safetensors I/O
_ST_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsReader:
    """Lazy, memory-mapped reader over one or many .safetensors files in a folder."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"HF checkpoint folder {folder!r} does not exist.")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {folder!r}.")
        self._where: dict[str, tuple[mmap.mmap, int, dict]] = {}
        self._maps = []
        for fname in files:
            with open(os.path.join(folder, fname), "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(mm)
            (n,) = pystruct.unpack("<Q", mm[:8])
            header = json.loads(mm[8 : 8 + n])
            header.pop("__metadata__", None)
            for name, info in header.items():
                self._where[name] = (mm, 8 + n, info)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][2]["shape"])

    def get(self, name: str) -> np.ndarray:
        mm, base, info = self._where[name]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        return np.frombuffer(mm, dtype, (end - start) // dtype.itemsize, base + start).reshape(
            info["shape"]
        )


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, arr in tensors.items():
        n = arr.nbytes
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(pystruct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------- mapping
@dataclasses.dataclass(frozen=True)
class Rule:
    """One (unstacked) model array <-> a group of HF tensors."""

    hf_names: tuple[str, ...]
    to_model: Callable[[list[np.ndarray]], np.ndarray]
    to_hf: Callable[[np.ndarray], list[np.ndarray]]
    hf_shapes: tuple[tuple[int, ...], ...]


def _t(name, shape):
    """A plain transpose of a 2-D weight (HF [out, in] <-> ours [in, out])."""
    return Rule((name,), lambda a: a[0].T, lambda w: [w.T], (shape,))


def _same(name, shape):
    return Rule((name,), lambda a: a[0], lambda w: [w], (shape,))


def _heads_in(name, heads, dim, d):
    """HF [heads*dim, D] rows -> ours [D, heads, dim]."""
    return Rule(
        (name,),
        lambda a: a[0].reshape(heads, dim, d).transpose(2, 0, 1),
        lambda w: [w.transpose(1, 2, 0).reshape(heads * dim, d)],
        ((heads * dim, d),),
    )


def _heads_out(name, heads, dim, d):
    """HF [D, heads*dim] -> ours [heads, dim, D]."""
    return Rule(
        (name,),
        lambda a: a[0].T.reshape(heads, dim, d),
        lambda w: [w.reshape(heads * dim, d).T],
        ((d, heads * dim),),
    )


def _attention_rules(cfg: ModelConfig, p: str) -> dict[str, Rule]:
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q_name = p + "self_attn.q_proj.weight"
    rules = {}
    if cfg.attn_output_gate:
        # Rows of q_proj: for head n, [query_n (H rows) | gate_n (H rows)] (spec §2.3, P1).
        def q_part(i):
            return lambda a: a[0].reshape(N, 2, H, D)[:, i].transpose(2, 0, 1)

        rules["mixer.wq_DNH"] = Rule((q_name,), q_part(0), None, ((N * 2 * H, D),))
        rules["mixer.wgate_DNH"] = Rule((q_name,), q_part(1), None, ((N * 2 * H, D),))
    else:
        rules["mixer.wq_DNH"] = _heads_in(q_name, N, H, D)
    rules["mixer.wk_DKH"] = _heads_in(p + "self_attn.k_proj.weight", K, H, D)
    rules["mixer.wv_DKH"] = _heads_in(p + "self_attn.v_proj.weight", K, H, D)
    rules["mixer.wo_NHD"] = _heads_out(p + "self_attn.o_proj.weight", N, H, D)
    rules["mixer.q_norm.weight"] = _same(p + "self_attn.q_norm.weight", (H,))
    rules["mixer.k_norm.weight"] = _same(p + "self_attn.k_norm.weight", (H,))
    return rules


def _deltanet_rules(cfg: ModelConfig, p: str) -> dict[str, Rule]:
    D, HK, HV = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    Dk, Dv, Kc = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim
    r = HV // HK
    group = 2 * Dk + 2 * r * Dv
    qkvz = p + "linear_attn.in_proj_qkvz.weight"
    ba = p + "linear_attn.in_proj_ba.weight"
    conv = p + "linear_attn.conv1d.weight"
    kd, vd = HK * Dk, HV * Dv

    # in_proj_qkvz rows are grouped by key head g: [q_g | k_g | v_{rg..rg+r-1} | z_{...}] (§2.4.1).
    def qk_part(off):
        return lambda a: a[0].reshape(HK, group, D)[:, off : off + Dk].transpose(2, 0, 1)

    def vz_part(off):
        return lambda a: (
            a[0].reshape(HK, group, D)[:, off : off + r * Dv].reshape(HV, Dv, D).transpose(2, 0, 1)
        )

    def ba_part(off):
        return lambda a: a[0].reshape(HK, 2 * r, D)[:, off : off + r].reshape(HV, D).T

    # conv1d channels are de-interleaved: [Q (all heads) | K | V] (§2.4.2, P4).
    def conv_part(lo, hi, heads, dim):
        return lambda a: a[0][lo:hi, 0, :].T.reshape(Kc, heads, dim)

    shapes_qkvz, shapes_ba = ((HK * group, D),), ((HK * 2 * r, D),)
    conv_shape = ((2 * kd + vd, 1, Kc),)
    m = "mixer."
    return {
        m + "wq_DHK": Rule((qkvz,), qk_part(0), None, shapes_qkvz),
        m + "wk_DHK": Rule((qkvz,), qk_part(Dk), None, shapes_qkvz),
        m + "wv_DHV": Rule((qkvz,), vz_part(2 * Dk), None, shapes_qkvz),
        m + "wz_DHV": Rule((qkvz,), vz_part(2 * Dk + r * Dv), None, shapes_qkvz),
        m + "wb_DH": Rule((ba,), ba_part(0), None, shapes_ba),
        m + "wa_DH": Rule((ba,), ba_part(r), None, shapes_ba),
        m + "conv_q_KHD": Rule((conv,), conv_part(0, kd, HK, Dk), None, conv_shape),
        m + "conv_k_KHD": Rule((conv,), conv_part(kd, 2 * kd, HK, Dk), None, conv_shape),
        m + "conv_v_KHD": Rule((conv,), conv_part(2 * kd, 2 * kd + vd, HV, Dv), None, conv_shape),
        m + "A_log": _same(p + "linear_attn.A_log", (HV,)),
        m + "dt_bias": _same(p + "linear_attn.dt_bias", (HV,)),
        m + "norm.weight": _same(p + "linear_attn.norm.weight", (Dv,)),
        m + "wo_HVD": _heads_out(p + "linear_attn.out_proj.weight", HV, Dv, D),
    }


def _pack_deltanet(cfg: ModelConfig, w: dict[str, np.ndarray], p: str) -> dict[str, np.ndarray]:
    """Inverse of the grouped layouts: our per-part arrays -> HF's fused tensors."""
    D, HK, HV = cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads
    r = HV // HK

    def rows(a_DHX, heads_per_group):  # [D, heads, dim] -> [HK, heads_per_group*dim, D]
        return a_DHX.transpose(1, 2, 0).reshape(HK, -1, D)

    qkvz = np.concatenate(
        [rows(w["wq_DHK"], 1), rows(w["wk_DHK"], 1), rows(w["wv_DHV"], r), rows(w["wz_DHV"], r)],
        axis=1,
    ).reshape(-1, D)
    ba = np.concatenate(
        [w["wb_DH"].T.reshape(HK, r, D), w["wa_DH"].T.reshape(HK, r, D)], axis=1
    ).reshape(-1, D)
    conv = np.concatenate(
        [w[k].reshape(w[k].shape[0], -1).T for k in ("conv_q_KHD", "conv_k_KHD", "conv_v_KHD")]
    )[:, None, :]
    return {
        p + "linear_attn.in_proj_qkvz.weight": qkvz,
        p + "linear_attn.in_proj_ba.weight": ba,
        p + "linear_attn.conv1d.weight": conv,
    }


def _ffn_rules(cfg: ModelConfig, p: str, moe: bool) -> dict[str, Rule]:
    D = cfg.hidden_size
    if not moe:
        F = cfg.intermediate_size
        return {
            "ffn.w_gate_DF": _t(p + "mlp.gate_proj.weight", (F, D)),
            "ffn.w_up_DF": _t(p + "mlp.up_proj.weight", (F, D)),
            "ffn.w_down_FD": _t(p + "mlp.down_proj.weight", (D, F)),
        }
    E, F, Fs = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size

    def experts(proj, shape):
        names = tuple(f"{p}mlp.experts.{e}.{proj}.weight" for e in range(E))
        return Rule(
            names,
            lambda a: np.stack([x.T for x in a]),
            lambda w: [x.T for x in w],
            (shape,) * E,
        )

    rules = {
        "ffn.router_DE": _t(p + "mlp.gate.weight", (E, D)),
        "ffn.w_gate_EDF": experts("gate_proj", (F, D)),
        "ffn.w_up_EDF": experts("up_proj", (F, D)),
        "ffn.w_down_EFD": experts("down_proj", (D, F)),
    }
    if Fs:
        rules.update(
            {
                "ffn.shared_expert.w_gate_DF": _t(
                    p + "mlp.shared_expert.gate_proj.weight", (Fs, D)
                ),
                "ffn.shared_expert.w_up_DF": _t(p + "mlp.shared_expert.up_proj.weight", (Fs, D)),
                "ffn.shared_expert.w_down_FD": _t(
                    p + "mlp.shared_expert.down_proj.weight", (D, Fs)
                ),
                "ffn.shared_gate_D1": _t(p + "mlp.shared_expert_gate.weight", (1, D)),
            }
        )
    return rules


def _fused_expert_rule(cfg: ModelConfig, p: str, key: str) -> Rule | None:
    """transformers>=5 may hold experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
    E, F, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    gu, dn = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
    if key == "ffn.w_gate_EDF":
        return Rule((gu,), lambda a: a[0][:, :F].transpose(0, 2, 1), None, ((E, 2 * F, D),))
    if key == "ffn.w_up_EDF":
        return Rule((gu,), lambda a: a[0][:, F:].transpose(0, 2, 1), None, ((E, 2 * F, D),))
    if key == "ffn.w_down_EFD":
        return Rule((dn,), lambda a: a[0].transpose(0, 2, 1), None, ((E, D, F),))
    return None


def _layer_rules(cfg: ModelConfig, p: str, layer_type: str, moe: bool) -> dict[str, Rule]:
    D = cfg.hidden_size
    rules = {
        "input_norm.weight": _same(p + "input_layernorm.weight", (D,)),
        "post_norm.weight": _same(p + "post_attention_layernorm.weight", (D,)),
    }
    rules.update(_deltanet_rules(cfg, p) if layer_type == LINEAR else _attention_rules(cfg, p))
    rules.update(_ffn_rules(cfg, p, moe))
    return rules


def _mtp_prefix(d: int) -> str:
    return "mtp." if d == 0 else f"mtp.depth{d}."


def _mtp_rules(cfg: ModelConfig, d: int) -> dict[str, Rule]:
    D = cfg.hidden_size
    q = _mtp_prefix(d)
    rules = {
        "pre_fc_norm_embedding.weight": _same(q + "pre_fc_norm_embedding.weight", (D,)),
        "pre_fc_norm_hidden.weight": _same(q + "pre_fc_norm_hidden.weight", (D,)),
        "fc_2DD": _t(q + "fc.weight", (D, 2 * D)),
        "norm.weight": _same(q + "norm.weight", (D,)),
    }
    for k, v in _layer_rules(cfg, q + "layers.0.", FULL, True).items():
        rules["layer." + k] = v
    return rules


def _layer_kinds(cfg: ModelConfig):
    return [(t, i not in cfg.mlp_only_layers) for i, t in enumerate(cfg.resolved_layer_types)]


def model_rules(model: Qwen3Next) -> dict[tuple, list[Rule]]:
    """Model state path -> one Rule per stacked slice (a single Rule list for unstacked arrays)."""
    cfg = model.cfg
    D, V = cfg.hidden_size, cfg.vocab_size
    out: dict[tuple, list[Rule]] = {
        ("embed_VD",): [_same("model.embed_tokens.weight", (V, D))],
        ("final_norm", "weight"): [_same("model.norm.weight", (D,))],
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head_DV",)] = [_t("lm_head.weight", (V, D))]
    period = len(model.block_kinds)
    kinds = _layer_kinds(cfg)
    for j, (t, moe) in enumerate(model.block_kinds):
        per_block = [
            _layer_rules(cfg, f"model.layers.{b * period + j}.", *kinds[b * period + j])
            for b in range(model.num_blocks)
        ]
        for key in per_block[0]:
            path = ("blocks", "layers", j, *_split_key(key))
            out[path] = [rules[key] for rules in per_block]
        assert kinds[j] == (t, moe)
    for d in range(cfg.num_mtp_layers):
        for key, rule in _mtp_rules(cfg, d).items():
            out[("mtp", d, *_split_key(key))] = [rule]
    return out


def _split_key(key: str) -> tuple:
    return tuple(key.split("."))


# ----------------------------------------------------------------------------------- load
def _read_rule(reader: SafetensorsReader, rule: Rule, path: tuple) -> np.ndarray:
    arrays = []
    for name, shape in zip(rule.hf_names, rule.hf_shapes, strict=True):
        got = reader.shape(name)
        if got != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {list(got)}; expected {list(shape)}.")
        arrays.append(reader.get(name))
    return rule.to_model(arrays)


def from_hf(path: str, dtype=jnp.float32, *, config_overrides: dict | None = None, seed: int = 0):
    """Loads an HF Qwen3-Next folder (config.json + *.safetensors) into a Qwen3Next.

    Parameters are cast to ``dtype``, which is also the compute dtype unless
    ``config_overrides`` says otherwise (A_log and dt_bias stay float32). A checkpoint without
    ``mtp.*`` tensors (transformers does not save them) gets a freshly initialised MTP head and a
    warning. Missing, unknown or mis-shaped tensors are reported by name.
    """
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} does not exist; expected an HF model folder.")
    overrides = dict(config_overrides or {})
    overrides.setdefault("param_dtype", jnp.dtype(dtype).name)
    overrides.setdefault("dtype", jnp.dtype(dtype).name)
    cfg = ModelConfig.from_hf_config(cfg_path, **overrides)
    reader = SafetensorsReader(path)
    available = reader.names()
    has_mtp = any(n.startswith("mtp.") for n in available)

    model = nnx.eval_shape(lambda: Qwen3Next(cfg, rngs=nnx.Rngs(seed)))
    rules = model_rules(model)
    if cfg.num_mtp_layers and not has_mtp:
        warnings.warn(
            f"{path} has no mtp.* tensors; the {cfg.num_mtp_layers} MTP head(s) are freshly "
            "initialised.",
            stacklevel=2,
        )
        rngs = nnx.Rngs(seed)
        model.mtp = nnx.List([MTPHead(cfg, rngs=rngs) for _ in range(cfg.num_mtp_layers)])
        rules = {k: v for k, v in rules.items() if k[0] != "mtp"}

    rules = _use_fused_experts_where_present(model, rules, available)
    expected = {n for rs in rules.values() for r in rs for n in r.hf_names}
    missing = sorted(expected - available)
    if missing:
        raise ValueError(f"checkpoint {path} lacks tensor {missing[0]!r} ({len(missing)} missing).")
    unknown = available - expected
    if not cfg.num_mtp_layers and any(n.startswith("mtp.") for n in unknown):
        warnings.warn(f"{path}: num_mtp_layers=0, so its mtp.* tensors are ignored.", stacklevel=2)
        unknown = {n for n in unknown if not n.startswith("mtp.")}
    if unknown:
        raise ValueError(
            f"checkpoint {path} has tensor {sorted(unknown)[0]!r}, which this config does not "
            f"expect ({len(unknown)} unknown)."
        )

    state = nnx.state(model)
    flat = dict(nnx.to_flat_state(state))
    for p, rs in rules.items():
        var = flat[p]
        arr = (
            np.stack([_read_rule(reader, r, p) for r in rs])
            if _stacked(p)
            else (_read_rule(reader, rs[0], p))
        )
        want = tuple(var.shape)
        if arr.shape != want:
            raise ValueError(f"{'.'.join(map(str, p))}: converted shape {arr.shape} != {want}.")
        keep_f32 = p[-1] in ("A_log", "dt_bias")
        var.set_value(jnp.asarray(arr, jnp.float32 if keep_f32 else dtype))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def _stacked(path: tuple) -> bool:
    return path[0] == "blocks"


def _use_fused_experts_where_present(model, rules, available):
    cfg = model.cfg
    period = len(model.block_kinds)
    out = dict(rules)
    for p, rs in rules.items():
        key = ".".join(map(str, p[3:])) if p[0] == "blocks" else None
        if key not in ("ffn.w_gate_EDF", "ffn.w_up_EDF", "ffn.w_down_EFD"):
            continue
        j = p[2]
        fused = []
        for b, r in enumerate(rs):
            if r.hf_names[0] in available:
                fused.append(r)
                continue
            alt = _fused_expert_rule(cfg, f"model.layers.{b * period + j}.", key)
            fused.append(alt if alt and alt.hf_names[0] in available else r)
        out[p] = fused
    return out


# ---------------------------------------------------------------------------------- write
def hf_tensors(model: Qwen3Next, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array) for every tensor of the checkpoint, layer by layer."""
    cfg = model.cfg
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    def value(p, index=None):
        a = flat[p].get_value()
        a = np.asarray(jax.device_get(a if index is None else a[index]))
        if dtype is not None and p[-1] not in ("A_log", "dt_bias"):
            a = a.astype(dtype)
        return a

    rules = model_rules(model)
    period = len(model.block_kinds)
    kinds = _layer_kinds(cfg)
    yield from _emit_simple(rules, ("embed_VD",), value)
    for L, (t, _) in enumerate(kinds):
        b, j = divmod(L, period)
        prefix = f"model.layers.{L}."
        group = {p: rs[b] for p, rs in rules.items() if p[:3] == ("blocks", "layers", j)}
        yield from _emit_layer(cfg, group, lambda p, b=b: value(p, b), prefix, t, 3)
    yield from _emit_simple(rules, ("final_norm", "weight"), value)
    if not cfg.tie_word_embeddings:
        yield from _emit_simple(rules, ("lm_head_DV",), value)
    for d in range(cfg.num_mtp_layers):
        group = {p: rs[0] for p, rs in rules.items() if p[:2] == ("mtp", d)}
        yield from _emit_layer(cfg, group, value, _mtp_prefix(d) + "layers.0.", FULL, 2)


def _emit_simple(rules, path, value):
    rule = rules[path][0]
    yield from zip(rule.hf_names, rule.to_hf(value(path)), strict=True)


def _emit_layer(cfg, group, value, prefix, layer_type, depth):
    packed: dict[str, np.ndarray] = {}
    attn_q: dict[str, np.ndarray] = {}
    for p, rule in group.items():
        key = ".".join(map(str, p[depth:])).removeprefix("layer.")
        if rule.to_hf is not None:
            yield from zip(rule.hf_names, rule.to_hf(value(p)), strict=True)
        elif layer_type == LINEAR:
            packed[key.removeprefix("mixer.")] = value(p)
        else:
            attn_q[key] = value(p)
    if packed:
        yield from _pack_deltanet(cfg, packed, prefix).items()
    if attn_q:
        q_DNH, g_DNH = attn_q["mixer.wq_DNH"], attn_q["mixer.wgate_DNH"]
        N, H, D = q_DNH.shape[1], q_DNH.shape[2], q_DNH.shape[0]
        q = np.stack([q_DNH, g_DNH], axis=2).transpose(1, 2, 3, 0).reshape(N * 2 * H, D)
        yield prefix + "self_attn.q_proj.weight", q


def to_hf(model: Qwen3Next, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors shards (with model.safetensors.index.json if >1)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        hf_cfg = model.cfg.to_hf_config()
        hf_cfg["torch_dtype"] = np.dtype(dtype or model.cfg.param_dtype).name
        json.dump(hf_cfg, f, indent=2)
    # Shards are flushed as they fill, so host memory holds one shard at a time; they get their
    # final "-of-N" names once N is known.
    written: list[tuple[str, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        tmp = os.path.join(path, f".shard-{len(written):05d}.safetensors")
        write_safetensors(tmp, shard)
        written.append((tmp, list(shard)))

    for name, arr in hf_tensors(model, dtype):
        if size and size + arr.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = np.ascontiguousarray(arr)
        size += arr.nbytes
        total += arr.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        fname = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, os.path.join(path, fname))
        weight_map.update({n: fname for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ------------------------------------------------------------------------------ command line
def main(argv=None) -> int:
    """``python -m qwen3next_jax.hf --hf_dir=DIR --workdir=OUT [--dtype=float32]``.

    Writes OUT/checkpoints/0 (params only) and OUT/model_config.json; train with
    ``--config.init_from=OUT`` and model fields matching model_config.json.
    """
    import argparse

    from qwen3next_jax.training.checkpointing import save_params

    ap = argparse.ArgumentParser(prog="python -m qwen3next_jax.hf", description=main.__doc__)
    ap.add_argument("--hf_dir", required=True, help="HF folder: config.json + *.safetensors")
    ap.add_argument("--workdir", required=True, help="output folder for the Orbax checkpoint")
    ap.add_argument("--dtype", default="float32", help="parameter dtype (float32 or bfloat16)")
    args = ap.parse_args(argv)
    try:
        model = from_hf(args.hf_dir, jnp.dtype(args.dtype))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    os.makedirs(args.workdir, exist_ok=True)
    save_params(os.path.join(args.workdir, "checkpoints"), nnx.state(model, nnx.Param))
    with open(os.path.join(args.workdir, "model_config.json"), "w") as f:
        json.dump(model.cfg.to_dict(), f, indent=2)
    print(f"wrote {args.workdir}/checkpoints/0 and model_config.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
