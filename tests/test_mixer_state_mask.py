"""Registry mixers on padded, packed and chunked sequences (the `TTTMLP.__call__` keywords
`mask`, `segment_ids`, `initial_state`, `return_state`), each against the plain runs it must
equal, in float32:

  (a) packed: a batch of sequences packed with segment_ids == each sequence run alone (outputs,
      final state, gradients w.r.t. inputs and parameters; with an initial state every
      sequence starts from it);
  (b) padded: padding anywhere (front, middle, end) == the unpadded sequence on the real
      tokens, the same final state, zero gradient into the padding;
  (c) chained (recurrent mixers): [x1, x2] in one call == x1 with return_state, then x2 with
      that state as initial_state.

Tolerance: rtol 1e-5, atol 1e-5 * max |reference| (the two sides run the same float32 ops in
a different grouping). Chunk sizes (4) and the window (5) are shorter than the sequences, so
resets fall inside chunks, at chunk starts and in windows that straddle a boundary.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tttjax.layers import registry
from tttjax.ops.causal_conv import causal_depthwise_conv

WIDTH, HEADS, LENGTH = 16, 2, 15
OPTIONS = {"gated_deltanet": dict(chunk_size=4),
           "mamba2": dict(d_state=8, chunk_size=4),
           "swa": dict(window=5, block_size=4),
           "full": {}}
RECURRENT = ("gated_deltanet", "mamba2")
# Two rows of three packed sequences of 5 tokens: starts at 5 and 10 fall inside chunks of 4.
# Row 1 reuses id 0 for its third sequence: sequences are runs of equal ids.
IDS = np.array([[7] * 5 + [2] * 5 + [9] * 5, [0] * 5 + [1] * 5 + [0] * 5])
# compile quickly: these programs are tiny and run once
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def build(name, direction="forward"):
    layer = registry.make_mixer(name, {"width": WIDTH, "num_heads": HEADS, "direction": direction,
                                       name: OPTIONS[name]}, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)     # off the init, so every parameter matters
    for _, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Param):
            var[...] = var[...] + 0.3 * jnp.asarray(rng.standard_normal(var.shape), var.dtype)
    return layer


def loss_fn(graphdef):
    """(params, x, w, **call keywords) -> (sum(w * y), (y, state or None))."""
    def loss(params, x, w, mask=None, segment_ids=None, initial_state=None, return_state=False):
        out = nnx.merge(graphdef, params)(x, mask=mask, segment_ids=segment_ids,
                                          initial_state=initial_state, return_state=return_state)
        y, state = out if return_state else (out, None)
        return jnp.sum(w * y), (y, state)
    return loss


@functools.lru_cache(maxsize=None)
def runner(name, direction="forward"):
    """(layer, params, run): run(params, x, w, **kw) -> ((loss, (y, state)), (d params, d x))."""
    layer = build(name, direction)
    graphdef, params = nnx.split(layer)
    run = jax.jit(jax.value_and_grad(loss_fn(graphdef), argnums=(0, 1), has_aux=True),
                  static_argnames=("return_state",), compiler_options=FAST)
    return layer, params, run


@functools.lru_cache(maxsize=None)
def forward(name, direction="forward"):
    """(params, fwd): fwd(params, x, **kw) -> y, without gradients (quicker to compile)."""
    layer, params, _ = runner(name, direction)
    graphdef = nnx.graphdef(layer)
    fwd = jax.jit(lambda params, x, **kw: nnx.merge(graphdef, params)(x, **kw),
                  compiler_options=FAST)
    return params, fwd


def close(got, want, what, scale=None):
    want = np.asarray(want)
    scale = np.abs(want).max() if scale is None else scale
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * max(scale, 1e-30),
                               err_msg=what)


def tree_close(got, want, what):
    """Leaf by leaf, atol relative to the largest value of the whole tree (gradients that are
    zero in exact arithmetic, e.g. of the key-norm bias under softmax, are rounding noise)."""
    scale = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(want))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        close(a, b, f"{what} {jax.tree_util.keystr(path)}", scale)


def data(length=LENGTH, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, length, WIDTH)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((batch, length, WIDTH)), jnp.float32)
    return x, w


def random_state(layer, batch, seed=3):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(0.5 * rng.standard_normal(s), jnp.float32)
            for k, s in layer.state_shapes(batch).items()}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_packed_batch_equals_each_sequence_alone(name):
    layer, params, run = runner(name)
    x, w = data()
    recurrent = name in RECURRENT
    init = random_state(layer, 2) if recurrent else None
    (_, (y, state)), (dp, dx) = run(params, x, w, segment_ids=jnp.asarray(IDS),
                                     initial_state=init, return_state=recurrent)
    # the six sequences alone, as one batch [row 0: seq 0, 1, 2, row 1: seq 0, 1, 2]
    alone = lambda a: a.reshape(6, 5, *a.shape[2:])  # noqa: E731
    init6 = None if init is None else jax.tree.map(lambda a: jnp.repeat(a, 3, axis=0), init)
    (_, (ys, ss)), (dps, dxs) = run(params, alone(x), alone(w), initial_state=init6,
                                    return_state=recurrent)
    close(alone(y), ys, f"{name} outputs")
    close(alone(dx), dxs, f"{name} d x")
    tree_close(dp, dps, f"{name} d params")
    if recurrent:       # each row's final state is its last sequence's
        tree_close(state, jax.tree.map(lambda a: a[2::3], ss), f"{name} final state")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_padding_anywhere_equals_the_unpadded_sequence(name):
    _, params, run = runner(name)
    x, w = data()
    mask = np.ones((2, LENGTH), bool)
    mask[0, [0, 3, 4, 14]] = False          # front, middle, end
    mask[1, 11:] = False                   # right padding
    recurrent = name in RECURRENT
    real = jnp.stack([x[r, mask[r]] for r in range(2)])
    w_real = jnp.stack([w[r, mask[r]] for r in range(2)])
    w_pad = jnp.where(jnp.asarray(mask)[..., None], w, 0.0)   # padding outputs are irrelevant
    (_, (y, state)), (dp, dx) = run(params, x, w_pad, mask=jnp.asarray(mask),
                                     return_state=recurrent)
    (_, (y0, state0)), (dp0, dx0) = run(params, real, w_real, return_state=recurrent)
    for r in range(2):
        close(y[r, mask[r]], y0[r], f"{name} output row {r}")
        close(dx[r, mask[r]], dx0[r], f"{name} d x row {r}")
        assert np.all(np.asarray(dx[r, ~mask[r]]) == 0), f"{name}: padding reached a real output"
    tree_close(dp, dp0, f"{name} d params")
    if recurrent:
        tree_close(state, state0, f"{name} final state")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_padding_inside_packed_sequences(name):
    """mask [L] (the same for every row) together with segment_ids: the real tokens of
    row 0's second sequence (5 of them) equal that sequence alone."""
    params, fwd = forward(name)
    x, _ = data()
    mask = np.ones(LENGTH, bool)
    mask[[5, 7, 8, 14]] = False             # inside row 0's second sequence, and the end
    y = fwd(params, x, mask=jnp.asarray(mask), segment_ids=jnp.asarray(IDS))
    second = mask & (IDS[0] == 2)
    close(y[0, second], fwd(params, x[:1, second])[0], f"{name} padded and packed")


@pytest.mark.parametrize("name", RECURRENT)
def test_state_chaining_equals_one_call(name):
    layer, params, run = runner(name)
    graphdef = nnx.graphdef(layer)
    x, w = data()
    init = random_state(layer, 2)
    (_, (y, state)), (dp, dx) = run(params, x, w, initial_state=init, return_state=True)
    loss = loss_fn(graphdef)

    def two_calls(params, x):
        l1, (y1, s1) = loss(params, x[:, :7], w[:, :7], initial_state=init, return_state=True)
        l2, (y2, s2) = loss(params, x[:, 7:], w[:, 7:], initial_state=s1, return_state=True)
        return l1 + l2, (jnp.concatenate([y1, y2], axis=1), s2)

    (_, (y12, s12)), g = jax.jit(jax.value_and_grad(two_calls, argnums=(0, 1), has_aux=True),
                                 compiler_options=FAST)(params, x)
    close(y12, y, f"{name} chained output")
    tree_close(s12, state, f"{name} chained final state")
    close(g[1], dx, f"{name} chained d x (through the handed-over state)")
    tree_close(g[0], dp, f"{name} chained d params")


def test_bidirectional_passes_mask_and_segments_through_both_passes():
    params, fwd = forward("mamba2", "bidirectional")
    x, _ = data()
    y = fwd(params, x, segment_ids=jnp.asarray(IDS))
    alone = lambda a: a.reshape(6, 5, *a.shape[2:])  # noqa: E731
    close(alone(y), fwd(params, alone(x)), "bidirectional packed")
    mask = np.ones((2, LENGTH), bool)
    mask[:, [2, 9, 14]] = False             # the reversed pass sees them at other places
    y = fwd(params, x, mask=jnp.asarray(mask))
    close(y[:, mask[0]], fwd(params, x[:, mask[0]]), "bidirectional padded")


@pytest.mark.parametrize("name,direction,match", [
    ("swa", "forward", "no recurrent state"), ("full", "causal", "no recurrent state"),
    ("mamba2", "bidirectional", "two-way pass has no single state")])
def test_state_arguments_refused_where_there_is_no_state(name, direction, match):
    layer = registry.make_mixer(name, {"width": WIDTH, "num_heads": HEADS, "direction": direction,
                                       name: OPTIONS[name]}, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 8, WIDTH))
    with pytest.raises(ValueError, match=match):
        layer(x, return_state=True)
    with pytest.raises(ValueError, match=match):
        layer(x, initial_state={})


def test_bad_arguments_are_named():
    layer = registry.make_mixer("gated_deltanet", {"width": WIDTH, "num_heads": HEADS},
                                rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 8, WIDTH))
    with pytest.raises(ValueError, match=r"mask must be \[L\] or \[B, L\]"):
        layer(x, mask=jnp.ones((3, 8)))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        layer(x, segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match="initial_state must be the dict"):
        layer(x, initial_state={"delta": jnp.zeros((2, 2, 8, 8))})
    with pytest.raises(ValueError, match=r"initial_state\['delta'\] must be"):
        layer(x, initial_state={k: jnp.zeros(s if k != "delta" else (2, 2, 8, 7))
                                for k, s in layer.state_shapes(2).items()})


def test_causal_conv_restarts_segments_from_its_initial_state():
    """The short convolution against a NumPy loop: taps before a token's segment start read
    the initial state (oldest first), and the returned state is the last K - 1 inputs of the
    last segment (filled from the initial state when that segment is shorter)."""
    rng = np.random.default_rng(0)
    k, c, length = 4, 3, 11
    x, kern, bias = rng.standard_normal((2, length, c)), rng.standard_normal((k, c)), rng.standard_normal(c)
    hist = rng.standard_normal((2, k - 1, c))
    starts = np.array([[0, 0, 0, 3, 3, 3, 3, 3, 8, 8, 10], [0] * 4 + [4] * 7])
    n_tokens = np.array([11, 9])                    # row 1: the last two are padding
    y, state = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kern), jnp.asarray(bias),
                                     initial_state=jnp.asarray(hist),
                                     segment_start=jnp.asarray(starts),
                                     num_tokens=jnp.asarray(n_tokens), return_state=True)

    def read(b, s, start):
        return x[b, s] if s >= start else hist[b, k - 1 + s - start]

    for b in range(2):
        for t in range(length):
            want = bias + sum(kern[j] * read(b, t - k + 1 + j, starts[b, t]) for j in range(k))
            np.testing.assert_allclose(y[b, t], want, rtol=1e-5, atol=1e-5)
        n = n_tokens[b]
        want_state = [read(b, n - k + 1 + j, starts[b, n - 1]) for j in range(k - 1)]
        np.testing.assert_allclose(state[b], np.stack(want_state), rtol=1e-5, atol=1e-5)
