"""One switch for the sequence mixer: `make_mixer(name, config, rngs=...)`.

Names: `ttt_mlp, ttt_linear, gated_deltanet, mamba2, swa, full` and `none` (no mixer:
`make_mixer` returns None). Every mixer is called as `mixer(x [B, L, D], *, rope=None)`.

`config` (ml_collections.ConfigDict or any mapping) holds
  width, num_heads                        required
  direction   "forward" (default) | "causal" | "bidirectional"
  dtype, param_dtype                      names or dtypes, default float32
  <name>      optional sub-dict of the chosen mixer's options (e.g. config.swa.window)
and any other top-level key is also passed to the chosen mixer as an option (so a flat
config works); top-level keys win over the sub-dict, and the sub-dicts of the other mixers
are ignored (one config can carry every mixer's settings, as the DiT's `mixer_config` in
configs/ does). Options a mixer does not take are refused by name.
`default_mixer_config(width, num_heads)` has every default.

Adding a mixer is one `REGISTRY` entry (class, whether it is recurrent, its defaults): the
options it accepts and whether it takes `causal` are read from its constructor.

Directions:
  forward        one pass in sequence order: recurrent mixers scan forward, TTT uses the
                 video form (non-causal inside a mini-batch), attention is non-causal. This
                 is the mixer the DiT wraps in `GatedBidirectional` (docs/design.md §2), which
                 adds the gated reversed pass itself.
  causal         every output depends only on earlier tokens: TTT's causal (ttt-lm) form,
                 causal masks for attention; recurrent mixers as in `forward`.
  bidirectional  a stand-alone two-way mixer without gates:
                     y = f(x) + rev(f(rev(x)))      (same parameters, rope reversed with x)
                 for the recurrent mixers (TTT in video form, Gated DeltaNet, Mamba 2);
                 for swa/full it is plain non-causal attention (already two-way).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tttjax.layers.attention_mixers import FullAttention, SlidingWindowAttention
from tttjax.layers.gated_deltanet import GatedDeltaNet
from tttjax.layers.mamba2 import Mamba2
from tttjax.layers.ttt import TTTLinear, TTTMLP
from tttjax.ops.rope import flip_rope

@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """One registered mixer: all `make_mixer` and `default_mixer_config` need to know.

    Whether the constructor takes `causal` (set from `direction`) and which options it
    accepts are read from its signature, so adding a mixer is one entry in `REGISTRY`.
    """

    cls: type                  # the nnx.Module: cls(width, num_heads, *, dtype, param_dtype, rngs, ...)
    recurrent: bool            # scans in sequence order: "bidirectional" adds the reversed pass
    defaults: dict[str, Any]   # the paper's options (docs/design.md §1 and §7)


REGISTRY: dict[str, MixerSpec] = {
    "ttt_mlp": MixerSpec(TTTMLP, True, dict(mini_batch_size=64, base_lr=0.1, remat_group_size=16)),
    "ttt_linear": MixerSpec(TTTLinear, True,
                            dict(mini_batch_size=16, base_lr=1.0, remat_group_size=16)),
    "gated_deltanet": MixerSpec(GatedDeltaNet, True,
                                dict(expand_v=1.0, conv_size=4, chunk_size=64, norm_eps=1e-5)),
    "mamba2": MixerSpec(Mamba2, True, dict(d_state=128, expand=2, ngroups=1, conv_size=4,
                                           chunk_size=256, norm_eps=1e-5)),
    "swa": MixerSpec(SlidingWindowAttention, False, dict(window=8192, qk_norm=True)),
    "full": MixerSpec(FullAttention, False, dict(qk_norm=True)),
}
MIXERS = {name: spec.cls for name, spec in REGISTRY.items()}    # name -> class
MIXER_NAMES = tuple(REGISTRY) + ("none",)
DIRECTIONS = ("forward", "causal", "bidirectional")
_COMMON = ("width", "num_heads", "direction", "dtype", "param_dtype")
_NOT_OPTIONS = ("self", "width", "num_heads", "dtype", "param_dtype", "rngs", "causal")


def mixer_names() -> tuple[str, ...]:
    """Names that build a mixer module (every name but `none`)."""
    return tuple(REGISTRY)


def default_mixer_config(width: int, num_heads: int) -> ml_collections.ConfigDict:
    """Config with the paper's defaults for every mixer (docs/design.md §1 and §7)."""
    return ml_collections.ConfigDict(dict(
        width=width,
        num_heads=num_heads,
        direction="forward",
        dtype="float32",
        param_dtype="float32",
        **{name: dict(spec.defaults) for name, spec in REGISTRY.items()},
    ))


def _init_keywords(klass: type) -> list[str]:
    """Keyword-only constructor arguments of `klass`, following `**kwargs` up its bases."""
    found: list[str] = []
    for base in klass.__mro__:
        if "__init__" not in vars(base):
            continue
        params = inspect.signature(vars(base)["__init__"]).parameters.values()
        found += [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.name not in found]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return found


def mixer_options(name: str) -> tuple[str, ...]:
    """Keyword options the mixer `name` accepts (besides the common ones)."""
    return tuple(k for k in _init_keywords(REGISTRY[name].cls) if k not in _NOT_OPTIONS)


class SumBidirectional(nnx.Module):
    """`y = f(x) + rev(f(rev(x)))` with one set of parameters (the ungated two-way mixer)."""

    def __init__(self, mixer: nnx.Module):
        self.mixer = mixer

    def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None = None,
                 mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
                 initial_state=None, return_state: bool = False) -> jax.Array:
        """x [B, L, D] -> [B, L, D]; rope (cos, sin) [L, d] or [B, L, d], mask [B, L] or [L]
        and segment_ids [B, L] in x's order (reversed with x for the backward pass)."""
        if initial_state is not None or return_state:
            raise ValueError(f"{type(self.mixer).__name__} (bidirectional): a two-way pass has no "
                             "single state to start from or return (the reversed pass starts at "
                             "the sequence's end); drop initial_state / return_state, or use "
                             "direction 'forward' / 'causal'")
        flip = lambda a: None if a is None else jnp.flip(a, jnp.ndim(a) - 1)  # noqa: E731
        # only the keywords given, so mixers without segment_ids are still called as before
        fwd = {k: v for k, v in (("mask", mask), ("segment_ids", segment_ids)) if v is not None}
        bwd = {k: flip(v) for k, v in fwd.items()}
        backward = self.mixer(jnp.flip(x, 1), rope=flip_rope(rope), **bwd)
        return self.mixer(x, rope=rope, **fwd) + jnp.flip(backward, 1)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _keys(config: Any) -> list[str]:
    if isinstance(config, Mapping):
        return list(config.keys())
    return list(config.keys()) if hasattr(config, "keys") else []


def _dtype(value: Any, field: str):
    try:
        return jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"make_mixer: config.{field} {value!r} is not a dtype name "
                         "(use e.g. 'float32' or 'bfloat16')") from err


def make_mixer(name: str, config: Any, *, rngs: nnx.Rngs) -> nnx.Module | None:
    """Builds the mixer `name` from `config` (see the module docstring); `none` -> None."""
    if name not in MIXER_NAMES:
        raise ValueError(f"make_mixer: unknown mixer {name!r}; choose one of {MIXER_NAMES}")
    if name == "none":
        return None
    width, num_heads = _get(config, "width"), _get(config, "num_heads")
    if not (isinstance(width, int) and isinstance(num_heads, int) and width > 0 and num_heads > 0):
        raise ValueError(f"make_mixer: config needs positive ints width and num_heads, got "
                         f"width={width!r}, num_heads={num_heads!r}")
    direction = _get(config, "direction", "forward")
    if direction not in DIRECTIONS:
        raise ValueError(f"make_mixer: direction {direction!r} not in {DIRECTIONS}")

    options: dict[str, Any] = {}
    sub = _get(config, name)
    if sub is not None:
        options.update(sub.to_dict() if isinstance(sub, ml_collections.ConfigDict) else dict(sub))
    for key in _keys(config):
        if key not in _COMMON and key not in MIXER_NAMES:
            options[key] = _get(config, key)
    allowed = mixer_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"make_mixer: mixer {name!r} has no option(s) {unknown}; it accepts "
                         f"{sorted(allowed)}")
    spec = REGISTRY[name]
    if "causal" in _init_keywords(spec.cls):
        options["causal"] = direction == "causal"

    mixer = spec.cls(width, num_heads, dtype=_dtype(_get(config, "dtype", "float32"), "dtype"),
                         param_dtype=_dtype(_get(config, "param_dtype", "float32"), "param_dtype"),
                         rngs=rngs, **options)
    if direction == "bidirectional" and spec.recurrent:
        return SumBidirectional(mixer)
    return mixer
