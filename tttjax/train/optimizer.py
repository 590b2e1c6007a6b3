"""The optimiser of docs/design.md §5: AdamW with two parameter groups and per-stage trainable sets.

    tx = optax.chain(
        clip_by_global_norm(0.1),                       # over the trainable gradients
        multi_transform({
            "pretrained": adamw(lr_pretrained(step), b1=0.9, b2=0.95, wd=1e-4, mask=decays),
            "new":        adamw(lr_new(step),        ...                   mask=decays),
            "frozen":     set_to_zero(),
        }, labels))

(Gradient accumulation happens inside the train step, tttjax.train.step, before `tx`.)

Labels come from parameter paths: `new` = the mixer slot (TTT layer and its four gates,
`blocks/mixer/...`), `pretrained` = everything else (what the converted CogVideoX checkpoint
holds). A stage's trainable set (`all`, `mixer_qkvo` = mixer + attention q/k/v/o, `mixer`)
turns every other parameter `frozen`: the train step stops its gradient, the optimiser keeps
no state for it and never changes it. Weight decay skips biases and every normalisation
parameter (LayerNorm scale/bias, TTT's per-head LayerNorm, the gates and the SSM constants).

Schedules (per group, `count` = optimiser updates done):
    warmup: lr * min(1, (count + 1) / warmup_steps)      (the first update already moves)
    constant: warmup only
    cosine: warmup times final + (1 - final) * (1 + cos(pi * progress)) / 2, progress going
            from 0 after warmup to 1 at `steps`; `final` = final_lr_fraction
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

PRETRAINED, NEW, FROZEN = "pretrained", "new", "frozen"
TRAINABLE_SETS = ("all", "mixer_qkvo", "mixer_qkvo_norms", "mixer")
SCHEDULES = ("constant", "cosine")

# Leaf names that are never decayed (besides anything ending in "bias" or inside a norm).
_NO_DECAY = {"scale", "b_lr", "b1", "b2", "ln_weight", "ln_bias", "alpha_fwd", "alpha_bwd",
             "A_log", "D", "dt_bias", "token_idx_offset"}
_QKVO = {"to_q", "to_k", "to_v", "to_out"}
# The attention q/k LayerNorms, which the seed code also trains from 9 s on (docs/design.md §8).
_QK_NORMS = {"norm_q", "norm_k"}


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """('blocks', 'attn', 'to_q', 'kernel') from a jax key path of a pure-dict state."""
    out = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                out.append(str(getattr(key, attr)))
                break
        else:
            out.append(str(key))
    return tuple(out)


def is_new(names: Sequence[str]) -> bool:
    """Parameters of the mixer slot (TTT layer + gates): absent from CogVideoX checkpoints."""
    return "mixer" in names


def is_trainable(names: Sequence[str], trainable: str) -> bool:
    if trainable == "all":
        return True
    if trainable == "mixer":
        return is_new(names)
    if trainable == "mixer_qkvo":
        return is_new(names) or ("attn" in names and any(n in _QKVO for n in names))
    if trainable == "mixer_qkvo_norms":
        return is_trainable(names, "mixer_qkvo") or (
            "attn" in names and any(n in _QK_NORMS for n in names))
    raise ValueError(f"trainable set {trainable!r} not in {TRAINABLE_SETS}")


def decays(names: Sequence[str]) -> bool:
    leaf = names[-1]
    return not (leaf in _NO_DECAY or leaf.endswith("bias") or any("norm" in n for n in names))


def param_labels(params: Any, trainable: str) -> Any:
    """Tree of 'pretrained' / 'new' / 'frozen' with the structure of `params`."""
    def label(path, _):
        names = path_names(path)
        if not is_trainable(names, trainable):
            return FROZEN
        return NEW if is_new(names) else PRETRAINED
    return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params: Any, trainable: str) -> Any:
    """Tree of bools: True where the parameter is trained in this stage."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_trainable(path_names(path), trainable), params)


def decay_mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path_names(path)), params)


def make_schedule(lr: float, kind: str, warmup_steps: int, total_steps: int,
                  final_lr_fraction: float = 0.0) -> Callable[[jax.Array], jax.Array]:
    """Learning rate as a function of the number of optimiser updates done (see module doc)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r} not in {SCHEDULES}")
    warmup, total, final = int(warmup_steps), int(total_steps), float(final_lr_fraction)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        scale = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else jnp.float32(1.0)
        if kind == "cosine":
            progress = jnp.clip((count - warmup) / max(total - warmup, 1), 0.0, 1.0)
            scale = scale * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        return lr * scale
    return schedule


def make_optimizer(optim, params: Any, *, trainable: str, total_steps: int
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
    """(optax transformation, {group: schedule}) for `params` (a pure-dict parameter tree).

    Args:
      optim: `config.optim` (b1, b2, eps, weight_decay, grad_clip, pretrained, new).
      params: parameter tree (arrays or ShapeDtypeStructs) the labels are computed from.
      trainable: the stage's trainable set, one of TRAINABLE_SETS.
      total_steps: optimiser updates of the run (cosine schedules end there).
    """
    schedules = {
        group: make_schedule(g.lr, g.schedule, g.warmup_steps, total_steps, g.final_lr_fraction)
        for group, g in ((PRETRAINED, optim.pretrained), (NEW, optim.new))}
    mu_dtype = jnp.dtype(optim.mu_dtype) if optim.mu_dtype else None

    def adamw(schedule):
        return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask, mu_dtype=mu_dtype)

    tx = optax.chain(
        optax.clip_by_global_norm(optim.grad_clip),
        optax.multi_transform({PRETRAINED: adamw(schedules[PRETRAINED]),
                               NEW: adamw(schedules[NEW]),
                               FROZEN: optax.set_to_zero()},
                              param_labels(params, trainable)))
    return tx, schedules


def optimizer_shardings(opt_state: Any, param_shardings: Any, replicated: Any) -> Any:
    """Shardings of an (abstract) optimiser state: leaves whose key path ends with a
    parameter's path (Adam moments) get that parameter's sharding;
    counters and the rest are replicated."""
    flat = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    by_path = {path_names(p): s for p, s in flat}
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def place(path, leaf):
        names = path_names(path)
        for n in lengths:
            if len(names) >= n and names[-n:] in by_path:
                return by_path[names[-n:]]
        return replicated
    return jax.tree_util.tree_map_with_path(place, opt_state)
