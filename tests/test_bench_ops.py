"""Smoke test of the ops benchmark at a tiny size (no timing asserted)."""

import csv

from tttjax.bench import ops


def test_bench_ops_runs_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "ops.csv"
    assert ops.main(["--lengths", "64", "--heads", "2", "--head-dim", "8",
                     "--repeats", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert {r["op"] for r in rows} == {"ttt_mlp", "ttt_linear"} and len(rows) == 2
    assert all(float(r["fwd_bwd_peak_MiB"]) > 0 for r in rows)
    assert "| ttt_mlp | 64 |" in capsys.readouterr().out
