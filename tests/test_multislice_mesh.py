"""Multi-slice meshes: config.mesh.dcn_axes, the hybrid device mesh, clear errors instead of a
silent reshape, and the reading of what a compiled program sends between slices."""

import importlib.util

import numpy as np
import pytest

from tttjax import sharding as shd
from tttjax import tpu_topology
from tttjax.bench import dcn_traffic
from tttjax.train import config as config_lib


def tiny(arg="none,1"):
    spec = importlib.util.spec_from_file_location("tiny_config", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def two_slices():
    return tpu_topology.devices("v5p-8", num_slices=2)


def test_dcn_axes_choose_the_axis_across_slices(two_slices):
    slice_of = np.vectorize(lambda d: d.slice_index)
    # fsdp across the slices, data inside: every fsdp row pair spans both slices.
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, two_slices, dcn_axes={"fsdp": -1})
    assert all(len(set(slice_of(mesh.devices)[i, :, 0])) == 2 for i in range(2))
    assert all(len(set(slice_of(mesh.devices)[:, j].flat)) == 1 for j in range(2))
    # The config default, data across the slices.
    mesh = shd.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, two_slices,
                         **config_lib.mesh_layout(tiny()))
    assert mesh.shape["data"] == 4
    assert all(len(set(slice_of(mesh.devices)[i].flat)) == 1 for i in range(4))


@pytest.mark.parametrize("sizes, dcn, num_slices, message", [
    ({"data": 1, "fsdp": 1, "tensor": 8}, {"data": -1}, 0, "multiples of the slices"),
    ({"data": 8, "fsdp": 1, "tensor": 1}, {"model": 2}, 0, "does not have"),
    ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": 4}, 0, "dcn_axes"),
    ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": -1}, 4, "form 2 slice"),
])
def test_bad_multi_slice_layouts_say_what_to_change(two_slices, sizes, dcn, num_slices, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(sizes, two_slices, dcn_axes=dcn, num_slices=num_slices)


def test_one_slice_refuses_dcn_sizes():
    import jax

    with pytest.raises(ValueError, match="devices form one slice"):
        shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:4],
                      dcn_axes={"data": 2})


def test_no_silent_reshape_when_placement_fails(monkeypatch):
    """A mesh the topology-aware placement refuses is an error naming the mesh, not a plain
    reshape of the device list (whose collectives could cross slower links)."""
    import jax

    def refuse(*args, **kwargs):
        raise ValueError("cannot map to the physical mesh")

    monkeypatch.setattr(shd.mesh_utils, "create_device_mesh", refuse)
    with pytest.raises(ValueError, match="cannot be laid out.*cannot map"):
        shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])


def test_config_validation_of_dcn_fields():
    for field, value, message in (("dcn_axes", {"pipeline": 2}, "does not have"),
                                  ("dcn_axes", {"data": -1, "fsdp": -1}, "at most one"),
                                  ("dcn_axes", {"data": 0}, "positive"),
                                  ("num_slices", -1, "mesh.num_slices")):
        config = tiny()
        config.mesh[field] = value
        with pytest.raises(ValueError, match=message):
            config_lib.validate(config)


def test_dcn_traffic_reads_transfers_and_replica_groups():
    hlo = "\n".join([
        '  %send.1 = (f32[8]) send(%a, %t), is_host_transfer=true, frontend_attributes={'
        '_xla_megascale_reduce_operation="SUM",_xla_megascale_transfer_type="ALL_REDUCE"}',
        '  %recv.1 = (f32[8]) recv(%t), frontend_attributes={_xla_megascale_transfer_type='
        '"ALL_REDUCE"}',
        "  %ag = f32[8] all-gather(%x), replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}",
        "  %rs = f32[2] reduce-scatter(%y), replica_groups={{0,1},{2,3}}, dimensions={0}",
    ])
    traffic = dcn_traffic.of_text(hlo)
    assert traffic.kinds == {"ALL_REDUCE": 1} and traffic.only_reductions
    assert traffic.ici_collectives == {"all-gather": 1, "reduce-scatter": 1}
    assert traffic.max_group_device == 3 and traffic.send_dtypes == {"f32": 1}
    assert dcn_traffic.replica_groups(hlo.splitlines()[2]) == [[0, 2], [1, 3]]
    gather = hlo + ('\n  %send.2 = (f32[8]) send(%b, %t), frontend_attributes={'
                    '_xla_megascale_transfer_type="ALL_GATHER"}')
    assert not dcn_traffic.of_text(gather).only_reductions
    assert "NOT only reductions" in dcn_traffic.of_text(gather).describe()


def _launch(script, *args):
    import subprocess
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "launch" / script
    return subprocess.run(["bash", str(path), *args], capture_output=True, text=True, timeout=60)


def test_launchers_pass_the_number_of_slices():
    xpk = _launch("gke_xpk.sh", "--cluster", "c", "--workload", "w", "--image", "i", "--config",
                  "c.py", "--workdir", "gs://b", "--dry-run", "--tpu-type", "v5p-128",
                  "--num-slices", "2")
    assert xpk.returncode == 0, xpk.stderr
    assert "--num-slices 2" in xpk.stdout and "--config.mesh.num_slices=2" in xpk.stdout
    pod = _launch("tpu_vm_pod.sh", "--tpu", "qr", "--zone", "z", "--config", "c.py", "--workdir",
                  "gs://b", "--num-slices", "2", "--dry-run")
    assert pod.returncode == 0, pod.stderr
    assert "queued-resources ssh qr" in pod.stdout and "--node=all" in pod.stdout
    assert "--config.mesh.num_slices=2" in pod.stdout
    bad = _launch("gke_xpk.sh", "--cluster", "c", "--workload", "w", "--image", "i", "--config",
                  "c.py", "--workdir", "gs://b", "--dry-run", "--tpu-type", "v5p-8",
                  "--num-slices", "0")
    assert bad.returncode == 2 and "--num-slices must be a positive integer" in bad.stderr
