"""Training checkpoints: Orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each saved step `WORKDIR/checkpoints/<step>/` holds four items:

    params      the parameter tree (pure dict, OCDBT arrays; mesh-independent)
    opt_state   the optax state (Adam moments per group, accumulated gradients, counts)
    meta        JSON: step, counters, examples consumed, process count, the run's config
    data        the Grain iterator position, one JSON per process (Grain's Orbax handler)

and `integrity.json`, the size and SHA-256 of every file (`tttjax.train.integrity`), written
by Orbax's background save thread after the items are finalised and before the step is
committed.

Saving is asynchronous (arrays are copied off the device, then written in the background
while training goes on) and keeps the last `keep` steps, plus always the newest step known
intact (restored after verification, or saved with finite values by this run): a run whose
latest saves are unusable never rotates its last good checkpoint away. Non-finite parameters
or optimiser state are never saved (`save` refuses and says why).

`restore_newest_intact` is how a run resumes: newest step first, a step is used only if its
files match its manifest, it restores, and its parameters and optimiser state are finite;
steps that fail are moved to `WORKDIR/checkpoints_rejected/<step>` (kept for inspection,
out of Orbax's way) and the reason is returned. Restoring takes the target
shardings of the *current* mesh, so a run saved on one mesh resumes on another. The data
position is restored from the Grain state when the number of processes is unchanged;
otherwise it is rebuilt from the number of examples consumed (every host reads a
deterministic global order, so position k of the global stream is the same example for any
number of hosts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from tttjax import storage
from tttjax.train import integrity

_TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX   # Orbax's uncommitted step folder: "<step>" + this


@dataclasses.dataclass
class _IteratorSnapshot:
    """A data-iterator state frozen at save time (Grain's handler calls `get_state`).

    Saving is asynchronous: the live iterator will have moved on by the time the handler
    runs, so the handler gets the position captured when `save` was called.
    """

    state: bytes

    def get_state(self) -> bytes:
        return self.state


class CheckpointsRejected(ValueError):
    """No saved step of the workdir passes verification (exit code 2: bad input)."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...): a runtime failure, exit 1.
    The message is one line naming the step, the cause and the file."""


@dataclasses.dataclass
class _KeepStep(ocp.checkpoint_managers.PreservationPolicy):
    """Orbax preservation policy: never delete `step` (the newest step known intact)."""

    step: int | None = None

    def should_preserve(self, checkpoints, *, context):
        del context
        return [info.step == self.step for info in checkpoints]


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any
    meta: dict
    data_restored: bool
    rejected: list[tuple[int, str]]    # (step, reason) of newer steps that failed, moved aside


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


class Checkpointer:
    """Save / restore of (params, opt_state, meta, data iterator) by step."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.workdir = storage.resolve(workdir)   # local: absolute; gs://...: as given
        self.directory = os.path.join(self.workdir, "checkpoints")
        self.rejected_directory = os.path.join(self.workdir, "checkpoints_rejected")
        self.async_save = async_save
        self.keep_step = _KeepStep()
        self._pending: int | None = None
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), self.keep_step])
        async_options = (ocp.AsyncOptions(post_finalization_callback=self._on_finalized)
                         if async_save else None)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, enable_async_checkpointing=async_save,
            async_options=async_options, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _on_finalized(self) -> None:
        """Orbax's post-finalisation hook (background thread, primary process, before the
        step folder is committed): writes the step's integrity manifest."""
        step = self._pending
        tmp = self.step_dir(step) + _TMP_SUFFIX
        # Orbax renames a temporary folder into place locally; on an object store (no
        # rename) it writes the step in place and marks it committed afterwards.
        integrity.write_manifest(tmp if storage.path(tmp).is_dir() else self.step_dir(step))
        self.keep_step.step = step

    def _write_failed(self, err: Exception) -> CheckpointWriteError:
        text = " ".join(str(err).split()) or type(err).__name__
        cause = text.rsplit(": ", 1)[-1]
        files = re.findall(r'"(/[^"]+)"', text) or [getattr(err, "filename", None) or self.directory]
        kept = [s for s in self.all_steps() if s != self._pending]
        return CheckpointWriteError(
            f"saving checkpoint step {self._pending} failed: {cause} (writing {files[-1]}); "
            f"older checkpoints are kept: {', '.join(map(str, kept)) or 'none'}")

    @contextlib.contextmanager
    def _surfacing_write_errors(self):
        """Turns Orbax's background write failures into one-line CheckpointWriteErrors."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as err:  # noqa: BLE001 - Orbax/TensorStore raise many types
            raise self._write_failed(err) from None

    def check(self) -> None:
        """Raises CheckpointWriteError if a background save has failed (cheap: a flag)."""
        with self._surfacing_write_errors():
            self.manager.check_for_errors()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict, data_state: bytes | None
             ) -> str | None:
        """Starts saving `step` (asynchronously unless configured otherwise).

        Returns None, or without saving anything a one-line reason when parameters or
        optimiser state hold NaN or infinity (such a state must not become a checkpoint).
        """
        bad = integrity.nonfinite_leaves({"params": params, "opt_state": opt_state})
        if bad:
            return (f"not saving step {step}: non-finite values in {len(bad)} tensors "
                    f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
        with self._surfacing_write_errors():
            self.manager.wait_until_finished()   # the previous save's manifest is written
        self._pending = step
        items = {"params": ocp.args.StandardSave(params),
                 "opt_state": ocp.args.StandardSave(opt_state),
                 "meta": ocp.args.JsonSave(dict(meta, process_count=jax.process_count()))}
        if data_state is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_state))
        with self._surfacing_write_errors():
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
            if not self.async_save and jax.process_index() == 0:
                # Synchronous saves are committed here; the manifest follows the commit.
                integrity.write_manifest(self.step_dir(step))
                self.keep_step.step = step
        return None

    def verify(self, step: int) -> str | None:
        """None if `step`'s files match its manifest (or it has none), else the reason."""
        return integrity.verify_step(self.step_dir(step))

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any, data_iterator=None
                ) -> tuple[Any, Any, dict, bool]:
        """(params, opt_state, meta, data_restored) of `step`, placed as the abstract trees say.

        `data_restored` is False when the iterator could not take the saved Grain state (no
        data item, or a different number of processes); the caller then positions it from
        `meta["examples_consumed"]`. No verification: see `restore_newest_intact`.
        """
        params, opt_state, meta = self._restore_state(step, abstract_params, abstract_opt_state)
        return params, opt_state, meta, self._restore_data(step, meta, data_iterator)

    def _restore_state(self, step, abstract_params, abstract_opt_state):
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state)))
        return restored["params"], restored["opt_state"], meta

    def _restore_data(self, step, meta, data_iterator) -> bool:
        data_dir = os.path.join(self.step_dir(step), "data")
        use_data = (data_iterator is not None and storage.path(data_dir).is_dir()
                    and meta.get("process_count") == jax.process_count())
        if use_data:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return use_data

    def restore_newest_intact(self, abstract_params: Any, abstract_opt_state: Any,
                              data_iterator=None) -> Restored | None:
        """The newest step that verifies, restores and is finite (see the module doc); None
        when there are no checkpoints.

        Steps newer than it that failed are moved to `checkpoints_rejected/` and listed in
        `Restored.rejected`. Raises `CheckpointsRejected` (nothing moved) when no step
        passes, and ValueError when a step whose checksums match does not restore into the
        given trees (another model or optimiser: not corruption, so nothing is moved).
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        rejected = []
        for step in steps:
            reason = self.verify(step)
            if reason is not None:
                rejected.append((step, reason))
                continue
            try:
                params, opt_state, meta = self._restore_state(step, abstract_params,
                                                              abstract_opt_state)
            except Exception as err:  # noqa: BLE001 - any failure to read a step is reported
                if integrity.has_manifest(self.step_dir(step)):
                    raise ValueError(
                        f"checkpoint {self.step_dir(step)} matches its checksums but does not "
                        f"restore into this run's model and optimiser: {_first_line(err)}"
                    ) from None
                why = f"no integrity manifest and it does not restore: {_first_line(err, 120)}"
                rejected.append((step, why))
                continue
            bad = integrity.nonfinite_leaves({"params": params, "opt_state": opt_state})
            if bad:
                more = " ..." if len(bad) > 1 else ""
                rejected.append((step, f"non-finite values in {len(bad)} tensors ({bad[0]}{more})"))
                continue
            data_ok = self._restore_data(step, meta, data_iterator)
            self._set_aside([s for s, _ in rejected])
            self.keep_step.step = step
            return Restored(step, params, opt_state, meta, data_ok, rejected)
        raise CheckpointsRejected(
            f"no checkpoint in {self.directory} can be trusted: "
            + "; ".join(f"step {s}: {r}" for s, r in rejected)
            + f"; move {self.directory} aside to start afresh")

    def _set_aside(self, steps: list[int]) -> None:
        """Moves rejected steps to `checkpoints_rejected/` so that Orbax neither lists nor
        overwrites them (the run will save those step numbers again)."""
        if not steps:
            return
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tttjax_checkpoints_verified")
        if jax.process_index() == 0:
            storage.path(self.rejected_directory).mkdir(parents=True, exist_ok=True)
            for step in steps:
                target = os.path.join(self.rejected_directory, str(step))
                n = 1
                while storage.path(target).exists():
                    target = os.path.join(self.rejected_directory, f"{step}.{n}")
                    n += 1
                storage.move_tree(self.step_dir(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tttjax_checkpoints_set_aside")
        self.manager.reload()

    def wait(self) -> None:
        with self._surfacing_write_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class _DropOrbaxErrors(logging.Filter):
    """Drops ERROR records logged by Orbax, or by asyncio about Orbax's write tasks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        where = f"{os.sep}orbax{os.sep}"
        if where in (record.pathname or ""):
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is kept as it is
            return True
        return not (record.name == "asyncio" and where in text)


def quiet_orbax_errors() -> None:
    """Drops Orbax's own ERROR logs (each failing background write logs its traceback from
    several threads, hundreds of lines); for commands that report every checkpoint failure
    themselves as one line (`CheckpointWriteError`, `CheckpointsRejected`)."""
    for name in ("absl", "asyncio"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropOrbaxErrors) for f in target.filters):
            target.addFilter(_DropOrbaxErrors())


def _step_names(root: str) -> list[int]:
    """The step numbers of the folders `root/<step>` (none when `root` does not exist)."""
    folder = storage.path(root)
    if not folder.is_dir():
        return []
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit()]


def newest_intact_step(workdir: str, below: int | None = None) -> int | None:
    """The newest step of `workdir` (older than `below`) whose files match its manifest
    (without restoring it; for messages)."""
    root = os.path.join(storage.resolve(workdir), "checkpoints")
    steps = sorted(_step_names(root), reverse=True)
    for step in steps:
        if (below is None or step < below) and integrity.verify_step(os.path.join(root, str(step))) is None:
            return step
    return None


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The `meta` JSON of a saved step (latest by default), without touching arrays."""
    root = os.path.join(storage.resolve(workdir), "checkpoints")
    steps = sorted(_step_names(root))
    if not steps:
        raise ValueError(f"no checkpoints under {root}")
    step = steps[-1] if step is None else step
    for name in ("metadata", "meta.json"):
        path = storage.path(os.path.join(root, str(step), "meta", name))
        if path.is_file():
            return json.loads(path.read_text())
    raise ValueError(f"checkpoint {root}/{step} has no meta item")


def _flat(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def check_workdir_fits(workdir: str, config, abstract_params: Any) -> None:
    """Raises ValueError, one line, when `workdir` holds checkpoints whose parameter tree
    (names and shapes, from Orbax's metadata of the newest readable step) differs from
    `abstract_params`, naming the `config.model` fields that differ from the saved run's.

    Reads only metadata (no arrays); does nothing for a workdir without checkpoints.
    """
    from tttjax.train.model_state import _names

    root = os.path.join(storage.resolve(workdir), "checkpoints")
    steps = sorted(_step_names(root), reverse=True)
    for step in steps:
        try:
            stored = ocp.PyTreeCheckpointer().metadata(os.path.join(root, str(step), "params"))
            stored = getattr(stored, "item_metadata", stored)
            stored = _names(getattr(stored, "tree", stored))
            saved_config = read_meta(workdir, step).get("config") or {}
        except Exception:  # noqa: BLE001, S112 - unreadable step: verification deals with it later
            continue
        break
    else:
        return
    wanted = _names(abstract_params)
    shapes = {k: tuple(v.shape) for k, v in wanted.items()}
    if shapes == {k: tuple(getattr(v, "shape", ())) for k, v in stored.items()}:
        return
    missing, extra = set(wanted) - set(stored), set(stored) - set(wanted)
    reshaped = [k for k in set(wanted) & set(stored) if tuple(stored[k].shape) != shapes[k]]
    a = _flat(saved_config.get("model", {}), "model")
    b = _flat(json.loads(config.to_json()).get("model", {}), "model")
    fields = [f"config.{k}: {a.get(k)!r} in the checkpoints, {b.get(k)!r} now"
              for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = "; ".join(fields[:6]) + (f"; and {len(fields) - 6} more" if len(fields) > 6 else "")
    raise ValueError(
        f"{workdir} holds checkpoints (step {step}) of another model: "
        f"{len(reshaped)} parameter tensors differ in shape, {len(missing)} are new, "
        f"{len(extra)} are gone ({shown or 'the saved config does not say which fields'}); "
        f"give a new --workdir (add --config.checkpoint.init_from={workdir} to start from its "
        "weights), or run with the workdir's own model settings")
