"""The jitted training step: loss, gradients, guarded optimiser update.

    params, opt_state, counters, metrics = step(params, opt_state, counters, batch)

- one step is one optimiser update over the global batch. With `grad_accum_steps` k > 1
  the batch is split into k micro-batches inside the step (a `lax.scan`: one micro-batch's
  activations live at a time) whose float32 gradients are averaged, as in MaxText; the
  update equals that of the whole batch at once up to summation order;
- the key of step `s` is `fold_in(PRNGKey(seed), s)`: timesteps, noise, prompt dropout and
  posterior samples of a step are drawn for the whole global batch, so they are fixed by the
  seed and the step number, whatever k or the sharding (exact resume);
- parameters outside the stage's trainable set enter the model through `stop_gradient`
  (their gradient is zero and the optimiser gives them a zero update);
- a non-finite loss, gradient norm or updated parameter keeps the previous parameters and
  optimiser state (`jnp.where` on every leaf) and is counted (`nonfinite_total`,
  `nonfinite_in_a_row`): non-finite values never reach the parameters (or a checkpoint);
- jitted with explicit in/out shardings (parameters and optimiser state as the logical rules
  say, the batch split over the `batch` mesh axes, counters replicated), parameters and
  optimiser state donated.

counters (int32 scalars): step (steps run), updates (optimiser updates applied: steps whose
loss, gradients and updated parameters were finite),
nonfinite_in_a_row, nonfinite_total. metrics (float32 scalars): loss, grad_norm, finite,
lr_pretrained, lr_new (the rates of the update this step made or would have made).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from tttjax.diffusion.loss import noised_inputs, v_loss
from tttjax.diffusion.schedule import NoiseSchedule
from tttjax.train.model_state import ModelSpec

COUNTERS = ("step", "updates", "nonfinite_in_a_row", "nonfinite_total")


def initial_counters() -> dict[str, jax.Array]:
    return {k: jnp.zeros((), jnp.int32) for k in COUNTERS}


def make_train_step(spec: ModelSpec, tx: optax.GradientTransformation, *, trainable: Any,
                    schedule: NoiseSchedule, schedules: dict[str, Callable], seed: int,
                    prompt_dropout: float, grad_accum_steps: int, param_shardings: Any,
                    opt_shardings: Any, batch_shardings: Any, mesh,
                    compiler_options: dict | None = None) -> Callable:
    """The jitted step (see the module doc). `trainable` is a bool tree like the params."""
    base_key = jax.random.PRNGKey(seed)
    dtype = jnp.dtype(spec.config.dtype)
    replicated = NamedSharding(mesh, PartitionSpec())

    batch_spec = next(iter(batch_shardings.values())).spec if batch_shardings else ()
    batch_axes = batch_spec[0] if len(batch_spec) else None

    def micro_batches(x):
        """[G, ...] -> [k, G / k, ...]; micro-batch j takes the j-th slice of every batch
        shard's local rows, so splitting moves no data between devices."""
        axes = batch_axes if isinstance(batch_axes, tuple) else (batch_axes,) if batch_axes else ()
        shards = 1
        for a in axes:
            shards *= mesh.shape[a]
        rest = (None,) * (x.ndim - 1)
        x = x.reshape(shards, grad_accum_steps, x.shape[0] // (shards * grad_accum_steps),
                      *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1).reshape(grad_accum_steps, -1, *x.shape[3:])
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, PartitionSpec(None, batch_axes, *rest)))

    def step(params, opt_state, counters, batch):
        key = jax.random.fold_in(base_key, counters["step"])
        inputs = noised_inputs(batch, key, schedule, prompt_dropout=prompt_dropout, dtype=dtype)
        inputs.pop("prompt_kept")

        def loss_fn(p, micro):
            p = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), p, trainable)
            return v_loss(lambda x, txt, t: spec.apply(p, x, txt, t), micro)

        if grad_accum_steps == 1:
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs)
        else:
            loss, grads = accumulate(params, jax.tree.map(micro_batches, inputs), loss_fn)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite &= jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)
                                     if jnp.issubdtype(x.dtype, jnp.inexact)]))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state_out = keep(new_params, params), keep(new_opt_state, opt_state)

        updates_done = counters["updates"] + finite.astype(jnp.int32)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
        for group, fn in schedules.items():  # the rate the next update uses
            metrics[f"lr_{group}"] = jnp.asarray(fn(counters["updates"]), jnp.float32)
        bad = (~finite).astype(jnp.int32)
        counters = {
            "step": counters["step"] + 1,
            "updates": updates_done.astype(jnp.int32),
            "nonfinite_in_a_row": (counters["nonfinite_in_a_row"] + bad) * bad,
            "nonfinite_total": counters["nonfinite_total"] + bad,
        }
        return params, opt_state_out, counters, metrics

    def accumulate(params, micro_inputs, loss_fn):
        """Mean loss and gradients over the leading (micro-batch) axis of `micro_inputs`.
        Only trainable leaves are accumulated (float32, sharded like their parameters);
        frozen ones get zeros, which is what their stop_gradient gives anyway."""
        leaves, treedef = jax.tree.flatten(params)
        mask = treedef.flatten_up_to(trainable)
        shardings = treedef.flatten_up_to(param_shardings)
        kept = [i for i, m in enumerate(mask) if m]

        def body(carry, micro):
            loss_sum, sums = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, micro)
            g = jax.tree.leaves(grads)
            sums = [s + g[i].astype(jnp.float32) for s, i in zip(sums, kept)]
            return (loss_sum + loss, sums), None

        zeros = [jax.lax.with_sharding_constraint(jnp.zeros(leaves[i].shape, jnp.float32),
                                                  shardings[i]) for i in kept]
        (loss_sum, sums), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                           micro_inputs)
        grads = [jnp.zeros_like(x) for x in leaves]
        for s, i in zip(sums, kept):
            grads[i] = (s / grad_accum_steps).astype(leaves[i].dtype)
        return loss_sum / grad_accum_steps, jax.tree.unflatten(treedef, grads)

    counter_sh = {k: replicated for k in COUNTERS}
    return jax.jit(step,
                   in_shardings=(param_shardings, opt_shardings, counter_sh, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, counter_sh, replicated),
                   donate_argnums=(0, 1), compiler_options=compiler_options)
