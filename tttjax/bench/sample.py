"""Throughput of sampling: one denoising step of the DiT at a storyboard of n segments.

    python -m tttjax.bench sample --config configs/tiny.py:ttt_mlp [--config.KEY=VALUE ...]
        [--segments N] [--steps-per-call 4] [--repeats 3] [--nocfg] [--sampler dpm++2m_sde]
        [--peak-tflops F] [--seed 0]

Runs the sampler as `tttjax.generation.generate` does: `tttjax.diffusion.sample` (one jitted
loop) on a freshly initialised DiT of `config.model`, parameters sharded over all devices on
`fsdp` (generation's default mesh), latents [1, prefix + n * frames_per_segment, C, h, w] and
one random prompt embedding per segment. With classifier-free guidance (on unless `--nocfg`,
generation's default rising 1 -> 4 schedule) every step evaluates the model once on the batch
[uncond; cond] of 2. A call runs `--steps-per-call` steps; after a warm-up call (the compile)
`--repeats` calls are timed and the median divided by the steps is the time per step.

Printed as `bench train` does: time per step, tokens/s (video + text tokens of the model's
batch per step), model FLOPs per step (`tttjax.bench.flops`, forward only, x the model's
batch), the matmul FLOPs of the traced forward pass at that batch and XLA's `cost_analysis()`
FLOPs of it compiled (per device x devices), their ratios to the analytic count, and MFU.
"""

from __future__ import annotations

import sys
import time

_PROG = "python -m tttjax.bench sample"


def define_flags(fv) -> None:
    from absl import flags

    from tttjax.bench.run_config import define_peak_flag

    define_peak_flag(fv)
    from tttjax.diffusion.samplers import SAMPLERS

    flags.DEFINE_integer("segments", None, "storyboard segments (default: config.stage's)",
                         flag_values=fv)
    flags.DEFINE_integer("steps_per_call", 4, "sampler steps per timed call", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "timed calls", flag_values=fv)
    flags.DEFINE_boolean("cfg", True, "classifier-free guidance (model batch 2 per step)",
                         flag_values=fv)
    flags.DEFINE_enum("sampler", SAMPLERS[0], SAMPLERS, "sampler", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the parameters, prompts and noise", flag_values=fv)


def measure(config, *, segments: int, steps_per_call: int, repeats: int, cfg: bool = True,
            sampler: str = "dpm++2m_sde", seed: int = 0) -> dict:
    """Times the sampling loop of `config.model` at `segments` segments (see the module doc)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tttjax.bench.flops import COUNTED_MIXERS, stage_forward_flops, traced_matmul_flops
    from tttjax.bench.timing import median_time
    from tttjax.bench.train import xla_flops
    from tttjax.diffusion.guidance import Guidance
    from tttjax.diffusion.samplers import sample
    from tttjax.diffusion.schedule import NoiseSchedule
    from tttjax.sharding import make_mesh
    from tttjax.storyboard import num_latent_frames
    from tttjax.train import config as config_lib
    from tttjax.train.model_state import init_params, model_spec

    m, s = config.model, config.stage
    frames = num_latent_frames(segments, m.frames_per_segment, m.prefix_frames)
    shape = (1, frames, m.in_channels, s.latent_height, s.latent_width)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = config_lib.rules(config)
    spec = model_spec(m, mesh, rules)
    keys = jax.random.split(jax.random.key(seed), 2)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.tree.map(lambda x: x, spec.template)
        nnx.replace_by_pure_dict(state, init_params(spec, seed))
        model = nnx.merge(spec.graphdef, state)
        cond = jax.random.normal(keys[0], (1, segments, s.text_length, m.text_embed_dim))
        uncond = jnp.zeros_like(cond)
        guidance = Guidance() if cfg else None
        schedule = NoiseSchedule(**config.diffusion.to_dict())

        def run(key):
            return sample(model, shape, cond, uncond, key=key, steps=steps_per_call,
                          sampler=sampler, guidance=guidance, schedule=schedule)

        start = time.perf_counter()
        jax.block_until_ready(run(keys[1]))
        compile_s = time.perf_counter() - start
        call_s = median_time(run, (keys[1],), repeats)

        # The model's own forward at the batch one step evaluates, for XLA's FLOP count.
        batch = 2 if cfg else 1
        graphdef, params = nnx.split(model)
        forward = jax.jit(lambda p, x, t, ts: nnx.merge(graphdef, p)(x, t, ts))
        inputs = (params, jax.ShapeDtypeStruct((batch,) + shape[1:], jnp.float32),
                  jax.ShapeDtypeStruct((batch,) + cond.shape[1:], jnp.float32),
                  jax.ShapeDtypeStruct((batch,), jnp.int32))
        traced = traced_matmul_flops(forward, *inputs)
        compiled = forward.lower(*inputs).compile()
    video = frames * (s.latent_height // m.patch_size) * (s.latent_width // m.patch_size)
    fwd = (stage_forward_flops(config, segments)["total"] if m.mixer in COUNTED_MIXERS
           else float("nan"))
    return {"devices": mesh.size, "batch": batch, "frames": frames,
            "tokens_per_step": batch * (video + segments * s.text_length),
            "compile_s": compile_s, "step_s": call_s / steps_per_call,
            "model_flops": batch * fwd, "xla_flops": xla_flops(compiled) * mesh.size,
            "traced_flops": traced}


def main(argv=None) -> int:
    import jax

    from tttjax.bench.run_config import device_peak, fail, parse, positive
    from tttjax.bench.train import report

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = parse(_PROG, __doc__, argv, define_flags)
        if parsed is None:
            return 0
        config, fv = parsed
        positive(fv, "steps_per_call", "repeats")
        segments = config.stage.num_segments if fv.segments is None else fv.segments
        if segments < 1:
            raise ValueError(f"--segments must be a positive integer, got {segments}")
        device_kind, peak = device_peak(fv)
        r = measure(config, segments=segments, steps_per_call=fv.steps_per_call,
                    repeats=fv.repeats, cfg=fv.cfg, sampler=fv.sampler, seed=fv.seed)
    except ValueError as err:
        return fail(_PROG, err)
    m = config.model
    print(f"# sampling step: {segments} segments ({r['frames']} latent frames), model batch "
          f"{r['batch']} ({'CFG' if fv.cfg else 'no guidance'}), {fv.sampler}, mixer {m.mixer}, "
          f"{m.num_layers} layers, width {m.num_attention_heads * m.attention_head_dim}, "
          f"{m.dtype}; {r['devices']} x {device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}; {fv.repeats} calls of {fv.steps_per_call} steps after a warm-up")
    report(r, what="forward", device_kind=device_kind, peak=peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
