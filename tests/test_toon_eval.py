"""`toon_export`, the toon detector and `python -m tttjax.eval`: the score separates real
episodes from reordered, mismatched and spliced ones."""

import json

import numpy as np
import pytest

from tttjax.data import toon_export, toon_world
from tttjax.eval import __main__ as eval_cli
from tttjax.eval import detector as detector_lib
from tttjax.eval import validate


@pytest.fixture(scope="module")
def det():
    return detector_lib.load_detector()


def test_detector_reads_rendered_ground_truth(det):
    """Held-out episodes (world seed 0; the detector trained on seed 7777)."""
    errs, vis, walls = [], [], []
    for index in range(4):
        ep, frames, _ = toon_export.make_episode(0, index, 3)
        d = det.detect(frames)
        states = ep.states()
        truth = np.stack([s.positions() for s in states])
        errs.append(np.hypot(*(d["cat_xy"] - truth[:, 0]).T))
        vis.append((d["mouse_visible"] > 0.5) == np.array([s.mouse_visible for s in states]))
        walls.append(d["wall"].argmax(-1) == np.array(
            [detector_lib.CLASSES["wall"].index(s.room.wall_name) for s in states]))
    figures = [float(np.mean(np.concatenate(a))) for a in (errs, vis, walls)]
    print("detector cat error, mouse-visible accuracy, wall accuracy", figures)
    # measured 0.090, 0.71, 0.93: a coarse reader (README), enough for the separations below
    assert figures[0] < 0.12 and figures[1] > 0.65 and figures[2] > 0.9, figures


def test_score_separates_real_from_reordered_mismatched_spliced(det):
    r = validate.separation(count=6, segments=4, seed=0, detector=det)
    print("separation", json.dumps({v: {k: r[v][k] for k in ("following", "consistency")}
                                    for v in validate.VERSIONS}))
    real, reordered, mismatched, spliced = (r[v] for v in validate.VERSIONS)
    # measured: real 0.81 / 0.92, reordered 0.56 / 0.72, mismatched 0.36 / 0.83,
    # spliced 0.75 / 0.65 (following / consistency)
    assert real["following"] > 0.7 and real["consistency"] > 0.85, r
    assert reordered["following"] < real["following"] - 0.1, r
    assert reordered["consistency"] < real["consistency"] - 0.1, r
    assert mismatched["following"] < real["following"] - 0.2, r
    assert spliced["consistency"] < real["consistency"] - 0.1, r


def test_export_then_eval_cli(tmp_path, capsys):
    out = tmp_path / "eps"
    assert toon_export.main(["--out", str(out), "--count", "2", "--segments", "2",
                             "--seed", "3"]) == 0
    vid = toon_export.episode_id(3, 1)
    board = json.loads((out / f"{vid}.json").read_text())
    ep = toon_world.make_episode(3, 1, num_segments=2, frames_per_segment=8)
    assert [b["text"] for b in board] == [s.caption for s in ep.segments]
    assert board[0]["requires_scene_transition"] is False
    capsys.readouterr()
    assert eval_cli.main(["--video", str(out / f"{vid}.mp4"), "--storyboard",
                          str(out / f"{vid}.json"), "--verbose"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert 0.0 <= line["following"] <= 1.0 and 0.0 <= line["consistency"] <= 1.0
    assert len(line["segments"]) == 2 and line["following"] > 0.6


@pytest.mark.parametrize("argv, words", [
    (["--video", "x.mp4"], "--storyboard"),
    ([], "either"),
    (["--video", "/nonexistent.mp4", "--storyboard", "/nonexistent.json"], "not found"),
])
def test_eval_usage_errors_are_one_line(argv, words, capsys):
    assert_exit = None
    try:
        code = eval_cli.main(argv)
    except SystemExit as e:
        code = e.code
        assert_exit = True
    assert code == 2, assert_exit
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_export_to_an_unwritable_place_is_one_line_exit_1(tmp_path, capsys):
    """A runtime failure (here: --out lies under a regular file) is one line on stderr and exit
    status 1 (command_line.one_line_errors), not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = toon_export.main(["--out", str(blocker / "episodes"), "--count", "1",
                             "--segments", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("python -m tttjax.data.toon_export: error:") and "\n" not in err
    assert "Traceback" not in err
