"""`python -m tttjax.bench study`: statistics, held-out storyboards, the command end to end."""

import csv
import json

import numpy as np
import pytest
from tiny_configs import FAST

from tttjax.bench import study


def test_bootstrap_interval_covers_the_mean_at_the_stated_rate():
    # For normal samples the 95% percentile-bootstrap interval of the mean should contain the
    # true mean in roughly 95% of repetitions (it undercovers a little at n = 30).
    rng = np.random.default_rng(0)
    hits = 0
    for rep in range(200):
        lo, hi = study.bootstrap_interval(rng.normal(0.3, 1.0, 30), resamples=400, seed=rep)
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99, hits
    assert study.bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)
    lo, hi = study.bootstrap_interval([0.0, 1.0])
    assert lo == 0.0 and hi == 1.0


def test_summary_rows_average_each_mixer_over_its_videos_and_seeds():
    runs = [{"mixer": "a", "seed": s, "tokens_per_sec": 10.0 * (s + 1), "train_s": 5.0,
             "final_loss": 0.5} for s in (0, 1)] + [
        {"mixer": "b", "seed": 0, "tokens_per_sec": 7.0, "train_s": 2.0, "final_loss": 0.9}]
    videos = ([{"mixer": "a", "following": f, "consistency": 1.0} for f in (0.2, 0.4, 0.6)]
              + [{"mixer": "b", "following": 0.9, "consistency": c} for c in (0.1, 0.3)])
    rows = study.summarize(runs, videos, ["a", "b"], resamples=200)
    a, b = rows
    assert (a["mixer"], a["videos"], b["videos"]) == ("a", 3, 2)
    np.testing.assert_allclose([a["following"], a["consistency"], a["tokens_per_sec"]],
                               [0.4, 1.0, 15.0])
    np.testing.assert_allclose([b["following"], b["consistency"]], [0.9, 0.2])
    assert a["following_lo"] <= 0.4 <= a["following_hi"] and a["following_hi"] <= 0.6


def test_held_out_storyboards_come_from_another_world():
    from tttjax.data import toon_world

    boards = study.held_out_storyboards(3, 4)
    assert len(boards) == 3 and all(len(b) == 4 for b in boards)
    trained = [toon_world.make_episode(0, i, num_segments=4, frames_per_segment=8)
               for i in range(3)]
    assert [b[0]["text"] for b in boards] != [e.segments[0].caption for e in trained]
    assert study.held_out_storyboards(3, 4) == boards      # deterministic


@pytest.mark.parametrize("argv,message", [
    (["--mixers", "ttt_mlp,lstm"], "unknown ['lstm']"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--seeds", "a"], "--seeds must be a comma-separated list"),
])
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        study.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and err.count("\n") == 1, err


def test_study_trains_films_scores_and_resumes(tmp_path, monkeypatch, capsys):
    def fast_compiles(*args, **kwargs):
        config = make_config(*args, **kwargs)
        config.train.compiler_options = dict(FAST)
        return config

    make_config = study.study_config
    monkeypatch.setattr(study, "study_config", fast_compiles)
    workdir = str(tmp_path / "study")
    argv = ["--mixers", "none", "--segments", "4", "--steps", "1", "--batch", "8",
            "--train-episodes", "8", "--storyboards", "2", "--sample-steps", "1",
            "--workdir", workdir, "--plot", "none"]
    assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert "| none |" in out
    with open(f"{workdir}/study.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["storyboard"] for r in rows} == {"0", "1"}
    assert all(0.0 <= float(r["following"]) <= 1.0 for r in rows)
    saved = json.loads((tmp_path / "study" / "none_s0" / "study_scores.json").read_text())
    assert saved["run"]["mixer"] == "none" and len(saved["videos"]) == 2
    # more segments than the bundled tiny dataset's 3: the runs train on 4-segment stories
    config = json.loads((tmp_path / "study" / "none_s0" / "config.json").read_text())
    assert config["stage"]["num_segments"] == 4 and config["stage"]["latent_frames"] == 9

    # A second call reuses the saved scores: no training, same table.
    def no_training(*_):
        raise AssertionError("retrained a finished run")

    monkeypatch.setattr(study, "_train", no_training)
    assert study.main(argv) == 0
    assert capsys.readouterr().out.split("| mixer")[1] == out.split("| mixer")[1]
