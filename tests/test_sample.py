"""`python -m tttjax.sample` and `tttjax.generation` on a tiny trained workdir.

One tiny run (plain DiT, 2 training steps, fast XLA options) is shared by every case: the
point is the path checkpoint -> storyboard -> sampler -> decoder -> files, and its errors.
"""

import importlib.util
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from tiny_configs import tiny_config

from tttjax import sample as sample_cli
from tttjax.generation import generate, load_generator
from tttjax.storyboard import load_storyboard
from tttjax.train.loop import train
from tttjax.train.optimizer import path_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORY = [{"text": "The orange cat walks slowly over to the right side of the kitchen."},
         {"text": "The little white mouse hops up and down happily.", "neg_text": "blurry"},
         {"text": "The black cat jumps high into the air.", "requires_scene_transition": True}]


def _tiny_config(data_dir):
    return tiny_config("none", **{"steps": 2, "log_every": 1, "checkpoint_every": 2,
                                  "data.data_dir": data_dir,
                                  "data.builder_overrides": dict(num_train=16, num_validation=0)})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    run = str(tmp_path_factory.mktemp("run"))
    train(_tiny_config(data_dir), run)
    return run


@pytest.fixture(scope="module")
def generator(workdir):
    return load_generator(workdir)


def _story(tmp_path, data, name="story.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_generator_holds_the_saved_parameters(workdir, generator):
    from flax import nnx

    saved = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "params"))
    ours = nnx.to_pure_dict(nnx.state(generator.model, nnx.Param))
    flat = lambda t: {"/".join(path_names(p)): np.asarray(v)  # noqa: E731
                      for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    a, b = flat(saved), flat(ours)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_generate_is_deterministic_and_sized_by_the_storyboard(tmp_path, generator):
    story = load_storyboard(_story(tmp_path, STORY))
    a = generate(generator, story, seed=3, steps=2)
    b = generate(generator, story, seed=3, steps=2)
    c = generate(generator, story, seed=4, steps=2)
    # tiny: 2 latent frames per segment + 1, 8 x 8 latents, toy codec 4x time, 8x space
    assert a.latents.shape == (7, 4, 8, 8)
    assert a.frames.shape == (generator.num_frames(3), 64, 64, 3) == (25, 64, 64, 3)
    assert a.frames.dtype == np.uint8 and np.isfinite(a.latents).all()
    np.testing.assert_array_equal(a.latents, b.latents)
    assert np.abs(a.latents - c.latents).max() > 1e-3
    one = generate(generator, load_storyboard(_story(tmp_path, STORY[:1], "one.json")), seed=3, steps=2)
    assert one.frames.shape[0] == 9
    assert a.captions == [s["text"] for s in STORY] and a.fps == pytest.approx(8 / 3)


def test_cli_writes_mp4_gif_and_contact_sheet(tmp_path, workdir, capsys):
    out = tmp_path / "v" / "out.mp4"
    rc = sample_cli.main(["--workdir", workdir, "--storyboard", _story(tmp_path, STORY),
                          "--out", str(out), "--steps", "2", "--seed", "1",
                          "--gif", str(tmp_path / "out.gif"),
                          "--contact-sheet", str(tmp_path / "sheet.png")])
    assert rc == 0
    frames = iio.imread(out, plugin="pyav") if _has_pyav() else _ffmpeg_frames(str(out))
    assert len(frames) == 25 and frames.shape[1:] == (64, 64, 3)
    assert len(iio.imread(tmp_path / "out.gif")) >= 1
    assert Image.open(tmp_path / "sheet.png").size[0] > 3 * 64
    assert "wrote 25 frames" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "v")) == ["out.mp4"]   # no temporary files left


def _has_pyav():
    return importlib.util.find_spec("av") is not None


def _ffmpeg_frames(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


BAD = [
    ("[]", "empty"),
    ('[{"neg_text": "x"}]', "missing field 'text'"),
    ('[{"text": 3}]', "field 'text' must be a string"),
    ('[{"text": "a", "requires_scene_transition": "yes"}]', "must be true or false"),
    ('[{"text": "a", "speed": 2}]', "unknown field 'speed'"),
    ('{"segments": "a"}', "expected a list of segments"),
    ("[{\"text\": ", "not valid JSON"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_storyboards_exit_2_with_one_line_and_write_nothing(tmp_path, workdir, capsys, text,
                                                                message):
    out = tmp_path / "out" / "x.mp4"
    rc = sample_cli.main(["--workdir", workdir, "--storyboard", _story(tmp_path, text),
                          "--out", str(out), "--gif", str(tmp_path / "x.gif")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not out.parent.exists() and not (tmp_path / "x.gif").exists()


def test_cli_usage_errors(tmp_path, workdir, capsys):
    story = _story(tmp_path, STORY)
    cases = [
        (["--workdir", str(tmp_path / "nope"), "--storyboard", story, "--out", "a.mp4"], "not a folder"),
        (["--workdir", workdir, "--storyboard", str(tmp_path / "missing.json"), "--out", "a.mp4"],
         "not found"),
        (["--workdir", workdir, "--storyboard", story, "--out", str(tmp_path / "a.avi")], "must end in .mp4"),
        (["--workdir", workdir, "--storyboard", story, "--out", "a.mp4", "--steps", "0"], "--steps"),
        (["--workdir", str(tmp_path), "--storyboard", story, "--out", str(tmp_path / "a.mp4")],
         "neither a training workdir"),
    ]
    for argv, message in cases:
        rc = sample_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "a.mp4").exists()


def test_module_entry_point_fails_cleanly(tmp_path):
    """The real command: exit 2, one line, no traceback, for a bad storyboard."""
    proc = subprocess.run([sys.executable, "-m", "tttjax.sample", "--workdir", str(tmp_path),
                           "--storyboard", _story(tmp_path, "[]"), "--out", str(tmp_path / "o.mp4")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "empty" in proc.stderr and not (tmp_path / "o.mp4").exists()


def test_pipeline_from_prompts_matches_generate_and_batches_over_seeds(workdir, generator):
    from tttjax.pipeline import TTTVideoPipeline, prompts_storyboard

    prompts = [s["text"] for s in STORY[:2]]
    pipe = TTTVideoPipeline(generator)
    out = pipe(prompts=prompts, negative_prompt="blurry", seed=3, num_inference_steps=2)
    assert out.frames.dtype == np.uint8 and out.frames.shape == (17, 64, 64, 3)
    story = prompts_storyboard(prompts, "blurry")
    assert story.negative_prompts == ["blurry", "blurry"]
    ref = generate(generator, story, seed=3, steps=2)   # the same machinery, bitwise
    np.testing.assert_array_equal(out.latents, ref.latents)
    np.testing.assert_array_equal(out.frames, ref.frames)
    batch = pipe(prompts=prompts, negative_prompt="blurry", seed=[3, 4], num_inference_steps=2)
    assert batch.frames.shape == (2, 17, 64, 64, 3) and batch.seeds == [3, 4]
    np.testing.assert_array_equal(batch.latents[0], ref.latents)
    assert np.abs(batch.latents[1] - ref.latents).max() > 1e-3
    loaded = TTTVideoPipeline.from_pretrained(workdir)
    np.testing.assert_array_equal(
        loaded(prompts=prompts[:1], seed=0, num_inference_steps=1).latents,
        pipe(prompts=prompts[:1], seed=0, num_inference_steps=1).latents)
    with pytest.raises(ValueError, match="segment 1: field 'text' is empty"):
        pipe(prompts=["a cat", " "], seed=0, num_inference_steps=1)


def test_cli_prompts_instead_of_a_storyboard(tmp_path, workdir, capsys):
    out = tmp_path / "p.mp4"
    rc = sample_cli.main(["--workdir", workdir, "--prompt", STORY[0]["text"], "--prompt",
                          STORY[1]["text"], "--out", str(out), "--steps", "1"])
    assert rc == 0 and out.stat().st_size > 0
    assert "wrote 17 frames" in capsys.readouterr().out
    for argv in (["--prompt", "a"] + ["--storyboard", _story(tmp_path, STORY)], []):
        rc = sample_cli.main(["--workdir", workdir, "--out", str(tmp_path / "q.mp4")] + argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "either --storyboard" in err and "\n" not in err


def test_pipeline_from_an_exported_folder_samples_the_workdirs_video(tmp_path, workdir, generator):
    """`python -m tttjax.export` of the workdir, loaded by `from_pretrained`: the same text
    encoder, decoder, schedule and sizes (tttjax_generation.json) and bitwise the same frames."""
    from tttjax import export as export_cli
    from tttjax.pipeline import TTTVideoPipeline

    out = tmp_path / "exported"
    assert export_cli.main(["--workdir", workdir, "--out", str(out)]) == 0
    prompts = [s["text"] for s in STORY[:2]]
    pipe = TTTVideoPipeline.from_pretrained(str(out))
    assert pipe.generator.source.startswith("loaded exported folder")
    got = pipe(prompts=prompts, seed=0, num_inference_steps=2)
    want = TTTVideoPipeline(generator)(prompts=prompts, seed=0, num_inference_steps=2)
    assert got.frames.dtype == np.uint8 and got.frames.ndim == 4 and got.frames.shape[-1] == 3
    np.testing.assert_array_equal(got.frames, want.frames)
    np.testing.assert_array_equal(got.latents, want.latents)
    assert got.fps == want.fps
    # a half-written export (no tttjax_config.json, which export writes last) is no export
    (out / export_cli.TTTJAX_CONFIG).unlink()
    with pytest.raises(ValueError, match="nor an exported folder"):
        TTTVideoPipeline.from_pretrained(str(out))


def test_pipeline_from_an_export_in_a_bucket(workdir, generator):
    """Export to gs:// (local emulator) and `from_pretrained("gs://...")`: the same frames."""
    import gcs_emulator

    from tttjax import export as export_cli
    from tttjax.pipeline import TTTVideoPipeline

    if gcs_emulator.available() is not None:
        pytest.skip(gcs_emulator.available())
    prompts = [STORY[0]["text"]]
    with gcs_emulator.GCSEmulator() as gcs:
        gcs.create_bucket("bucket")
        assert export_cli.main(["--workdir", workdir, "--out", "gs://bucket/exported"]) == 0
        got = TTTVideoPipeline.from_pretrained("gs://bucket/exported")(
            prompts=prompts, seed=1, num_inference_steps=1)
    want = TTTVideoPipeline(generator)(prompts=prompts, seed=1, num_inference_steps=1)
    np.testing.assert_array_equal(got.frames, want.frames)
