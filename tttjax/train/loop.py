"""The training run: `train(config, workdir)`, used by `python -m tttjax.train`.

Order of events:
  1. validate the config (no devices touched), start `jax.distributed` when the environment
     asks for several processes, build the mesh and check it against the devices;
  2. open the dataset (generated on first use) and this host's Grain loader;
  3. take the workdir's lock (`tttjax.train.workdir_lock`: a second run on it stops at once);
     check that its checkpoints hold this config's model (one line naming the differing
     config fields otherwise); resume from the newest checkpoint that verifies (integrity
     manifest, restorable, finite; newer ones that fail are set aside, said in one line),
     otherwise initialise: fresh, or from `config.checkpoint.init_from` (converted CogVideoX
     checkpoint or previous stage); only then write WORKDIR/config.json;
  4. loop: host batch -> global array -> jitted step; log, checkpoint every
     `checkpoint_every` steps and at the end; on SIGTERM or Ctrl-C save the current step and
     return (`TrainResult.interrupted` tells Ctrl-C apart).

A non-finite loss skips its update (see tttjax.train.step); `max_nonfinite_in_a_row` such
steps in a row raise `TrainingDiverged` naming the newest checkpoint (checkpoints never hold
non-finite values: `Checkpointer.save` refuses them).

What is compiled for a (config, mesh) and the step's batch layout: `tttjax/train/step_plan.py`
(`train_step_setup`, `StepSetup` stay importable from here); placing a resumed data stream:
`tttjax/train/data_position.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tttjax import compile_cache, storage
from tttjax.bench.flops import train_step_flops
from tttjax.bench.mfu import device_peak_tflops
from tttjax.data import loader as data_loader
from tttjax.sharding import make_mesh
from tttjax.train import config as config_lib
from tttjax.train import run_record
from tttjax.train.checkpoints import Checkpointer, check_workdir_fits
from tttjax.train.data_position import _position_iterator
from tttjax.train.eval_video import EvalVideo
from tttjax.train.evaluation import HeldOutEval
from tttjax.train.metrics import MetricsLogger
from tttjax.train.model_state import load_params
from tttjax.train.preemption import PreemptionWatch
from tttjax.train.profiling import StepProfiler
from tttjax.train.step import initial_counters
from tttjax.train.step_plan import (  # noqa: F401 - StepSetup, train_step_setup, _plan: re-exported
    StepSetup, _batch_shardings, _check_example_shapes, _global_shapes, _plan,
    _tokens_per_step, train_step_setup)
from tttjax.train.workdir_lock import WorkdirLock, WorkdirLockLost


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclasses.dataclass
class TrainResult:
    step: int                      # train steps done (one optimiser update each)
    updates: int                   # optimiser updates applied
    nonfinite_total: int
    preempted: bool
    last_checkpoint: int | None
    records: list[dict]            # metric records logged by this call
    interrupted: bool = False      # stopped by Ctrl-C (SIGINT) rather than SIGTERM / stop_at


def _initialize_distributed() -> None:
    from tttjax.distributed import initialize_from_env

    initialize_from_env()


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at: int | None = None
          ) -> TrainResult:
    """Runs (or resumes) training as configured; see the module doc.

    `stop_at` ends this call after that many steps in total, saving a checkpoint as a
    preemption would (for time-limited jobs and tests); the next call resumes from it.
    Raises `WorkdirBusy` (a ValueError) at once when another run holds the workdir.
    """
    started = time.perf_counter()
    config_lib.validate(config)
    _initialize_distributed()
    # One run per workdir: process 0 holds the lock (the other hosts belong to its run).
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, compile_cache.persistent(compile_cache.directory(config, workdir)):
        return _train(config, workdir, stop_at, started,
                      lock_lost=lambda: getattr(lock, "lost", None))


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at: int | None,
           started: float, lock_lost: Callable[[], str | None] = lambda: None) -> TrainResult:
    num_devices = config_lib.mesh_device_count(config, jax.device_count(), jax.process_count())
    sizes = config_lib.validate_mesh(config, num_devices)
    config = config_lib.resolve_accumulation(config, sizes)
    mesh = make_mesh(sizes, devices=jax.devices()[:num_devices], **config_lib.mesh_layout(config))
    rules = config_lib.rules(config)
    is_primary = jax.process_index() == 0
    workdir = storage.resolve(workdir)      # local: absolute; gs://...: as given
    storage.path(workdir).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- data
    source, transform = data_loader.open_training_source(config)
    with_logvar = config.data.dataset == "latents"
    global_batch = config.train.global_batch_size
    batch_sh = _batch_shardings(config, mesh, rules, with_logvar)
    shapes = _global_shapes(config, global_batch, with_logvar)
    _check_example_shapes(source, transform, shapes)
    shard_index, shard_count = data_loader.host_rows(batch_sh["latents"], shapes["latents"])
    loader = data_loader.make_loader(
        source, transform, global_batch=global_batch, shard_index=shard_index,
        shard_count=shard_count,
        seed=config.seed, shuffle=config.data.shuffle, worker_count=config.data.worker_count)
    iterator = iter(loader)

    # ---------------------------------------------------------------- model and optimiser
    plan = _plan(config, mesh, rules)
    spec, step_fn = plan.spec, plan.step_fn
    evaluator = (HeldOutEval(config, mesh, spec, batch_sh, shapes)
                 if config.get("eval_every", 0) else None)
    # compiled here, next to the train step, not at the first evaluation
    eval_video = (EvalVideo(config, mesh, rules, spec)
                  if evaluator is not None and config.eval.get("video_steps", 0) else None)
    record = run_record.collect(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    check_workdir_fits(workdir, config, spec.abstract)   # before anything is written
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    messages = []
    try:
        restored = ckpt.restore_newest_intact(spec.abstract, plan.abstract_opt, iterator)
    except BaseException:
        ckpt.close()
        raise
    latest = restored.step if restored is not None else None
    if restored is not None:
        params, opt_state, meta = restored.params, restored.opt_state, restored.meta
        counters = {k: jax.device_put(np.int32(meta["counters"][k]), replicated)
                    for k in meta["counters"]}
        if restored.rejected:
            steps = ", ".join(str(s) for s, _ in restored.rejected)
            why = "; ".join(f"step {s}: {r}" for s, r in restored.rejected)
            messages.append(f"checkpoint step{'s' if len(restored.rejected) > 1 else ''} "
                            f"{steps} failed verification ({why}); resuming from step "
                            f"{latest}, the newest that verifies (the failed ones are in "
                            f"{ckpt.rejected_directory})")
        if not restored.data_restored:
            _position_iterator(iterator, meta["examples_consumed"] // shard_count, shard_index,
                               shard_count, config.data.worker_count,
                               global_batch // shard_count)
        if not restored.rejected:
            messages.append(f"resumed from {ckpt.directory}/{latest} (step {latest})")
    else:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            if config.checkpoint.init_from:
                params, report = load_params(spec, config.checkpoint.init_from, config.seed,
                                             dict(config.train.compiler_options) or None)
                messages.append(report)
            else:
                params = plan.init_params()
        opt_state = plan.init_opt(params)
        counters = {k: jax.device_put(v, replicated) for k, v in initial_counters().items()}
    start = int(counters["step"])
    if is_primary:   # the run is known to be valid: say what it is
        storage.write_text_atomic(os.path.join(workdir, "config.json"),
                                  config.to_json(indent=2, sort_keys=True))

    if is_primary:   # what ran (tttjax.train.run_record); also in every checkpoint's meta
        epath.Path(workdir, "run.json").write_text(json.dumps(record, indent=2, sort_keys=True))
    logger = MetricsLogger(workdir, total_steps=config.steps, start_step=start,
                           tokens_per_step=_tokens_per_step(config, global_batch),
                           enabled=is_primary,
                           progress_bar=config.train.progress_bar,
                           model_flops_per_step=train_step_flops(config), num_devices=mesh.size,
                           peak_tflops=device_peak_tflops(mesh.devices.flat))
    for m in messages:
        logger.message(m)
    watch = PreemptionWatch()
    profiler = StepProfiler(config.get("profile"), workdir, jax.process_index())
    records, pending = [], []
    last_saved = latest
    preempted = False

    def save(step_done: int) -> bool:
        host = {k: int(v) for k, v in jax.device_get(counters).items()}
        meta = {"counters": host, "examples_consumed": step_done * global_batch,
                "config": json.loads(config.to_json()), "run": record}
        refused = ckpt.save(step_done, params, opt_state, meta, iterator.get_state())
        if refused:
            logger.message(refused)
        return not refused

    def check_diverged(in_a_row: int, at_step: int) -> None:
        if in_a_row >= config.train.max_nonfinite_in_a_row:
            raise TrainingDiverged(
                f"stopping at step {at_step}: {in_a_row} non-finite losses in a row (their "
                "updates were skipped); lower the learning rate or check the data; newest "
                "checkpoint (checkpoints hold only finite values): "
                f"{'step ' + str(last_saved) if last_saved is not None else 'none'}")

    try:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            for step in range(start, config.steps):
                local = next(iterator)
                batch = {k: jax.make_array_from_process_local_data(batch_sh[k], local[k], shapes[k])
                         for k in batch_sh}
                previous = counters  # not donated: readable after the next step is queued
                with profiler.step(step):
                    params, opt_state, counters, metrics = step_fn(params, opt_state, counters,
                                                                   batch)
                pending.append(metrics)
                done = step + 1
                profiler.step_done(done, metrics)
                if step == start:
                    jax.block_until_ready(metrics)   # compilation is not throughput
                    logger.reset_clock(done)
                    logger.message(f"start-up: {time.perf_counter() - started:.1f} s to the "
                                   f"first step (compile cache: "
                                   f"{compile_cache.directory(config, workdir) or 'off'})")
                else:
                    check_diverged(int(previous["nonfinite_in_a_row"]), done - 1)
                logger.advance()
                ckpt.check()   # a failed background save stops the run now, one line
                lost = lock_lost()
                if lost:       # another run owns the workdir now: write nothing more
                    raise WorkdirLockLost(f"stopped at step {done} without saving: {lost}")
                if done % config.log_every == 0 or done == config.steps:
                    window = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
                    pending = []
                    host_counters = {k: int(v) for k, v in jax.device_get(counters).items()}
                    records.append(logger.log(done, window, host_counters))
                    check_diverged(host_counters["nonfinite_in_a_row"], done)
                if evaluator is not None and done % config.eval_every == 0:
                    logger.log_eval(done, evaluator(params))
                    if eval_video is not None:
                        logger.log_eval_video(done, eval_video(params), eval_video.captions)
                preempted = watch.requested(done) or done == stop_at
                due = done % config.checkpoint_every == 0 or done == config.steps or preempted
                if due and save(done):
                    last_saved = done
                if preempted:
                    ckpt.wait()
                    how = " (Ctrl-C)" if watch.interrupted else ""
                    logger.message(f"stopped early{how}: saved step {last_saved} to "
                                   f"{ckpt.directory}; rerun the same command to resume")
                    break
    finally:
        profiler.close()
        watch.close()
        ckpt.close()
        logger.close()
    host = {k: int(v) for k, v in jax.device_get(counters).items()}
    return TrainResult(step=host["step"], updates=host["updates"],
                       nonfinite_total=host["nonfinite_total"], preempted=preempted,
                       last_checkpoint=last_saved, records=records,
                       interrupted=preempted and watch.interrupted)

