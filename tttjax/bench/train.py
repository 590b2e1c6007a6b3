"""Throughput of the real training step: step time, tokens/s, model FLOPs and MFU.

    python -m tttjax.bench train --config configs/tiny.py:ttt_mlp [--config.KEY=VALUE ...]
        [--steps 10] [--warmup 2] [--peak-tflops F] [--seed 0]

The step is the one `python -m tttjax.train` runs for the config (`tttjax.train.loop`'s
memoised plan: same model, optimiser, shardings, donation and compiler options) on the
config's mesh, fed one synthetic global batch of the stage's shapes (random arrays made on
the devices in the batch sharding; no dataset is read). Parameters are freshly initialised.
It is compiled once ahead of time; `--warmup` steps run untimed, then `--steps` steps are
timed one by one (each waited for) and the median is reported.

Printed: step time, tokens/s (video + text tokens of the global batch per step, as the train
loop logs), analytic model FLOPs per step (`tttjax.bench.flops`: 3 x forward matmul FLOPs x
global batch), the matmul FLOPs of the traced step (`flops.traced_matmul_flops`: with what
remat recomputes), XLA's `cost_analysis()` FLOPs of the compiled step (per device x devices;
XLA counts each loop body once, see `tttjax.bench.flops`), their ratios to the analytic
count, and MFU = model FLOP/s / (devices x peak): the peak comes from the device kind
(`tttjax.bench.mfu`) or `--peak-tflops`, and on CPU or an unknown device MFU is n/a.
"""

from __future__ import annotations

import statistics
import sys
import time

_PROG = "python -m tttjax.bench train"


def define_flags(fv) -> None:
    from absl import flags

    from tttjax.bench.run_config import define_peak_flag

    define_peak_flag(fv)
    flags.DEFINE_integer("steps", 10, "timed steps", flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "untimed steps before timing (after the compile)",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the synthetic batch", flag_values=fv)


def synthetic_batch(shapes: dict, shardings: dict, seed: int) -> dict:
    """Random float32 arrays of the loader's keys and global shapes, made in their shardings."""
    import jax
    import jax.numpy as jnp

    def make(key):
        keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
        out = {k: jax.random.normal(keys[k], shapes[k], jnp.float32) for k in shapes}
        if "latents_logvar" in out:  # a plausible posterior: small variance
            out["latents_logvar"] = out["latents_logvar"] - 6.0
        return out

    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def xla_flops(compiled) -> float:
    """FLOPs of one device's program by XLA's cost analysis (NaN if it gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def measure(config, *, steps: int, warmup: int, seed: int = 0) -> dict:
    """Compiles and times the training step of `config` (see the module doc)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from tttjax.bench.flops import stage_forward_flops, traced_matmul_flops
    from tttjax.bench.run_config import mesh_for
    from tttjax.train.loop import train_step_setup
    from tttjax.train.step import initial_counters

    mesh, rules = mesh_for(config)
    setup = train_step_setup(config, mesh, rules)
    plan = setup.plan
    replicated = NamedSharding(mesh, PartitionSpec())
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        params = plan.init_params()
        opt_state = plan.init_opt(params)
        counters = {k: jax.device_put(v, replicated) for k, v in initial_counters().items()}
        batch = synthetic_batch(setup.batch_shapes, setup.batch_shardings, seed)
        traced = traced_matmul_flops(plan.step_fn, params, opt_state, counters, batch)
        start = time.perf_counter()
        step = plan.step_fn.lower(params, opt_state, counters, batch).compile()
        compile_s = time.perf_counter() - start
        times = []
        for i in range(warmup + steps):
            start = time.perf_counter()
            params, opt_state, counters, metrics = jax.block_until_ready(
                step(params, opt_state, counters, batch))
            if i >= warmup:
                times.append(time.perf_counter() - start)
    batch = setup.config.train.global_batch_size
    forward = stage_forward_flops(config)["total"] if _counted(config) else float("nan")
    return {"devices": mesh.size, "batch": batch,
            "accumulation": setup.config.train.grad_accum_steps,
            "tokens_per_step": setup.tokens_per_step,
            "compile_s": compile_s, "step_s": statistics.median(times),
            "model_flops": 3 * batch * forward, "xla_flops": xla_flops(step) * mesh.size,
            "traced_flops": traced,
            "loss": float(metrics["loss"])}


def _counted(config) -> bool:
    from tttjax.bench.flops import COUNTED_MIXERS

    return config.model.mixer in COUNTED_MIXERS


def report(r: dict, *, what: str, device_kind: str, peak: float | None) -> None:
    """Prints a measurement of `measure` (or the sampling benchmark) as a Markdown table."""
    from tttjax.bench.mfu import mfu
    from tttjax.bench.table import MarkdownTable

    rate = r["model_flops"] / r["step_s"]
    util = mfu(r["model_flops"], r["step_s"], r["devices"], peak)
    rows = [
        ("step time (median)", f"{1e3 * r['step_s']:.2f} ms"),
        ("tokens / step", f"{r['tokens_per_step']}"),
        ("tokens / s", f"{r['tokens_per_step'] / r['step_s']:.4g}"),
        (f"model FLOPs / step (analytic, {what})", f"{r['model_flops']:.4g}"),
        ("traced matmul FLOPs / step (jaxpr)", f"{r['traced_flops']:.4g}"),
        ("traced / analytic", f"{r['traced_flops'] / r['model_flops']:.3f}"),
        ("XLA cost_analysis FLOPs / step", f"{r['xla_flops']:.4g}"),
        ("XLA / analytic (loop bodies counted once)", f"{r['xla_flops'] / r['model_flops']:.3f}"),
        ("model TFLOP/s", f"{rate / 1e12:.4g}"),
        ("peak TFLOP/s per device", "n/a" if peak is None else f"{peak:g}"),
        ("MFU", "n/a" if util != util else f"{100 * util:.2f}%"),
        ("compile", f"{r['compile_s']:.1f} s"),
    ]
    table = MarkdownTable(("metric", "value"))
    for name, value in rows:
        table.row({"metric": name, "value": value})


def main(argv=None) -> int:
    import jax

    from tttjax.bench.run_config import device_peak, fail, parse, positive

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = parse(_PROG, __doc__, argv, define_flags)
        if parsed is None:
            return 0
        config, fv = parsed
        positive(fv, "steps")
        if fv.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {fv.warmup}")
        device_kind, peak = device_peak(fv)
        r = measure(config, steps=fv.steps, warmup=fv.warmup, seed=fv.seed)
    except ValueError as err:
        return fail(_PROG, err)
    m, s = config.model, config.stage
    print(f"# train step: {s.name}, mixer {m.mixer}, {m.num_layers} layers, width "
          f"{m.num_attention_heads * m.attention_head_dim}, batch {r['batch']} "
          f"({r['accumulation']} micro-batch(es)), "
          f"{s.num_segments} segments x ({s.latent_frames} latent frames, {s.text_length} text "
          f"tokens), remat {m.remat_policy}, {m.dtype}; {r['devices']} x {device_kind} "
          f"({jax.default_backend()}), jax {jax.__version__}; {fv.steps} steps after "
          f"{fv.warmup} warm-up; loss {r['loss']:.4f}")
    report(r, what="3 x forward", device_kind=device_kind, peak=peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
