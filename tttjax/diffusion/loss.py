"""The training objective: v-prediction mean squared error (docs/design.md §4).

For a batch of clean latents `x0` [B, T, C, H, W] and prompt embeddings [B, n, S, Dt]:

    t     = stratified_timesteps(B)                 one per stratum of [0, 1000)
    eps   ~ N(0, I)
    x_t   = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) eps          (schedule.add_noise)
    v     = sqrt(alphabar_t) eps - sqrt(1 - alphabar_t) x0          (schedule.v_target)
    text  = prompt dropout (p = 0.1: the whole embedding zeroed)
    loss  = mean over every element of (model(x_t, text, t) - v)^2

(equivalently the x0 error weighted by 1 / (1 - alphabar_t)). For real data the batch
carries the VAE posterior, and `x0 = mean + exp(logvar / 2) * z` is re-sampled here, so an
example gives a new latent every time it is seen.

All randomness comes from one key and is drawn for the whole global batch, so the numbers do
not depend on how the batch is sharded or on the number of hosts.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tttjax.diffusion.prompt_dropout import drop_prompts
from tttjax.diffusion.schedule import NoiseSchedule, add_noise, v_target
from tttjax.diffusion.timesteps import stratified_timesteps

# apply(noisy latents [B, T, C, H, W], text [B, n, S, Dt], timesteps int [B]) -> v [B, T, C, H, W]
ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def noised_inputs(batch: dict, key: jax.Array, schedule: NoiseSchedule, *,
                  prompt_dropout: float = 0.1, dtype=jnp.float32) -> dict:
    """The network inputs and v target of one (global) batch: all the objective's randomness.

    Returns {"x_t": [B, T, C, H, W] in `dtype`, "text": [B, n, S, Dt] in `dtype` (dropped
    prompts zeroed), "t": int32 [B], "target": float32 [B, T, C, H, W], "prompt_kept":
    bool [B]}. Every entry has the batch first, so a train step can split it into
    micro-batches (gradient accumulation) and get the same numbers as one big batch.
    """
    k_t, k_noise, k_drop, k_post = jax.random.split(key, 4)
    x0 = batch["latents"].astype(jnp.float32)
    if "latents_logvar" in batch:
        std = jnp.exp(0.5 * batch["latents_logvar"].astype(jnp.float32))
        x0 = x0 + std * jax.random.normal(k_post, x0.shape, jnp.float32)
    t = stratified_timesteps(k_t, x0.shape[0], schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t = add_noise(x0, noise, t, schedule)
    target = v_target(x0, noise, t, schedule)
    text, kept = drop_prompts(k_drop, batch["text"].astype(dtype), prompt_dropout)
    return {"x_t": x_t.astype(dtype), "text": text, "t": t, "target": target,
            "prompt_kept": kept}


def v_loss(apply_fn: ApplyFn, inputs: dict) -> jax.Array:
    """Float32 mean squared error of the network's v on `noised_inputs` (or a slice of them
    along the batch)."""
    pred = apply_fn(inputs["x_t"], inputs["text"], inputs["t"])
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - inputs["target"]))


def v_prediction_loss(apply_fn: ApplyFn, batch: dict, key: jax.Array, schedule: NoiseSchedule,
                      *, prompt_dropout: float = 0.1, dtype=jnp.float32
                      ) -> tuple[jax.Array, dict]:
    """Scalar float32 loss and aux values (timesteps, kept-prompt mask) for one batch.

    Args:
      apply_fn: the network, predicting v.
      batch: {"latents": [B, T, C, H, W] (x0, or the posterior mean when "latents_logvar"
        [B, T, C, H, W] is present), "text": [B, n, S, Dt]}.
      key: PRNG key of this step.
      schedule: the noise schedule.
      prompt_dropout: probability of zeroing an example's whole prompt embedding.
      dtype: dtype of the network inputs (the loss is computed in float32).
    """
    inputs = noised_inputs(batch, key, schedule, prompt_dropout=prompt_dropout, dtype=dtype)
    return v_loss(apply_fn, inputs), {"timesteps": inputs["t"],
                                      "prompt_kept": inputs["prompt_kept"]}
