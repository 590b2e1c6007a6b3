"""TTT-MLP / TTT-Linear ops against the per-token float64 reference (docs/design.md §1).

Tolerances: forward |jax(float32) - ref(float64)| <= 2e-5 relative to the output scale.
Gradients: the op's float32 autodiff against central finite differences of the float64
reference along a random direction, relative error <= 5e-3 (float32 round-off through a
scan of a few mini-batches; a wrong gradient is off by O(1)).
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tttjax.ops import ttt
from ttt_reference import ttt_reference

OPS = {"mlp": ttt.ttt_mlp, "linear": ttt.ttt_linear}


def stable_seed(*parts) -> int:
    """A seed fixed by the test case: `hash()` of strings changes per process (PYTHONHASHSEED),
    which would give every run different inputs and make failures irreproducible."""
    return zlib.crc32(repr(parts).encode())


def make_inputs(seed, kind, bsz, h, length, d, w_scale=0.3):
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q, k = unit((bsz, h, length, d)), unit((bsz, h, length, d))
    v = rng.standard_normal((bsz, h, length, d))
    eta = rng.uniform(0.2, 1.5, (bsz, h, length))
    params = {name: rng.standard_normal(fn(h, d)) * w_scale
              for name, fn in ttt.PARAM_SHAPES[kind].items()}
    params["ln_weight"] = 1.0 + 0.2 * rng.standard_normal((h, d))
    params["ln_bias"] = 0.2 * rng.standard_normal((h, d))
    return q, k, v, eta, params


def f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


CASES = [  # kind, B, H, L, d, b, causal
    ("mlp", 2, 2, 32, 8, 8, False),
    ("mlp", 1, 3, 48, 16, 16, False),
    ("linear", 2, 2, 32, 8, 8, False),
    ("linear", 1, 2, 64, 16, 16, False),
    ("mlp", 1, 2, 24, 8, 8, True),
    ("linear", 2, 1, 32, 8, 8, True),
]


@functools.lru_cache(maxsize=None)
def jitted(kind, b, causal, group):
    fn = functools.partial(OPS[kind], mini_batch_size=b, causal=causal, remat_group_size=group)
    return jax.jit(fn)


@pytest.mark.parametrize("kind,bsz,h,length,d,b,causal", CASES)
def test_forward_matches_reference(kind, bsz, h, length, d, b, causal):
    q, k, v, eta, params = make_inputs(stable_seed(kind, length, d, causal), kind, bsz, h, length, d)
    z = jitted(kind, b, causal, 2)(*f32((q, k, v, eta, params)))
    z_ref, _ = ttt_reference(kind, q, k, v, eta, params, b, causal=causal)
    assert z.dtype == jnp.float32 and z.shape == q.shape
    np.testing.assert_allclose(np.asarray(z), z_ref, atol=2e-5 * np.abs(z_ref).max(), rtol=0)
    # The test can fail: the inner update must matter at these step sizes.
    z_no_update, _ = ttt_reference(kind, q, k, v, 0 * eta, params, b, causal=causal)
    assert np.abs(z_no_update - z_ref).max() > 1e-2


@pytest.mark.parametrize("kind,bsz,h,length,d,b,causal", [CASES[0], CASES[2], CASES[4], CASES[5]])
def test_gradients_match_finite_differences(kind, bsz, h, length, d, b, causal):
    q, k, v, eta, params = make_inputs(7 + len(kind) + causal, kind, bsz, h, length, d)
    rng = np.random.default_rng(1)
    w_out = rng.standard_normal(q.shape)
    inputs = {"q": q, "k": k, "v": v, "eta": eta, **params}
    fn = jitted(kind, b, causal, 2)

    def loss(args):
        p = {key: args[key] for key in params}
        return jnp.sum(fn(args["q"], args["k"], args["v"], args["eta"], p) * w_out)

    grads = jax.jit(jax.grad(loss))(f32(inputs))

    def ref_loss(args):
        p = {key: args[key] for key in params}
        z, _ = ttt_reference(kind, args["q"], args["k"], args["v"], args["eta"], p, b, causal=causal)
        return np.sum(z * w_out)

    eps = 1e-5
    for name, value in inputs.items():
        direction = rng.standard_normal(value.shape)
        plus = dict(inputs, **{name: value + eps * direction})
        minus = dict(inputs, **{name: value - eps * direction})
        fd = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
        ad = float(np.sum(np.asarray(grads[name], np.float64) * direction))
        assert abs(ad - fd) <= 5e-3 * max(abs(fd), 1e-2), f"d/d{name}: autodiff {ad} vs fd {fd}"


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_remat_groups_identical_and_state_pieces(kind):
    b, length = 8, 56  # 7 mini-batches: groups of 1, 2, 3 (remainder), 16 (one group)
    q, k, v, eta, params = make_inputs(3, kind, 1, 2, length, 8)
    args = f32((q, k, v, eta, params))
    outs = [jitted(kind, b, False, g)(*args) for g in (1, 2, 3, 16)]
    grads = [jax.grad(lambda qq, g=g: jnp.sum(jitted(kind, b, False, g)(qq, *args[1:]) ** 2))(args[0])
             for g in (1, 3)]
    for z in outs[1:]:
        np.testing.assert_allclose(np.asarray(z), np.asarray(outs[0]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=0, atol=1e-5)

    # Processing in two pieces with the returned state equals one pass.
    op = OPS[kind]
    z_full, s_full = op(*args, mini_batch_size=b, return_state=True)
    cut = 24
    part = lambda x, sl: x[..., sl, :] if x.ndim == 4 else x[..., sl]  # noqa: E731
    z1, s1 = op(*(part(x, slice(0, cut)) for x in args[:4]), args[4], mini_batch_size=b, return_state=True)
    z2, s2 = op(*(part(x, slice(cut, None)) for x in args[:4]), args[4], mini_batch_size=b,
                return_state=True, initial_state=s1)
    np.testing.assert_allclose(np.concatenate([z1, z2], axis=2), np.asarray(z_full), atol=1e-6, rtol=0)
    for key in s_full:
        np.testing.assert_allclose(np.asarray(s2[key]), np.asarray(s_full[key]), atol=1e-6, rtol=0)
    _, s_ref = ttt_reference(kind, q, k, v, eta, params, b)
    for key in s_full:
        np.testing.assert_allclose(np.asarray(s_full[key]), s_ref[key], atol=2e-5, rtol=0)


def test_causal_token_idx_offset_matches_reference():
    q, k, v, eta, params = make_inputs(11, "mlp", 1, 2, 16, 8)
    offset = np.random.default_rng(2).uniform(-0.05, 0.1, 8)
    z = ttt.ttt_mlp(*f32((q, k, v, eta, params)), mini_batch_size=8, causal=True,
                    token_idx_offset=jnp.asarray(offset, jnp.float32))
    z_ref, _ = ttt_reference("mlp", q, k, v, eta, params, 8, causal=True, token_idx_offset=offset)
    np.testing.assert_allclose(np.asarray(z), z_ref, atol=2e-5 * np.abs(z_ref).max(), rtol=0)


def test_bf16_inputs_keep_float32_state():
    q, k, v, eta, params = make_inputs(5, "mlp", 1, 2, 32, 8)
    bf = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), (q, k, v, eta))
    z, state = ttt.ttt_mlp(*bf, f32(params), mini_batch_size=8, return_state=True)
    assert z.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in state.values())
    # Same numbers as float32 arithmetic on the bf16-rounded inputs, up to output rounding.
    z32 = ttt.ttt_mlp(*(x.astype(jnp.float32) for x in bf), f32(params), mini_batch_size=8)
    np.testing.assert_allclose(np.asarray(z, np.float32), np.asarray(z32), rtol=1e-2, atol=1e-2)


def test_vmap_matches_loop():
    q, k, v, eta, params = make_inputs(9, "linear", 1, 2, 32, 8)
    stack = lambda x: jnp.stack([jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32) * 0.5])  # noqa: E731
    qs, ks, vs, es = (stack(x) for x in (q, k, v, eta))
    fn = jitted("linear", 8, False, 2)
    zs = jax.vmap(fn, in_axes=(0, 0, 0, 0, None))(qs, ks, vs, es, f32(params))
    for i in range(2):
        np.testing.assert_allclose(np.asarray(zs[i]), np.asarray(fn(qs[i], ks[i], vs[i], es[i], f32(params))),
                                   atol=1e-6, rtol=0)


def test_inner_loss_decreases_after_update():
    q, k, v, eta, params = make_inputs(4, "mlp", 1, 2, 64, 8, w_scale=0.1)
    _, loss = ttt.ttt_mlp(*f32((q, k, v, 0.3 * eta, params)), mini_batch_size=16, return_inner_loss=True)
    assert loss.before.shape == (1, 2, 4)
    assert bool(jnp.all(loss.after < loss.before))


def test_sharded_over_heads_equals_unsharded():
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    q, k, v, eta, params = make_inputs(21, "mlp", 2, 8, 32, 8)
    args = f32((q, k, v, eta, params))
    mesh = jax.make_mesh((8,), ("tensor",))
    head = NamedSharding(mesh, P(None, "tensor"))
    param_sh = {key: NamedSharding(mesh, P("tensor")) for key in params}
    sharded = jax.device_put(args, (head, head, head, head, param_sh))

    def loss_and_z(q, k, v, eta, p):
        z = ttt.ttt_mlp(q, k, v, eta, p, mini_batch_size=8, remat_group_size=2)
        return jnp.sum(z**2), z

    fn = jax.jit(jax.value_and_grad(loss_and_z, argnums=(0, 4), has_aux=True))
    (_, z_sh), g_sh = fn(*sharded)
    (_, z_one), g_one = fn(*args)
    assert z_sh.sharding.spec[1] == "tensor"
    np.testing.assert_allclose(np.asarray(z_sh), np.asarray(z_one), atol=1e-6, rtol=0)
    for a, b in zip(jax.tree.leaves(g_sh), jax.tree.leaves(g_one)):
        # Sharded reductions sum in a different order: float32 round-off only.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6 * np.abs(b).max(), rtol=1e-4)


@pytest.mark.parametrize("bad,match", [
    (dict(length=30), "not a multiple of mini_batch_size"),
    (dict(k_shape=(1, 2, 32, 4)), "share one shape"),
    (dict(eta_shape=(1, 2, 16)), "eta must be"),
    (dict(drop="W2"), "wrong param keys"),
    (dict(extra="W3"), "wrong param keys"),
    (dict(w1_shape=(2, 8, 8)), r"params\['W1'\] must have shape"),
])
def test_clear_errors(bad, match):
    length = bad.get("length", 32)
    q, k, v, eta, params = make_inputs(0, "mlp", 1, 2, length, 8)
    if "k_shape" in bad:
        k = np.zeros(bad["k_shape"])
    if "eta_shape" in bad:
        eta = np.zeros(bad["eta_shape"])
    if "drop" in bad:
        params.pop(bad["drop"])
    if "extra" in bad:
        params[bad["extra"]] = np.zeros(1)
    if "w1_shape" in bad:
        params["W1"] = np.zeros(bad["w1_shape"])
    with pytest.raises(ValueError, match=match):
        ttt.ttt_mlp(q, k, v, eta, params, mini_batch_size=8)


# --------------------------------------------------------------------------- custom-VJP scan
# The non-causal op's gradient is a custom VJP (hand-derived per-mini-batch backward of
# pallas_kernels.ttt_step, one state per remat group). `vjp="autodiff"` runs the previous
# implementation, JAX autodiff through the closed-form steps inside jax.checkpoint groups.


def _op(kind, vjp, b, group, with_state):
    def fn(q, k, v, eta, params, initial_state=None):
        return ttt._ttt(kind, q, k, v, eta, params, mini_batch_size=b, remat_group_size=group,
                        causal=False, token_idx_offset=None, initial_state=initial_state,
                        return_state=with_state, return_inner_loss=False, vjp=vjp)
    return fn


@pytest.mark.parametrize("kind,bsz,h,n,d,b,group,with_state", [
    ("mlp", 2, 2, 7, 8, 8, 3, True),       # two groups and a remainder group of 1
    ("linear", 1, 2, 6, 16, 4, 1, False),  # a checkpoint per mini-batch
])
def test_custom_vjp_equals_autodiff_scan(kind, bsz, h, n, d, b, group, with_state):
    """Values and every gradient (q, k, v, eta, params, initial state) of the custom-VJP scan
    equal JAX autodiff of the plain scan: |diff| <= 2e-5 x the gradient's scale (float32)."""
    q, k, v, eta, params = make_inputs(100 + n + d, kind, bsz, h, n * b, d)
    rng = np.random.default_rng(n)
    state0 = {key: rng.standard_normal((bsz,) + params[key].shape) * 0.3 for key in ttt.STATE_KEYS[kind]}
    w_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    w_state = {key: jnp.asarray(rng.standard_normal(s.shape), jnp.float32) for key, s in state0.items()}
    args = f32((q, k, v, eta, params, state0))

    def loss(fn):
        def f(*a):
            out = fn(*a)
            z, st = out if with_state else (out, {})
            return jnp.sum(z * w_out) + sum(jnp.sum(jnp.tanh(st[key]) * w_state[key]) for key in st), out
        return jax.jit(jax.value_and_grad(f, argnums=tuple(range(6)), has_aux=True))

    (_, out_c), g_c = loss(_op(kind, "custom", b, group, with_state))(*args)
    (_, out_a), g_a = loss(_op(kind, "autodiff", b, group, with_state))(*args)
    for x, y in zip(jax.tree.leaves(out_c), jax.tree.leaves(out_a)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6 * max(1.0, np.abs(y).max()), rtol=0)
    for path, x, y in zip(jax.tree_util.tree_flatten_with_path(g_c)[0], jax.tree.leaves(g_c), jax.tree.leaves(g_a)):
        # (params' W1, b1, ... get zero gradients: the initial state replaces them.)
        scale = float(np.abs(np.asarray(y)).max())
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5 * scale, rtol=0, err_msg=str(path[0]))
    assert all(float(jnp.abs(g).max()) > 0 for g in (*g_c[:4], *g_c[5].values(),
                                                      g_c[4]["ln_weight"], g_c[4]["ln_bias"]))


def test_custom_vjp_keeps_the_remat_bound_and_linear_memory():
    """Compiled temporaries of TTT-MLP forward + backward: linear in L (doubling L doubles
    the growth, +-15%) and no more than the autodiff scan's jax.checkpoint groups."""
    kind, b, d, h, group = "mlp", 8, 8, 2, 4

    def temp(n, vjp):
        shape = (1, h, n * b, d)
        args = (jnp.ones(shape),) * 3 + (jnp.ones((1, h, n * b)),)
        params = {key: jnp.ones(fn(h, d)) for key, fn in ttt.PARAM_SHAPES[kind].items()}
        op = _op(kind, vjp, b, group, False)
        grad = jax.grad(lambda *a: jnp.sum(op(*a)), argnums=(0, 1, 2, 3, 4))
        return jax.jit(grad).lower(*args, params).compile().memory_analysis().temp_size_in_bytes

    t32, t64, t128 = (temp(n, "custom") for n in (32, 64, 128))
    assert 1.7 <= (t128 - t64) / (t64 - t32) <= 2.3, (t32, t64, t128)
    assert t128 <= 1.1 * temp(128, "autodiff")


@pytest.mark.parametrize("matmul_sums", [True, False])
def test_reconstruction_target_vjp_equals_autodiff(matmul_sums):
    """The op's target [B, H, L, d] with per-head gamma, beta [H, 1, d] and its hand-written
    VJP (sums as matmuls with ones, as on CPU, or as reductions) against autodiff of the plain
    formula in float64: |diff| <= 1e-12 x scale, incl. a constant row of v - k (padding)."""
    from pallas_kernels import ttt_step

    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        k, v, dy = (jnp.asarray(rng.standard_normal((2, 3, 20, 8))) for _ in range(3))
        v = v.at[1, 2, 5].set(k[1, 2, 5] - 0.4)
        gamma = jnp.asarray(1.0 + 0.3 * rng.standard_normal((3, 1, 8)))
        beta = jnp.asarray(0.3 * rng.standard_normal((3, 1, 8)))
        with ttt_step.row_sums_as_matmuls(matmul_sums):
            y, vjp = jax.vjp(jax.jit(ttt.reconstruction_target), k, v, gamma, beta)
            got = vjp(dy)
            y_ref, vjp_ref = jax.vjp(jax.jit(ttt_step.target), k, v, gamma, beta)  # same sums
            expected = vjp_ref(dy)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-12)
        for name, a, r in zip(("k", "v", "gamma", "beta"), got, expected):
            a, r = np.asarray(a), np.asarray(r)
            assert a.shape == r.shape, name
            assert np.all(np.isfinite(a)), name
            # Row by row: the constant row's 1 / (0 + eps) scale must not hide the others' error.
            for row, ref_row in zip(a.reshape(-1, 8), r.reshape(-1, 8)):
                np.testing.assert_allclose(row, ref_row, rtol=0,
                                           atol=1e-12 * np.abs(ref_row).max(), err_msg=f"d{name}")


def test_cpu_only_choice_follows_the_traced_program_s_platform(monkeypatch):
    """The CPU-only choice (sums as matmuls) follows `platform.target_platform`, not the host:
    a TPU program compiled ahead of time on a CPU host does not get it."""
    from tttjax import platform

    k = jnp.ones((1, 2, 16, 8))
    gamma = jnp.ones((2, 1, 8))

    def dots_in_target_vjp():
        jaxpr = jax.make_jaxpr(jax.grad(lambda k: jnp.sum(ttt.reconstruction_target(
            k, 2 * k + 1, gamma, gamma))))(k)
        return str(jaxpr).count("dot_general")

    assert dots_in_target_vjp() > 0
    monkeypatch.setattr(platform, "target_platform", lambda: "tpu")
    assert dots_in_target_vjp() == 0
