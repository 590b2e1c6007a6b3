"""The `latents` TFDS dataset from the per-video source files, for `python -m tttjax.precompute`.

`build_dataset(manual_dir, data_dir, config)` builds `latents/<config.name>` in a scratch
data dir and moves its version folder into place (a reader never sees a half-built dataset,
and a rebuild picks up new source files); a gs:// data_dir is built locally and uploaded.
`dataset_config(name, overrides)` is the config the training loader derives for the same
shapes (`tttjax.data.loader.latents_config`).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil

from tttjax import storage


def _build_dataset_in_bucket(manual_dir: str, data_dir: str, config) -> str:
    """`build_dataset` for a gs:// data_dir: TFDS's ArrayRecord writer opens local files only,
    so the dataset is built in a local temporary folder, the bucket's older build of it is
    deleted and the new one uploaded, `dataset_info.json` (what readers check) last."""
    import tempfile

    from tttjax.data.latents import build_latents_dataset

    with tempfile.TemporaryDirectory(prefix="tttjax-precompute-") as scratch:
        with contextlib.redirect_stdout(io.StringIO()):
            built = build_latents_dataset(manual_dir, scratch, config)
        src = str(built.data_dir)
        dst = f"{storage.resolve(data_dir)}/{os.path.relpath(src, scratch)}"
        if storage.path(dst).exists():
            storage.path(dst).rmtree()
        storage.upload_tree(src, dst, last=("dataset_info.json",))
    return dst


def build_dataset(manual_dir: str, data_dir: str, config) -> str:
    """Builds `latents/<config.name>` into `data_dir`, replacing an older build; returns its folder.

    The build runs in a scratch data dir and its version folder is moved into place, so a
    reader never sees a half-built dataset and a rebuild picks up new source files (TFDS
    itself would keep an existing version untouched).
    """
    import tensorflow_datasets as tfds

    from tttjax.data.latents import build_latents_dataset

    tfds.disable_progress_bar()
    if storage.is_url(data_dir):
        return _build_dataset_in_bucket(manual_dir, data_dir, config)
    scratch = os.path.join(data_dir, f".precompute_build_{config.name}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        # TFDS prints where it built, i.e. the scratch folder that is moved away below
        with contextlib.redirect_stdout(io.StringIO()):
            built = build_latents_dataset(manual_dir, scratch, config)
        src = str(built.data_dir)
        version = os.path.relpath(src, scratch)
        dst = os.path.join(data_dir, version)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst):
            old = dst + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            shutil.rmtree(old)
        os.replace(src, dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


def dataset_config(name: str, overrides: dict):
    """The `LatentsConfig` the training loader derives from `name` and these fields
    (`tttjax.data.loader.latents_config`): `name` itself when they are its values, else
    `<name>_<hash>`, so `data.builder_config` / `data.builder_overrides` find this dataset."""
    from tttjax.data.loader import latents_config

    return latents_config(name, overrides)
