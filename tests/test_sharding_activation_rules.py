"""Parameters and activations have separate logical names, so their rules can differ.

A rule for an activation name moves the activations of a compiled DiT forward and leaves
every parameter where it was; a rule for the parameter name of the same width does the
opposite. Both fail if the model's constraints used the parameter names.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from tttjax import command_line
from tttjax import sharding as shd
from tttjax.models.dit import CogVideoXDiT


def _forward_blocks(model, mesh, rules, x, e, t):
    """Jitted embed + blocks under `rules`: (video tokens [B, L, D], parameter shardings)."""
    graphdef, state = nnx.split(model)
    shardings = shd.state_shardings(state, mesh, rules)

    def blocks(st, x, e, t):
        m = nnx.merge(graphdef, st)
        layout = m.layout(x.shape, e.shape)
        text, video = m.embed(x, e, layout)
        return m.run_blocks(text, video, m.time_embedding(t), layout)[1]

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        placed = jax.device_put(state, shardings)
        video = jax.jit(blocks)(placed, x, e, t)
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    return video, specs


def test_activation_rules_move_activations_not_parameters():
    cfg = command_line.load_config("tiny:mixer=none,segments=1").model
    cfg.num_layers = 1
    model = CogVideoXDiT(cfg, rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (2, 3, cfg.in_channels, 8, 8))
    e = jax.random.normal(k2, (2, 1, 8, cfg.text_embed_dim))
    t = np.asarray([17, 803])
    # batch 2 over data; fsdp and tensor free for the width.
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    width = cfg.num_attention_heads * cfg.attention_head_dim

    base, base_params = _forward_blocks(model, mesh, shd.DEFAULT_RULES, x, e, t)
    assert base.shape[-1] == width
    assert base.sharding.spec == P("data", None, "fsdp")      # batch over data, D over fsdp

    # Activations' width over tensor: the blocks' output moves, the parameters stay.
    moved, moved_params = _forward_blocks(
        model, mesh, shd.merge_rules([("activation_embed", "tensor")]), x, e, t)
    assert moved.sharding.spec == P("data", None, "tensor")
    assert moved_params == base_params
    assert any("fsdp" in shd.entry_axes(e) for s in base_params for e in s)

    # Parameters' width over tensor: the parameters move, the activations stay.
    kept, param_moved = _forward_blocks(
        model, mesh, shd.merge_rules([("embed", "tensor")]), x, e, t)
    assert kept.sharding.spec == P("data", None, "fsdp")
    assert param_moved != base_params

    for out in (moved, kept):
        np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=1e-5, atol=1e-5)
