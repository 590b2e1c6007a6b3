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


def test_paper_op_option_times_a_given_checkout(tmp_path, capsys):
    """--paper-op imports ttt.models.ssm.ops.ttt_{kind} from the given folder and times it
    beside tttjax (here a stand-in with the paper op's signature); a folder without it exits 2."""
    import pytest

    ops_dir = tmp_path / "ttt" / "models" / "ssm" / "ops"
    ops_dir.mkdir(parents=True)
    for folder in (tmp_path / "ttt", tmp_path / "ttt" / "models", tmp_path / "ttt" / "models" / "ssm",
                   ops_dir):
        (folder / "__init__.py").write_text("")
    (ops_dir / "ttt_linear.py").write_text(
        "def ttt_linear(XK, XQ, XV, eta, ln_w, ln_b, W1, b1, group):\n"
        "    return (XQ @ W1[:, :, None] + b1[:, :, None]) * ln_w[None, :, None, None, :] + XK\n")
    out = tmp_path / "ops.csv"
    assert ops.main(["--lengths", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1",
                     "--ops", "ttt_linear", "--no-reference", "--paper-op", str(tmp_path),
                     "--csv", str(out)]) == 0
    row, = csv.DictReader(open(out))
    assert float(row["paper_fwd_bwd_ms"]) > 0 and float(row["vs_paper"]) > 0
    with pytest.raises(SystemExit) as exit_info:
        ops.main(["--lengths", "32", "--paper-op", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "no ttt/models/ssm/ops folder" in capsys.readouterr().err


def test_unimportable_paper_checkout_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch):
    """A checkout whose op module fails to import (e.g. a requirement missing) exits 2 with one
    line before anything is timed, not a traceback from inside the table."""
    import sys

    import pytest

    for name in [m for m in sys.modules if m == "ttt" or m.startswith("ttt.")]:
        monkeypatch.delitem(sys.modules, name)     # another test's stand-in checkout

    ops_dir = tmp_path / "ttt" / "models" / "ssm" / "ops"
    ops_dir.mkdir(parents=True)
    (ops_dir / "ttt_mlp.py").write_text("import no_such_requirement_of_the_paper\n")
    with pytest.raises(SystemExit) as exit_info:
        ops.main(["--lengths", "32", "--ops", "ttt_mlp", "--paper-op", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot import ttt.models.ssm.ops.ttt_mlp" in err and "no_such_requirement" in err


def test_heads_split_over_devices(tmp_path, capsys):
    """--devices 2 shards the heads over two devices (the suite's fake CPU devices) and runs
    the same rows; memory is per device, so it falls. A count that does not divide the heads,
    or more devices than JAX has, exits 2."""
    import jax
    import pytest

    out1, out2 = tmp_path / "one.csv", tmp_path / "two.csv"
    common = ["--lengths", "64", "--heads", "2", "--head-dim", "8", "--repeats", "1",
              "--ops", "ttt_mlp", "--no-reference"]
    assert ops.main(common + ["--csv", str(out1)]) == 0
    assert ops.main(common + ["--devices", "2", "--csv", str(out2)]) == 0
    (one,), (two,) = (list(csv.DictReader(open(p))) for p in (out1, out2))
    assert (one["devices"], two["devices"]) == ("1", "2")
    assert float(two["fwd_bwd_peak_MiB"]) < float(one["fwd_bwd_peak_MiB"])
    for bad, message in ((["--devices", "3"], "divide --heads"),
                         (["--devices", str(2 * jax.device_count()), "--heads",
                           str(2 * jax.device_count())], "JAX has only")):
        with pytest.raises(SystemExit) as exit_info:
            ops.main(["--lengths", "64"] + bad)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
