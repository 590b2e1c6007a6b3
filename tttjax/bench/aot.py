"""The trainer's own step compiled ahead of time for a mesh: per-chip memory, cost, roofline.

    python -m tttjax.bench aot --config configs/cogvideox_5b.py:63s,ttt_mlp --topology v5p-256
    python -m tttjax.bench aot --config configs/tiny.py:ttt_mlp --topology v5p-8 --num-slices 2
    python -m tttjax.bench aot --config configs/cogvideox_5b.py:3s,ttt_mlp \\
        --mesh data=1,fsdp=8,tensor=4 --batch 8            # fake CPU devices, the CPU compiler
    ... [--config.KEY=VALUE ...] [--mesh NAME=SIZE,...] [--batch N] [--rules activation_length=none]

What is compiled is exactly what `python -m tttjax.train` runs for the config and mesh: the
step of `tttjax.train.loop.train_step_setup` (loss, prompt dropout, clipping, parameter groups
and frozen sets, accumulation, non-finite guard, donation, shardings), lowered with abstract
inputs shaped and sharded as the trainer's (parameters, optimiser state, counters, the global
batch; accumulation splits it inside the step). Nothing is allocated or run.

`--topology NAME` compiles for a TPU slice described by libtpu (`tttjax.tpu_topology`: v5p-8,
v5p-256, v6e-256, v5e-256 or v5p:4x4x8; `--num-slices N` for N slices joined over DCN), on any
host, a CPU-only one included: the real TPU compiler (XLA:TPU, Mosaic for Pallas kernels). Its
figures are *compiled, not run*. With several slices the mesh is the trainer's hybrid mesh
(config.mesh.dcn_axes cross the slices) and a line says what the program sends between
slices (`tttjax.bench.dcn_traffic`): only reductions for a data-parallel DCN axis. Without `--topology`, the mesh is built of fake CPU devices
and the CPU compiler plans it (a plan: GPU and TPU fusion differ).

Printed per chip: arguments (parameters, optimiser state, batch), outputs, aliased (outputs
written over donated arguments), temporaries (activations, gradients, workspace), peak =
arguments + outputs - aliased + temporaries; the chip's HBM; compiled FLOPs and bytes of
`cost_analysis()` (XLA counts a loop body once: the scanned DiT blocks and the TTT scan are
counted for one iteration); the analytic model FLOPs of the step (`tttjax.bench.flops`) and a
roofline estimate of the step time (model FLOPs at the chip's peak bf16 rate; an estimate, a
lower bound, not a measurement). The last line is `peak per chip: X GiB of Y GiB (fits)` or
`(does not fit)` on a TPU topology.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Any

from tttjax import storage
from tttjax.command_line import UsageError, fail, parse_config_flags

GIB = 1024 ** 3
PROG = "python -m tttjax.bench aot"


@dataclasses.dataclass
class StepMemory:
    """Bytes per chip of one compiled step, and its compiled cost."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    params: int              # parameters resident on a chip (part of arguments)
    optimizer: int           # optimiser state resident on a chip (part of arguments)
    batch: int               # this chip's share of the global batch (part of arguments)
    flops: float             # cost_analysis() FLOPs of the per-chip program (loops once)
    bytes_accessed: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


@dataclasses.dataclass
class CompiledStep:
    """The trainer's step for a config and mesh, lowered and compiled ahead of time."""

    compiled: Any
    mesh: Any
    rules: tuple
    setup: Any               # tttjax.train.loop.StepSetup
    memory: StepMemory
    compile_seconds: float

    @property
    def pallas_kernels(self) -> int:
        """Pallas kernel launches in the compiled program (Mosaic custom calls on TPU, Triton
        on GPU): non-zero when `impl="auto"` picked the TTT kernel for these devices."""
        text = self.compiled.as_text() or ""
        return text.count('custom_call_target="tpu_custom_call"') + text.count(
            'custom_call_target="__gpu$xla.gpu.triton"')


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    import jax

    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def abstract_step_inputs(setup) -> tuple:
    """(params, opt_state, counters, batch) as sharded `ShapeDtypeStruct`s, as `train` passes
    them to the step (the batch as the data loader delivers it: float32)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from tttjax.train.step import COUNTERS

    plan = setup.plan
    mesh = next(iter(setup.batch_shardings.values())).mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    counters = {k: jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated) for k in COUNTERS}
    batch = {k: jax.ShapeDtypeStruct(setup.batch_shapes[k], jnp.float32, sharding=sh)
             for k, sh in setup.batch_shardings.items()}
    return plan.spec.abstract, plan.abstract_opt, counters, batch


def compile_train_step(config, devices, *, dump_dir: str | None = None) -> CompiledStep:
    """Lowers and compiles `train`'s step for `config` on a mesh of `devices` (real, fake CPU
    or libtpu topology devices); nothing runs. Raises ValueError for a config or mesh the
    trainer would refuse."""
    import jax
    from flax import nnx

    from tttjax.sharding import make_mesh
    from tttjax.train import config as config_lib
    from tttjax.train.loop import train_step_setup

    config_lib.validate(config)
    sizes = config_lib.validate_mesh(config, len(devices))
    mesh = make_mesh(sizes, devices=list(devices), **config_lib.mesh_layout(config))
    rules = config_lib.rules(config)
    setup = train_step_setup(config, mesh, rules)
    params, opt_state, counters, batch = abstract_step_inputs(setup)
    start = time.time()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        lowered = setup.plan.step_fn.lower(params, opt_state, counters, batch)
        if dump_dir and storage.is_url(dump_dir):
            # XLA dumps to local files only: dump to a scratch folder, then upload it
            with tempfile.TemporaryDirectory(prefix="tttjax-xla-dump-") as scratch:
                compiled = lowered.compile({"xla_dump_to": scratch})
                storage.upload_tree(scratch, storage.resolve(dump_dir))
        elif dump_dir:
            compiled = lowered.compile({"xla_dump_to": dump_dir})
        else:
            compiled = lowered.compile()
    seconds = time.time() - start
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    memory = StepMemory(
        arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
        params=_bytes_per_device(params), optimizer=_bytes_per_device(opt_state),
        batch=_bytes_per_device(batch), flops=float(cost.get("flops", math.nan)),
        bytes_accessed=float(cost.get("bytes accessed", math.nan)))
    return CompiledStep(compiled, mesh, rules, setup, memory, seconds)


def model_flops_per_step(config) -> float:
    """Analytic model FLOPs of one step, an update over the global batch (3 x forward
    matmuls x global batch); NaN for a mixer the analytic count does not cover."""
    from tttjax.bench.flops import train_step_flops

    return train_step_flops(config)


def report_lines(step: CompiledStep, *, chip=None, what: str) -> list[str]:
    """The printed report; its last line states the peak against the chip's HBM."""
    m, mesh, config = step.memory, step.mesh, step.setup.config
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    from tttjax.sharding import DEFAULT_RULES
    from tttjax.train import config as config_lib

    accum = config.train.grad_accum_steps
    micro = config_lib.micro_batch_size(config)
    shards = math.prod(mesh.shape[a] for a in config_lib.batch_mesh_axes(config))
    changed = [f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in step.rules
               if (k, v) not in DEFAULT_RULES]
    lines = [
        f"{what}",
        f"mesh {dict(mesh.shape)} ({mesh.size} chips), logical rules: defaults"
        + (f" with {', '.join(changed)}" if changed else ""),
        f"global batch {config.train.global_batch_size} per step = {accum} micro-batch(es) of "
        f"{micro} accumulated in the step ({micro // shards} example(s) per batch shard of "
        f"{mesh.size // shards} chips); "
        f"trainable {config.train.trainable}; "
        f"param_dtype {config.model.param_dtype}, dtype {config.model.dtype}; "
        f"remat {config.model.remat_policy}; attention {config.model.attention_impl}; "
        f"mixer {config.model.mixer}",
        "per chip:",
        f"  arguments       {g(m.arguments)}  (parameters {g(m.params).strip()}, optimiser "
        f"state {g(m.optimizer).strip()}, batch {g(m.batch).strip()})",
        f"  outputs         {g(m.outputs)}  (aliased to donated arguments {g(m.aliased).strip()})",
        f"  temporaries     {g(m.temporaries)}",
        f"  peak            {g(m.peak)}",
        f"compiled cost per chip (XLA cost_analysis, loop bodies once): {m.flops:.4g} FLOPs, "
        f"{m.bytes_accessed:.4g} bytes accessed",
    ]
    model = model_flops_per_step(config)
    lines.append(f"model FLOPs per step (analytic, 3 x forward x global batch): {model:.4g}; "
                 f"per chip {model / mesh.size:.4g}")
    if chip is not None:
        compute = model / mesh.size / chip.peak_bf16_flops
        lines.append(
            f"roofline estimate (not measured): {compute:.3g} s per step at the "
            f"{chip.generation}'s peak {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16")
    if config.model.mixer.startswith("ttt"):
        kernels = step.pallas_kernels
        lines.append("TTT inner loop: " + (f"Pallas kernel ({kernels} kernel calls in the program)"
                                           if kernels else "XLA scan (no Pallas kernel)"))
    slices = len({getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat})
    if slices > 1:
        from tttjax.bench import dcn_traffic

        lines.append(dcn_traffic.of_compiled(step.compiled).describe())
    lines.append(f"compiled in {step.compile_seconds:.1f} s")
    if chip is None:
        lines.append(f"peak per device: {m.peak / GIB:.2f} GiB (fake CPU devices, CPU compiler: "
                     "a plan with no capacity to compare; pass --topology for a TPU slice)")
    else:
        fits = "fits" if m.peak <= chip.hbm_bytes else "does not fit"
        lines.append(f"peak per chip: {m.peak / GIB:.2f} GiB of {chip.hbm_bytes / GIB:.0f} GiB "
                     f"({fits})")
    return lines


# ------------------------------------------------------------------------------ CLI


def _parse_pairs(text: str, what: str, cast) -> dict[str, Any]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise UsageError(f"--{what}: expected NAME=VALUE pairs separated by commas, "
                             f"got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = cast(v.strip())
        except ValueError:
            raise UsageError(f"--{what}: bad value in {item!r}") from None
    return out


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("topology", None, "TPU slice to compile for (v5p-8, v5p-256, v6e-256, "
                        "v5e-256, v5p:4x4x8); default: fake CPU devices", flag_values=fv)
    flags.DEFINE_integer("num_slices", 1, "TPU slices joined over DCN (with --topology)",
                         flag_values=fv)
    flags.DEFINE_string("mesh", None, "mesh axis sizes NAME=SIZE,... replacing config.mesh.axes "
                        "(one may be -1 on a topology)", flag_values=fv)
    flags.DEFINE_integer("batch", None, "global batch (config.train.global_batch_size)",
                         flag_values=fv)
    flags.DEFINE_string("rules", "", "logical rule overrides on top of config.mesh.rules, e.g. "
                        "activation_length=none or activation_length=tensor (mesh axes joined "
                        "by '+')", flag_values=fv)
    flags.DEFINE_string("dump_dir", None, "write XLA's dumps (memory-usage reports, HLO) here "
                        "(a local folder, or gs://...: dumped locally, then uploaded)",
                        flag_values=fv)


def _apply_overrides(config, fv) -> None:
    """--mesh, --batch and --rules onto the (unlocked) config."""
    from tttjax.sharding import merge_rules

    if fv.mesh:
        sizes = _parse_pairs(fv.mesh, "mesh", int)
        config.mesh.axes = sizes
    if fv.batch is not None:
        if fv.batch < 1:
            raise UsageError(f"--batch must be positive, got {fv.batch}")
        config.train.global_batch_size = fv.batch
    if fv.rules:
        overrides = _parse_pairs(fv.rules, "rules", lambda v: None if v == "none" else
                                 (tuple(v.split("+")) if "+" in v else v))
        config.mesh.rules = tuple(merge_rules(list(overrides.items()),
                                              tuple(config.mesh.get("rules") or ())))


def _fake_cpu_device_count(config) -> int:
    sizes = dict(config.mesh.axes)
    if any(s == -1 for s in sizes.values()):
        raise UsageError(f"config.mesh.axes {sizes} has a -1 axis; without --topology give every "
                         "size, e.g. --mesh data=1,fsdp=8,tensor=4")
    return math.prod(sizes.values())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = parse_config_flags(PROG, __doc__, argv, _define_flags)
        if parsed is None:
            return 0
        config, fv = parsed
        chip = None
        with config.unlocked():
            _apply_overrides(config, fv)
        if fv.num_slices < 1:
            raise UsageError(f"--num-slices must be >= 1, got {fv.num_slices}")
        if fv.topology:
            from tttjax import tpu_topology

            chip = tpu_topology.chip(fv.topology)
            devices = tpu_topology.devices(fv.topology, fv.num_slices)
            where = (f"{fv.topology}" + (f" x {fv.num_slices} slices" if fv.num_slices > 1 else "")
                     + " (TPU compiler on a CPU host: compiled, not run)")
        else:
            if fv.num_slices != 1:
                raise UsageError("--num-slices needs --topology")
            count = _fake_cpu_device_count(config)
            flags = os.environ.get("XLA_FLAGS", "")
            if "xla_force_host_platform_device_count" not in flags:
                os.environ["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count="
                                           f"{count}").strip()
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            import jax

            if len(jax.devices()) < count:
                raise UsageError(f"the mesh needs {count} devices but {len(jax.devices())} exist; "
                                 "unset XLA_FLAGS or set its device count to the mesh size")
            devices = jax.devices()[:count]
            where = f"{count} fake CPU devices (CPU compiler: a plan)"
        from tttjax.train import config as config_lib

        config_lib.validate(config)
    except (UsageError, ValueError) as err:
        return fail(PROG, err)
    import jax

    try:
        step = compile_train_step(config, devices, dump_dir=fv.dump_dir)
    except ValueError as err:
        return fail(PROG, err)
    except jax.errors.JaxRuntimeError as err:
        # The compiler refused the program (out of memory, or a compiler error): the run
        # failed, the command was fine.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return fail(PROG, f"the compiler failed: {first[:2000]}", code=1)
    print("\n".join(report_lines(step, chip=chip,
                                 what=f"{config.stage.name} train step on {where}")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
