"""Hugging Face model folders: where the weights are, and reading them lazily as NumPy.

A folder written by `save_pretrained` (diffusers or transformers) holds `config.json` and its
weights as one `.safetensors` file or as shards listed by an `*.safetensors.index.json`.

    folder = model_folder(path, "vae", "AutoencoderKLCogVideoX.save_pretrained")
    files = weight_files(folder)                  # {tensor key: safetensors file}
    with TensorReader(files) as read:
        w = read("decoder.conv_out.conv.weight")  # np.ndarray, as stored
    for key, w in read_tensors(files, keys): ...  # each file opened once
    kernel = read_parameter(read, "blocks.{i}.q.weight", (L, D, D), np.float32, lambda w: w.T)

Tensors are read one at a time (`safe_open` memory-maps the file), so a loader's peak host
memory is the model plus the tensor in hand. bfloat16 tensors come back as NumPy arrays of
`ml_dtypes.bfloat16`: NumPy's safetensors reader has no bfloat16, so those go through JAX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

# diffusers' file name; preferred when a folder holds several weight files or indices.
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_folder(path: str, subfolder: str, written_by: str) -> str:
    """`path` if it holds config.json, else `path/subfolder` (a pipeline's component folder).

    `written_by` names the `save_pretrained` that writes such a folder, for the error message.
    """
    for folder in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise ValueError(f"no config.json in {path!r} (nor in {path!r}/{subfolder}); give the folder "
                     f"written by {written_by}")


def weight_files(folder: str) -> dict[str, str]:
    """{tensor key: safetensors file} from the index json, or from the single file."""
    names = sorted(os.listdir(folder))
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(index) > 1:
        index = [n for n in index if n == _DIFFUSERS_WEIGHTS + ".index.json"]
    if index:
        with open(os.path.join(folder, index[0]), encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    files = [n for n in names if n.endswith(".safetensors")]
    if _DIFFUSERS_WEIGHTS in files:
        files = [_DIFFUSERS_WEIGHTS]
    if len(files) != 1:
        raise ValueError(f"expected one .safetensors file or an index json in {folder!r}, found "
                         f"{files or 'none'}")
    path = os.path.join(folder, files[0])
    with safe_open(path, framework="numpy") as f:
        return {k: path for k in f.keys()}


class TensorReader:
    """`read(key) -> np.ndarray` over `weight_files`, keeping at most one file open.

    Reading keys file by file opens each file once; `close()` (or leaving a `with` block)
    closes the open one.
    """

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._path: str | None = None
        self._handles: list[Any] = []   # numpy handle, then the JAX one once a bf16 tensor needs it

    def __call__(self, key: str) -> np.ndarray:
        path = self.files[key]
        if path != self._path:
            self.close()
            self._path, self._handles = path, [safe_open(path, framework="numpy")]
        if self._handles[0].get_slice(key).get_dtype() != "BF16":
            return self._handles[0].get_tensor(key)
        if len(self._handles) == 1:
            self._handles.append(safe_open(path, framework="flax"))
        return np.asarray(jax.device_get(self._handles[1].get_tensor(key)))

    def close(self) -> None:
        for handle in self._handles:
            handle.__exit__(None, None, None)
        self._path, self._handles = None, []

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensors(files: dict[str, str], keys: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (key, array) for `keys`, grouped by file so that each file is opened once."""
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    with TensorReader(files) as read:
        for file_keys in by_file.values():
            for k in file_keys:
                yield k, read(k)


class ShapeMismatch(ValueError):
    """A stored tensor that does not fit the parameter it is read into."""

    def __init__(self, key: str, stored: tuple[int, ...], wanted: tuple[int, ...]):
        super().__init__(f"{key}: stored shape {stored} does not fit {wanted}")
        self.key, self.stored, self.wanted = key, stored, wanted


def read_parameter(read: Callable[[str], np.ndarray], key: str, shape: tuple[int, ...],
                   dtype: Any, transform: Callable[[np.ndarray], np.ndarray] | None = None
                   ) -> np.ndarray:
    """The array of `shape` and `dtype` for one parameter, assembled in one host buffer.

    A `key` with `{i}` names one tensor per layer: layer i's tensor goes to `[i]` of the
    stacked axis 0. `transform` maps a stored tensor to our layout (e.g. torch's Linear
    `[out, in]` to `[in, out]`). Raises `ShapeMismatch` for the first tensor that does not fit.
    """
    transform = transform or (lambda w: w)
    stacked = "{i}" in key
    buf = np.empty(shape, np.dtype(dtype))
    for i in range(shape[0]) if stacked else (None,):
        k = key.format(i=i) if stacked else key
        want = buf.shape[1:] if stacked else buf.shape
        raw = read(k)
        try:
            arr = transform(raw)
        except ValueError:
            arr = None
        if arr is None or arr.shape != want:
            raise ShapeMismatch(k, raw.shape, want)
        buf[i if stacked else ...] = arr
    return buf
