"""A mesh axis that does not divide a parameter dimension: replicated, and never silently."""

import warnings

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tttjax import sharding as shd
from tttjax.logical_params import logical_param


class TwoWeights(nnx.Module):
    def __init__(self):
        self.even = logical_param(jnp.zeros((8, 6)), ("embed", "mlp"))   # fsdp 2 divides 8
        self.odd = logical_param(jnp.zeros((6, 3)), ("embed", "mlp"))    # tensor 2 does not divide 3


def test_indivisible_axes_lists_only_the_dropped_splits():
    mesh = {"fsdp": 2, "tensor": 2, "data": 1}
    assert shd.indivisible_axes(P("fsdp", "tensor"), mesh, (8, 6)) == []
    assert shd.indivisible_axes(P("fsdp", "tensor"), mesh, (6, 3)) == [(1, "tensor")]
    assert shd.indivisible_axes(P(("fsdp", "tensor"), None), mesh, (6, 3)) == [(0, "tensor")]
    assert shd.indivisible_axes(P("data", None), mesh, (3, 3)) == []       # size-1 axis: no split lost
    assert shd.indivisible_axes(P("fsdp", "fsdp"), mesh, (8, 3)) == []     # reuse is not a loss


def test_state_shardings_warns_or_refuses():
    state = nnx.state(nnx.eval_shape(TwoWeights))
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = shd.merge_rules([("embed", "fsdp"), ("mlp", "tensor")])
    with pytest.warns(UserWarning, match=r"1 parameter dimension.*odd dim 1 \(3\) over tensor \(2\)"):
        out = shd.state_shardings(state, mesh, rules)
    assert out["odd"].spec == P("fsdp", None) and out["even"].spec == P("fsdp", "tensor")
    with pytest.raises(ValueError, match=r"odd dim 1 \(3\) over tensor.*config.mesh.axes"):
        shd.state_shardings(state, mesh, rules, indivisible="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shd.state_shardings(state, mesh, rules, indivisible="ignore")
