"""`python -m tttjax.bench step_parts`: each part's scan computes the chain it names (against
NumPy float64), the rows carry sane numbers, bad arguments are usage errors."""

import numpy as np
import pytest

from tttjax.bench import step_parts


def _numpy_chain(part, s, w, steps, per_step):
    s = s.astype(np.float64)
    w = w.astype(np.float64)
    h, b, d = s.shape
    for _ in range(steps * per_step):
        if part == "head_dot":
            s = np.einsum("hbd,hde->hbe", s, w)
        elif part == "flat_dot":
            s = (s.reshape(h * b, d) @ w[0]).reshape(h, b, d)
        elif part == "row_sum":
            s = s - s.mean(-1, keepdims=True)
        else:
            c = s - s.mean(-1, keepdims=True)
            s = c / np.sqrt((c * c).mean(-1, keepdims=True) + 1e-5)
    return s


@pytest.mark.parametrize("part", step_parts.PARTS)
def test_each_part_scan_computes_its_chain(part):
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 4, 8)).astype(np.float32)
    w = (rng.standard_normal((2, 8, 8)) / np.sqrt(8)).astype(np.float32)
    got = np.asarray(step_parts.part_scan(part, 2, 4, 8, steps=3, per_step=2)(s, w))
    np.testing.assert_allclose(got, _numpy_chain(part, s, w, 3, 2), rtol=1e-4, atol=1e-5)


def test_rows_and_usage_errors(capsys, tmp_path):
    rows = list(step_parts.run(heads=2, rows=4, dim=8, steps=4, per_step=2, repeats=2))
    assert [r["part"] for r in rows] == list(step_parts.PARTS)
    for r in rows:
        assert r["us_per_op"] > 0
        assert np.isfinite(r["GFLOP_s"]) == (r["part"] in ("head_dot", "flat_dot"))
    assert step_parts.dot_flops("head_dot", 4, 16, 64) == 2 * 4 * 16 * 64 * 64
    csv = tmp_path / "parts.csv"
    assert step_parts.main(["--heads", "2", "--rows", "4", "--dim", "8", "--steps", "2",
                            "--per-step", "1", "--repeats", "1", "--csv", str(csv)]) == 0
    assert "| head_dot |" in capsys.readouterr().out and csv.read_text().startswith("part,")
    with pytest.raises(SystemExit) as exit_info:
        step_parts.main(["--steps", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--steps" in err and "\n" not in err
    with pytest.raises(ValueError, match="unknown part"):
        step_parts.part_scan("nope", 1, 1, 1, 1, 1)
