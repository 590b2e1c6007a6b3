"""The TPU TTT kernels through the real TPU compiler, impl="auto" on a TPU mesh, and the kernel's
shard_map on 8 fake CPU devices.

No TPU here: libtpu compiles for TPU topology devices (`tttjax.tpu_topology`) on this CPU host,
so the Mosaic kernels meet the real compiler (VMEM limits, tiling, layouts, block shapes), the
figures are *compiled, not run*; the default backend stays the CPU. Numerics of the kernels are
tested in interpret mode (tests/test_pallas_ttt.py and the shard_map test here).

Tolerance of the sharded interpret-mode kernel against the unsharded XLA op (float32): every
output and gradient within 2e-5 x the array's largest magnitude, as in test_pallas_ttt.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import ttt as pallas_ttt
from pallas_kernels import ttt_tpu
from test_ttt_ops import f32, make_inputs
from tttjax import sharding, tpu_topology
from tttjax.layers.ttt import TTTMLP
from tttjax.ops import ttt

OPS = {"mlp": ttt.ttt_mlp, "linear": ttt.ttt_linear}


@functools.lru_cache(maxsize=None)
def _tpu_mesh(topology, tensor=4):
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu")
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": tensor},
                              tpu_topology.devices(topology))


def _abstract(shape, dtype, mesh, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _compile_grad(mesh, kind, *, heads, length, d, b, eta_dtype, impl):
    """jit(grad) of sum(z^2) w.r.t. q, k, v, eta and params, compiled for `mesh` (batch over
    data, heads over tensor; bf16 q/k/v; remat groups of 16)."""
    bsz = mesh.shape["data"]
    seq = _abstract((bsz, heads, length, d), jnp.bfloat16, mesh, P("data", "tensor"))
    eta = _abstract((bsz, heads, length), eta_dtype, mesh, P("data", "tensor"))
    params = {name: _abstract(fn(heads, d), jnp.float32, mesh, P("tensor"))
              for name, fn in ttt.PARAM_SHAPES[kind].items()}

    def loss(q, k, v, eta, p):
        z = OPS[kind](q, k, v, eta, p, mini_batch_size=b, remat_group_size=16, impl=impl)
        return jnp.sum(jnp.square(z.astype(jnp.float32)))

    with jax.set_mesh(mesh):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
            seq, seq, seq, eta, params).compile()


@pytest.mark.parametrize("topology,kind,d,b,n", [
    ("v5p-8", "mlp", 64, 64, 17),    # the 5B layer's per-head shape, groups of 16, ragged last
    ("v5p-8", "linear", 64, 16, 17),
    ("v6e-8", "mlp", 64, 64, 17),
    ("v6e-8", "linear", 64, 16, 17),
])
def test_tpu_kernels_compile_forward_and_backward(topology, kind, d, b, n):
    """jit(grad) of the op with impl='pallas' on a TPU topology mesh (heads over tensor = 4,
    batch over data) compiles with libtpu: one forward and one backward Mosaic kernel, inside
    the shard_map (no all-gather of the sharded q/k/v), the kernels' cost estimates counted."""
    mesh = _tpu_mesh(topology)
    heads = 2 * mesh.shape["tensor"]
    compiled = _compile_grad(mesh, kind, heads=heads, length=n * b, d=d, b=b,
                             eta_dtype=jnp.bfloat16, impl="pallas")
    text = compiled.as_text()
    assert text.count("tpu_custom_call") == 2, "one forward and one backward Mosaic kernel"
    assert "all-gather" not in text, "q/k/v must reach the kernel in their batch/heads shards"
    # (No assertion on memory_analysis: small programs report 0 temporaries on v6e, whose
    # compiler keeps such buffers out of HBM.)
    # The kernels' pl.CostEstimate reaches XLA's cost analysis: at least the backward's matmuls
    # over this chip's (batch, head) pairs.
    step = ttt_tpu.step_costs(kind, d, b)["backward"][0]
    assert compiled.cost_analysis()["flops"] >= step * n * heads // mesh.shape["tensor"]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5p-8", "v6e-8"])
@pytest.mark.parametrize("kind,b,tokens", [("mlp", 64, 17550), ("mlp", 64, 341550),
                                           ("linear", 16, 341550)])
def test_tpu_kernels_compile_at_5b_lengths(topology, kind, b, tokens):
    """The 5B layer (48 heads, 12 per chip, d = 64, groups of 16) at 13 and 253 latent frames
    (18k and 341k tokens): fwd+bwd compiles and its temporaries fit the chip's HBM."""
    mesh = _tpu_mesh(topology)
    compiled = _compile_grad(mesh, kind, heads=48, length=-(-tokens // b) * b, d=64, b=b,
                             eta_dtype=jnp.float32, impl="auto")
    assert compiled.as_text().count("tpu_custom_call") == 2
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
    assert total < tpu_topology.chip(topology).hbm_bytes


@pytest.mark.parametrize("impl,kernels", [("auto", 2), ("xla", 0)])
def test_auto_compiles_the_mosaic_kernel_for_a_tpu_mesh(impl, kernels):
    """A tiny TTT-MLP layer jitted (forward + gradients) on a v5p-8 topology mesh: impl='auto'
    picks the TPU kernel from the mesh's devices although JAX's default backend is the CPU (the
    ahead-of-time case); impl='xla' keeps the XLA scan."""
    assert jax.default_backend() == "cpu"
    mesh = _tpu_mesh("v5p-8")
    layer = TTTMLP(64, 4, mini_batch_size=8, remat_group_size=2, impl=impl, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            nnx.to_pure_dict(state),
                            nnx.to_pure_dict(sharding.state_shardings(state, mesh)))
    x = _abstract((1, 40, 64), jnp.float32, mesh, P())

    def loss(params, x):
        st = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(st, params)
        return jnp.sum(nnx.merge(graphdef, st)(x) ** 2)

    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        compiled = jax.jit(jax.grad(loss)).lower(abstract, x).compile()
    assert compiled.as_text().count("tpu_custom_call") == kernels


@pytest.mark.slow
def test_tiny_dit_train_step_compiles_the_kernel_for_a_tpu_slice():
    """The trainer's whole step (tiny DiT, TTT-MLP mixer with impl='auto': scanned blocks, remat,
    both scan directions) compiled for v5p-8 with heads over tensor = 4: the Mosaic kernels are
    in it (a forward and a backward per direction)."""
    import importlib.util
    from pathlib import Path

    from tttjax.bench import aot

    _tpu_mesh("v5p-8")  # skips without libtpu
    path = Path(__file__).parents[1] / "configs" / "tiny.py"
    spec = importlib.util.spec_from_file_location("tiny_config", path)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    config = tiny.get_config("ttt_mlp,1")
    config.model.mixer_config.ttt_mlp.impl = "auto"
    config.mesh.axes = {"data": 1, "fsdp": 1, "tensor": 4}
    step = aot.compile_train_step(config, tpu_topology.devices("v5p-8"))
    assert step.pallas_kernels == 4


def test_mesh_layout_follows_rules_divisibility_and_manual_axes():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert pallas_ttt.mesh_layout(mesh, 4, 6) == (("data", "fsdp"), ("tensor",))
    # shard_map splits evenly: an axis that does not divide its dim is left out (gathered).
    assert pallas_ttt.mesh_layout(mesh, 2, 3) == (("data",), ())
    rules = sharding.merge_rules([("activation_batch", "data"),
                                  ("activation_heads", ("tensor", "fsdp"))])
    assert pallas_ttt.mesh_layout(mesh, 2, 4, rules) == (("data",), ("tensor", "fsdp"))
    # Inside a caller's shard_map over data: data is already split, the rest stays to do.
    manual = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"),
                          axis_types=(AxisType.Manual, AxisType.Auto, AxisType.Auto))
    assert pallas_ttt.mesh_layout(manual, 4, 6) == (("fsdp",), ("tensor",))


def test_kernel_in_shard_map_on_cpu_mesh_equals_unsharded_xla_op():
    """impl='pallas_interpret' under jax.set_mesh on 8 fake CPU devices: batch over data, heads
    over tensor, the sequence arriving sharded over fsdp (gathered for the scan); the value and
    gradients w.r.t. q, k, v, eta and every parameter equal the XLA op on one device. The
    last remat group is ragged (5 mini-batches, groups of 2)."""
    kind, bsz, heads, d, b, group = "mlp", 2, 4, 8, 8, 2
    length = 5 * b
    q, k, v, eta, params = f32(make_inputs(7, kind, bsz, heads, length, d))
    w_out = jnp.asarray(np.random.default_rng(1).standard_normal((bsz, heads, length, d)),
                        jnp.float32)

    def loss(args, impl):
        z = ttt.ttt_mlp(*args, mini_batch_size=b, remat_group_size=group, impl=impl)
        return jnp.sum(z * w_out), z

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1,
                 compiler_options={"xla_backend_optimization_level": 0})
    (_, z_ref), g_ref = fn((q, k, v, eta, params), "xla")

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.merge_rules([("activation_batch", "data"), ("activation_length", "fsdp")])
    assert pallas_ttt.mesh_layout(mesh, bsz, heads, rules) == (("data",), ("tensor",))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    args = (put(q, "data", "tensor", "fsdp"), put(k, "data", "tensor", "fsdp"),
            put(v, "data", "tensor", "fsdp"), put(eta, "data", "tensor", "fsdp"),
            {key: put(p, "tensor") for key, p in params.items()})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        (_, z), g = fn(args, "pallas_interpret")
        lowered = fn.lower(args, "pallas_interpret").as_text()
    assert "sdy.manual_computation" in lowered, "the kernel runs inside a shard_map"

    def close(a, ref, what):
        a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
        np.testing.assert_allclose(a, ref, rtol=0, atol=2e-5 * np.abs(ref).max(), err_msg=what)

    assert z.sharding.spec[:2] == ("data", "tensor")
    close(z, z_ref, "z")
    for name, a, ref in zip("q k v eta".split(), g[:4], g_ref[:4]):
        close(a, ref, f"d{name}")
    for key in params:  # replicated over data: shard_map's transpose sums the batch shards
        close(g[4][key], g_ref[4][key], f"d{key}")


def test_kernel_benchmark_compiles_for_a_topology(tmp_path, capsys):
    """`python -m tttjax.bench kernels --topology v5p-8` at a tiny shape: both impls, fwd and
    fwd+bwd, per-chip memory and cost rows; usage errors exit 2."""
    import csv

    from tttjax.bench import __main__ as bench_cli

    _tpu_mesh("v5p-8")  # skips without libtpu
    out = tmp_path / "kernels.csv"
    assert bench_cli.main(["kernels", "--topology", "v5p-8", "--kinds", "linear", "--lengths", "200",
                           "--heads", "8", "--head-dim", "16", "--mini-batch", "8",
                           "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["impl"], r["L"], r["mode"]) for r in rows] == [
        ("xla", "200", "fwd"), ("xla", "200", "fwd_bwd"),
        ("pallas", "200", "fwd"), ("pallas", "200", "fwd_bwd")]
    assert [int(r["mosaic_calls"]) for r in rows] == [0, 0, 1, 2]
    for r in rows:
        assert float(r["args_gib"]) > 0 and float(r["analytic_gflop"]) > 0, r
    assert float(rows[3]["vmem_est_mib"]) > 0 and int(rows[3]["heads_per_chip"]) == 2
    printed = capsys.readouterr().out
    assert "TPU compiler on a CPU host: compiled, not run" in printed
    assert "| linear | pallas | 200 | fwd_bwd |" in printed
    for bad in (["--interpret"], ["--heads", "6"], ["--impls", "triton"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_cli.main(["kernels", "--topology", "v5p-8", "--lengths", "64", *bad])
        assert exit_info.value.code == 2, bad
