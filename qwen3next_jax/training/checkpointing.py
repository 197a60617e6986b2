"""Checkpoints: one Orbax CheckpointManager saving train state, data-iterator state and metadata.

Layout: ``<directory>/<step>/{state,data,meta}``. ``state`` is a pytree of jax Arrays (params,
optimizer state, rng key *data* — typed PRNG keys must be converted with ``jax.random.key_data``),
restored straight onto the shardings of an abstract target. ``data`` is the grain iterator state
and ``meta`` free-form JSON (step, config fingerprint, ...).

Robustness rules:
- A step counts only when Orbax lists it (a ``<step>.orbax-checkpoint-tmp*`` folder left by a kill
  is never listed) *and* its folder holds ``commit_success.txt``, which Orbax 0.12.4 and 0.12.8
  write as the last act of finalising (before the atomic rename on local disks; as the commit
  marker on GCS). A step folder without it is unfinished and ignored.
- ``restore()`` tries the newest step first; if reading it fails (missing or truncated files) it
  warns and falls back to the next older one. Steps newer than the one restored are then moved
  aside to ``<step>.corrupt-<ns>`` so training can save those step numbers again.

Preemption: ``PreemptionGuard`` turns SIGTERM (and optionally SIGINT) into a flag;
``should_stop`` also honours Orbax's multi-host preemption sync point. The loop then saves with
``force=True``, waits and exits 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwen3next_jax.config import ConfigError

log = logging.getLogger(__name__)

COMMIT_FILE = "commit_success.txt"
_ITEMS = ("state", "data", "meta")
# Orbax splits every replicated shard across its replicas when saving ("replica-parallel"), one
# eager slice per device and array. For small arrays (norm weights, biases, optimizer counts)
# that costs thousands of tiny device programs per save (10 s per save of the tiny model on 8
# CPU devices) and buys nothing; only slices of at least this many bytes are split.
MIN_REPLICA_SLICE_BYTES = 4 << 20


@functools.cache
def _register_array_handler() -> None:
    handler = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES
    )
    # Orbax logs a warning for any override; this one is deliberate.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) matching a pytree of jax Arrays: a restore target."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
        tree,
    )


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 (hex, 16 chars) of the config as canonical JSON; equal configs, equal prints."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_name(path, prefix: str = "state") -> str:
    """'state/opt/1/count' for a tree path: Orbax's metadata stores named tuples and dataclasses
    as dicts and tuples by index, so paths compare by their names only."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join([prefix, *parts])


class Checkpointer:
    """Saves and restores (state, data_state, meta) per step under ``directory``.

    ``keep``: newest N finalised steps kept. ``save_every``: ``save`` writes only at steps that are
    positive multiples of it (or with ``force``). ``async_save``: arrays are written in the
    background; ``save`` returns once they are copied off the devices.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        save_every: int = 1000,
        async_save: bool = True,
    ):
        if keep < 1 or save_every < 1:
            raise ValueError(f"keep={keep} and save_every={save_every} must both be >= 1.")
        # Orbax's async commit wants absolute paths; a local relative one is made absolute here
        # (remote paths such as gs://... are absolute already).
        path = str(directory)
        if "://" not in path:
            path = os.path.abspath(path)
        self.directory = epath.Path(path)
        self.save_every = save_every
        _register_array_handler()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # The save cadence is decided here (save_every / force), not by Orbax.
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            # Deletes tmp folders a killed run left behind; they are never loaded either way.
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    # -------------------------------------------------------------------------------- queries
    def _is_finalised(self, step: int) -> bool:
        return (self.directory / str(step) / COMMIT_FILE).exists()

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending."""
        # Re-list the folder unless a save is in flight (a reload then would drop the pending
        # step from Orbax's bookkeeping).
        if not self.manager.is_saving_in_progress():
            self.manager.reload()
        return sorted(s for s in self.manager.all_steps() if self._is_finalised(s))

    def latest_step(self) -> int | None:
        """The newest finalised step, or None. (Not checked for corruption; ``restore`` is.)"""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ----------------------------------------------------------------------------------- save
    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any] | None,
        meta: Mapping[str, Any] | None,
        *,
        force: bool = False,
    ) -> bool:
        """Starts saving ``step``; True if a save started.

        Without ``force`` it saves only when ``step`` is a positive multiple of ``save_every`` or
        Orbax reports a preemption sync point. A step already saved is skipped (returns False).
        """
        due = (step > 0 and step % self.save_every == 0) or self.manager.reached_preemption(step)
        if not (force or due):
            return False
        if step in self.manager.all_steps():
            return False
        meta = {"step": int(step), **dict(meta or {})}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state or {})),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until every pending async save is finalised on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager's threads."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------- restore
    def _restore_step(self, step: int, abstract_state: Any):
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self.manager.restore(step, args=args)
        missing = [k for k in _ITEMS if out[k] is None]
        if missing:
            raise FileNotFoundError(f"checkpoint step {step} lacks item {missing[0]!r}.")
        return step, out["state"], dict(out["data"]), dict(out["meta"])

    def check_compatible(self, abstract_state: Any, step: int) -> None:
        """Raises ConfigError, in one sentence, if ``step``'s saved arrays differ from
        ``abstract_state`` in tree structure or shapes (dtypes may differ: restore casts).

        Reads only Orbax's metadata, so a mismatch is named before any array is read; a failed
        array restore would instead leave Orbax's worker threads printing tracebacks.
        """
        where = f"checkpoint step {step} in {self.directory}"
        check_saved_shapes(self.directory / str(step), abstract_state, where)

    def restore(
        self, abstract_state: Any, step: int | None = None
    ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data_state, meta) from ``step`` or the newest readable step; None if
        there is no checkpoint.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings (see
        ``abstract_like``); arrays come back with exactly those shardings. An explicit ``step``
        is restored or raises; without one, unreadable newer steps are skipped with a warning.
        If every step fails, the newest step's error is raised and nothing is moved.
        """
        self.wait()
        if step is not None:
            return self._restore_step(step, abstract_state)
        steps = self.all_steps()
        failed: list[tuple[int, BaseException]] = []
        for s in reversed(steps):
            try:
                result = self._restore_step(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means "try an older step"
                warnings.warn(
                    f"checkpoint step {s} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {str(e)[:300]}); trying an older one.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                failed.append((s, e))
                continue
            self._quarantine([f for f, _ in failed])
            return result
        if failed:
            raise failed[0][1]
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Renames unreadable steps out of Orbax's view (chief only) so they can be re-saved."""
        if not steps:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.corrupt-{time.time_ns()}"
                src.rename(dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("qwen3next_checkpoint_quarantine")
        self.manager.reload()

    # ----------------------------------------------------------------------------- preemption
    def reached_preemption(self, step: int) -> bool:
        """True when Orbax/JAX's multi-host preemption sync point is reached at ``step``."""
        return bool(self.manager.reached_preemption(step))

    def should_stop(
        self, step: int, guard: PreemptionGuard | None = None, *, sync_every: int = 10
    ) -> bool:
        """See the module-level ``should_stop``."""
        return should_stop(self, guard, step, sync_every=sync_every)


def should_stop(
    ckpt: Checkpointer, guard: PreemptionGuard | None, step: int, *, sync_every: int = 10
) -> bool:
    """True if ``guard`` caught a signal or Orbax reached a preemption sync point at ``step``.

    Single process: the flag is read every call. Several processes: the local flags are
    OR-reduced only at multiples of ``sync_every`` (the all-gather waits for the step in flight,
    so doing it every step would stall dispatch); every process then stops at the same step.
    Orbax's sync point (JAX's coordination service, which owns SIGTERM there) is checked always.
    """
    local = bool(guard is not None and guard.requested)
    if jax.process_count() > 1:
        if step % sync_every == 0:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
            local = bool(np.any(flags))
        else:
            local = False
    return local or ckpt.reached_preemption(step)


class PreemptionGuard:
    """Context manager: while active, SIGTERM (and SIGINT if ``sigint``) set ``requested``
    instead of killing the process; the previous handlers come back on exit.

    ``sigterm=None`` takes SIGTERM only in a single-process run: with several processes JAX's
    preemption notifier owns SIGTERM and Orbax's ``reached_preemption`` reports it in sync on
    every host, so a Python handler would only hide it. A second SIGINT raises
    KeyboardInterrupt, so Ctrl-C twice still stops a stuck run. Outside the main thread (where
    Python forbids handlers) it installs nothing and only warns.
    """

    def __init__(self, *, sigint: bool = False, sigterm: bool | None = None):
        if sigterm is None:
            sigterm = jax.process_count() == 1
        self.signals = ([signal.SIGTERM] if sigterm else []) + ([signal.SIGINT] if sigint else [])
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        log.warning("received %s: will checkpoint and stop", signal.Signals(signum).name)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "PreemptionGuard outside the main thread installs no handler.", stacklevel=2
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def check_saved_shapes(step_dir, abstract: Any, where: str, *, subtree: str | None = None):
    """ConfigError if the arrays saved under ``step_dir/state`` (or its ``subtree`` entry) differ
    from ``abstract`` in tree structure or shapes. Silent when the metadata cannot be read (the
    restore then reports what is wrong)."""
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state").tree
        if subtree is not None:
            meta = meta[subtree]
        saved = jax.tree_util.tree_flatten_with_path(meta)[0]
    except Exception:  # noqa: BLE001 - unreadable metadata: leave the verdict to the restore
        return
    prefix = "state" if subtree is None else f"state/{subtree}"
    saved = {_key_name(p, prefix): tuple(m.shape) for p, m in saved}
    wanted = {
        _key_name(p, prefix): tuple(a.shape)
        for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }
    for key, shape in wanted.items():
        if key not in saved:
            raise ConfigError(f"{where} has no array {key}, which the config needs.")
        if saved[key] != shape:
            raise ConfigError(
                f"{where} stores {key} with shape {saved[key]}, but the config expects {shape}."
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise ConfigError(
            f"{where} holds array {extra[0]}, which the config's model does not have."
        )


def save_params(directory: str | os.PathLike, params: Any, *, step: int = 0, meta=None) -> None:
    """Writes a params-only checkpoint (state = {'params': params}) at ``step``, synchronously."""
    with Checkpointer(directory, keep=1, save_every=1, async_save=False) as ckpt:
        ckpt.save(step, {"params": params}, {}, dict(meta or {}), force=True)


def _resolve_step_dir(path: str | os.PathLike) -> epath.Path:
    p = epath.Path(path)
    if (p / "state").is_dir():
        return p
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    steps = [int(c.name) for c in p.iterdir() if c.name.isdigit() and (c / COMMIT_FILE).exists()]
    if not steps:
        raise FileNotFoundError(f"no finalised checkpoint step under {p}.")
    return p / str(max(steps))


def restore_params(path: str | os.PathLike, abstract_params: Any) -> Any:
    """Only ``state['params']`` of a checkpoint, onto ``abstract_params``' shardings.

    ``path`` is a step folder, a checkpoints folder or a workdir (newest finalised step). Other
    entries of the saved state (optimizer, rng) are not read.
    """
    step_dir = _resolve_step_dir(path)
    check_saved_shapes(step_dir, abstract_params, f"checkpoint {step_dir}", subtree="params")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    ckptr = ocp.PyTreeCheckpointer()
    out = ckptr.restore(
        step_dir / "state",
        args=ocp.args.PyTreeRestore(
            item={"params": abstract_params},
            restore_args={"params": restore_args},
            partial_restore=True,
        ),
    )
    return out["params"]
