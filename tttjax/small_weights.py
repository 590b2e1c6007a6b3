"""The small networks tttjax ships weights for (the learned toon codec, the toon detector):
their parameters as float16 Orbax plus one JSON file of what rebuilds and describes them.

    save_weights(path, net, "codec.json", info)         -> absolute path
    net, info = load_weights(path, "codec.json", make_net, hint)

float16 keeps the shipped folders at a few hundred kB; the networks compute in float32.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def replace_folder(path: str, write: Callable[[str], None]) -> str:
    """Calls `write(staging)` on a fresh folder beside `path`, then swaps it in as `path`.

    A failure (a full disk, a kill) leaves what was at `path`, e.g. shipped weights being
    retrained in place, intact, and no staging folder. Returns the absolute path.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}-", dir=parent)
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would hide shipped weights from other users
        write(staging)
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(staging, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def save_weights(path: str, net: nnx.Module, info_file: str, info: dict[str, Any]) -> str:
    """Writes `net`'s parameters (float16) to `path/params` and `info` to `path/info_file`,
    swapped in whole (`replace_folder`)."""
    import orbax.checkpoint as ocp

    state = jax.tree.map(lambda a: np.asarray(a, np.float16), nnx.state(net, nnx.Param))

    def write(folder):
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(folder, "params"), nnx.to_pure_dict(state))
        with open(os.path.join(folder, info_file), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)

    return replace_folder(path, write)


def load_weights(path: str, info_file: str, make_net: Callable[[dict[str, Any]], nnx.Module],
                 hint: str) -> tuple[nnx.Module, dict[str, Any]]:
    """(network with float32 parameters, info) from a folder `save_weights` wrote.

    `make_net(info)` builds the network's shape; `hint` ends the error when `path` holds no
    `info_file` (how to make one). Raises ValueError.
    """
    import orbax.checkpoint as ocp

    info_path = os.path.join(path, info_file)
    if not os.path.isfile(info_path):
        raise ValueError(f"{path!r} holds no {info_file}; {hint}")
    with open(info_path, encoding="utf-8") as f:
        info = json.load(f)
    graph, state = nnx.split(make_net(info), nnx.Param)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, np.float16),
                            nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as ckpt:
        try:
            restored = ckpt.restore(os.path.join(os.path.abspath(path), "params"), abstract)
        except ValueError as e:  # Orbax: the saved tree is not this network's
            raise ValueError(f"{path!r} holds weights of another network layout than "
                             f"{info_file} describes ({str(e).splitlines()[0][:120]}); "
                             f"{hint}") from None
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), restored))
    return nnx.merge(graph, state), info
