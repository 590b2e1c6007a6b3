"""`python -m tttjax.demo`: a TTT-MLP layer learning in context on a synthetic sequence.

The sequence hides a fixed random map: every value is `v_t = k_t + f(k_t)` for one linear
`f` (a product of two random matrices) shared by all tokens, so the target `v - k` is learnable from context. The inner
loop of the TTT layer sees the tokens mini-batch by mini-batch; its self-supervised loss
before each update (on tokens it has not seen yet) falls as the inner network learns f,
which is the in-context learning the TTT layer is built on. CPU, a few seconds.

The keys here are random unit vectors rather than learned projections, so the demo uses a
much larger `base_lr` (256, i.e. eta_t = 4 per token) than the paper's video layers (0.1);
`--base-lr 0.1` shows how little a single untrained layer learns at the paper's rate.

This is the foundation-stage main job; it prints the inner loss per mini-batch.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from tttjax.ops.ttt import PARAM_SHAPES, ttt_mlp


def synthetic_sequence(key, heads: int, length: int, d: int):
    """Unit-norm keys and queries; values `k + f(k)` with one random linear map f per head."""
    kk, kq, k1, k2 = jax.random.split(key, 4)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    k = unit(jax.random.normal(kk, (1, heads, length, d)))
    q = unit(jax.random.normal(kq, (1, heads, length, d)))
    a = jax.random.normal(k1, (heads, d, 2 * d)) / jnp.sqrt(d)
    b = jax.random.normal(k2, (heads, 2 * d, d)) / jnp.sqrt(2 * d)
    v = k + jnp.einsum("hlf,hfd->hld", jnp.einsum("hld,hdf->hlf", k[0], a), b)[None]
    return q, k, v


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tttjax.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--mini-batch", type=int, default=16)
    parser.add_argument("--mini-batches", type=int, default=48)
    parser.add_argument("--base-lr", type=float, default=256.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.heads, args.head_dim, args.mini_batch, args.mini_batches) < 1 or args.base_lr <= 0:
        print("error: sizes must be positive integers and --base-lr > 0", file=sys.stderr)
        return 2

    h, d, b = args.heads, args.head_dim, args.mini_batch
    length = b * args.mini_batches
    key = jax.random.key(args.seed)
    q, k, v = synthetic_sequence(key, h, length, d)
    init = jax.random.split(key, 2)[1]
    params = {name: 0.02 * jax.random.normal(init, fn(h, d)) for name, fn in PARAM_SHAPES["mlp"].items()}
    params["ln_weight"] = jnp.ones((h, d))
    params["ln_bias"] = jnp.zeros((h, d))
    # The layer's eta is base_lr * sigmoid(gate) / d; at an untrained gate sigmoid = 1/2.
    eta = jnp.full((1, h, length), args.base_lr * 0.5 / d)

    run = jax.jit(lambda q, k, v, eta, p: ttt_mlp(q, k, v, eta, p, mini_batch_size=b,
                                                  return_inner_loss=True))
    _, loss = run(q, k, v, eta, params)
    before = jnp.mean(loss.before[0], axis=0)   # mean over heads, [n_mini_batches]
    after = jnp.mean(loss.after[0], axis=0)

    print(f"TTT-MLP in-context learning: H={h}, d={d}, mini-batch {b}, L={length}, "
          f"base_lr {args.base_lr}, backend {jax.default_backend()}")
    print("mini-batch | inner loss before update (unseen tokens) | after update")
    for i in range(args.mini_batches):
        bar = "#" * int(round(40 * float(before[i]) / float(before[0])))
        print(f"{i:10d} | {float(before[i]):9.4f} {bar:<40s} | {float(after[i]):9.4f}")
    print(f"inner loss on unseen tokens fell from {float(before[0]):.4f} to "
          f"{float(before[-1]):.4f} ({float(before[-1] / before[0]):.1%} of the start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
