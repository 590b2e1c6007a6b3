"""`latents`: pre-computed VAE latents and text embeddings of real videos (docs/design.md §6).

Training on real video never touches pixels or T5 at train time: every video is encoded
once (`python -m tttjax.precompute`, the generation tools) into the VAE's posterior mean and
log-variance, a latent is re-sampled from them every time the example is loaded
(`z = mean + exp(logvar / 2) * eps`, inside the train step), and every 3-second segment's
caption is stored as its T5 embedding.

Source files (what the pre-computation writes, one file per video, `write_source_example`):

    <manual_dir>/<split>/<video_id>.npz
      latents_mean    float [T, C, h, w]   posterior mean, unscaled (diffusers layout per frame)
      latents_logvar  float [T, C, h, w]   posterior log-variance
      text            float [n, S, Dt]     one T5 embedding per segment (S = 226, Dt = 4096)
      scene_start     bool  [n]            the segment opens a scene (`<start_scene>`)
      scene_end       bool  [n]            the segment closes a scene (`<end_scene>`)
      captions        str   [n]            the storyboard text of each segment
    with T = prefix_frames + n * frames_per_segment (CogVideoX: 1 + 12 n).

Dataset records (`tfds.data_source("latents/<config>", ...)`, ArrayRecord, float16 storage):

    latents_mean, latents_logvar   float16 [T, C, h, w]
    text                           float16 [n, S, Dt]
    scene_start, scene_end         bool [n]
    captions                       n strings
    num_segments                   int32
    video_id                       string (the source file's stem)

`info.metadata` holds `segment_counts[split]` (each record's n, records in file-name order),
`frames_per_segment`, `prefix_frames` and `scaling_factor` (the VAE's latent scale, 0.7 for
CogVideoX-5B; the loader multiplies latents by it, as diffusers' pipelines do).

Build the dataset from a manual dir:

    build_latents_dataset(manual_dir, data_dir, LatentsConfig(name="cogvideox5b", ...))
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

SOURCE_KEYS = ("latents_mean", "latents_logvar", "text", "scene_start", "scene_end", "captions")


@dataclasses.dataclass
class LatentsConfig(tfds.core.BuilderConfig):
    latent_channels: int = 16
    text_length: int = 226
    text_embed_dim: int = 4096
    frames_per_segment: int = 12
    prefix_frames: int = 1
    scaling_factor: float = 0.7

    def validate(self) -> None:
        sizes = dict(latent_channels=self.latent_channels, text_length=self.text_length,
                     text_embed_dim=self.text_embed_dim, frames_per_segment=self.frames_per_segment)
        bad = [k for k, v in sizes.items() if not isinstance(v, int) or v < 1]
        if bad or self.prefix_frames < 0 or self.scaling_factor <= 0:
            raise ValueError(f"latents config {self.name!r}: {bad or 'prefix_frames/scaling_factor'} "
                             "must be positive")


def _check_example(arrays: dict, cfg: LatentsConfig, where: str) -> int:
    """Validates one source example against `cfg`; returns its number of segments."""
    missing = [k for k in SOURCE_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: missing arrays {missing}; a source example needs {SOURCE_KEYS}")
    mean, logvar, text = arrays["latents_mean"], arrays["latents_logvar"], arrays["text"]
    if mean.ndim != 4 or mean.shape != logvar.shape or mean.shape[1] != cfg.latent_channels:
        raise ValueError(f"{where}: latents_mean/logvar must both be [T, {cfg.latent_channels}, h, w],"
                         f" got {mean.shape} and {logvar.shape}")
    n = text.shape[0] if text.ndim == 3 else -1
    if text.ndim != 3 or text.shape[1:] != (cfg.text_length, cfg.text_embed_dim):
        raise ValueError(f"{where}: text must be [n, {cfg.text_length}, {cfg.text_embed_dim}], got "
                         f"{text.shape}")
    want = cfg.prefix_frames + n * cfg.frames_per_segment
    if mean.shape[0] != want:
        raise ValueError(f"{where}: {n} segments need {want} latent frames ({cfg.prefix_frames} + "
                         f"{n} x {cfg.frames_per_segment}), got {mean.shape[0]}")
    for key in ("scene_start", "scene_end", "captions"):
        if len(arrays[key]) != n:
            raise ValueError(f"{where}: {key} must have one entry per segment ({n}), got "
                             f"{len(arrays[key])}")
    return n


def write_source_example(path: str, *, latents_mean, latents_logvar, text, scene_start, scene_end,
                         captions, config: LatentsConfig | None = None) -> str:
    """Writes one pre-computed video as `<path>` (.npz), validated against `config`."""
    cfg = config or LatentsConfig(name="default")
    arrays = dict(latents_mean=np.asarray(latents_mean, np.float16),
                  latents_logvar=np.asarray(latents_logvar, np.float16),
                  text=np.asarray(text, np.float16),
                  scene_start=np.asarray(scene_start, bool), scene_end=np.asarray(scene_end, bool),
                  captions=np.asarray([str(c) for c in captions]))
    _check_example(arrays, cfg, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a half-written file never looks finished (resumable pre-computation)
    return path


class Latents(tfds.core.GeneratorBasedBuilder):
    """Pre-computed VAE posteriors + per-segment text embeddings, from a manual dir of .npz."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        LatentsConfig(name="cogvideox5b", description="CogVideoX-5B VAE latents + T5-XXL text"),
    ]
    DEFAULT_CONFIG_NAME = "cogvideox5b"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Write one .npz per video under <manual_dir>/<split>/ with "
        "tttjax.data.latents.write_source_example (python -m tttjax.precompute does this).")

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        c, s, d = cfg.latent_channels, cfg.text_length, cfg.text_embed_dim
        return self.dataset_info_from_configs(
            description=__doc__.split("\n")[0],
            features=tfds.features.FeaturesDict({
                # raw bytes: several unknown dims, and float noise does not compress anyway
                "latents_mean": tfds.features.Tensor(shape=(None, c, None, None), dtype=np.float16,
                                                     encoding=tfds.features.Encoding.BYTES),
                "latents_logvar": tfds.features.Tensor(shape=(None, c, None, None),
                                                       dtype=np.float16,
                                                       encoding=tfds.features.Encoding.BYTES),
                "text": tfds.features.Tensor(shape=(None, s, d), dtype=np.float16),
                "scene_start": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "scene_end": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "num_segments": tfds.features.Scalar(dtype=np.int32),
                "video_id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        splits = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
        if not splits:
            raise ValueError(f"no split folders under {root}; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        cfg = self.builder_config
        files, counts = {}, {}
        for split in splits:
            files[split] = sorted(p for p in (root / split).iterdir()
                                  if p.name.endswith(".npz") and not p.name.endswith(".tmp.npz"))
            counts[split] = [self._num_segments(p) for p in files[split]]
        self.info.metadata["segment_counts"] = counts
        self.info.metadata["frames_per_segment"] = cfg.frames_per_segment
        self.info.metadata["prefix_frames"] = cfg.prefix_frames
        self.info.metadata["scaling_factor"] = cfg.scaling_factor
        return {split: self._generate_examples(files[split]) for split in splits}

    def _num_segments(self, path) -> int:
        with np.load(path) as data:
            return int(data["text"].shape[0])

    def _generate_examples(self, paths):
        cfg = self.builder_config
        for i, path in enumerate(paths):
            with np.load(path) as data:
                arrays = {k: data[k] for k in SOURCE_KEYS if k in data}
            n = _check_example(arrays, cfg, str(path))
            yield i, {
                "latents_mean": arrays["latents_mean"].astype(np.float16),
                "latents_logvar": arrays["latents_logvar"].astype(np.float16),
                "text": arrays["text"].astype(np.float16),
                "scene_start": arrays["scene_start"].astype(bool),
                "scene_end": arrays["scene_end"].astype(bool),
                "captions": [str(c) for c in arrays["captions"]],
                "num_segments": np.int32(n),
                "video_id": path.name[: -len(".npz")],
            }


def build_latents_dataset(manual_dir: str, data_dir: str, config: LatentsConfig | str = "cogvideox5b"
                          ) -> Latents:
    """Packs the .npz files under `manual_dir` into the `latents` TFDS dataset in `data_dir`."""
    builder = Latents(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
