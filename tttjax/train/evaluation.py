"""Held-out evaluation: the v-prediction loss on a validation split at fixed timesteps.

    config.eval_every = 500
    config.eval = dict(split="validation", batches=2, timesteps=(100, 500, 900), seed=0)

Every `eval_every` steps the trainer calls `HeldOutEval(params)`, which returns

    {"eval_loss": mean over the timesteps, "eval_loss_t100": ..., "eval_loss_t500": ...}

The number is deterministic, so two evaluations differ only because the parameters did:
the same `batches` global batches (the split's first examples in order, no shuffling, read
once when the run starts and kept on the host), the same noise (drawn from `seed` for each
batch) and, instead of the training's random timesteps, every one of `timesteps` for every
example; no prompt dropout; for the `latents` dataset the posterior mean, not a sample. One
loss per timestep shows where the model improves (low t: detail, high t: layout); their
mean is the headline number.

For the toon world, `config.eval.video_steps` also samples a short video of a held-out
storyboard at each evaluation and logs it to TensorBoard (`tttjax.train.eval_video`).
`python -m tttjax.sample --workdir WORKDIR` samples from any checkpoint.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.data import loader as data_loader
from tttjax.diffusion.loss import v_loss
from tttjax.diffusion.schedule import NoiseSchedule, add_noise, v_target


class HeldOutEval:
    """The held-out loss of a run's model (see the module doc); call with the parameters."""

    def __init__(self, config, mesh, spec, batch_shardings: dict, batch_shapes: dict):
        ev = config.eval
        self.timesteps = tuple(int(t) for t in ev.timesteps)
        held_out = copy.deepcopy(config)
        with held_out.unlocked():
            held_out.data.split = ev.split
        try:
            source, transform = data_loader.open_training_source(held_out)
        except ValueError as err:
            raise ValueError(f"config.eval.split: {err}; set config.eval.split to one of them, "
                             "or config.eval_every=0") from None
        if len(source) == 0:
            raise ValueError(f"config.eval.split {ev.split!r} has no examples of "
                             f"{config.stage.num_segments} segments; choose another split or "
                             "set config.eval_every=0")
        keys = ("latents", "text")
        self.shardings = {k: batch_shardings[k] for k in keys}
        self.shapes = {k: batch_shapes[k] for k in keys}
        global_batch = self.shapes["latents"][0]
        shard_index, shard_count = data_loader.host_rows(self.shardings["latents"],
                                                         self.shapes["latents"])
        loader = data_loader.make_loader(source, transform, global_batch=global_batch,
                                         shard_index=shard_index, shard_count=shard_count,
                                         seed=0, shuffle=False, worker_count=0)
        it = iter(loader)
        # Host copies, read once: every evaluation sees exactly these examples.
        self.batches = [{k: v for k, v in next(it).items() if k in keys}
                        for _ in range(ev.batches)]
        self._losses = _losses_fn(spec, NoiseSchedule(**config.diffusion.to_dict()),
                                  self.timesteps, int(ev.seed), self.shardings, mesh)

    def __call__(self, params) -> dict[str, float]:
        """{"eval_loss", "eval_loss_t<T>" for each T} of `params` (host floats)."""
        per_batch = []
        for i, local in enumerate(self.batches):
            batch = {k: jax.make_array_from_process_local_data(self.shardings[k], local[k],
                                                               self.shapes[k])
                     for k in self.shardings}
            per_batch.append(self._losses(params, batch, jnp.int32(i)))
        losses = jax.device_get(jnp.mean(jnp.stack(per_batch), axis=0))
        out = {"eval_loss": float(losses.mean())}
        out.update({f"eval_loss_t{t}": float(v) for t, v in zip(self.timesteps, losses)})
        return out


def _losses_fn(spec, schedule: NoiseSchedule, timesteps: tuple[int, ...], seed: int,
               batch_shardings: dict, mesh):
    """jit(params, batch, index) -> float32 [len(timesteps)]: the mean v loss of the batch
    with noise fixed by (seed, index), at each timestep."""
    dtype = jnp.dtype(spec.config.dtype)
    replicated = NamedSharding(mesh, PartitionSpec())

    def losses(params, batch, index):
        x0 = batch["latents"].astype(jnp.float32)
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), x0.shape,
                                  jnp.float32)
        text = batch["text"].astype(dtype)

        def at(t):
            tt = jnp.full((x0.shape[0],), t, jnp.int32)
            inputs = {"x_t": add_noise(x0, noise, tt, schedule).astype(dtype), "text": text,
                      "t": tt, "target": v_target(x0, noise, tt, schedule)}
            return v_loss(lambda x, txt, ts: spec.apply(params, x, txt, ts), inputs)

        # One forward pass at a time (lax.map), so evaluation needs no more memory than one.
        return jax.lax.map(at, jnp.asarray(timesteps, jnp.int32))

    return jax.jit(losses, in_shardings=(spec.shardings, batch_shardings, replicated),
                   out_shardings=replicated)
