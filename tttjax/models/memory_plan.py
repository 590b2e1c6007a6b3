"""Per-device memory of a DiT training step, from an ahead-of-time compile (no hardware needed).

    python -m tttjax.models.memory_plan --config configs/cogvideox_5b.py:63s,ttt_mlp \
        [--mesh data=1,fsdp=8,tensor=4] [--batch 8] [--rules length=none] [--forward-only]

The default mesh (fsdp 8 x tensor 4, batch 8) gives each device the same share as the paper's
run (global batch 64 on 256 GPUs, config.mesh data=8 x fsdp=8 x tensor=4): parameters are
FSDP-sharded over `fsdp` only, so the `data` axis does not change per-device memory.

The step (v-prediction MSE, `jax.value_and_grad`, AdamW with float32 first moments, donated
parameters and optimizer state) is lowered with abstract inputs on a mesh of fake CPU devices
(`--xla_force_host_platform_device_count`) and compiled for the SPMD partition of one device;
XLA's `memory_analysis()` of that program gives argument, output and temporary bytes. These
are the CPU compiler's figures: GPU fusion differs, so treat them as a plan, not a guarantee.
Attention: the CPU compiler cannot use the cuDNN flash kernel, so attention is planned with
`attention_impl="chunked"` (online softmax over key blocks, in full attention and inside each
segment window), which, like a flash kernel, stores no window's logits. `--attention-impl xla`
plans the plain path instead, which materialises one window's logits at a time (the printed
logits size; XLA keeps a few such buffers live in the backward pass).
The CPU backend also has no native bfloat16 dynamic-update-slice: it keeps a float32 copy of
the stacked block inputs saved for the backward pass (twice the printed `saved block
inputs`), which a GPU compile does not need.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from typing import Any

from tttjax.command_line import ArgumentParser

GIB = 1024 ** 3


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device of one compiled step."""

    devices: int
    mesh: dict[str, int]
    params: int            # parameters resident on a device
    optimizer: int         # optimizer state resident on a device
    arguments: int         # everything passed in (params, optimizer state, batch)
    outputs: int
    aliased: int           # outputs written in place of donated arguments
    temporaries: int       # activations, gradients, workspace
    compile_seconds: float
    window_logits: int = 0  # one attention window's float32 logits (XLA attention path)
    saved_inputs: int = 0   # every block's input, stacked for the backward pass

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
        return [f"mesh {self.mesh} ({self.devices} devices), per device:",
                f"  parameters      {g(self.params)}",
                f"  optimizer state {g(self.optimizer)}",
                f"  arguments       {g(self.arguments)}",
                f"  temporaries     {g(self.temporaries)}",
                f"  outputs         {g(self.outputs)} (aliased {g(self.aliased)})",
                f"  peak            {g(self.peak)}",
                f"  in temporaries: one attention window's f32 logits {g(self.window_logits)}, "
                f"saved block inputs {g(self.saved_inputs)}",
                f"  (compiled in {self.compile_seconds:.0f} s)"]


def trainable_filter(mode: str):
    """nnx filter of trainable parameters: 'all', or SPEC section 5's later stages 'mixer_qkvo'."""
    from flax import nnx

    if mode == "all":
        return nnx.Param
    if mode == "mixer_qkvo":
        def is_trainable(path, value):
            names = [str(p) for p in path]
            return isinstance(value, nnx.Param) and (
                "mixer" in names or ("attn" in names and any(n.startswith("to_") for n in names)))
        return is_trainable
    raise ValueError(f"trainable must be 'all' or 'mixer_qkvo', got {mode!r}")


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    import jax

    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def _ways(mesh, spec) -> int:
    """How many pieces the first dimension of a 1-D PartitionSpec is split into."""
    entry = spec[0] if len(spec) else None
    axes = entry if isinstance(entry, tuple) else ((entry,) if entry else ())
    return math.prod(mesh.shape[a] for a in axes)


def plan_memory(model_config, *, latent_frames: int, latent_height: int, latent_width: int,
                num_segments: int, text_length: int, batch: int, mesh, rules=None,
                trainable: str = "all", forward_only: bool = False) -> MemoryPlan:
    """Compiles one training (or forward) step abstractly on `mesh` and returns its memory.

    Args:
      model_config: `config.model`.
      latent_frames, latent_height, latent_width, num_segments, text_length: batch geometry.
      batch: global batch size (sharded over the `batch` logical axis).
      mesh: `jax.sharding.Mesh` (e.g. of fake CPU devices).
      rules: logical axis rules (default `tttjax.sharding.DEFAULT_RULES`).
      trainable: 'all' (3 s stage) or 'mixer_qkvo' (later stages, SPEC section 5).
      forward_only: compile the forward pass only (sampling).
    """
    import time

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding

    from tttjax import sharding as shd
    from tttjax.models.dit import CogVideoXDiT

    rules = tuple(rules or shd.DEFAULT_RULES)
    cfg = model_config
    abstract = nnx.eval_shape(lambda: CogVideoXDiT(cfg, rngs=nnx.Rngs(0)))
    graphdef, train_state, frozen_state = nnx.split(abstract, trainable_filter(trainable), ...)
    train_sh = shd.state_shardings(train_state, mesh, rules)
    frozen_sh = shd.state_shardings(frozen_state, mesh, rules)

    def with_sharding(state, shardings):
        """Plain (Variable-free) state of sharded ShapeDtypeStructs, for lowering."""
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        shardings = jax.tree.map(lambda s: s.get_value() if is_var(s) else s, shardings,
                                 is_leaf=is_var)
        return jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
            state, shardings, is_leaf=is_var)

    dtype = jnp.dtype(cfg.dtype)
    b, t, c = batch, latent_frames, cfg.in_channels
    batch_spec = shd._prune_spec(shd.logical_to_spec(("batch",), rules), mesh, (b,))
    bsh = NamedSharding(mesh, batch_spec)
    x = jax.ShapeDtypeStruct((b, t, c, latent_height, latent_width), dtype, sharding=bsh)
    target = jax.ShapeDtypeStruct((b, t, cfg.out_channels, latent_height, latent_width), dtype,
                                  sharding=bsh)
    text = jax.ShapeDtypeStruct((b, num_segments, text_length, cfg.text_embed_dim), dtype, sharding=bsh)
    steps = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bsh)

    def loss_fn(train, frozen, x, text, steps, target):
        model = nnx.merge(graphdef, train, frozen)
        out = model(x, text, steps)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))

    train_in = with_sharding(train_state, train_sh)
    frozen_in = with_sharding(frozen_state, frozen_sh)
    params_bytes = _bytes_per_device(train_in) + _bytes_per_device(frozen_in)
    start = time.time()
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        if forward_only:
            fwd = jax.jit(lambda train, frozen, x, text, steps:
                          nnx.merge(graphdef, train, frozen)(x, text, steps))
            lowered = fwd.lower(train_in, frozen_in, x, text, steps)
            opt_bytes = 0
        else:
            tx = optax.adamw(1e-5, b1=0.9, b2=0.95, weight_decay=1e-4, mu_dtype=jnp.float32)
            opt_abstract = _shard_like_params(jax.eval_shape(tx.init, train_in), train_in, mesh)
            opt_sh = jax.tree.map(lambda a: a.sharding, opt_abstract)

            def step(train, frozen, opt_state, x, text, steps, target):
                loss, grads = jax.value_and_grad(loss_fn)(train, frozen, x, text, steps, target)
                updates, opt_state = tx.update(grads, opt_state, train)
                return optax.apply_updates(train, updates), opt_state, loss

            jitted = jax.jit(step, donate_argnums=(0, 2),
                             out_shardings=(jax.tree.map(lambda a: a.sharding, train_in), opt_sh, NamedSharding(mesh, jax.sharding.PartitionSpec())))
            lowered = jitted.lower(train_in, frozen_in,
                                   opt_abstract, x, text, steps, target)
            opt_bytes = _bytes_per_device(opt_abstract)
        compiled = lowered.compile()
    stats = compiled.memory_analysis()
    # Logits of one attention window on one device, as the XLA attention path stores them.
    local_batch = max(1, b // _ways(mesh, batch_spec))
    heads = cfg.num_attention_heads // _ways(mesh, shd._prune_spec(
        shd.logical_to_spec(("heads",), rules), mesh, (cfg.num_attention_heads,)))
    grid = (latent_height // cfg.patch_size) * (latent_width // cfg.patch_size)
    if cfg.attention == "segment":
        tokens = text_length + (cfg.frames_per_segment + cfg.prefix_frames) * grid
    else:
        tokens = num_segments * text_length + latent_frames * grid
    logits = 0 if cfg.attention_impl != "xla" else (
        local_batch * heads * tokens * tokens * 4)
    act_spec = shd.logical_to_spec(("batch", "length", "embed"), rules)
    length_ways = _ways(mesh, shd._prune_spec(jax.sharding.PartitionSpec(*act_spec[1:2]), mesh,
                                              (1 << 30,)))
    tokens_all = num_segments * text_length + latent_frames * grid
    saved = 0 if forward_only else (cfg.num_layers * local_batch * -(-tokens_all // length_ways)
                                    * cfg.num_attention_heads * cfg.attention_head_dim
                                    * dtype.itemsize)
    return MemoryPlan(devices=mesh.size, mesh=dict(mesh.shape), params=params_bytes,
                      optimizer=opt_bytes, arguments=stats.argument_size_in_bytes,
                      outputs=stats.output_size_in_bytes, aliased=stats.alias_size_in_bytes,
                      temporaries=stats.temp_size_in_bytes, compile_seconds=time.time() - start,
                      window_logits=logits, saved_inputs=saved)


def _shard_like_params(opt_state, params, mesh):
    """Optimizer leaves whose key path ends with a parameter's path (Adam moments) get that
    parameter's sharding; everything else (step counts) is replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    by_path = {tuple(path): leaf.sharding
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def place(path, leaf):
        sharding = NamedSharding(mesh, PartitionSpec())
        for n in lengths:
            if len(path) >= n and tuple(path[-n:]) in by_path:
                sharding = by_path[tuple(path[-n:])]
                break
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, opt_state)


# ------------------------------------------------------------------------------ CLI


def _parse_pairs(text: str, what: str, cast) -> dict[str, Any]:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--{what}: expected NAME=VALUE pairs separated by commas, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = cast(v.strip())
    return out


def _load_config(spec: str):
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config: no such file {path!r}; give e.g. configs/cogvideox_5b.py:63s,ttt_mlp")
    module_spec = importlib.util.spec_from_file_location("_plan_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m tttjax.models.memory_plan",
                                description="Per-device memory of a DiT training step (AOT compile).")
    p.add_argument("--config", required=True, help="config file and argument, FILE[:ARG]")
    p.add_argument("--mesh", default="data=1,fsdp=8,tensor=4", help="mesh axis sizes NAME=SIZE,...")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (default: data*fsdp, one example per tensor group)")
    p.add_argument("--rules", default="", help="logical rule overrides on top of the config's "
                   "mesh.rules, e.g. length=none or length=tensor (mesh axes joined by '+', "
                   "'none' for replicated)")
    p.add_argument("--trainable", default=None, choices=("all", "mixer_qkvo"),
                   help="default: config.train.trainable, else all for 3s and mixer_qkvo later")
    p.add_argument("--attention-impl", default=None,
                   help="attention_impl for the plan (default: chunked, the online softmax "
                        "that stores no logits, as a GPU flash kernel)")
    p.add_argument("--remat", default=None, help="override config.model.remat_policy")
    p.add_argument("--forward-only", action="store_true", help="plan the forward pass only")
    args = p.parse_args(argv)
    try:
        mesh_sizes = _parse_pairs(args.mesh, "mesh", int)
        devices = math.prod(mesh_sizes.values())
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import jax

        from tttjax import sharding as shd
        from tttjax.models import dit_config

        if len(jax.devices()) < devices:
            raise ValueError(f"mesh needs {devices} devices but {len(jax.devices())} exist; unset "
                             "XLA_FLAGS or set its device count to the mesh size")
        mesh = shd.make_mesh(mesh_sizes, jax.devices()[:devices])
        overrides = _parse_pairs(args.rules, "rules", lambda v: None if v == "none" else
                                 (tuple(v.split("+")) if "+" in v else v))
        config = _load_config(args.config)
        # The config's own rules (a training config's mesh.rules), then the flag's.
        config_rules = config.get("mesh", {}).get("rules") or ()
        rules = shd.merge_rules(list(overrides.items()), shd.merge_rules(config_rules))
        model = config.model
        model.attention_impl = args.attention_impl or "chunked"
        if args.remat:
            model.remat_policy = args.remat
        dit_config.validate(model)
        stage = config.stage
        default_trainable = config.get("train", {}).get("trainable") or (
            "all" if stage.name == "3s" else "mixer_qkvo")
        trainable = args.trainable or default_trainable
        batch = args.batch or mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)
        plan = plan_memory(model, latent_frames=stage.latent_frames,
                           latent_height=stage.latent_height, latent_width=stage.latent_width,
                           num_segments=stage.num_segments, text_length=stage.text_length,
                           batch=batch, mesh=mesh, rules=rules, trainable=trainable,
                           forward_only=args.forward_only)
    except ValueError as err:
        print(f"memory_plan: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: batch {batch}, trainable {trainable}, remat {model.remat_policy}, "
          f"attention {model.attention_impl}, {'forward' if args.forward_only else 'train step'}")
    changed = [f"{k}={'+'.join(v) if isinstance(v, tuple) else v}" for k, v in rules
               if (k, v) not in shd.DEFAULT_RULES]
    print(f"logical rules: defaults{' with ' + ', '.join(changed) if changed else ''}")
    print("\n".join(plan.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
