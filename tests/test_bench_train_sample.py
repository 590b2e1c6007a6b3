"""`bench train`, `bench sample`, `bench aot` and the analytic FLOP count (no timing asserted).

The benchmarks run on configs/tiny.py cut to one block, one segment and one TTT mini-batch
(b = 56, the whole 56-token sequence; a longer b is refused by the config validation), so every loop of the program (blocks, attention windows, TTT
mini-batches, sampler steps) runs once: XLA's cost analysis counts a loop body once, and only
then is its FLOP figure comparable with the analytic count.
"""

import re

import jax
import ml_collections
import pytest
from tiny_configs import load_config

from tttjax.bench import __main__ as bench_cli
from tttjax.bench import flops
from tttjax.bench.mfu import mfu, peak_tflops

ONE_LOOP = ["--config", "configs/tiny.py:ttt_mlp,1", "--config.model.num_layers=1",
            "--config.model.mixer_config.ttt_mlp.mini_batch_size=56"]
FIELDS = ("step time (median)", "tokens / step", "tokens / s", "XLA cost_analysis FLOPs / step",
          "traced matmul FLOPs / step (jaxpr)", "model TFLOP/s", "compile")
XLA_RATIO = "XLA / analytic (loop bodies counted once)"

# XLA counts every elementwise op (LayerNorms, GELU, softmax, RoPE, adaLN, the loss and AdamW)
# and, in training, the TTT inner forward it recomputes under the op's remat; the analytic
# count is matmuls only. At width 64 the elementwise share is large, so XLA may count up to
# 2x; it must never count materially less (that would mean a matmul the formula misses).
XLA_OVER_ANALYTIC = (0.95, 2.0)


def _table(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\| (.+?) \| (.+?) \|$", text, re.M))


def _number(value: str) -> float:
    return float(value.split()[0].rstrip("%"))


@pytest.fixture(scope="module")
def train_out(capsys_module):
    return capsys_module(["train", *ONE_LOOP, "--steps", "2", "--warmup", "1",
                          "--peak-tflops", "0.001"])


@pytest.fixture(scope="module")
def sample_out(capsys_module):
    return capsys_module(["sample", *ONE_LOOP, "--segments", "1", "--steps-per-call", "2",
                          "--repeats", "1"])


@pytest.fixture(scope="module")
def capsys_module():
    import contextlib
    import io

    def run(argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = bench_cli.main(argv)
        assert code == 0, buf.getvalue()
        return buf.getvalue()

    return run


def _check_fields(rows: dict[str, str], what: str) -> None:
    for field in FIELDS + (f"model FLOPs / step (analytic, {what})",):
        assert field in rows, (field, rows)
        assert _number(rows[field]) > 0, (field, rows[field])


def test_bench_train_prints_positive_fields_and_numeric_mfu(train_out):
    rows = _table(train_out)
    _check_fields(rows, "3 x forward")
    assert rows["peak TFLOP/s per device"] == "0.001"
    # MFU = model FLOP/s / (devices x peak); a peak this low keeps the CPU's figure well above
    # the table's two decimals, so the formula (not only the field's presence) is checked.
    expected = 100 * _number(rows["model TFLOP/s"]) / (jax.device_count() * 0.001)
    assert _number(rows["MFU"]) == pytest.approx(expected, rel=2e-3, abs=0.01)
    assert rows["tokens / step"] == str(8 * (8 + 3 * 16))   # micro-batch 8 of 8 text + 48 video


def test_bench_train_analytic_flops_match_xla(train_out):
    lo, hi = XLA_OVER_ANALYTIC
    rows = _table(train_out)
    assert lo < _number(rows[XLA_RATIO]) < hi
    # The traced step holds 3 forward passes' matmuls plus the TTT inner forward its remat
    # groups recompute (one block's TTT is a small share of the step).
    assert 1.0 <= _number(rows["traced / analytic"]) < 1.5


def test_bench_sample_prints_fields_and_matches_xla(sample_out):
    rows = _table(sample_out)
    _check_fields(rows, "forward")
    assert rows["MFU"] == "n/a"                      # CPU, no --peak-tflops
    assert rows["tokens / step"] == str(2 * (8 + 3 * 16))   # CFG: batch [uncond; cond]
    lo, hi = XLA_OVER_ANALYTIC
    assert lo < _number(rows[XLA_RATIO]) < hi
    # Traced = analytic + the gates' one-hot expansion (flops.gate_flops, once per pass; 1.0007
    # here) + on CPU the TTT steps' row sums, traced as matmuls with a ones column
    # (ttt_step.row_sums_as_matmuls; 1.006 in all). Any real extra matmul costs more.
    assert 1.0 <= _number(rows["traced / analytic"]) < 1.01


def _one_layer(mixer: str) -> ml_collections.ConfigDict:
    from tttjax.models import dit_config

    cfg = dit_config.cogvideox_5b()
    cfg.update(dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, in_channels=4,
                    out_channels=4, patch_size=2, text_embed_dim=16, time_embed_dim=8,
                    frames_per_segment=2, prefix_frames=1, attention="full", mixer=mixer))
    cfg.mixer_config = ml_collections.ConfigDict({"ttt_linear": {"mini_batch_size": 16}})
    return cfg


def test_analytic_flops_by_hand():
    # 1 block, D = 16, E = 8, 3 latent frames of 4x4 (patch 2: 4 tokens each), one 5-token
    # prompt: N_v = 12, N_t = 5, N = 17; attention over all 17 tokens.
    geometry = dict(latent_frames=3, latent_height=4, latent_width=4, num_segments=1,
                    text_length=5)
    D, E, Nv, Nt, N = 16, 8, 12, 5, 17
    embed = 2 * Nv * 16 * D + 2 * Nt * 16 * D + 2 * D * E + 2 * E * E
    block = 2 * E * 12 * D + 8 * N * D * D + 4 * N * N * D + 16 * N * D * D
    head = 2 * E * 2 * D + 2 * Nv * D * 16
    plain = flops.dit_forward_flops(_one_layer("none"), **geometry)
    assert plain["total"] == embed + block + head == 141_760
    # TTT-Linear (b = 16): two passes over 17 tokens padded to 32, each q/k/v projections
    # (padded), the o projection (17 real tokens), the per-head learning-rate gate and 3
    # inner matmuls of 2 d^2 per padded token and head (d = 8).
    ttt = flops.dit_forward_flops(_one_layer("ttt_linear"), **geometry)
    L, H, d = 32, 2, 8
    assert ttt["mixer"] == 2 * (6 * L * D * D + 2 * N * D * D + 2 * L * D * H
                                + 3 * 2 * d * d * H * L) == 168_960
    assert ttt["total"] == plain["total"] + ttt["mixer"]
    with pytest.raises(ValueError, match="no analytic FLOP count"):
        flops.dit_forward_flops(_one_layer("lstm"), **geometry)


def test_unit_lower_inverse_flops_by_hand():
    # C = 3 pads to 4: level s = 1 has 2 blocks, s = 2 one block, each 2 products of 2 s^3.
    assert flops.unit_lower_inverse_flops(3) == 2 * 2 * 2 + 1 * 2 * 2 * 8 == 40
    assert flops.unit_lower_inverse_flops(1) == 0


@pytest.mark.parametrize("arg, overrides, mixer_options", [
    ("ttt_mlp", {}, {}), ("ttt_linear,3", {}, {}), ("none", {"attention": "full"}, {}),
    ("full", {"attention": "full"}, {}), ("gated_deltanet", {}, {}),
    ("gated_deltanet", {}, {"chunk_size": 12, "expand_v": 2.0}), ("mamba2", {}, {}),
    ("mamba2", {}, {"chunk_size": 20, "d_state": 8, "ngroups": 2, "head_dim": 8}),
])
def test_analytic_flops_equal_traced_model(arg, overrides, mixer_options):
    """The formula equals the matmuls of the traced DiT forward (scans x their length) on
    the tiny configs: several blocks, segments, windows, TTT mini-batches and chunks (a last
    chunk padded, a chunk that is not a power of two)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pallas_kernels import ttt_step
    from tttjax.models.dit import CogVideoXDiT
    from tttjax.storyboard import num_latent_frames

    config = load_config(f"tiny:{arg}").unlock()
    config.model.update(overrides)
    if mixer_options:
        config.model.mixer_config[arg] = ml_collections.ConfigDict(mixer_options)
    m, s = config.model, config.stage
    frames = num_latent_frames(s.num_segments, m.frames_per_segment, m.prefix_frames)
    model = nnx.eval_shape(lambda: CogVideoXDiT(m, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, frames, m.in_channels, s.latent_height, s.latent_width),
                             jnp.float32)
    text = jax.ShapeDtypeStruct((2, s.num_segments, s.text_length, m.text_embed_dim), jnp.float32)
    # The model's FLOPs take row sums as reductions; on CPU the XLA TTT op would otherwise
    # trace them as matmuls with a ones column (a speed choice, not model work).
    with ttt_step.row_sums_as_matmuls(False):
        traced = flops.traced_matmul_flops(
            lambda st, x, t, ts: nnx.merge(graphdef, st)(x, t, ts),
            state, x, text, jax.ShapeDtypeStruct((2,), jnp.int32))
    tokens = s.num_segments * s.text_length + frames * (
        (s.latent_height // m.patch_size) * (s.latent_width // m.patch_size))
    assert traced == 2 * flops.stage_forward_flops(config)["total"] + flops.gate_flops(m, tokens)


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989 and peak_tflops("TPU v5 lite") == 197
    assert peak_tflops("TPU v5") == 459 and peak_tflops("TPU v6 lite") == 918
    assert peak_tflops("cpu") is None and peak_tflops("cpu", 2.0) == 2.0
    assert mfu(1e12, 1.0, 2, 1.0) == 0.5 and mfu(1e12, 1.0, 1, None) != mfu(1e12, 1.0, 1, None)


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "configs/nope.py"], "nope.py"),
    (["train", "--config", "configs/tiny.py", "--config.model.nope=1"], "nope"),
    (["train", "--config", "configs/tiny.py", "--steps", "0"], "--steps"),
    (["sample", "--config", "configs/tiny.py", "--segments", "0"], "--segments"),
    (["sample", "--config", "configs/tiny.py", "--config.model.num_layers=0"], "num_layers"),
])
def test_bench_bad_input_exits_2(argv, message, capsys):
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
