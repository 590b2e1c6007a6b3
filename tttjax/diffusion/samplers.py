"""DDIM and DPM-Solver++(2M) SDE samplers on the v-prediction schedule, one jitted loop.

    latents = sample(model_fn, (B, T, C, H, W), cond, uncond, key=jax.random.key(0))

`model_fn(latents [B', T, C, H, W] f32, text, timesteps int32 [B']) -> v [B', T, C, H, W]`
is a plain function or a Flax NNX module (its state is passed to the compiled loop as an
argument, so weights are not baked into the program as constants). `cond` / `uncond` are
arrays (or pytrees of arrays) with leading batch dim B, e.g. per-segment prompt embeddings
[B, n_segments, S, D]; `uncond` holds the negative prompts. With guidance the model sees the
batch [uncond; cond] (2B rows) once per step, as diffusers' CogVideoX pipeline does.

Timesteps (`sampling_timesteps`): diffusers' spacings; CogVideoX uses "trailing", which for
50 steps gives 999, 979, ..., 19 (the public SAT sampler's spacing too). Step i goes from
t_i to t_i - N // steps (alphabar = 1 past t = 0), as diffusers' CogVideoX schedulers do.

Per step, with x0 = sqrt(abar_t) x - sqrt(1 - abar_t) v and lambda = log sqrt(abar/(1-abar)):

  DDIM (eta 0)   x' = c x + (sqrt(abar') - sqrt(abar) c) x0,   c = sqrt((1-abar')/(1-abar))
  DPM++(2M) SDE  h = lambda' - lambda,
                 x' = sqrt((1-abar')/(1-abar)) e^-h x - expm1(-2h) sqrt(abar') D
                      + sqrt(1-abar') sqrt(1 - e^-2h) z,     z ~ N(0, I)
                 D = x0 on the first and last step, else (1 + 1/2r) x0 - (1/2r) x0_prev,
                 r = h_prev / h   (CogVideoXDPMScheduler / SAT VPSDEDPMPP2MSampler)

All per-step coefficients are computed once in float64 NumPy (infinite lambdas at
abar = 0 and abar = 1 resolve to exact 0 / 1 coefficients there) and the loop applies them
in float32, so a step equals diffusers' `step` up to float32 rounding.

Randomness: `initial_latents(key, shape)` and `step_noise(key, i, shape)`; the same key
gives the same video on any machine and any number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tttjax.diffusion.guidance import Guidance, as_guidance, combine
from tttjax.diffusion.schedule import DEFAULT_SCHEDULE, NoiseSchedule
from tttjax.sharding import with_logical_constraint

SAMPLERS = ("dpm++2m_sde", "ddim")
SPACINGS = ("trailing", "leading", "linspace")


# ------------------------------------------------------------------------------ timesteps


def sampling_timesteps(steps: int, *, num_train_timesteps: int = 1000, spacing: str = "trailing",
                       steps_offset: int = 0) -> np.ndarray:
    """int64 [steps] descending timesteps, as diffusers' `set_timesteps` for `spacing`."""
    n = num_train_timesteps
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= n:
        raise ValueError(f"steps must be an integer in [1, {n}], got {steps!r}")
    if spacing == "trailing":
        t = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        t = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        t = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(t)


# ------------------------------------------------------------------------------ coefficients


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    """float64 [steps] per-step coefficients of the update

        x0 = sqrt_abar * x - sqrt_one_minus_abar * v
        x' = m1 * x - m2 * (m3 * x0 - m4 * x0_prev) + m_noise * z
    """

    timesteps: np.ndarray
    sqrt_abar: np.ndarray
    sqrt_one_minus_abar: np.ndarray
    m1: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray
    m_noise: np.ndarray


def _half_log_snr(abar: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.sqrt(abar / (1.0 - abar)))


def step_coefficients(timesteps: np.ndarray, sampler: str,
                      schedule: NoiseSchedule = DEFAULT_SCHEDULE) -> StepCoefficients:
    """Coefficients of every step of `sampler` over descending `timesteps` (see module doc)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    t = np.asarray(timesteps, np.int64)
    n = schedule.num_train_timesteps
    if t.ndim != 1 or t.size < 1 or t.min() < 0 or t.max() >= n:
        raise ValueError(f"timesteps must be a non-empty 1-D list in [0, {n}), got {t}")
    abar_all = schedule.alphas_cumprod_f64
    t_prev = t - n // t.size
    abar = abar_all[t]
    abar_prev = np.where(t_prev >= 0, abar_all[np.maximum(t_prev, 0)], 1.0)
    ones, zeros = np.ones_like(abar), np.zeros_like(abar)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.sqrt((1.0 - abar_prev) / (1.0 - abar))
        if sampler == "ddim":
            m1 = ratio
            m2 = -(np.sqrt(abar_prev) - np.sqrt(abar) * ratio)
            m3, m4, m_noise = ones, zeros, zeros
        else:
            lam, lam_prev = _half_log_snr(abar), _half_log_snr(abar_prev)
            h = lam_prev - lam
            m1 = ratio * np.exp(-h)
            m2 = np.expm1(-2.0 * h) * np.sqrt(abar_prev)
            m_noise = np.sqrt(1.0 - abar_prev) * np.sqrt(1.0 - np.exp(-2.0 * h))
            # Second order needs the previous step's x0; diffusers skips it on the last step.
            h_last = np.concatenate([[np.nan], lam[1:] - lam[:-1]])
            second = (np.arange(t.size) > 0) & (t_prev >= 0)
            inv_2r = np.where(second, h / (2.0 * np.where(second, h_last, 1.0)), 0.0)
            m3, m4 = 1.0 + inv_2r, inv_2r
    coeffs = StepCoefficients(t, np.sqrt(abar), np.sqrt(1.0 - abar), m1, m2, m3, m4, m_noise)
    for field in dataclasses.fields(coeffs):
        value = getattr(coeffs, field.name)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"non-finite {field.name} coefficients for timesteps {t}; "
                             "use distinct descending timesteps")
    return coeffs


def apply_step(c: dict[str, jax.Array], x, v, x0_prev, noise):
    """One sampler update with the coefficients `c` of one step (float32 scalars).

    Args:
      c: {"sqrt_abar", "sqrt_one_minus_abar", "m1", "m2", "m3", "m4", "m_noise"} scalars.
      x: [B, ...] float32 latents at this step's timestep.
      v: [B, ...] (guided) velocity.
      x0_prev: [B, ...] previous step's x0 prediction (any finite value on the first step).
      noise: [B, ...] standard normal noise, or None for a deterministic sampler.
    Returns:
      (x at the next timestep, x0 predicted at this step), float32.
    """
    x0 = c["sqrt_abar"] * x - c["sqrt_one_minus_abar"] * v
    x_next = c["m1"] * x - c["m2"] * (c["m3"] * x0 - c["m4"] * x0_prev)
    if noise is not None:
        x_next = x_next + c["m_noise"] * noise
    return x_next, x0


def coefficient_table(coeffs: StepCoefficients) -> dict[str, np.ndarray]:
    """float32 [steps] tables of the update coefficients, for `apply_step` under jit."""
    return {f.name: getattr(coeffs, f.name).astype(np.float32)
            for f in dataclasses.fields(coeffs) if f.name != "timesteps"}


# ------------------------------------------------------------------------------ randomness


def initial_latents(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32 x_T ~ N(0, I) (init noise sigma is 1 on this schedule)."""
    return jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)


def step_noise(key: jax.Array, i, shape: tuple[int, ...]) -> jax.Array:
    """float32 N(0, I) noise injected by stochastic samplers at step `i`."""
    return jax.random.normal(jax.random.fold_in(jax.random.split(key)[1], i), shape, jnp.float32)


# ------------------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class _Plan:
    shape: tuple[int, ...]
    steps: int
    sampler: str
    guidance: Guidance
    schedule: NoiseSchedule
    spacing: str
    batched_cfg: bool
    report_progress: bool


@dataclasses.dataclass(frozen=True)
class _ApplyModule:
    graphdef: Any

    def __call__(self, state, x, text, t):
        return nnx.merge(self.graphdef, state)(x, text, t)


@dataclasses.dataclass(frozen=True)
class _ApplyFunction:
    fn: Callable

    def __call__(self, state, x, text, t):
        del state
        return self.fn(x, text, t)


# Progress callbacks by token: the token is a runtime argument of the compiled loop, so
# a new callback (a fresh lambda, say) does not recompile it.
_PROGRESS: dict[int, Callable[[int], Any]] = {}
_PROGRESS_TOKENS = itertools.count()


def _report_progress(token, step):
    fn = _PROGRESS.get(int(token))
    if fn is not None:
        fn(int(step))


def _concat(a, b):
    return jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), a, b)


@functools.partial(jax.jit, static_argnames=("apply", "plan"))
def _sample_loop(apply, plan: _Plan, state, cond, uncond, key, progress_token):
    timesteps = sampling_timesteps(plan.steps, num_train_timesteps=plan.schedule.num_train_timesteps,
                                   spacing=plan.spacing)
    table = coefficient_table(step_coefficients(timesteps, plan.sampler, plan.schedule))
    scales = plan.guidance.scales(plan.steps).astype(np.float32)
    guided = not plan.guidance.is_unguided()
    stochastic = plan.sampler == "dpm++2m_sde"
    b = plan.shape[0]
    both = _concat(uncond, cond) if guided and plan.batched_cfg else None

    def velocity(i, x, state):
        t = jnp.full((b,), jnp.asarray(timesteps, jnp.int32)[i])
        if not guided:
            return apply(state, x, cond, t).astype(jnp.float32)
        if plan.batched_cfg:
            v = apply(state, jnp.concatenate([x, x]), both, jnp.concatenate([t, t]))
            v_u, v_c = v[:b], v[b:]
        else:
            v_u, v_c = apply(state, x, uncond, t), apply(state, x, cond, t)
        return combine(v_u.astype(jnp.float32), v_c.astype(jnp.float32), jnp.asarray(scales)[i])

    # Under a mesh, latents (and the noise) are split over the batch like the model's input.
    names = ("activation_batch",) + (None,) * (len(plan.shape) - 1)

    def body(i, carry):
        # The model state rides in the carry: NNX modules must be rebuilt from values of
        # the loop's own trace level (nnx.scan inside the model checks this).
        x, x0_prev, state = carry
        v = velocity(i, x, state)
        c = {k: jnp.asarray(tab)[i] for k, tab in table.items()}
        noise = step_noise(key, i, plan.shape) if stochastic else None
        x, x0 = apply_step(c, x, v, x0_prev, noise)
        if plan.report_progress:
            jax.debug.callback(_report_progress, progress_token, i)
        return with_logical_constraint(x, names), x0, state

    x = with_logical_constraint(initial_latents(key, plan.shape), names)
    x, _, _ = jax.lax.fori_loop(0, plan.steps, body, (x, jnp.zeros_like(x), state))
    return x


def _batch_dims(tree) -> set[int]:
    return {jnp.shape(leaf)[0] if jnp.ndim(leaf) else -1 for leaf in jax.tree.leaves(tree)}


def sample(model_fn, latents_shape, cond, uncond=None, *, key: jax.Array, steps: int = 50,
           sampler: str = "dpm++2m_sde", guidance: Guidance | float | None = Guidance(),
           schedule: NoiseSchedule = DEFAULT_SCHEDULE, spacing: str = "trailing",
           batched_cfg: bool = True, progress: Callable[[int], Any] | None = None) -> jax.Array:
    """Samples latents by running `steps` sampler steps from pure noise, in one jitted loop.

    Args:
      model_fn: `(latents, text, timesteps [B']) -> v`, a function or an NNX module. The
        compiled loop is cached per function object (per graph for modules): pass the same
        object again to reuse it.
      latents_shape: (B, T, C, H, W) (any shape whose first dim is the batch).
      cond: prompt embeddings, array or pytree of arrays with leading dim B.
      uncond: negative-prompt embeddings, same structure and shapes as `cond`; may be None
        only without guidance.
      key: PRNG key; the result is a deterministic function of it.
      steps: number of sampler steps (model evaluations), 50 by default.
      sampler: "dpm++2m_sde" (the public code's sampler) or "ddim".
      guidance: a `Guidance` schedule, a constant scale, or None (no guidance). Default:
        linear 1 -> 4 (the paper's).
      schedule: the DDPM schedule the model was trained with.
      spacing: "trailing" (CogVideoX), "leading" or "linspace".
      batched_cfg: evaluate [uncond; cond] in one 2B batch (faster) rather than two calls
        (half the activation memory).
      progress: optional `progress(step_index)` called from inside the loop after each step
        (then `sample` waits for the result before returning).
    Returns:
      float32 [latents_shape] sampled latents (x_0).
    """
    shape = tuple(int(s) for s in latents_shape)
    if not shape or min(shape) < 1:
        raise ValueError("latents_shape must be positive dims with the batch first, got "
                         f"{latents_shape}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    guidance = as_guidance(guidance)
    sampling_timesteps(steps, num_train_timesteps=schedule.num_train_timesteps, spacing=spacing)
    if _batch_dims(cond) != {shape[0]}:
        raise ValueError(f"cond must have leading (batch) dim {shape[0]} on every array, "
                         f"got shapes {[jnp.shape(x) for x in jax.tree.leaves(cond)]}")
    if guidance.is_unguided():
        uncond = None
    else:
        if uncond is None:
            raise ValueError("guidance needs uncond (the negative-prompt embeddings); pass "
                             "uncond=... or guidance=None")
        shapes_c = jax.tree.map(jnp.shape, cond)
        shapes_u = jax.tree.map(jnp.shape, uncond)
        if shapes_c != shapes_u:
            raise ValueError(f"uncond must have the shapes of cond, got {shapes_u} vs {shapes_c}")
    if isinstance(model_fn, nnx.Module):
        graphdef, state = nnx.split(model_fn)
        apply = _ApplyModule(graphdef)
    elif callable(model_fn):
        apply, state = _ApplyFunction(model_fn), None
    else:
        raise ValueError(f"model_fn must be callable, got {type(model_fn).__name__}")
    plan = _Plan(shape, int(steps), sampler, guidance, schedule, spacing, bool(batched_cfg),
                 progress is not None)
    if progress is None:
        return _sample_loop(apply, plan, state, cond, uncond, key, 0)
    token = next(_PROGRESS_TOKENS)
    _PROGRESS[token] = progress
    try:
        out = _sample_loop(apply, plan, state, cond, uncond, key, token)
        jax.block_until_ready(out)
        jax.effects_barrier()
    finally:
        del _PROGRESS[token]
    return out
