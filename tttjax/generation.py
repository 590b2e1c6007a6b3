"""Storyboard -> video: a trained (or converted) DiT with its text encoder and latent decoder.

    gen = load_generator("/runs/tiny")                          # a training workdir
    gen = load_generator("/ckpt/cogvideox5b_ttt",               # a converted checkpoint
                         vae="/weights/CogVideoX-5b/vae",
                         text_encoder="/weights/CogVideoX-5b/text_encoder")
    video = generate(gen, load_storyboard("story.json"), seed=0, steps=50)
    write_mp4(video.frames, "out.mp4", fps=video.fps)

What a checkpoint is paired with follows from how it was trained:

  - a workdir trained on `toon_storyboards` (the tiny configs) uses the same download-free
    pieces as its training data: the hashed-word text encoder and the toy latent codec, with
    the seeds of its `config.json`; nothing else is needed;
  - a workdir trained on `latents`, or a converted CogVideoX checkpoint, needs the CogVideoX
    VAE folder (`vae=`, diffusers `AutoencoderKLCogVideoX`) and a T5 encoder folder
    (`text_encoder=`, transformers `T5EncoderModel` + tokenizer);
  - a folder written by `python -m tttjax.export` pairs as the checkpoint it came from (its
    `tttjax_generation.json` records that pairing: `pairing(path)`).

The video length follows the storyboard: n segments are `prefix + n * frames_per_segment`
latent frames (docs/design.md §6), decoded to `(T - 1) * temporal + 1` frames.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from tttjax import storage
from tttjax.diffusion.guidance import Guidance
from tttjax.diffusion.samplers import sample
from tttjax.diffusion.schedule import DEFAULT_SCHEDULE, NoiseSchedule
from tttjax.sharding import DEFAULT_RULES, LogicalRules, make_mesh
from tttjax.storyboard import SEGMENT_SECONDS, Storyboard, embed_storyboard, num_latent_frames


class LatentDecoder(Protocol):
    """Latents in the DiT's scale -> video frames."""

    temporal: int                                      # video frames per latent frame (after the first)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float32 [T, C, h, w] -> uint8 [(T - 1) * temporal + 1, H, W, 3]."""


class TextEncoder(Protocol):
    def encode(self, texts: list[str], max_length: int) -> np.ndarray: ...


class ToyDecoder:
    """The toon world's codec (`tttjax.data.toy_latents.make_toon_codec`: "linear" or
    "learned", as the run was trained) as a decoder."""

    def __init__(self, channels: int, seed: int, kind: str = "linear"):
        from tttjax.data.toy_latents import make_toon_codec

        self.codec = make_toon_codec(kind, channels, seed=seed)
        self.temporal = self.codec.temporal

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.codec.decode(np.asarray(latents, np.float32))


class VAEDecoder:
    """CogVideoX's VAE decoding DiT-scale latents (divided by `latent_scale`, default the
    VAE's scaling factor; 1.0 for checkpoints trained as the seed code, docs/design.md §8)."""

    def __init__(self, vae, *, tile_batches: int = 2, latent_scale: float | None = None):
        self.vae, self.tile_batches = vae, tile_batches
        self.latent_scale = float(latent_scale or vae.scaling_factor)
        self.temporal = 2 ** vae.config.temporal_compress_level

    def decode(self, latents: np.ndarray) -> np.ndarray:
        from tttjax.video_io import to_uint8

        z = np.asarray(latents, np.float32)[None] / self.latent_scale
        chunks = [np.asarray(c[0]) for c in self.vae.decode_chunks(z, tile_batches=self.tile_batches)]
        video = np.concatenate(chunks, axis=0)          # [F, C, H, W]
        return to_uint8(np.transpose(video, (0, 2, 3, 1)))


@dataclasses.dataclass
class Generator:
    """Everything `generate` needs; build it with `load_generator`."""

    model: nnx.Module                 # CogVideoXDiT holding the loaded parameters
    model_config: ml_collections.ConfigDict
    text_encoder: TextEncoder
    decoder: LatentDecoder
    latent_hw: tuple[int, int]        # (h, w) latent frame size
    text_length: int                  # tokens per prompt
    schedule: NoiseSchedule
    mesh: jax.sharding.Mesh
    rules: LogicalRules
    source: str                       # one line: what was loaded

    @property
    def frames_per_segment(self) -> int:
        """Video frames per 3-second segment."""
        return self.model_config.frames_per_segment * self.decoder.temporal

    @property
    def fps(self) -> float:
        return self.frames_per_segment / SEGMENT_SECONDS

    def num_frames(self, num_segments: int) -> int:
        """Video frames of an n-segment storyboard."""
        t = num_latent_frames(num_segments, self.model_config.frames_per_segment,
                              self.model_config.prefix_frames)
        return (t - 1) * self.decoder.temporal + 1


@dataclasses.dataclass
class Video:
    frames: np.ndarray                # uint8 [F, H, W, 3]
    latents: np.ndarray               # float32 [T, C, h, w] (DiT scale)
    captions: list[str]               # one per segment, as written in the storyboard
    fps: float
    frames_per_segment: int           # video frames per segment
    prefix_frames: int                # video frames before the first segment


def _read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.path(os.path.join(workdir, "config.json"))
    if not path.is_file():
        raise ValueError(f"{workdir!r} has no config.json; give a training --workdir (written "
                         "by `python -m tttjax.train`) or a converted checkpoint folder")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _vae_decoder(vae: str | None, what: str, latent_scale: float | None = None) -> VAEDecoder:
    if not vae:
        raise ValueError(f"{what} needs the CogVideoX VAE to decode its latents: pass --vae "
                         "DIR (a diffusers AutoencoderKLCogVideoX folder)")
    from tttjax.models.vae_weights import from_diffusers_vae

    model, _ = from_diffusers_vae(vae)
    return VAEDecoder(model, latent_scale=latent_scale)


def _text_encoder(text_encoder: str | None, hashed_text_seed: int | None, dim: int,
                  what: str) -> TextEncoder:
    """The T5 folder's encoder, or the hashed one when the data was pre-computed with it."""
    if text_encoder and hashed_text_seed is not None:
        raise ValueError("give either --text-encoder or --hashed-text-seed, not both")
    if hashed_text_seed is not None:
        from tttjax.data.text_encoder import HashedTextEncoder

        return HashedTextEncoder(dim, seed=hashed_text_seed)
    if not text_encoder:
        raise ValueError(f"{what} was trained on pre-computed prompt embeddings: pass "
                         "--text-encoder DIR (a transformers T5EncoderModel folder with its "
                         "tokenizer), or --hashed-text-seed S if they came from `python -m "
                         "tttjax.precompute --hashed-text-dim`")
    from tttjax.text.t5 import T5TextEncoder

    return T5TextEncoder.from_pretrained(text_encoder)


def pairing(path: str) -> dict[str, Any]:
    """What the checkpoint at `path` (a training workdir or a converted checkpoint) samples
    with, as JSON-able settings: `latent_hw`, `text_length`, `schedule` (NoiseSchedule
    fields), `text_encoder` ({"kind": "hashed", "seed"} or {"kind": "t5"}: a folder the user
    gives) and `decoder` ({"kind": "toon", "codec", "seed"} or {"kind": "vae",
    "latent_scale"}). `python -m tttjax.export` writes it next to the weights, so an exported
    folder samples exactly as its source."""
    from tttjax.models.dit_weights import read_checkpoint_config
    from tttjax.train.model_state import checkpoint_kind

    kind, _ = checkpoint_kind(path)
    if kind == "converted":
        cfg = read_checkpoint_config(path)
        return {"latent_hw": [cfg.sample_height, cfg.sample_width], "text_length": 226,
                "schedule": dataclasses.asdict(DEFAULT_SCHEDULE), "text_encoder": {"kind": "t5"},
                "decoder": {"kind": "vae", "latent_scale": None}}
    config = _read_workdir_config(path)
    out = {"latent_hw": [config.stage.latent_height, config.stage.latent_width],
           "text_length": config.stage.text_length,
           "schedule": dataclasses.asdict(NoiseSchedule(**config.diffusion.to_dict()))}
    if config.data.dataset == "toon_storyboards":
        out["text_encoder"] = {"kind": "hashed", "seed": config.data.text_encoder_seed}
        out["decoder"] = {"kind": "toon", "codec": config.data.get("toon_codec", "linear"),
                          "seed": config.data.toy_latent_seed}
    else:
        out["text_encoder"] = {"kind": "t5"}
        out["decoder"] = {"kind": "vae", "latent_scale": config.data.get("latent_scale", 0.0) or None}
    return out


def _paired(settings: dict[str, Any], model_config, what: str, *, vae, text_encoder,
            hashed_text_seed, latent_scale) -> tuple[TextEncoder, LatentDecoder]:
    """The text encoder and decoder `settings` (from `pairing`) name, with the user's folders."""
    text_settings, dec = settings["text_encoder"], settings["decoder"]
    if text_settings["kind"] == "hashed":     # the encoder the data was made with, always
        from tttjax.data.text_encoder import HashedTextEncoder

        text = HashedTextEncoder(model_config.text_embed_dim, seed=text_settings["seed"])
    else:
        text = _text_encoder(text_encoder, hashed_text_seed, model_config.text_embed_dim, what)
    if dec["kind"] == "toon":
        decoder = ToyDecoder(model_config.in_channels, dec["seed"], dec["codec"])
    else:
        decoder = _vae_decoder(vae, what, latent_scale or dec.get("latent_scale"))
    return text, decoder


def is_exported(path: str) -> bool:
    """True for a folder written by `python -m tttjax.export` (local or gs://)."""
    from tttjax.export import BASE_FILE, TTTJAX_CONFIG

    folder = storage.path(path)
    return (folder / TTTJAX_CONFIG).is_file() and (folder / BASE_FILE).is_file()


def load_generator(path: str, *, vae: str | None = None, text_encoder: str | None = None,
                   hashed_text_seed: int | None = None, text_length: int | None = None,
                   mesh_axes: dict[str, int] | None = None,
                   rules: LogicalRules = DEFAULT_RULES, seed: int = 0,
                   latent_scale: float | None = None) -> Generator:
    """Loads a training workdir, a converted checkpoint or an exported folder for sampling
    (see the module doc).

    Args:
      path: a `python -m tttjax.train` workdir (latest checkpoint), a folder written by
        `python -m tttjax.convert` (model_config.json + state/), or one written by
        `python -m tttjax.export` (safetensors + tttjax_config.json; it samples exactly as
        the checkpoint it was exported from, with the same text encoder and decoder).
      vae, text_encoder: folders for checkpoints trained on real latents (module doc).
      hashed_text_seed: instead of `text_encoder`, the seed of the download-free hashed
        encoder the `latents` data was pre-computed with (`precompute --hashed-text-dim`).
      text_length: tokens per prompt; default the workdir's `stage.text_length`, or 226
        (CogVideoX's) for a converted checkpoint.
      mesh_axes: mesh for the parameters, default all devices on `fsdp` (parameters sharded,
        the batch of 2 (CFG) replicated).
      seed: initialises mixer parameters a converted checkpoint lacks (docs/design.md §1-2).
      latent_scale: the factor between VAE latents and the model's (docs/design.md §8);
        default a workdir's `data.latent_scale`, else the VAE's scaling factor.
    Raises:
      ValueError naming what is missing or inconsistent.
    """
    from tttjax.models.dit_weights import read_checkpoint_config
    from tttjax.train.model_state import checkpoint_kind, load_params, model_spec

    path = storage.resolve(path)     # local: absolute; gs://...: as given
    if not storage.path(path).is_dir():
        raise ValueError(f"checkpoint folder {path!r} not found")
    if is_exported(path):
        kind = "exported"
        settings = _read_exported_pairing(path)
    else:
        try:
            kind, _ = checkpoint_kind(path)
        except ValueError:
            raise ValueError(f"{path!r} is neither a training workdir (config.json + "
                             "checkpoints/, from `python -m tttjax.train`), a converted "
                             "checkpoint (model_config.json + state/, from `python -m "
                             "tttjax.convert`) nor an exported folder (tttjax_config.json + "
                             "safetensors, from `python -m tttjax.export`)") from None
        settings = pairing(path)
    what = {"converted": "converted checkpoint", "stage": "workdir", "exported": "exported folder"
            }[kind] + f" {path}"
    from tttjax.models import dit_config

    if kind == "converted":
        model_config = read_checkpoint_config(path)
    elif kind == "stage":
        model_config = dit_config.validate(_read_workdir_config(path).model)
    else:
        from tttjax.export import TTTJAX_CONFIG

        raw = (storage.path(path) / TTTJAX_CONFIG).read_text()
        model_config = dit_config.validate(ml_collections.ConfigDict(json.loads(raw)))
    text, decoder = _paired(settings, model_config, what, vae=vae, text_encoder=text_encoder,
                            hashed_text_seed=hashed_text_seed, latent_scale=latent_scale)
    text_length = text_length or settings["text_length"]
    if text_length < 1:
        raise ValueError(f"text_length must be >= 1, got {text_length}")
    dim = getattr(text, "dim", model_config.text_embed_dim)
    if dim != model_config.text_embed_dim:
        raise ValueError(f"the text encoder gives {dim}-dim embeddings but the model expects "
                         f"{model_config.text_embed_dim}; pass the model's own text encoder")

    mesh = make_mesh(mesh_axes or {"data": 1, "fsdp": -1, "tensor": 1})
    if kind == "exported":
        from tttjax.export import read_export

        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            model, _ = read_export(path, mesh=mesh, rules=rules)
        report = f"loaded exported folder {path}"
    else:
        spec = model_spec(model_config, mesh, rules)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            # A training workdir's checkpoints hold the whole model: nothing may be made up.
            params, report = load_params(spec, path, seed, allow_fresh_mixer=kind == "converted")
        state = jax.tree.map(lambda x: x, spec.template)
        nnx.replace_by_pure_dict(state, params)
        model = nnx.merge(spec.graphdef, state)
    return Generator(model=model, model_config=model_config, text_encoder=text, decoder=decoder,
                     latent_hw=tuple(settings["latent_hw"]), text_length=int(text_length),
                     schedule=NoiseSchedule(**settings["schedule"]), mesh=mesh, rules=rules,
                     source=report)


def _read_exported_pairing(path: str) -> dict[str, Any]:
    from tttjax.export import PAIRING_FILE

    file = storage.path(path) / PAIRING_FILE
    if not file.is_file():
        raise ValueError(f"exported folder {path!r} has no {PAIRING_FILE} (what it samples with); "
                         "export it again with this version of `python -m tttjax.export`")
    return json.loads(file.read_text())


def generate(gen: Generator, storyboard: Storyboard, *, seed: int = 0, steps: int = 50,
             sampler: str = "dpm++2m_sde", guidance: Guidance | float | None = Guidance(),
             progress: Callable[[int], Any] | None = None) -> Video:
    """Samples one video for `storyboard` (deterministic in `seed`) and decodes it.

    Args:
      gen: from `load_generator`.
      storyboard: a validated storyboard (`tttjax.storyboard.load_storyboard`).
      seed: the initial noise and SDE noise come from `jax.random.key(seed)`.
      steps, sampler, guidance: as `tttjax.diffusion.sample` (50 steps, DPM-Solver++(2M) SDE,
        guidance rising 1 -> 4 by default).
      progress: optional `progress(step)` after each sampler step.
    Returns:
      the `Video` (uint8 frames [F, H, W, 3] with F = `gen.num_frames(n)`).
    """
    cfg = gen.model_config
    n = storyboard.num_segments
    cond, uncond, _ = embed_storyboard(storyboard, gen.text_encoder, gen.text_length)
    t = num_latent_frames(n, cfg.frames_per_segment, cfg.prefix_frames)
    shape = (1, t, cfg.in_channels, *gen.latent_hw)
    with jax.set_mesh(gen.mesh), nnx.logical_axis_rules(gen.rules):
        latents = sample(gen.model, shape, cond[None], uncond[None], key=jax.random.key(seed),
                         steps=steps, sampler=sampler, guidance=guidance, schedule=gen.schedule,
                         progress=progress)
    latents = np.asarray(jax.device_get(latents))[0]
    frames = gen.decoder.decode(latents)
    return Video(frames=frames, latents=latents, captions=storyboard.captions, fps=gen.fps,
                 frames_per_segment=gen.frames_per_segment, prefix_frames=1)
