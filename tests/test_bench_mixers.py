"""Smoke test of the mixer benchmark and the bench dispatcher at a tiny size (no timing asserted)."""

import csv

import pytest

from tttjax.bench import __main__ as bench_cli
from tttjax.bench import mixers


def test_bench_mixers_runs_writes_csv_and_plot(tmp_path, capsys):
    out, png = tmp_path / "mixers.csv", tmp_path / "mixers.png"
    # A subset keeps compilation short; every mixer builds and runs in test_mixers.py.
    assert bench_cli.main(["mixers", "--width", "16", "--heads", "2", "--lengths", "40,64",
                           "--mixers", "swa,local,full", "--local-window", "16",
                           "--full-max-length", "40", "--repeats", "1", "--csv", str(out),
                           "--plot", str(png)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["mixer"], r["L"]) for r in rows] == [
        ("local", "40"), ("swa", "40"), ("full", "40"),
        ("local", "64"), ("swa", "64"), ("full", "64")]
    done = [r for r in rows if not r["skipped"]]
    assert [r["mixer"] for r in rows if r["skipped"]] == ["full"]          # L = 64 > 40
    assert all(float(r["fwd_bwd_peak_MiB"]) > 0 and float(r["fwd_ms"]) > 0 for r in done)
    assert all(float(r["fwd_rel_local"]) == 1.0 for r in done if r["mixer"] == "local")
    assert png.stat().st_size > 10_000
    assert "| swa | 40 |" in capsys.readouterr().out
    assert set(mixers.ALL_MIXERS) == {"local", "ttt_mlp", "ttt_linear", "gated_deltanet", "mamba2",
                                      "swa", "full"}


def test_bench_cli_errors():
    with pytest.raises(SystemExit) as err:
        bench_cli.main([])
    assert err.value.code == 2
    with pytest.raises(SystemExit) as err:
        mixers.main(["--mixers", "local,mamba7"])
    assert err.value.code == 2
