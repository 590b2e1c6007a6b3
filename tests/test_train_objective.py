"""The diffusion objective: stratified timesteps, prompt dropout, v-prediction loss and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttjax.diffusion.loss import v_prediction_loss
from tttjax.diffusion.prompt_dropout import drop_prompts
from tttjax.diffusion.schedule import NoiseSchedule
from tttjax.diffusion.timesteps import stratified_timesteps

SCHEDULE = NoiseSchedule()


def test_one_timestep_per_stratum_and_uniform_marginal():
    draws = jax.vmap(lambda k: stratified_timesteps(k, 8, 1000))(
        jax.random.split(jax.random.PRNGKey(0), 2000))
    draws = np.asarray(draws)
    assert draws.dtype == np.int32 and draws.min() >= 0 and draws.max() <= 999
    np.testing.assert_array_equal(np.sort(draws // 125, axis=1), np.tile(np.arange(8), (2000, 1)))
    # marginal of every row is uniform on [0, 1000): chi-square over 10 bins
    for row in (0, 5):
        counts = np.bincount(draws[:, row] // 100, minlength=10)
        chi2 = float(((counts - 200.0) ** 2 / 200.0).sum())
        assert chi2 < 30.0, (row, counts)          # 9 dof: p < 0.0005
    # the strata are dealt in random order (not sorted by row)
    assert (np.diff(draws, axis=1) < 0).any(axis=1).mean() > 0.9
    with pytest.raises(ValueError):
        stratified_timesteps(jax.random.PRNGKey(0), 0)


def test_prompt_dropout_zeroes_whole_examples_at_rate_p():
    text = jnp.ones((4000, 2, 3, 5))
    out, kept = drop_prompts(jax.random.PRNGKey(1), text, 0.1)
    out, kept = np.asarray(out), np.asarray(kept)
    per_example = out.reshape(4000, -1)
    assert set(np.unique(per_example.sum(axis=1))) <= {0.0, 30.0}
    np.testing.assert_array_equal(per_example.sum(axis=1) > 0, kept)
    assert abs((~kept).mean() - 0.1) < 0.015
    assert np.asarray(drop_prompts(jax.random.PRNGKey(1), text[:10], 0.0)[1]).all()
    with pytest.raises(ValueError, match="probability"):
        drop_prompts(jax.random.PRNGKey(1), text, 1.5)


def _numpy_loss(w, batch, t, noise, kept, post_noise=None):
    """float64 reference of the loss for the linear 'network' v = x_t * w + mean(text) * t/1000."""
    abar = SCHEDULE.alphas_cumprod_f64[t]
    a = np.sqrt(abar)[:, None, None, None, None]
    b = np.sqrt(1 - abar)[:, None, None, None, None]
    x0 = batch["latents"].astype(np.float64)
    if post_noise is not None:
        x0 = x0 + np.exp(0.5 * batch["latents_logvar"]) * post_noise
    xt = a * x0 + b * noise
    v = a * noise - b * x0
    text = batch["text"] * kept[:, None, None, None]
    cond = text.mean(axis=(1, 2, 3))[:, None, None, None, None] * (t / 1000.0)[:, None, None, None, None]
    pred = xt * w[None, None, :, None, None] + cond
    err = pred - v
    loss = np.mean(err ** 2)
    grad_w = 2 * np.mean(err * xt, axis=(0, 1, 3, 4)) / err.shape[2]
    return loss, grad_w


@pytest.mark.parametrize("posterior", [False, True])
def test_v_prediction_loss_and_gradient_match_float64(posterior):
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((6, 3, 4, 2, 2)).astype(np.float32),
             "text": rng.standard_normal((6, 2, 3, 5)).astype(np.float32)}
    if posterior:
        batch["latents_logvar"] = (rng.standard_normal((6, 3, 4, 2, 2)) - 3).astype(np.float32)
    w = rng.standard_normal(4).astype(np.float32)
    key = jax.random.PRNGKey(3)

    def loss_fn(w):
        def apply(x, text, t):
            cond = jnp.mean(text, axis=(1, 2, 3))[:, None, None, None, None] * (t / 1000.0)[
                :, None, None, None, None]
            return x * w[None, None, :, None, None] + cond
        return v_prediction_loss(apply, batch, key, SCHEDULE, prompt_dropout=0.3)

    (loss, aux), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(w))
    # the same random numbers, drawn as the loss draws them
    k_t, k_noise, k_drop, k_post = jax.random.split(key, 4)
    t = np.asarray(aux["timesteps"])
    np.testing.assert_array_equal(t, stratified_timesteps(k_t, 6, 1000))
    noise = np.asarray(jax.random.normal(k_noise, batch["latents"].shape), np.float64)
    post = (np.asarray(jax.random.normal(k_post, batch["latents"].shape), np.float64)
            if posterior else None)
    kept = np.asarray(aux["prompt_kept"])
    np.testing.assert_array_equal(kept, np.asarray(drop_prompts(k_drop, jnp.asarray(batch["text"]), 0.3)[1]))
    want_loss, want_grad = _numpy_loss(w.astype(np.float64), batch, t, noise, kept, post)
    np.testing.assert_allclose(float(loss), want_loss, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)


def test_perfect_v_prediction_has_zero_loss():
    rng = np.random.default_rng(1)
    batch = {"latents": rng.standard_normal((4, 2, 3, 2, 2)).astype(np.float32),
             "text": np.zeros((4, 1, 2, 3), np.float32)}

    def oracle(x_t, text, t):
        # Knows x0, hence v = (sqrt(abar) x_t - x0) / sqrt(1 - abar) for t with abar < 1.
        a, b = SCHEDULE.coefficients(t, 5)
        return (a * x_t - batch["latents"]) / b

    loss, _ = v_prediction_loss(oracle, batch, jax.random.PRNGKey(0), SCHEDULE, prompt_dropout=0.0)
    assert float(loss) < 1e-8
