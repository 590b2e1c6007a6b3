"""`flip_rope`, the one place RoPE tables are reordered for a reversed pass."""

import jax.numpy as jnp
import numpy as np

from tttjax.ops.rope import apply_rope, flip_rope, rope_3d


def test_flip_rope_reverses_or_permutes_the_token_axis():
    cos, sin = rope_3d((3, 2, 2), 16)                              # [12, 16]
    got = flip_rope((cos, sin))
    np.testing.assert_array_equal(got[0], np.asarray(cos)[::-1])
    np.testing.assert_array_equal(got[1], np.asarray(sin)[::-1])
    batched = (jnp.stack([cos, 2 * cos]), jnp.stack([sin, 2 * sin]))   # [2, 12, 16]
    got = flip_rope(batched)
    np.testing.assert_array_equal(got[0], np.asarray(batched[0])[:, ::-1])
    np.testing.assert_array_equal(got[1], np.asarray(batched[1])[:, ::-1])
    index = np.random.default_rng(0).permutation(12)
    got = flip_rope((cos, sin), index)
    np.testing.assert_array_equal(got[0], np.asarray(cos)[index])
    np.testing.assert_array_equal(got[1], np.asarray(sin)[index])
    assert flip_rope(None) is None and flip_rope(None, index) is None


def test_flipped_tables_travel_with_flipped_tokens():
    """Rotating the reversed sequence with the flipped tables is the reversed rotation: what
    the bidirectional mixers rely on for each token to keep its own position."""
    cos, sin = rope_3d((3, 2, 2), 16)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 12, 16)), jnp.float32)
    np.testing.assert_allclose(apply_rope(x[:, :, ::-1], *flip_rope((cos, sin))),
                               apply_rope(x, cos, sin)[:, :, ::-1], rtol=0, atol=0)
