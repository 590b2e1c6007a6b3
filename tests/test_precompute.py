"""`python -m tttjax.precompute`: videos + storyboards -> source .npz -> `latents` TFDS dataset.

Tiny random diffusers VAE and transformers T5 folders stand in for CogVideoX's. Latents are
checked against diffusers' `AutoencoderKLCogVideoX.encode(...).latent_dist` on the same
frames, text against transformers' `T5EncoderModel`, both after the float16 storage of the
source files (tolerance: a few float16 ulps, |d| <= 2e-3 * max |ref| + 1e-3).
"""

import json
import os

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from transformers import T5Tokenizer

from tiny_hf_models import save_tiny_t5, save_tiny_vae, spiece_lines, train_spiece
from tttjax import precompute
from tttjax.data.latents import Latents
from tttjax.data.loader import latents_config
from tttjax.data.text_encoder import HashedTextEncoder
from tttjax.storyboard import load_storyboard
from tttjax.text.tokenizer import SCENE_TOKENS
from tttjax.video_io import write_mp4

TEXT_LENGTH = 8
VAE = dict(block_out_channels=(8, 16, 16), latent_channels=4, layers_per_block=1,
           norm_num_groups=4, down_block_types=("CogVideoXDownBlock3D",) * 3,
           up_block_types=("CogVideoXUpBlock3D",) * 3, sample_height=16, sample_width=16,
           scaling_factor=0.7)
T5 = dict(vocab_size=48, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, dropout_rate=0.0)
WORDS = "the a cat mouse jumps runs over table kitchen hides wall in".split()
# a: 2 segments (scene change), 32x32 at 16 fps -> resized; b: 1 segment, 16x16 at 32 fps
STORIES = {"a": [{"text": "The cat jumps over the table."},
                 {"text": "The mouse hides in the wall.", "requires_scene_transition": True}],
           "b": [{"text": "A mouse runs."}]}
SOURCES = {"a": (32, 16, 20), "b": (16, 32, 20)}  # size, fps, frames
# 2 latent frames per segment after 1: a -> 5 latent / 17 video frames, b -> 3 / 9
FLAGS = ["--frames-per-segment", "2", "--text-length", str(TEXT_LENGTH)]


def _video(size, frames, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 6, 3)
    out = [np.stack([np.sin(6 * xx + t * 0.3 + phase[c]) * np.cos(5 * yy - phase[c])
                     for c in range(3)], -1) for t in range(frames)]
    return np.round((np.stack(out) + 1) * 127.5).astype(np.uint8)


def _write_inputs(folder, stories=STORIES, sources=SOURCES):
    os.makedirs(folder, exist_ok=True)
    for i, (vid, story) in enumerate(stories.items()):
        size, fps, frames = sources[vid]
        write_mp4(_video(size, frames, i), os.path.join(folder, vid + ".mp4"), fps=fps)
        with open(os.path.join(folder, vid + ".json"), "w") as f:
            json.dump(story, f)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    torch_vae = save_tiny_vae(str(root / "vae"), VAE, 0)
    t5_dir = str(root / "t5")
    train_spiece(t5_dir, spiece_lines(WORDS, 400, 3, 9), vocab_size=32)
    T5Tokenizer.from_pretrained(t5_dir, extra_ids=4).save_pretrained(t5_dir)
    torch_t5 = save_tiny_t5(t5_dir, T5)
    _write_inputs(str(root / "videos"))
    return dict(root=root, vae=str(root / "vae"), t5=t5_dir, videos=str(root / "videos"),
                torch_vae=torch_vae, torch_t5=torch_t5)


def _argv(folders, manual, data, *extra, text=None):
    text = ["--text-encoder", folders["t5"]] if text is None else text
    return ["--videos", folders["videos"], "--vae", folders["vae"], *text, "--manual-dir",
            str(manual), "--data-dir", str(data), *FLAGS, *extra]


@pytest.fixture(scope="module")
def t5_run(folders):
    manual, data = folders["root"] / "manual", folders["root"] / "data"
    assert precompute.main(_argv(folders, manual, data)) == 0
    return manual, data


def _source(data, split="train", text_dim=16):
    """The dataset the training loader opens for these shapes (derived config name)."""
    cfg = latents_config("cogvideox5b", dict(latent_channels=4, text_length=TEXT_LENGTH,
                                             text_embed_dim=text_dim, frames_per_segment=2))
    builder = Latents(config=cfg, data_dir=str(data), file_format="array_record")
    assert builder.is_prepared()
    return builder, builder.as_data_source(split=split)


def _close(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    np.testing.assert_array_less(np.abs(ours - ref), 2e-3 * np.abs(ref).max() + 1e-3)


def _decoded(path):
    reader = imageio_ffmpeg.read_frames(path)
    w, h = next(reader)["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def test_frames_are_resampled_to_fps_and_resized(folders):
    b = os.path.join(folders["videos"], "b.mp4")
    frames = precompute.read_video(b, 9, 16, 16, 16)
    ref = _decoded(b)[0:17:2]  # 32 fps -> every other frame
    np.testing.assert_array_equal(frames, ref)
    # the VAE's view of the frames: [1, T, 3, H, W] in [-1, 1], converted per slice
    view = precompute.VAEInputView(frames)
    full = np.moveaxis(ref.astype(np.float32) / 127.5 - 1, -1, 1)[None]
    assert view.shape == full.shape
    for index in [(slice(None), slice(0, 9), slice(None), slice(None), slice(None)),
                  (slice(None), slice(2, 5), slice(None), slice(3, 11), slice(0, 7))]:
        np.testing.assert_array_equal(view[index], full[index])
    np.testing.assert_array_equal(precompute.source_frame_indices(5, 30, 16), [0, 1, 3, 5, 7])
    # scale to cover (20x40 -> 16x32), crop the middle 16 columns: the bright band
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 200
    crop = precompute.resize_center_crop(img, 16, 16)
    assert crop.shape == (16, 16, 3) and np.abs(crop[:, 1:-1].astype(int) - 200).max() <= 2
    with pytest.raises(precompute.UsageError, match="b.mp4: has 20 frames"):
        precompute.read_video(b, 11, 16, 16, 16)


def test_sources_match_diffusers_and_transformers(folders, t5_run):
    manual, _ = t5_run
    assert sorted(os.listdir(manual / "train")) == ["a.npz", "b.npz"]
    tok = T5Tokenizer.from_pretrained(folders["t5"])
    tok.add_special_tokens({"additional_special_tokens": list(SCENE_TOKENS)})
    for vid, (size, fps, _) in SOURCES.items():
        story = load_storyboard(os.path.join(folders["videos"], vid + ".json"))
        n = story.num_segments
        with np.load(manual / "train" / f"{vid}.npz") as data:
            src = {k: data[k] for k in data}
        frames = precompute.read_video(os.path.join(folders["videos"], f"{vid}.mp4"), 8 * n + 1,
                                       16, 16, 16)
        with torch.no_grad():
            dist = folders["torch_vae"].encode(
                torch.from_numpy(np.moveaxis(precompute.unit_range(frames), 1, 0)[None].copy())
            ).latent_dist
        ref_mean = dist.mean[0].numpy().transpose(1, 0, 2, 3)
        ref_logvar = dist.logvar[0].numpy().transpose(1, 0, 2, 3)
        assert src["latents_mean"].shape == (1 + 2 * n, 4, 4, 4)
        _close(src["latents_mean"], ref_mean)
        _close(src["latents_logvar"], ref_logvar)

        ids = tok(story.prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            ref_text = folders["torch_t5"](ids).last_hidden_state.numpy()
        _close(src["text"], ref_text)
        assert list(src["captions"]) == story.captions
    with np.load(manual / "train" / "a.npz") as data:
        assert data["scene_start"].tolist() == [False, True]
        assert data["scene_end"].tolist() == [True, False]


def test_dataset_loads_with_tfds(t5_run):
    manual, data = t5_run
    builder, source = _source(data)
    assert builder.builder_config.name.startswith("cogvideox5b_") and len(source) == 2
    records = [source[i] for i in range(2)]
    assert [r["video_id"] for r in records] in (["a", "b"], [b"a", b"b"])
    assert [int(r["num_segments"]) for r in records] == [2, 1]
    for r, vid in zip(records, "ab"):
        with np.load(manual / "train" / f"{vid}.npz") as src:
            np.testing.assert_array_equal(r["latents_mean"], src["latents_mean"])
            np.testing.assert_array_equal(r["text"], src["text"])
    info = builder.info
    assert info.metadata["scaling_factor"] == pytest.approx(0.7)
    assert info.metadata["frames_per_segment"] == 2


def test_resume_skips_finished_sources(folders, t5_run, monkeypatch, capsys):
    manual, data = t5_run
    mtimes = {p: os.stat(manual / "train" / p).st_mtime_ns for p in ("a.npz", "b.npz")}

    def never(*args, **kwargs):
        raise AssertionError("a finished source file was encoded again")

    monkeypatch.setattr(precompute, "encode_item", never)
    capsys.readouterr()
    assert precompute.main(_argv(folders, manual, data)) == 0
    assert "encoded 0, skipped 2" in capsys.readouterr().out
    assert {p: os.stat(manual / "train" / p).st_mtime_ns for p in mtimes} == mtimes


def test_shards_partition_and_build_once_complete(folders, tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    hashed = ["--hashed-text-dim", "12"]
    assert precompute.main(_argv(folders, manual, data, "--shard-index", "1",
                                 "--shard-count", "2", text=hashed)) == 0
    assert os.listdir(manual / "train") == ["b.npz"] and not data.exists()
    assert precompute.main(_argv(folders, manual, data, "--build-only", text=hashed)) == 2
    assert "missing" in capsys.readouterr().err
    assert precompute.main(_argv(folders, manual, data, "--shard-index", "0",
                                 "--shard-count", "2", text=hashed)) == 0
    assert sorted(os.listdir(manual / "train")) == ["a.npz", "b.npz"]
    assert len(_source(data, text_dim=12)[1]) == 2
    story = load_storyboard(os.path.join(folders["videos"], "a.json"))
    with np.load(manual / "train" / "a.npz") as src:
        ref = HashedTextEncoder(12).encode(story.prompts, max_length=TEXT_LENGTH)
        np.testing.assert_array_equal(src["text"], ref.astype(np.float16))


def _bad_cases(folders, tmp):
    empty = tmp / "empty"
    empty.mkdir()
    lonely = tmp / "lonely"
    _write_inputs(str(lonely))
    os.remove(lonely / "b.json")
    invalid = tmp / "invalid"
    _write_inputs(str(invalid))
    (invalid / "b.json").write_text(json.dumps([{"txt": "typo"}]))
    short = tmp / "short"
    _write_inputs(str(short), {"a": STORIES["a"] * 3, "b": STORIES["b"]})
    novae = tmp / "novae"
    novae.mkdir()
    (novae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return [
        (dict(videos=str(tmp / "nowhere")), "is not a folder"),
        (dict(videos=str(empty)), "holds no videos"),
        (dict(videos=str(lonely)), "'b.mp4'"),
        (dict(videos=str(invalid)), "unknown field 'txt'"),
        (dict(videos=str(short)), "a.mp4: has 20 frames"),
        (dict(vae=str(novae)), "AutoencoderKL"),
        (dict(vae=str(tmp / "nowhere")), "--vae"),
    ]


def test_bad_inputs_exit_2_and_write_nothing(folders, tmp_path, capsys):
    manual, data = tmp_path / "manual", tmp_path / "data"
    for change, words in _bad_cases(folders, tmp_path):
        argv = _argv({**folders, **change}, manual, data, text=["--hashed-text-dim", "12"])
        capsys.readouterr()
        assert precompute.main(argv) == 2, change
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err and "Traceback" not in err, (change, err)
        assert not manual.exists() and not data.exists(), change
    with pytest.raises(SystemExit) as exc:  # argparse errors are one line too
        precompute.main(["--videos", folders["videos"]])
    assert exc.value.code == 2 and "\n" not in capsys.readouterr().err.strip()


def test_skip_bad_leaves_a_note_and_builds_the_rest(folders, tmp_path, capsys):
    videos = tmp_path / "videos"
    _write_inputs(str(videos), {"a": STORIES["a"] * 3, "b": STORIES["b"]})
    manual, data = tmp_path / "manual", tmp_path / "data"
    argv = _argv({**folders, "videos": str(videos)}, manual, data, "--skip-bad",
                 text=["--hashed-text-dim", "12"])
    assert precompute.main(argv) == 0
    out = capsys.readouterr()
    assert "skipping a" in out.err and "encoded 1" in out.out
    assert sorted(os.listdir(manual / "train")) == ["a.skipped", "b.npz"]
    assert len(_source(data, text_dim=12)[1]) == 1


def test_jax_processes_shard_and_only_process_0_builds(folders, tmp_path, monkeypatch, capsys):
    import tttjax.distributed

    manual, data = tmp_path / "manual", tmp_path / "data"
    monkeypatch.setattr(tttjax.distributed, "initialize_from_env", lambda: (1, 2))
    argv = _argv(folders, manual, data, text=["--hashed-text-dim", "12"])
    assert precompute.main(argv) == 0
    assert os.listdir(manual / "train") == ["b.npz"]
    assert precompute.main(argv + ["--build-only"]) == 0  # process 1 never builds
    assert "shard 1/2" in capsys.readouterr().out and not data.exists()


def test_videos_to_trained_model_to_sampled_video(folders, tmp_path, capsys):
    """The real-data path end to end on tiny models, through the three commands: precompute
    (hashed text) -> train on the dataset with the overrides it prints -> sample with the VAE.
    The mixer is off and one device is used: this checks the data path, not the model."""
    from tttjax.sample import main as sample_main
    from tttjax.train.__main__ import main as train_main

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    manual, data, run = tmp_path / "manual", tmp_path / "data", tmp_path / "run"
    assert precompute.main(_argv(folders, manual, data, text=["--hashed-text-dim", "32"])) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    overrides = last.split("data.builder_overrides=")[1].rstrip(")")
    config = [f"--config={configs}/tiny.py:none", "--config.data.dataset=latents",
              "--config.mesh.num_devices=1",
              "--config.data.builder_config=cogvideox5b",
              f"--config.data.builder_overrides={overrides}", f"--config.data.data_dir={data}",
              f"--config.data.manual_dir={manual}", "--config.steps=2",
              "--config.checkpoint_every=2", f"--workdir={run}"]
    # tiny's 8x8 latents against the dataset's 4x4: refused with the fields to change
    assert train_main(["prog", *config]) == 2
    assert ("latents is (5, 4, 4, 4) but the config expects (5, 4, 8, 8)"
            in capsys.readouterr().err)
    config += ["--config.stage.latent_height=4", "--config.stage.latent_width=4"]
    assert train_main(["prog", *config]) == 0
    out = tmp_path / "a.mp4"
    sample = ["--workdir", str(run), "--storyboard", os.path.join(folders["videos"], "a.json"),
              "--out", str(out), "--vae", folders["vae"], "--steps", "2"]
    assert sample_main(sample) == 2 and not out.exists()   # which text encoder? say so
    assert "--hashed-text-seed" in capsys.readouterr().err
    assert sample_main(sample + ["--hashed-text-seed", "0"]) == 0
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 17   # 5 latent frames


def test_dataset_built_into_a_bucket_loads_from_it(folders, tmp_path, capsys):
    """--data-dir gs://...: built locally (TFDS's ArrayRecord writer opens local files only),
    uploaded, and read back from the bucket by TFDS; --manual-dir gs:// is refused."""
    import gcs_emulator

    if gcs_emulator.available() is not None:
        pytest.skip(gcs_emulator.available())
    manual, hashed = tmp_path / "manual", ["--hashed-text-dim", "12"]
    with gcs_emulator.GCSEmulator() as gcs:
        gcs.create_bucket("bucket")
        assert precompute.main(_argv(folders, manual, "gs://bucket/data", text=hashed)) == 0
        assert len(_source("gs://bucket/data", text_dim=12)[1]) == 2
        # a rebuild replaces the bucket's build (no stale files are left beside it)
        assert precompute.main(_argv(folders, manual, "gs://bucket/data", "--build-only",
                                     text=hashed)) == 0
        builder, source = _source("gs://bucket/data", text_dim=12)
        assert len(source) == 2 and str(builder.data_dir).startswith("gs://bucket/data/")
        capsys.readouterr()
        assert precompute.main(_argv(folders, "gs://bucket/manual", tmp_path / "d",
                                     text=hashed)) == 2
        assert "--manual-dir" in capsys.readouterr().err
