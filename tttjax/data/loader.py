"""Grain input pipelines: each host reads only its rows of the global batch.

    source, transform = open_training_source(config)      # TFDS data source + model inputs
    loader = make_loader(source, transform, global_batch=64, shard_index=i, shard_count=n,
                         seed=0)
    batch = next(iter(loader))   # host-local numpy {"latents", "text"[, "latents_logvar"]}

Batches (host-local, `b = global_batch / shard_count` rows):

    latents         float32 [b, T, C, h, w]   toon: toy latents; real data: posterior mean
                                              (both multiplied by the VAE scaling factor)
    latents_logvar  float32 [b, T, C, h, w]   real data only: posterior log-variance of the
                                              scaled latents (the train step samples from it)
    text            float32 [b, n, S, Dt]     one prompt embedding per segment

Datasets are TFDS builders read through `tfds` data sources (ArrayRecord, no TensorFlow);
`toon_storyboards` is generated on first use (by process 0 when several processes share a
disk, by every host otherwise; generation is deterministic, so copies are identical).
The iterator's position is part of every checkpoint (Orbax's Grain handler).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from tttjax import storage
from tttjax.data import latents as latents_lib
from tttjax.data import toon_storyboards
from tttjax.data.block_shard_sampler import BlockShardSampler
from tttjax.data.text_encoder import HashedTextEncoder, segment_prompt
from tttjax.data.toy_latents import ToyLatentCodec, make_toon_codec
from tttjax.data.windows import SegmentWindows, crop_latents, crop_toon

DATASETS = ("toon_storyboards", "latents")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------ transforms


class ToonToModelInputs(grain.transforms.Map):
    """Toon window -> toy latents and hashed-word prompt embeddings (with scene markers).

    Encoded windows are memoised (up to `cache_size`, keyed by the frames' digest): training
    revisits each window every epoch, and the learned codec's encoder costs about 10x the
    linear map's per clip, which would otherwise dominate a small run on CPU.
    """

    def __init__(self, codec: ToyLatentCodec, encoder: HashedTextEncoder, text_length: int,
                 cache_size: int = 8192):
        self.codec, self.encoder, self.text_length = codec, encoder, text_length
        self.cache_size = cache_size
        self._latents: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()

    def __getstate__(self) -> dict:   # Grain pickles transforms for its workers; no cache
        return {**self.__dict__, "_latents": collections.OrderedDict()}

    def _encode(self, video: np.ndarray) -> np.ndarray:
        video = np.ascontiguousarray(video)
        key = hashlib.blake2b(video.tobytes(), digest_size=16).digest() + repr(video.shape).encode()
        latents = self._latents.get(key)
        if latents is None:
            latents = self.codec.encode(video)
            self._latents[key] = latents
            if len(self._latents) > self.cache_size:
                self._latents.popitem(last=False)
        else:
            self._latents.move_to_end(key)
        return latents.copy()

    def map(self, example: dict) -> dict:
        prompts = [segment_prompt(_text(c), bool(s), bool(e)) for c, s, e in
                   zip(example["captions"], example["scene_start"], example["scene_end"])]
        return {"latents": self._encode(example["video"]),
                "text": self.encoder.encode(prompts, self.text_length)}


def model_latent_scale(data, recorded: float) -> float:
    """The factor from VAE latents to the model's: `config.data.latent_scale`, or when it is 0
    the VAE scaling factor the dataset was written with (1.0 trains as the seed code,
    docs/design.md §8)."""
    return float(data.get("latent_scale", 0.0) or recorded)


class LatentsToModelInputs(grain.transforms.Map):
    """Latents window -> scaled posterior (mean, log-variance) and text embeddings, float32."""

    def __init__(self, scaling_factor: float):
        self.scale = float(scaling_factor)

    def map(self, example: dict) -> dict:
        return {"latents": example["latents_mean"].astype(np.float32) * self.scale,
                "latents_logvar": (example["latents_logvar"].astype(np.float32)
                                   + 2.0 * np.log(self.scale)),
                "text": example["text"].astype(np.float32)}


# ------------------------------------------------------------------------------ datasets


def builder_config(builder_cls, name: str, overrides: dict | None = None):
    """A named config of a TFDS builder, or a derived one when `overrides` changes fields.

    A derived config is named `<name>_<hash of its fields>`, so each geometry gets its own
    folder under the data dir and is generated (or packed) once.
    """
    base = {c.name: c for c in builder_cls.BUILDER_CONFIGS}
    if name not in base:
        raise ValueError(f"{builder_cls.name} has no config {name!r}; choose one of {sorted(base)}")
    cfg = base[name]
    skip = ("name", "version", "release_notes", "supported_versions", "description", "tags")
    fields = {f: getattr(cfg, f) for f in type(cfg).__dataclass_fields__ if f not in skip}
    unknown = sorted(set(overrides or {}) - set(fields))
    if unknown:
        raise ValueError(f"unknown {builder_cls.name} fields {unknown}; fields: {sorted(fields)}")
    if overrides and any(fields[k] != v for k, v in overrides.items()):
        fields.update(overrides)
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
        cfg = type(cfg)(name=f"{name}_{digest}", **fields)
    cfg.validate()
    return cfg


def toon_config(name: str, overrides: dict | None = None) -> toon_storyboards.ToonStoryboardsConfig:
    return builder_config(toon_storyboards.ToonStoryboards, name, overrides)


def latents_config(name: str, overrides: dict | None = None) -> latents_lib.LatentsConfig:
    return builder_config(latents_lib.Latents, name, overrides)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _download_and_prepare(make_builder, builder, download_config):
    """`builder.download_and_prepare`, also for a `gs://` data_dir: TFDS's ArrayRecord writer
    opens local files only (its reader does read gs://), so such a dataset is built in a
    local temporary data_dir and its version folder uploaded, `dataset_info.json` (what
    `is_prepared` looks for) last. Returns the builder to read the dataset with."""
    target = os.fspath(builder.data_dir)
    if not storage.is_url(target):
        builder.download_and_prepare(download_config=download_config)
        return builder
    with tempfile.TemporaryDirectory(prefix="tttjax-tfds-") as local_root:
        local = make_builder(local_root)
        local.download_and_prepare(download_config=download_config)
        storage.upload_tree(os.fspath(local.data_dir), target, last=("dataset_info.json",))
    return make_builder()


def prepared_builder(make_builder, download_config=None):
    """Builds the dataset if needed (process 0 first, then any host that still lacks it).

    `make_builder(data_dir=None)` makes the builder, in the configured data_dir by default.
    """
    builder = make_builder()
    if jax.process_count() > 1:
        if jax.process_index() == 0 and not builder.is_prepared():
            _download_and_prepare(make_builder, builder, download_config)
        _barrier("tttjax.data.prepare")
        builder = make_builder()
    if not builder.is_prepared():
        builder = _download_and_prepare(make_builder, builder, download_config)
    return builder


def open_training_source(config) -> tuple[SegmentWindows, grain.transforms.Map]:
    """(windows of `config.stage.num_segments` segments, model-input transform) for a run."""
    data, stage, model = config.data, config.stage, config.model
    data_dir = data.data_dir or None
    tfds.disable_progress_bar()
    n = stage.num_segments
    if data.dataset == "toon_storyboards":
        cfg = toon_config(data.builder_config, dict(data.builder_overrides))
        builder = prepared_builder(lambda d=None: toon_storyboards.ToonStoryboards(
            config=cfg, data_dir=d or data_dir, file_format="array_record"))
        crop = crop_toon(cfg.frames_per_segment)
        transform = ToonToModelInputs(
            make_toon_codec(data.get("toon_codec", "linear"), model.in_channels,
                            seed=data.toy_latent_seed),
            HashedTextEncoder(model.text_embed_dim, seed=data.text_encoder_seed),
            stage.text_length)
    elif data.dataset == "latents":
        download_config = (tfds.download.DownloadConfig(manual_dir=data.manual_dir)
                           if data.manual_dir else None)
        cfg = latents_config(data.builder_config, dict(data.builder_overrides))
        builder = prepared_builder(lambda d=None: latents_lib.Latents(
            config=cfg, data_dir=d or data_dir, file_format="array_record"), download_config)
        meta = builder.info.metadata
        crop = crop_latents(meta["frames_per_segment"], meta["prefix_frames"])
        transform = LatentsToModelInputs(model_latent_scale(data, meta["scaling_factor"]))
    else:
        raise ValueError(f"config.data.dataset {data.dataset!r} not in {DATASETS}")
    counts = builder.info.metadata["segment_counts"]
    if data.split not in counts:
        raise ValueError(f"{builder.name}/{builder.builder_config.name} has no split "
                         f"{data.split!r}; splits: {sorted(counts)}")
    source = builder.as_data_source(split=data.split)
    name = f"{builder.name}/{builder.builder_config.name}:{data.split}"
    return SegmentWindows(source, counts[data.split], n, crop, name=name), transform


# ------------------------------------------------------------------------------ loaders


def make_loader(source, transform: grain.transforms.Map, *, global_batch: int, shard_index: int,
                shard_count: int, seed: int, shuffle: bool = True, worker_count: int = 0
                ) -> grain.DataLoader:
    """An endless (epoch after epoch) Grain loader of this host's rows of each global batch.

    The example order is a global shuffle of `source` with `seed`, identical on every host;
    `BlockShardSampler` gives this host (shard `shard_index` of `shard_count`) rows
    `[shard_index * b, (shard_index + 1) * b)` of every global batch, `b = global_batch /
    shard_count`.
    """
    inner = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle,
                                        seed=seed if shuffle else None, num_epochs=None)
    sampler = BlockShardSampler(inner, global_batch=global_batch, shard_count=shard_count)
    if worker_count > 0:
        # Grain's worker processes read absl flags; called from Python (a notebook, a test,
        # `tttjax.train.train`) rather than a CLI, nothing has parsed them, and Grain fails
        # with UnparsedFlagAccessError. Parsing defaults only is what an absl app would do.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[transform, grain.transforms.Batch(sampler.local_batch, drop_remainder=True)],
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
        worker_count=worker_count)


def host_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
    """(shard_index, shard_count) of this process's contiguous rows of a batch sharding.

    Processes whose devices hold the same rows (a batch replicated over a model axis that
    spans hosts) get the same shard index, so they read the same examples.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        sl = index[0] if index else slice(None)
        start, stop, _ = sl.indices(global_shape[0])
        rows.update(range(start, stop))
    lo, hi = min(rows), max(rows) + 1
    local = hi - lo
    if len(rows) != local or global_shape[0] % local or lo % local:
        raise ValueError(f"process {jax.process_index()} holds batch rows {sorted(rows)} which are "
                         "not one aligned block; order the mesh so each host's devices hold "
                         "consecutive batch rows (data axis outermost)")
    return lo // local, global_shape[0] // local
