"""The DDPM schedule against diffusers' CogVideoX schedulers, and the v-prediction algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from tttjax.diffusion.schedule import (
    DEFAULT_SCHEDULE,
    NoiseSchedule,
    add_noise,
    eps_from_v,
    v_target,
    x0_from_v,
)


def _diffusers(snr_shift_scale=1.0, **kw):
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, set_alpha_to_one=True, snr_shift_scale=snr_shift_scale, **kw)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_alphas_cumprod_match_diffusers(shift):
    ref = _diffusers(shift).alphas_cumprod.double().numpy()
    ours = NoiseSchedule(snr_shift_scale=shift).alphas_cumprod_f64
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[-1] == 0.0  # zero terminal SNR, exactly
    assert np.all(np.diff(ours) < 0)


def test_schedule_without_rescale_keeps_positive_terminal_snr():
    ours = NoiseSchedule(zero_terminal_snr=False).alphas_cumprod_f64
    ref = CogVideoXDDIMScheduler(rescale_betas_zero_snr=False, snr_shift_scale=1.0).alphas_cumprod
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-12)
    assert ours[-1] > 0


def test_add_noise_and_velocity_match_diffusers():
    sched = _diffusers()
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 2, 5, 6)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 17, 500, 999], np.int64)
    ref_xt = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    ref_v = sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    xt = add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    v = v_target(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t, jnp.int32))
    np.testing.assert_allclose(np.asarray(xt), ref_xt.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), ref_v.numpy(), rtol=1e-6, atol=1e-6)
    assert xt.dtype == jnp.float32 and xt.shape == x0.shape
    # t = 999 is pure noise.
    np.testing.assert_array_equal(np.asarray(xt[3]), noise[3])


def test_v_algebra_round_trips_under_jit():
    key = jax.random.key(0)
    k1, k2 = jax.random.split(key)
    x0 = jax.random.normal(k1, (6, 2, 3, 4))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0, 1, 250, 700, 998, 999], jnp.int32)

    @jax.jit
    def roundtrip(x0, noise, t):
        xt = add_noise(x0, noise, t)
        v = v_target(x0, noise, t)
        return x0_from_v(xt, v, t), eps_from_v(xt, v, t)

    x0_hat, eps_hat = roundtrip(x0, noise, t)
    np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-6)
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(noise), atol=2e-6)


def test_scalar_timestep_and_bf16_dtype_kept():
    x0 = jnp.ones((2, 3), jnp.bfloat16)
    xt = add_noise(x0, jnp.zeros_like(x0), 10)
    assert xt.dtype == jnp.bfloat16
    expected = np.sqrt(DEFAULT_SCHEDULE.alphas_cumprod_f64[10])
    np.testing.assert_allclose(np.asarray(xt, np.float32), expected, rtol=1e-2)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="integers"):
        add_noise(jnp.ones((2,)), jnp.ones((2,)), jnp.array([0.5, 1.0]))
