"""The training objective: v-prediction mean squared error (SPEC section 4).

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
    pred = apply_fn(x_t.astype(dtype), text, t)
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
    return loss, {"timesteps": t, "prompt_kept": kept}
