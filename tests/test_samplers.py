"""Samplers against diffusers' CogVideoX DDIM / DPM schedulers, guidance schedules, the jitted loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.schedulers import scheduling_dpm_cogvideox
from flax import nnx

from tttjax.diffusion import samplers
from tttjax.diffusion.guidance import Guidance, as_guidance
from tttjax.diffusion.samplers import (
    apply_step,
    coefficient_table,
    initial_latents,
    sample,
    sampling_timesteps,
    step_coefficients,
    step_noise,
)
from tttjax.diffusion.schedule import DEFAULT_SCHEDULE

SHAPE = (2, 3, 4, 4, 4)  # B, T, C, H, W
TEXT_SHAPE = (2, 5, 4)   # B, S, D (D = C for the toy model)
COGVIDEOX = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="v_prediction",
                 rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False,
                 set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0)


def _scheduler(kind, steps, **overrides):
    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    sched = cls(**{**COGVIDEOX, **overrides})
    sched.set_timesteps(steps)
    return sched


def _row(table, i):
    return {k: jnp.asarray(v[i]) for k, v in table.items()}


class _InjectedNoise:
    """Stands in for diffusers' randn_tensor: returns the queued tensors in order."""

    def __init__(self):
        self.queue = []

    def __call__(self, shape, **kwargs):
        out = self.queue.pop(0)
        assert tuple(out.shape) == tuple(shape)
        return out


@pytest.fixture
def injected_noise(monkeypatch):
    fake = _InjectedNoise()
    monkeypatch.setattr(scheduling_dpm_cogvideox, "randn_tensor", fake)
    return fake


# ------------------------------------------------------------------------------ timesteps


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [50, 30, 1])
def test_timesteps_match_diffusers(spacing, steps):
    sched = _scheduler("ddim", steps, timestep_spacing=spacing)
    np.testing.assert_array_equal(sampling_timesteps(steps, spacing=spacing), sched.timesteps.numpy())


def test_trailing_50_is_cogvideox_grid():
    t = sampling_timesteps(50)
    np.testing.assert_array_equal(t, np.arange(999, 0, -20))
    # The public SAT sampler's grid (generate_roughly_equally_spaced_steps) is the same.
    np.testing.assert_array_equal(t, np.linspace(999, 0, 50, endpoint=False).astype(int))


# ------------------------------------------------------------------------------ single steps


@pytest.mark.parametrize("steps", [50, 30])
def test_ddim_step_matches_diffusers(steps):
    sched = _scheduler("ddim", steps)
    ts = sampling_timesteps(steps)
    table = coefficient_table(step_coefficients(ts, "ddim"))
    rng = np.random.default_rng(1)
    for i in (0, 1, steps // 2, steps - 1):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        v = rng.standard_normal(SHAPE).astype(np.float32)
        ref, ref_x0 = sched.step(torch.from_numpy(v), int(ts[i]), torch.from_numpy(x),
                                 return_dict=False)
        ours, x0 = apply_step(_row(table, i), jnp.asarray(x), jnp.asarray(v), jnp.zeros(SHAPE), None)
        np.testing.assert_allclose(np.asarray(x0), ref_x0.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [50, 30])
def test_dpm_step_matches_diffusers(steps, injected_noise):
    sched = _scheduler("dpm", steps)
    ts = sampling_timesteps(steps)
    table = coefficient_table(step_coefficients(ts, "dpm++2m_sde"))
    rng = np.random.default_rng(2)
    for i in (0, 1, 2, steps // 2, steps - 1):
        x, v, old, n1, n2 = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(5))
        injected_noise.queue = [torch.from_numpy(n1), torch.from_numpy(n2)]
        ref, ref_x0 = sched.step(torch.from_numpy(v), None if i == 0 else torch.from_numpy(old),
                                 int(ts[i]), None if i == 0 else int(ts[i - 1]),
                                 torch.from_numpy(x), return_dict=False)
        # diffusers draws twice and uses the second draw when it takes the second-order step.
        second_order = 0 < i < steps - 1
        noise = n2 if second_order else n1
        ours, x0 = apply_step(_row(table, i), jnp.asarray(x), jnp.asarray(v), jnp.asarray(old),
                              jnp.asarray(noise))
        np.testing.assert_allclose(np.asarray(x0), ref_x0.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-5)
        if i == steps - 1:  # the last step returns the x0 prediction, noise-free
            np.testing.assert_allclose(np.asarray(ours), np.asarray(x0), atol=1e-6)


def test_coefficients_are_finite_at_zero_and_full_snr():
    for sampler in samplers.SAMPLERS:
        c = step_coefficients(sampling_timesteps(50), sampler)
        assert c.sqrt_abar[0] == 0.0          # t = 999: zero SNR
        assert c.m1[-1] == 0.0 and c.m2[-1] == -1.0  # last step: x' = x0
    with pytest.raises(ValueError, match="sampler"):
        step_coefficients(sampling_timesteps(50), "euler")


# ------------------------------------------------------------------------------ guidance


def test_guidance_schedules():
    lin = Guidance.linear(1.0, 4.0).scales(50)
    assert lin[0] == 1.0 and lin[-1] == 4.0 and np.all(np.diff(lin) > 0)
    cos = Guidance.cosine(6.0, 5.0).scales(50)
    assert cos[0] == 1.0 and np.all(np.diff(cos) >= 0)
    i = 49
    assert math.isclose(cos[i], 1 + 6 * (1 - math.cos(math.pi * (i / 50) ** 5)) / 2)
    np.testing.assert_array_equal(Guidance.constant(6).scales(3), [6.0, 6.0, 6.0])
    assert as_guidance(None).is_unguided() and as_guidance(2.5) == Guidance.constant(2.5)
    with pytest.raises(ValueError, match="kind"):
        Guidance(kind="sigmoid")
    with pytest.raises(ValueError, match="Guidance"):
        as_guidance("4")


# ------------------------------------------------------------------------------ full loop


def _toy_v_jax(x, text, t):
    ctx = jnp.mean(text, axis=1)[:, None, :, None, None]
    scale = (t.astype(jnp.float32) / 1000.0 * 0.3)[:, None, None, None, None]
    return 0.5 * jnp.tanh(x) + scale * x + ctx


def _toy_v_torch(x, text, t):
    ctx = text.mean(dim=1)[:, None, :, None, None]
    return 0.5 * torch.tanh(x) + (t.float() / 1000.0 * 0.3)[:, None, None, None, None] * x + ctx


@pytest.fixture(scope="module")
def texts():
    rng = np.random.default_rng(3)
    cond = rng.standard_normal(TEXT_SHAPE).astype(np.float32)
    uncond = rng.standard_normal(TEXT_SHAPE).astype(np.float32) * 0.5
    return cond, uncond


def _diffusers_trajectory(kind, steps, guidance, key, cond, uncond, injected_noise):
    """The CogVideoX pipeline's denoising loop with diffusers' schedulers and our noise."""
    sched = _scheduler(kind, steps)
    scales = guidance.scales(steps)
    latents = torch.from_numpy(np.array(initial_latents(key, SHAPE)))
    emb = torch.cat([torch.from_numpy(uncond), torch.from_numpy(cond)])
    old = None
    for i, t in enumerate(sched.timesteps):
        v = _toy_v_torch(torch.cat([latents] * 2), emb, t.expand(2 * SHAPE[0]))
        v_u, v_c = v.chunk(2)
        v = v_u + float(scales[i]) * (v_c - v_u)
        if kind == "ddim":
            latents = sched.step(v, t, latents, return_dict=False)[0]
        else:
            noise = torch.from_numpy(np.array(step_noise(key, i, SHAPE)))
            injected_noise.queue = [noise, noise]
            latents, old = sched.step(v, old, t, sched.timesteps[i - 1] if i > 0 else None,
                                      latents, return_dict=False)
    return latents.numpy()


@pytest.mark.parametrize("kind,sampler,steps,guidance", [
    ("dpm", "dpm++2m_sde", 50, Guidance.linear(1.0, 4.0)),
    ("ddim", "ddim", 20, Guidance.cosine(6.0, 5.0)),
])
def test_trajectory_matches_diffusers_pipeline(kind, sampler, steps, guidance, texts, injected_noise):
    cond, uncond = texts
    key = jax.random.key(7)
    ref = _diffusers_trajectory(kind, steps, guidance, key, cond, uncond, injected_noise)
    ours = sample(_toy_v_jax, SHAPE, jnp.asarray(cond), jnp.asarray(uncond), key=key, steps=steps,
                  sampler=sampler, guidance=guidance)
    assert ours.shape == SHAPE and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=2e-5)


def _point_mass_model(target):
    """The exact velocity when the data is the single point `target`."""
    def v(x, text, t):
        a, b = DEFAULT_SCHEDULE.coefficients(t, x.ndim)
        eps = jnp.where(b > 0, (x - a * target) / jnp.maximum(b, 1e-12), 0.0)
        return a * eps - b * target
    return v


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m_sde"])
def test_exact_velocity_recovers_the_data_point(sampler, texts):
    target = jnp.asarray(np.random.default_rng(4).standard_normal(SHAPE), jnp.float32)
    out = sample(_point_mass_model(target), SHAPE, jnp.asarray(texts[0]), key=jax.random.key(1),
                 steps=10, sampler=sampler, guidance=None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(target), atol=1e-4)


def test_loop_is_compiled_once_and_deterministic(texts):
    cond, uncond = (jnp.asarray(a) for a in texts)
    calls = []

    def model(x, text, t):
        calls.append(x.shape)
        return _toy_v_jax(x, text, t)

    kw = dict(key=jax.random.key(0), steps=8)
    a = sample(model, SHAPE, cond, uncond, **kw)
    b = sample(model, SHAPE, cond, uncond, **kw)
    assert calls == [(2 * SHAPE[0],) + SHAPE[1:]]  # traced once, inside the loop, batched CFG
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = sample(model, SHAPE, cond, uncond, key=jax.random.key(1), steps=8)
    assert not np.allclose(np.asarray(a), np.asarray(c))
    d = sample(model, SHAPE, cond, uncond, batched_cfg=False, **kw)
    np.testing.assert_allclose(np.asarray(d), np.asarray(a), rtol=1e-5, atol=1e-5)
    seen = []
    sample(model, SHAPE, cond, uncond, progress=seen.append, **kw)
    assert sorted(seen) == list(range(8))
    traced, again = len(calls), []
    sample(model, SHAPE, cond, uncond, progress=lambda i: again.append(i), **kw)
    assert sorted(again) == list(range(8))
    assert len(calls) == traced  # a new progress callback does not recompile the loop


class _ToyModule(nnx.Module):
    """Stacked layers applied with nnx.scan, as the DiT does (NNX checks trace levels there)."""

    def __init__(self, channels, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(channels, channels, rngs=rngs)

        self.mix = make(rngs)

    def __call__(self, x, text, t):
        def body(layer, h):
            return 0.5 * layer(h) + h

        scan = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        y = scan(self.mix, jnp.moveaxis(x, 2, -1))
        return _toy_v_jax(jnp.moveaxis(y, -1, 2), text, t)


def test_nnx_module_model(texts):
    cond, uncond = (jnp.asarray(a) for a in texts)
    module = _ToyModule(SHAPE[2], nnx.Rngs(0))
    out = sample(module, SHAPE, cond, uncond, key=jax.random.key(3), steps=6)
    kernels, biases = np.asarray(module.mix.kernel[...]), np.asarray(module.mix.bias[...])

    def plain(x, text, t):  # the same network written with arrays
        h = jnp.moveaxis(x, 2, -1)
        for w, b in zip(kernels, biases):
            h = 0.5 * (h @ w + b) + h
        return _toy_v_jax(jnp.moveaxis(h, -1, 2), text, t)

    ref = sample(plain, SHAPE, cond, uncond, key=jax.random.key(3), steps=6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_bad_arguments(texts):
    cond, uncond = (jnp.asarray(a) for a in texts)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="sampler"):
        sample(_toy_v_jax, SHAPE, cond, uncond, key=key, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(_toy_v_jax, SHAPE, cond, uncond, key=key, steps=0)
    with pytest.raises(ValueError, match="leading"):
        sample(_toy_v_jax, (3,) + SHAPE[1:], cond, uncond, key=key)
    with pytest.raises(ValueError, match="uncond"):
        sample(_toy_v_jax, SHAPE, cond, None, key=key, guidance=4.0)
    with pytest.raises(ValueError, match="shapes"):
        sample(_toy_v_jax, SHAPE, cond, uncond[:, :3], key=key)


def test_sampling_under_a_mesh_matches_one_device(texts):
    from tttjax.sharding import make_mesh

    cond, uncond = (jnp.asarray(a) for a in texts)
    kw = dict(key=jax.random.key(5), steps=4)
    ref = sample(_toy_v_jax, SHAPE, cond, uncond, **kw)
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
    with jax.set_mesh(mesh):
        out = sample(_toy_v_jax, SHAPE, cond, uncond, **kw)
    assert out.sharding.spec[0] in ("data", ("data",), ("data", "fsdp"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)
