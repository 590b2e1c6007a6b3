"""The jitted training step: loss, gradients, guarded optimiser update.

    params, opt_state, counters, metrics = step(params, opt_state, counters, batch)

- the key of step `s` is `fold_in(PRNGKey(seed), s)`: timesteps, noise, prompt dropout and
  posterior samples of a step are fixed by the seed and the step number (exact resume);
- parameters outside the stage's trainable set enter the model through `stop_gradient`
  (their gradient is zero and the optimiser gives them a zero update);
- a non-finite loss or gradient norm keeps the previous parameters and optimiser state
  (`jnp.where` on every leaf) and is counted (`nonfinite_total`, `nonfinite_in_a_row`);
- jitted with explicit in/out shardings (parameters and optimiser state as the logical rules
  say, the batch split over the `batch` mesh axes, counters replicated), parameters and
  optimiser state donated.

counters (int32 scalars): step (train steps run), updates (optimiser updates applied),
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

from tttjax.diffusion.loss import v_prediction_loss
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

    def step(params, opt_state, counters, batch):
        key = jax.random.fold_in(base_key, counters["step"])

        def loss_fn(p):
            p = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), p, trainable)
            loss, _ = v_prediction_loss(lambda x, txt, t: spec.apply(p, x, txt, t), batch, key,
                                        schedule, prompt_dropout=prompt_dropout, dtype=dtype)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        params, opt_state_out = keep(new_params, params), keep(new_opt_state, opt_state)

        if grad_accum_steps > 1:
            updates_done = opt_state_out.gradient_step
        else:
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

    counter_sh = {k: replicated for k in COUNTERS}
    return jax.jit(step,
                   in_shardings=(param_shardings, opt_shardings, counter_sh, batch_shardings),
                   out_shardings=(param_shardings, opt_shardings, counter_sh, replicated),
                   donate_argnums=(0, 1), compiler_options=compiler_options)
