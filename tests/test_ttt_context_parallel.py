"""Context-parallel TTT (tttjax.ops.ttt_context_parallel) against the single-device op.

On the 8 fake CPU devices of conftest; B 2, H 4, L 128, d 8, mini-batch 8, float32.
Tolerances: values |cp - one| <= 1e-5 * max|one|; gradients of sum(z * w) w.r.t. q, k, v,
eta and every param (initial state W1, b1 (, W2, b2) and the TTT LayerNorm), per leaf
rtol 1e-4 and atol 1e-5 * max|one's gradient|. Measured differences are ~1e-6 of the scale:
the pipeline runs the same per-span arithmetic, only the parameter gradients are summed over
devices in another order. A state that does not travel (each device from W0, or the ppermute
dropped) is off by O(0.1-1) of the scale.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tttjax.ops import ttt
from tttjax.ops.ttt_context_parallel import ttt_context_parallel
from tttjax.sharding import make_mesh
from test_ttt_ops import f32, make_inputs

OPS = {"mlp": ttt.ttt_mlp, "linear": ttt.ttt_linear}
BSZ, HEADS, LENGTH, DIM, MB, GROUP = 2, 4, 128, 8, 8, 2
# LLVM at -O0: halves the CPU compile time of these scans (the file's main cost); the
# arithmetic is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def inputs(kind):
    q, k, v, eta, params = make_inputs(17 + len(kind), kind, BSZ, HEADS, LENGTH, DIM)
    w_out = np.random.default_rng(5).standard_normal(q.shape)
    return f32(dict(q=q, k=k, v=v, eta=eta, **params)), jnp.asarray(w_out, jnp.float32)


def value_and_grad(kind, z_fn, args, w_out):
    """(z, d sum(z * w_out) / d args) for z = z_fn(q, k, v, eta, params), one compile."""
    def loss(args, w_out):
        params = {key: args[key] for key in ttt.PARAM_SHAPES[kind]}
        z = z_fn(args["q"], args["k"], args["v"], args["eta"], params)
        return jnp.sum(z * w_out), z
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, z), grads = fn.trace(args, w_out).lower().compile(FAST_COMPILE)(args, w_out)
    return z, grads


@functools.lru_cache(maxsize=None)
def single_device(kind, reverse):
    """(z, grads) of the plain op; reversed: on the flipped sequence, flipped back."""
    args, w_out = inputs(kind)
    seq = ("q", "k", "v", "eta")
    flip = (lambda x: jnp.flip(x, axis=2)) if reverse else (lambda x: x)
    # Both directions run one compiled function: sum(rev(op(rev x)) * w) = sum(op(rev x) * rev w).
    z, grads = single_device_fn(kind)({**args, **{n: flip(args[n]) for n in seq}}, flip(w_out))
    return flip(z), {**grads, **{n: flip(grads[n]) for n in seq}}


@functools.lru_cache(maxsize=None)
def single_device_fn(kind):
    def loss(args, w_out):
        params = {key: args[key] for key in ttt.PARAM_SHAPES[kind]}
        z = OPS[kind](args["q"], args["k"], args["v"], args["eta"], params, mini_batch_size=MB,
                      remat_group_size=GROUP)
        return jnp.sum(z * w_out), z
    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    compiled = fn.trace(*inputs(kind)).lower().compile(FAST_COMPILE)

    def run(args, w_out):
        (_, z), grads = compiled(args, w_out)
        return z, grads
    return run


def fast_jit(fn):
    return lambda *args: jax.jit(fn).trace(*args).lower().compile(FAST_COMPILE)(*args)


def mesh_of(sizes):
    n = int(np.prod(list(sizes.values())))
    return make_mesh(sizes, jax.devices()[:n])


def assert_close_to_scale(actual, expected, *, rtol, scale_tol, what):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol,
                               atol=scale_tol * np.abs(expected).max(), err_msg=what)


CASES = [  # kind, mesh, reverse, batch_axes, head_axes, head_groups
    ("mlp", {"context": 8}, True, None, None, 2),
    ("linear", {"context": 2}, False, None, None, None),
    # Heads over another axis; one pipelined group of both local heads.
    ("mlp", {"tensor": 2, "context": 4}, False, None, "tensor", 1),
    # Batch over another axis.
    ("linear", {"data": 2, "context": 4}, True, "data", None, 2),
]


def case_id(case):
    kind, sizes, reverse, *_ = case
    return f"{kind}-{'x'.join(f'{k}{v}' for k, v in sizes.items())}-{'rev' if reverse else 'fwd'}"


@pytest.mark.parametrize("kind,sizes,reverse,batch_axes,head_axes,head_groups", CASES,
                         ids=[case_id(c) for c in CASES])
def test_values_and_gradients_equal_single_device(kind, sizes, reverse, batch_axes, head_axes,
                                                  head_groups):
    mesh = mesh_of(sizes)
    z_fn = functools.partial(ttt_context_parallel, kind, mini_batch_size=MB, axis_name="context",
                             mesh=mesh, remat_group_size=GROUP, reverse=reverse,
                             head_groups=head_groups, batch_axes=batch_axes, head_axes=head_axes)
    z, grads = value_and_grad(kind, z_fn, *inputs(kind))
    z_one, grads_one = single_device(kind, reverse)

    assert tuple(z.sharding.spec) + (None,) * (4 - len(z.sharding.spec)) == (
        batch_axes, head_axes, "context", None)
    assert_close_to_scale(z, z_one, rtol=0, scale_tol=1e-5, what="z")
    assert set(grads) == {"q", "k", "v", "eta", *ttt.PARAM_SHAPES[kind]}
    for name in grads:
        assert_close_to_scale(grads[name], grads_one[name], rtol=1e-4, scale_tol=1e-5,
                              what=f"d loss / d {name}")


def test_pallas_kernel_per_span_equals_single_device():
    """Each span scanned by the Pallas TPU kernel (interpret mode) inside the pipeline's
    shard_map (which then runs without the varying-axes check), reversed, heads on a second
    axis: values and gradients equal the single-device XLA op."""
    kind, mesh = "mlp", mesh_of({"tensor": 2, "context": 2})
    z_fn = functools.partial(ttt_context_parallel, kind, mini_batch_size=MB, axis_name="context",
                             mesh=mesh, remat_group_size=GROUP, reverse=True, head_axes="tensor",
                             impl="pallas_interpret")
    z, grads = value_and_grad(kind, z_fn, *inputs(kind))
    z_one, grads_one = single_device(kind, True)
    assert_close_to_scale(z, z_one, rtol=0, scale_tol=1e-5, what="z")
    for name in grads:
        assert_close_to_scale(grads[name], grads_one[name], rtol=1e-4, scale_tol=1e-5,
                              what=f"d loss / d {name}")


def test_state_must_travel(monkeypatch):
    """The tolerance above catches a pipeline whose state does not cross devices."""
    kind, cp = "mlp", 4
    args = inputs(kind)[0]
    params = {key: args[key] for key in ttt.PARAM_SHAPES[kind]}
    z_one, _ = single_device(kind, False)
    tolerance = 1e-5 * float(np.abs(np.asarray(z_one)).max())

    # Every device starting its span from W0 (what a missing ppermute amounts to).
    span = LENGTH // cp
    def spans_as_batch(x):  # [B, H, L, ...] -> [cp * B, H, L / cp, ...]
        x = x.reshape(BSZ, HEADS, cp, span, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0).reshape(cp * BSZ, HEADS, span, *x.shape[4:])
    z_w0 = fast_jit(functools.partial(OPS[kind], mini_batch_size=MB))(
        *(spans_as_batch(args[n]) for n in ("q", "k", "v", "eta")), params)
    z_w0 = jnp.moveaxis(z_w0.reshape(cp, BSZ, HEADS, span, DIM), 0, 2).reshape(z_one.shape)
    np.testing.assert_allclose(np.asarray(z_w0[:, :, :span]), np.asarray(z_one[:, :, :span]),
                               atol=tolerance, rtol=0)  # the first span is right either way
    assert float(jnp.abs(z_w0 - z_one).max()) > 1000 * tolerance

    # The op itself with its ppermute dropped (nothing received).
    monkeypatch.setattr(jax.lax, "ppermute",
                        lambda x, axis_name, perm: jax.tree.map(jnp.zeros_like, x))
    z_dropped = fast_jit(functools.partial(
        ttt_context_parallel, kind, mini_batch_size=MB, axis_name="context",
        mesh=mesh_of({"context": cp})))(args["q"], args["k"], args["v"], args["eta"], params)
    assert float(jnp.abs(z_dropped - z_one).max()) > 1000 * tolerance


def test_explicit_mesh_from_context_and_causal():
    """A `jax.make_mesh` (explicit axes) set with `jax.set_mesh`; the causal form with offsets."""
    kind = "linear"
    args = inputs(kind)[0]
    params = {key: args[key] for key in ttt.PARAM_SHAPES[kind]}
    offset = jnp.asarray(np.random.default_rng(3).uniform(-0.05, 0.1, MB), jnp.float32)
    seq = (args["q"], args["k"], args["v"], args["eta"])
    opts = dict(mini_batch_size=MB, causal=True, token_idx_offset=offset)
    z_one = fast_jit(functools.partial(OPS[kind], **opts))(*seq, params)
    mesh = jax.make_mesh((4,), ("context",), devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        z = fast_jit(functools.partial(ttt_context_parallel, kind, axis_name="context", **opts))(
            *seq, params)
    assert_close_to_scale(z, z_one, rtol=0, scale_tol=1e-5, what="z")


@pytest.mark.parametrize("change,match", [
    (dict(length=126), r"L=126 is not divisible by the 4 devices .* pad to 128"),
    (dict(length=96, sizes={"context": 8}), r"span length L/cp=12 .* pad the sequence to 128"),
    (dict(head_groups=3), r"head_groups=3 must be a positive divisor of the 4 heads"),
    (dict(sizes={"context": 4, "tensor": 2}, head_axes="tensor", head_groups=4),
     r"divisor of the 2 heads per device"),
    (dict(axis_name="seq"), r"axis_name 'seq' is not a mesh axis"),
    (dict(head_axes="tensor"), r"head mesh axis 'tensor' is not in the mesh"),
    (dict(sizes=None), r"no mesh; pass mesh="),
    (dict(kind="gru"), r"kind must be 'mlp' or 'linear'"),
])
def test_clear_errors(change, match):
    length = change.get("length", LENGTH)
    kind = change.get("kind", "mlp")
    q, k, v, eta, params = make_inputs(0, "mlp", 1, HEADS, length, DIM)
    sizes = change.get("sizes", {"context": 4})
    with pytest.raises(ValueError, match=match):
        ttt_context_parallel(kind, q, k, v, eta, params, mini_batch_size=MB,
                             axis_name=change.get("axis_name", "context"),
                             mesh=None if sizes is None else mesh_of(sizes),
                             head_groups=change.get("head_groups"),
                             head_axes=change.get("head_axes"))


def test_layer_with_context_axis_equals_layer_without():
    """TTT-MLP layer, values and gradients of every parameter: batch over data, heads over
    tensor (default rules), the sequence over context; L = 40 is padded to 48 (2 spans of 3
    mini-batches) instead of 40."""
    from flax import nnx

    from tttjax.layers.ttt import TTTMLP
    from tttjax.sharding import merge_rules, state_shardings

    sizes, length = {"data": 2, "tensor": 2, "context": 2}, 40
    plain = TTTMLP(32, 4, mini_batch_size=MB, remat_group_size=GROUP, rngs=nnx.Rngs(0))
    context = TTTMLP(32, 4, mini_batch_size=MB, remat_group_size=GROUP, context_axis="context",
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, length, 32))
    w_out = jax.random.normal(jax.random.key(5), (2, length, 32))

    def run(layer, mesh=None, rules=()):
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            y = nnx.merge(graphdef, state)(x)
            return jnp.sum(y * w_out), y

        fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        if mesh is None:
            (_, y), grads = fn.trace(state, x).lower().compile(FAST_COMPILE)(state, x)
            return y, grads
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            state = jax.device_put(state, state_shardings(state, mesh, rules))
            traced = fn.trace(state, x)
            assert "shard_map" in str(traced.jaxpr)  # the context-parallel op did run
            (_, y), grads = traced.lower().compile(FAST_COMPILE)(state, x)
        return y, grads

    y_one, grads_one = run(plain)
    y_cp, grads_cp = run(context, mesh_of(sizes), merge_rules([("activation_length", "context")]))
    assert_close_to_scale(y_cp, y_one, rtol=0, scale_tol=1e-5, what="layer output")
    flat_one = dict(jax.tree_util.tree_flatten_with_path(grads_one)[0])
    flat_cp = dict(jax.tree_util.tree_flatten_with_path(grads_cp)[0])
    assert flat_cp.keys() == flat_one.keys()
    for path, g in flat_one.items():
        assert_close_to_scale(flat_cp[path], g, rtol=1e-4, scale_tol=1e-5,
                              what=f"d loss / d {jax.tree_util.keystr(path)}")


def test_layer_context_axis_needs_the_mesh_axis():
    from flax import nnx

    from tttjax.layers.ttt import TTTLinear

    layer = TTTLinear(32, 4, mini_batch_size=MB, context_axis="context", rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 16, 32))
    with pytest.raises(ValueError, match=r"context_axis='context' needs a mesh with that axis"):
        layer(x)
    with jax.set_mesh(mesh_of({"data": 2})), pytest.raises(ValueError, match=r"axes are \('data',\)"):
        layer(x)
