"""Pallas TTT kernels (pallas_kernels) against the XLA op, the float64 reference and jax.vjp.

No TPU/GPU here: the kernels run in Pallas interpret mode (the TPU kernels with Pallas' TPU
interpret params, which simulate VMEM and the grid's sequential semantics; the Triton kernels
with the generic interpreter), and their lowering to Mosaic (TPU) and Triton (CUDA) IR is
checked by exporting for those platforms. The real TPU compiler (libtpu on this host) and the
kernel's shard_map under a mesh: tests/test_pallas_tpu_compile.py.

Tolerances: kernel vs XLA op on the same float32 inputs, every output and gradient within
2e-5 x the array's largest magnitude (float32 round-off of differently ordered sums; a wrong
term is off by O(1)). bf16 inputs: outputs and the bf16 input gradients are rounded to bf16 by
both, so 1e-2 x max. Every case, bf16 included, is also checked against the float64 per-token
reference: outputs, and all gradients through a central difference of the reference along a
random direction (1e-4 of the summed magnitudes for float32 inputs, 3e-2 for bf16). The
hand-written step VJP is checked against jax.vjp of the XLA step in float64 to 1e-12.
"""

import csv
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels import ttt as pallas_ttt
from pallas_kernels import ttt_step
from test_ttt_ops import f32, make_inputs, stable_seed
from tttjax.ops import ttt
from ttt_reference import ttt_reference

OPS = {"mlp": ttt.ttt_mlp, "linear": ttt.ttt_linear}

CASES = [  # kind, backend, B, H, mini-batches, d, b, remat group, input dtype, with state
    ("mlp", "tpu", 2, 1, 5, 16, 8, 4, "float32", False),      # 5 = 4 + 1: padded last group
    ("linear", "tpu", 1, 2, 3, 32, 16, 1, "bfloat16", False),
    ("mlp", "tpu", 1, 1, 2, 64, 64, 1, "bfloat16", False),
    ("linear", "tpu", 1, 2, 6, 16, 8, 4, "float32", True),    # initial_state in, final state out
    ("mlp", "gpu", 1, 2, 4, 32, 16, 4, "float32", False),
    ("linear", "gpu", 1, 1, 3, 64, 64, 4, "float32", False),  # one padded group
    ("mlp", "gpu", 1, 2, 3, 16, 16, 1, "bfloat16", True),
]


def _loss_fn(run, kind, with_state, w_out, w_state):
    """sum(z * w_out) (+ sum(final_state * w_state)), returning z and the state as aux."""
    names = ttt_step.STATE_NAMES[kind]

    def loss(args):
        p = {key: args[key] for key in ttt.PARAM_SHAPES[kind]}
        init = {key: args["s_" + key] for key in names} if with_state else None
        out = run(args["q"], args["k"], args["v"], args["eta"], p, init)
        z, state = out if with_state else (out, None)
        total = jnp.sum(z.astype(jnp.float32) * w_out)
        if with_state:
            total += sum(jnp.sum(state[key] * w_state[key]) for key in names)
        return total, (z, state)

    # LLVM -O0: halves the CPU compile time of these interpret-mode graphs (the test's cost).
    return jax.jit(jax.value_and_grad(loss, has_aux=True),
                   compiler_options={"xla_backend_optimization_level": 0})


def _inputs(case):
    kind, backend, bsz, h, n, d, b, group, dtype, with_state = case
    length = n * b
    q, k, v, eta, params = make_inputs(stable_seed(*case), kind, bsz, h, length, d)
    rng = np.random.default_rng(len(CASES))
    args = dict(zip("q k v eta".split(), (jnp.asarray(x, dtype) for x in (q, k, v, eta))))
    args.update(f32(params))
    w_state = None
    if with_state:
        for key in ttt_step.STATE_NAMES[kind]:
            args["s_" + key] = jnp.asarray(
                params[key][None] + 0.1 * rng.standard_normal((bsz,) + params[key].shape), jnp.float32)
        w_state = {key: jnp.asarray(rng.standard_normal(args["s_" + key].shape), jnp.float32)
                   for key in ttt_step.STATE_NAMES[kind]}
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    return args, w_out, w_state, (q, k, v, eta, params)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:2] + c[5:9])))
def test_kernel_outputs_and_all_gradients_equal_xla_op(case):
    kind, backend, bsz, h, n, d, b, group, dtype, with_state = case
    args, w_out, w_state, raw = _inputs(case)
    opts = dict(mini_batch_size=b, remat_group_size=group, return_state=with_state)

    def xla(q, k, v, eta, p, init):
        return OPS[kind](q, k, v, eta, p, initial_state=init, **opts)

    if backend == "tpu" and not with_state:
        # Through the public op's dispatch: impl="pallas_interpret" is the TPU kernel.
        def kernel(q, k, v, eta, p, init):
            return OPS[kind](q, k, v, eta, p, initial_state=init, impl="pallas_interpret", **opts)
    else:
        def kernel(q, k, v, eta, p, init):
            return pallas_ttt.ttt_scan(kind, q, k, v, eta, p, initial_state=init, backend=backend,
                                       interpret=True, **opts)

    (_, (z_ref, s_ref)), g_ref = _loss_fn(xla, kind, with_state, w_out, w_state)(args)
    (_, (z, s)), g = _loss_fn(kernel, kind, with_state, w_out, w_state)(args)

    tol = 2e-5 if dtype == "float32" else 1e-2
    assert z.dtype == z_ref.dtype == jnp.dtype(dtype) and z.shape == z_ref.shape

    def close(a, ref, what):
        a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
        scale = np.abs(ref).max()
        assert scale > 0, f"{what}: reference is all zeros, the comparison would be vacuous"
        np.testing.assert_allclose(a, ref, rtol=0, atol=tol * scale, err_msg=what)

    close(z, z_ref, "z")
    if with_state:
        for key in s_ref:
            assert s[key].dtype == jnp.float32
            close(s[key], s_ref[key], f"final state {key}")
    assert set(g) == set(g_ref)
    unused = set(ttt_step.STATE_NAMES[kind]) if with_state else set()  # initial_state replaces them
    for name in g_ref:
        assert g[name].dtype == g_ref[name].dtype, name
        if name in unused:
            assert not np.any(np.asarray(g[name])) and not np.any(np.asarray(g_ref[name])), name
        else:
            close(g[name], g_ref[name], f"d/d{name}")

    _check_against_float64_reference(case, args, z, s, g, w_out, w_state, raw[4])


def _check_against_float64_reference(case, args, z, s, g, w_out, w_state, param_names):
    """The kernel against the independent per-token float64 reference, for every dtype:
    outputs at the inputs the kernel saw (bf16-rounded in the bf16 cases), and all gradients
    at once through a central difference of the reference's loss along a random direction in
    the space of every input (q, k, v, eta, parameters, initial state)."""
    kind, _, _, _, _, _, b, _, dtype, with_state = case
    names = ttt_step.STATE_NAMES[kind]
    x0 = {n: np.asarray(jnp.asarray(a, jnp.float32), np.float64) for n, a in args.items()}
    w_out64 = np.asarray(w_out, np.float64)

    def loss(x):
        init = {key: x["s_" + key] for key in names} if with_state else None
        z64, s64 = ttt_reference(kind, x["q"], x["k"], x["v"], x["eta"],
                                 {n: x[n] for n in param_names}, b, initial_state=init)
        total = np.sum(z64 * w_out64)
        if with_state:
            total += sum(np.sum(s64[key] * np.asarray(w_state[key], np.float64)) for key in names)
        return total, z64, s64

    _, z64, s64 = loss(x0)
    tol = 2e-5 if dtype == "float32" else 1e-2   # bf16: z itself is rounded to bf16
    np.testing.assert_allclose(np.asarray(z, np.float64), z64, rtol=0,
                               atol=tol * np.abs(z64).max(), err_msg="z vs float64 reference")
    if with_state:
        for key in s64:
            np.testing.assert_allclose(np.asarray(s[key]), s64[key], rtol=0,
                                       atol=2e-5 if dtype == "float32" else 2e-3, err_msg=key)

    rng = np.random.default_rng(stable_seed("direction", *case))
    u = {n: rng.standard_normal(x.shape) for n, x in x0.items()}
    h = 1e-5
    fd = (loss({n: x0[n] + h * u[n] for n in x0})[0]
          - loss({n: x0[n] - h * u[n] for n in x0})[0]) / (2 * h)
    terms = [np.sum(np.asarray(g[n], np.float64) * u[n]) for n in x0]
    # bf16: input gradients are rounded to bf16 and the output cotangent too.
    rtol = 1e-4 if dtype == "float32" else 3e-2
    scale = sum(abs(t) for t in terms)
    assert abs(sum(terms) - fd) <= rtol * scale, (sum(terms), fd, scale)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_step_backward_equals_vjp_of_xla_step(kind):
    """The hand-derived backward of one update-then-apply step, in float64, against jax.vjp."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        b, d = 8, 8
        f = ttt_step.hidden_width(kind, d)

        def rand(*shape, scale=0.5):
            return jnp.asarray(scale * rng.standard_normal(shape), jnp.float64)

        q, k, y = rand(b, d), rand(b, d), rand(b, d)
        eta = jnp.asarray(rng.uniform(0.2, 1.5, b))
        gamma, beta = 1.0 + rand(1, d, scale=0.3), rand(1, d, scale=0.3)
        state = (rand(d, f), rand(1, f)) + ((rand(f, d), rand(1, d)) if kind == "mlp" else ())
        names = ttt_step.STATE_NAMES[kind]

        def xla_step(state, q, k, y, eta, gamma, beta):
            s4 = {n: x[None, None] for n, x in zip(names, state)}
            inputs = (q[None, None], k[None, None], y[None, None], eta[None, None], gamma, beta,
                      jnp.full((b,), 1.0 / b, jnp.float64))
            new, (z, _) = ttt._minibatch_step(s4, inputs, kind=kind, causal=False, with_loss=False)
            return tuple(new[n][0, 0] for n in names), z[0, 0]

        args = (state, q, k, y, eta, gamma, beta)
        fast = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
        new, z = fast(ttt_step.forward_step, static_argnums=0)(
            kind, state, q, k, y, (eta / b)[:, None], gamma, beta)
        dnew = tuple(rand(*x.shape, scale=1.0) for x in new)
        dz = rand(b, d, scale=1.0)

        @fast
        def reference(args, cotangents):
            out, vjp = jax.vjp(xla_step, *args)
            return out, vjp(cotangents)

        (new_ref, z_ref), expected = reference(args, (dnew, dz))
        np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-12)
        for a, r in zip(new, new_ref):
            np.testing.assert_allclose(a, r, rtol=0, atol=1e-12)
        dstate, dq, dk, dy, dw, dgamma, dbeta = fast(ttt_step.backward_step, static_argnums=0)(
            kind, state, q, k, y, (eta / b)[:, None], gamma, beta, dz, dnew)
        got = (dstate, dq, dk, dy, dw[:, 0] / b, dgamma, dbeta)
        for name, a, r in zip("state q k y eta gamma beta".split(), got, expected):
            for x, xr in zip(jax.tree.leaves(a), jax.tree.leaves(r)):
                assert np.abs(np.asarray(xr)).max() > 1e-3, f"d{name} is vacuously small"
                np.testing.assert_allclose(x, xr, rtol=0, atol=1e-12, err_msg=f"d{name}")


def test_in_kernel_target_and_its_vjp_equal_the_xla_target():
    """The TPU kernels form y = reconstruction_target(k, v) per mini-batch and its VJP by hand:
    both against the XLA op's function and jax.vjp in float64, incl. a constant row of v - k
    (padding: the floored variance, whose gradient is cut)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        b, d = 8, 16
        k, v = (jnp.asarray(rng.standard_normal((b, d))) for _ in range(2))
        v = v.at[3].set(k[3] + 0.7)                                  # v - k constant in row 3
        gamma = jnp.asarray(1.0 + 0.3 * rng.standard_normal((1, d)))
        beta = jnp.asarray(0.3 * rng.standard_normal((1, d)))
        dy = jnp.asarray(rng.standard_normal((b, d)))
        # (ttt.reconstruction_target has this very VJP; autodiff of the plain function is the
        # independent reference.)
        y_ref, vjp = jax.vjp(ttt_step.target, k, v, gamma, beta)
        np.testing.assert_allclose(ttt.reconstruction_target(k, v, gamma, beta), y_ref, rtol=0,
                                   atol=1e-12)
        expected = vjp(dy)
        got = ttt_step.target_backward(k, v, gamma, dy)
        for name, a, r in zip(("k", "v", "gamma", "beta"), got, expected):
            a, r = np.asarray(a), np.asarray(r)
            assert np.all(np.isfinite(a)), name
            # Row by row: the constant row's 1 / (0 + eps) scale must not hide the others' error.
            for row in range(a.shape[0]):
                np.testing.assert_allclose(a[row], r[row], rtol=0, atol=1e-12 * np.abs(r[row]).max(),
                                           err_msg=f"d{name} row {row}")


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_kernels_lower_to_mosaic_and_triton(kind):
    """Forward + backward at the 5B per-head shape (d = b = 64, groups of 16) lower for TPU and
    CUDA: the Pallas Mosaic and Triton lowerings accept every op of the kernels."""
    d, b, group = 64, 64, 16
    args = f32(make_inputs(1, kind, 1, 2, 2 * group * b, d))

    for backend, platform in (("tpu", "tpu"), ("gpu", "cuda")):
        def loss(q, k, v, eta, p, backend=backend):
            z = pallas_ttt.ttt_scan(kind, q, k, v, eta, p, mini_batch_size=b,
                                    remat_group_size=group, backend=backend)
            return jnp.sum(z * z)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        exp = export.export(fn, platforms=[platform], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        text = exp.mlir_module()
        if platform == "tpu":
            assert text.count("tpu_custom_call") == 2, "one forward and one backward Mosaic kernel"
        else:
            assert text.count("__gpu$xla.gpu.triton") == 2, "one forward and one backward Triton kernel"


@functools.lru_cache(maxsize=None)
def _small_inputs():
    return f32(make_inputs(2, "mlp", 1, 2, 32, 8))


def test_auto_on_cpu_is_the_xla_op_and_pallas_needs_an_accelerator():
    q, k, v, eta, params = _small_inputs()
    z_xla = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8)
    z_auto = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, impl="auto")
    np.testing.assert_array_equal(np.asarray(z_auto), np.asarray(z_xla))
    with pytest.raises(ValueError, match="needs a TPU or GPU backend"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, impl="pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, impl="triton")


def test_causal_and_inner_loss_stay_on_xla():
    q, k, v, eta, params = _small_inputs()
    z_auto = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, causal=True, impl="auto")
    z_xla = ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, causal=True)
    np.testing.assert_array_equal(np.asarray(z_auto), np.asarray(z_xla))
    with pytest.raises(ValueError, match="non-causal scan only; causal=True"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, causal=True, impl="pallas_interpret")
    with pytest.raises(ValueError, match="return_inner_loss=True runs in the XLA op"):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8, return_inner_loss=True,
                    impl="pallas_interpret")


def test_auto_picks_the_kernel_only_where_the_backend_supports_the_shape(monkeypatch):
    def on(platform):
        monkeypatch.setattr(pallas_ttt.jax, "default_backend", lambda: platform)

    shape = dict(d=64, length=64 * 64, mini_batch_size=64, remat_group_size=16)
    on("tpu")
    assert pallas_ttt.select("mlp", "auto", **shape) == ("tpu", False)
    assert pallas_ttt.select("mlp", "auto", **dict(shape, mini_batch_size=12, length=48)) is None
    assert pallas_ttt.select("mlp", "auto", **shape, causal=True) is None
    on("gpu")
    assert pallas_ttt.select("linear", "pallas", **shape) == ("gpu", False)
    assert pallas_ttt.select("linear", "auto", **dict(shape, d=24)) is None
    with pytest.raises(ValueError, match="powers of two"):
        pallas_ttt.select("linear", "pallas", **dict(shape, d=24))
    on("cpu")
    assert pallas_ttt.select("mlp", "auto", **shape) is None
    assert pallas_ttt.select("mlp", "xla", **shape) is None


@pytest.mark.parametrize("backend,kind,d,b,group,match", [
    ("tpu", "mlp", 16, 12, 4, "mini_batch_size=12 must be a multiple of 8"),
    ("tpu", "linear", 12, 8, 4, "head dim d=12 must be a multiple of 8"),
    ("tpu", "mlp", 64, 64, 512, "MiB of VMEM"),
    ("gpu", "mlp", 24, 16, 4, "must be powers of two"),
    ("gpu", "linear", 16, 8, 4, "must be >= 16"),
    ("gpu", "mlp", 64, 48, 4, "must be powers of two"),
    ("cuda", "mlp", 64, 64, 4, "backend must be one of"),
])
def test_unsupported_shapes_raise_clear_errors(backend, kind, d, b, group, match):
    with pytest.raises(ValueError, match=match):
        pallas_ttt.check_supported(kind, backend, d=d, mini_batch_size=b, remat_group_size=group)
    if backend in pallas_ttt.BACKENDS:
        # The same error reaches the caller of the scan, before anything is traced.
        q, k, v, eta, params = f32(make_inputs(0, kind, 1, 1, group * b, d))
        with pytest.raises(ValueError, match=match):
            pallas_ttt.ttt_scan(kind, q, k, v, eta, params, mini_batch_size=b,
                                remat_group_size=group, backend=backend, interpret=True)


def test_kernel_benchmark_smoke(tmp_path, capsys):
    """`python -m tttjax.bench kernels --interpret` at a tiny shape (no timing asserted)."""
    from tttjax.bench import __main__ as bench_cli

    out = tmp_path / "kernels.csv"
    assert bench_cli.main(["kernels", "--interpret", "--kinds", "linear", "--lengths", "32",
                           "--heads", "1", "--head-dim", "16", "--mini-batch", "16",
                           "--matmul-size", "64", "--repeats", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["impl"], r["L"]) for r in rows] == [("xla", "32"), ("pallas_interpret", "32")]
    assert float(rows[1]["z_rel_err"]) < 1e-2 and float(rows[1]["grad_rel_err"]) < 1e-2
    assert "| linear | pallas_interpret | 32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # on CPU the real kernels cannot run
        bench_cli.main(["kernels", "--lengths", "32"])
    assert exit_info.value.code == 2
