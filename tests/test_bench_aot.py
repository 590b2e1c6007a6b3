"""`python -m tttjax.bench aot`: the trainer's own step compiled ahead of time, on fake CPU
devices and on TPU slices described by libtpu (the real TPU compiler on this CPU host)."""

import importlib.util
import re

import jax
import numpy as np
import pytest

from tttjax import sharding as shd
from tttjax import tpu_topology
from tttjax.bench import aot
from tttjax.train import config as config_lib
from tttjax.train.loop import train_step_setup

LAST_LINE = re.compile(r"^peak per chip: \d+\.\d\d GiB of (\d+) GiB \((fits|does not fit)\)$")


def tiny(arg="none,1"):
    spec = importlib.util.spec_from_file_location("tiny_config", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_topology_names():
    assert tpu_topology.parse("v5p-256").topology_name == "v5p:4x4x8"    # 128 chips
    assert tpu_topology.parse("v5p-8").chips == 4
    assert tpu_topology.parse("v6e-256").topology_name == "v6e:16x16"
    assert tpu_topology.parse("v5litepod-16").topology_name == "v5e:4x4"
    assert tpu_topology.parse("v5p:4x4x4").chips == 64
    assert tpu_topology.chip("v6e-8").hbm_bytes == 32 * 2**30
    for bad in ("v9-8", "v5p-7", "v5p:4x4", "h100-8"):
        with pytest.raises(ValueError):
            tpu_topology.parse(bad)


def test_multi_slice_mesh_puts_data_across_slices():
    devices = tpu_topology.devices("v5p-8", num_slices=2)
    mesh = shd.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert mesh.shape["data"] == 2
    # Each data row is one slice: fsdp and tensor collectives stay on ICI.
    assert all(len(set(slice_of[i].flat)) == 1 for i in range(2))
    assert set(slice_of[:, 0, 0]) == {0, 1}
    with pytest.raises(ValueError, match="multiple of the number of slices"):
        shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 8}, devices)


def test_cpu_plan_is_the_trainers_step():
    """On 4 fake CPU devices: the compiled step is the memoised one `train` runs, and the
    resident bytes are those of the trainer's shardings (sharded, not replicated)."""
    config = tiny()
    config.mesh.axes = {"data": 1, "fsdp": 2, "tensor": 2}
    config.train.global_batch_size = 2
    config.train.compiler_options = {"xla_backend_optimization_level": 0}
    step = aot.compile_train_step(config, jax.devices()[:4])
    setup = train_step_setup(config, step.mesh, config_lib.rules(config))
    assert step.setup.plan.step_fn is setup.plan.step_fn
    params = setup.plan.spec.abstract
    full = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    assert 0 < step.memory.params < full
    assert step.memory.temporaries > 0 and step.memory.peak >= step.memory.arguments
    # Parameters and AdamW moments are donated: the outputs that replace them are aliased.
    assert step.memory.aliased >= step.memory.params


def test_cpu_and_tpu_plans_trace_the_same_step():
    """The same config on 4 fake CPU devices and on a 4-chip v5p slice: one program (loss,
    clipping, parameter groups, guard), only the devices differ. (Mixer none: with a TTT mixer
    `impl="auto"` rightly picks the Mosaic kernel on TPU. StableHLO is not compared: JAX lowers
    some primitives, e.g. the threefry PRNG, differently per platform.)"""
    config = tiny()
    config.mesh.axes = {"data": 4, "fsdp": 1, "tensor": 1}

    def traced(devices):
        mesh = shd.make_mesh(dict(config.mesh.axes), devices)
        setup = train_step_setup(config, mesh, config_lib.rules(config))
        with jax.set_mesh(mesh):
            jaxpr = str(setup.plan.step_fn.trace(*aot.abstract_step_inputs(setup)).jaxpr)
        return setup, re.sub(r", device_kind=[^)]*\)", ")", jaxpr)

    cpu_setup, cpu_jaxpr = traced(jax.devices()[:4])
    tpu_setup, tpu_jaxpr = traced(tpu_topology.devices("v5p-8"))
    assert cpu_setup.plan is not tpu_setup.plan
    assert "platform=tpu" not in tpu_jaxpr and "optax" not in cpu_jaxpr
    assert cpu_jaxpr == tpu_jaxpr


def test_tiny_step_compiles_for_a_v5p_slice(capsys):
    assert aot.main(["--config", "configs/tiny.py:ttt_mlp,1", "--topology", "v5p-8",
                     "--config.model.mixer_config.ttt_mlp.impl=auto"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "TPU compiler on a CPU host: compiled, not run" in out[0]
    # impl="auto" follows the slice's platform: the Mosaic kernel, not the XLA scan.
    assert any(line.startswith("TTT inner loop: Pallas kernel") for line in out), out
    match = LAST_LINE.match(out[-1])
    assert match and match.groups() == ("95", "fits"), out[-1]


def test_tiny_step_compiles_for_two_slices(capsys):
    assert aot.main(["--config", "configs/tiny.py:none,1", "--topology", "v5p-8",
                     "--num-slices", "2", "--mesh", "data=-1,fsdp=2,tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "v5p-8 x 2 slices" in out and "'data': 2, 'fsdp': 2, 'tensor': 2" in out
    assert LAST_LINE.match(out.strip().splitlines()[-1])
    # The hybrid mesh puts `data` across the slices (config.mesh.dcn_axes): the compiled
    # program's only transfers between slices are summed all-reduces (gradients, loss); fsdp
    # and tensor gathers and scatters stay inside a slice (tttjax.bench.dcn_traffic reads
    # the HLO). Before the adaLN modulation's output was constrained to the activations'
    # batch sharding (tttjax/models/dit.py, Modulation), the timestep embedding [B, 32] was
    # all-gathered and collective-permuted across the slices at every modulation. The one
    # u32 all-reduce is the noise draw's counter iota, gathered (tttjax/bench/dcn_traffic.py).
    dcn = [line for line in out.splitlines() if line.startswith("between slices (DCN):")]
    assert len(dcn) == 1, out
    match = re.fullmatch(r"between slices \(DCN\): (\d+) all-reduce transfers \(reduction SUM; "
                         r"element types f32 (\d+)(?:, u32 1)?\); only reductions "
                         r"\(data-parallel gradients and loss\)", dcn[0])
    assert match and int(match.group(2)) >= int(match.group(1)) - 1, dcn[0]


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9-8"], "unknown TPU generation"),
    (["--num-slices", "2"], "--num-slices needs --topology"),
    (["--mesh", "data=3,fsdp=5"], "mesh needs 15 devices"),
    (["--mesh", "data=-1"], "has a -1 axis"),
    (["--mesh", "data"], "NAME=VALUE"),
    (["--batch", "3", "--mesh", "data=2,fsdp=1,tensor=1"], "divisible"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert aot.main(["--config", "configs/tiny.py:none,1"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_compiler_failure_is_one_line_exit_1(monkeypatch, capsys):
    """A program the compiler refuses (out of HBM, an internal error) is a failed run: one
    line naming the compiler's message, exit code 1, no traceback."""
    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in hbm\ndetails")

    monkeypatch.setattr(aot, "compile_train_step", refuse)
    assert aot.main(["--config", "configs/tiny.py:none,1", "--mesh", "data=1,fsdp=1,tensor=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "python -m tttjax.bench aot: error: the compiler failed: RESOURCE_EXHAUSTED: Ran out of "
        "memory in hbm"]
