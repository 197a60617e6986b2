"""Device mesh, logical-axis rules and activation sharding constraints.

Model code names logical axes only (``('batch', 'seq', 'act_embed')``); a rules table maps each
logical name to mesh axes. Outside an active :func:`use_mesh` context every constraint is a no-op,
so the same model runs unsharded in tests and notebooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. Parameters use 'embed'/'mlp'/...; activations use 'act_*' names so a
# parameter's fsdp axis never collides with the batch axes of the activations that meet it.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": (),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": (),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "expert_mlp": ("tensor",),
    "conv": (),
    "norm": (),
}


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]]


_CONTEXT: list[ShardingContext] = []


def _axis_sizes(shape: Mapping[str, int] | None, num_devices: int, what: str) -> list[int]:
    """Sizes in MESH_AXES order for ``shape`` over ``num_devices``; one size may be -1."""
    shape = dict(shape or {})
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{what} axis {unknown[0]!r} is unknown; expected names from {MESH_AXES}.")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"{what} {shape} has more than one axis of size -1; at most one may be.")
    for a, s in zip(MESH_AXES, sizes, strict=True):
        if s == 0 or s < -1:
            raise ValueError(f"{what} axis {a!r} has size {s}; expected a positive size or -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"{what} {shape}: {num_devices} devices are not divisible by the fixed axes' "
                f"product {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{what} {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
            f"devices, but {num_devices} are available."
        )
    return sizes


def make_mesh(
    shape: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    dcn_shape: Mapping[str, int] | None = None,
) -> Mesh:
    """Builds the ('data','fsdp','expert','tensor') mesh.

    ``shape`` is the parallelism inside one slice (ICI; one size may be -1 = the rest) and
    ``dcn_shape`` the parallelism across slices (multi-slice TPU over the data-centre network;
    default all 1, no -1). Each mesh axis has size shape[a] * dcn_shape[a], with the slice index
    outermost, so collectives over an axis with dcn size 1 (the expert all-to-all, fsdp gathers)
    stay inside a slice. On TPU the ICI part follows the physical torus
    (``mesh_utils.create_device_mesh`` / ``create_hybrid_device_mesh``); elsewhere devices are
    laid out in order.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: int(v) for a, v in (dcn_shape or {}).items()}
    bad = [(a, v) for a, v in dcn.items() if v < 1]
    if bad:
        raise ValueError(
            f"dcn_mesh axis {bad[0][0]!r} has size {bad[0][1]}; expected a positive size (no -1)."
        )
    num_slices = math.prod(dcn.values())
    if len(devices) % num_slices:
        raise ValueError(
            f"dcn_mesh {dcn} asks for {num_slices} slices, but {len(devices)} devices do not "
            f"split into {num_slices} equal slices."
        )
    ici = _axis_sizes(shape, len(devices) // num_slices, "mesh")
    dcn_sizes = _axis_sizes(dcn, num_slices, "dcn_mesh")
    tpu = devices[0].platform == "tpu"
    if num_slices > 1:
        if not tpu or not hasattr(devices[0], "slice_index"):
            raise ValueError(
                f"dcn_mesh {dcn} needs TPU devices that know their slice; got "
                f"{devices[0].platform} devices."
            )
        dev_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn_sizes, devices, allow_split_physical_axes=True
        )
    elif tpu and len(devices) > 1:
        dev_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    else:
        dev_array = np.asarray(devices).reshape(ici)
    return Mesh(dev_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of an experiment config: ``config.mesh`` (ICI) and ``config.dcn_mesh`` if set."""
    dcn = config.get("dcn_mesh")
    return make_mesh(config.mesh.to_dict(), devices, dcn.to_dict() if dcn is not None else None)


def logical_to_spec(
    axes: Sequence[str | None], rules: Mapping[str, tuple[str, ...]], mesh: Mesh | None = None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec.

    A mesh axis is used at most once (first dimension wins) and axes of size 1 are dropped, so any
    rules table yields a valid spec.
    """
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}.")
        mesh_axes = []
        for m in rules[name]:
            if m in used or (mesh is not None and mesh.shape.get(m, 1) == 1):
                continue
            used.add(m)
            mesh_axes.append(m)
        spec.append(
            tuple(mesh_axes) if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None)
        )
    return PartitionSpec(*spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Sequence[str]] | None = None) -> Iterator[Mesh]:
    """Activates ``mesh`` and ``rules`` for :func:`constrain` and the expert-parallel MoE."""
    merged = dict(DEFAULT_RULES)
    merged.update({k: tuple(v) for k, v in (rules or {}).items()})
    _CONTEXT.append(ShardingContext(mesh, merged))
    try:
        yield mesh
    finally:
        _CONTEXT.pop()


def current() -> ShardingContext | None:
    return _CONTEXT[-1] if _CONTEXT else None


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu': the platform the code is being traced for.

    The active mesh's devices decide (an ahead-of-time compile for a TPU topology traces on a CPU
    host with abstract TPU devices); without a mesh, JAX's default backend. Kernel backends set to
    "auto" resolve against this, never against ``jax.default_backend()`` directly.
    """
    ctx = current()
    if ctx is not None:
        platform = ctx.mesh.devices.flat[0].platform
        return "gpu" if platform in ("cuda", "rocm") else platform
    return jax.default_backend()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes; identity outside :func:`use_mesh`."""
    ctx = current()
    if ctx is None:
        return x
    spec = logical_to_spec(axes, ctx.rules, ctx.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def named_sharding(axes: Sequence[str | None], ctx: ShardingContext | None = None) -> NamedSharding:
    ctx = ctx or current()
    if ctx is None:
        raise RuntimeError("named_sharding needs an active use_mesh(...) context.")
    return NamedSharding(ctx.mesh, logical_to_spec(axes, ctx.rules, ctx.mesh))
