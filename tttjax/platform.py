"""Which hardware the program being traced is for: the basis of every `impl="auto"` choice.

An ahead-of-time compile for a TPU slice runs on a CPU host (`python -m tttjax.bench aot
--topology v5p-256`): `jax.default_backend()` is then "cpu" while the program is for TPUs.
Inside `jax.set_mesh(mesh)` the mesh's devices say what the program is for, so kernel and
attention choices follow them; outside a mesh the default backend decides.
"""

from __future__ import annotations

import jax

_CANONICAL = {"cuda": "gpu", "rocm": "gpu"}


def target_platform() -> str:
    """'tpu', 'gpu' or 'cpu' (or another jax platform name) of the program being traced."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    platform = device.platform if device is not None else jax.default_backend()
    return _CANONICAL.get(platform, platform)


def attention_impl(configured: str) -> str:
    """An attention `impl` (`tttjax.ops.attention`, `config.model.attention_impl`) with "auto"
    resolved: cuDNN's fused flash attention on GPUs; elsewhere "chunked", the online softmax
    over key blocks that never stores a window's logits (XLA has no fused attention kernel on
    TPU or CPU)."""
    if configured != "auto":
        return configured
    return "cudnn" if target_platform() == "gpu" else "chunked"
