"""Test set-up: 8 fake CPU devices (set before jax is imported) and the `slow` marker."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (large shapes, long runs)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy case, skipped unless --run-slow is given")


# A test that hangs (a blocked writer thread, a dead subprocess) fails after this long instead
# of holding CI until its limit (pytest-timeout; a test may set its own @pytest.mark.timeout).
HANG_LIMIT_S = 1200


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(HANG_LIMIT_S))
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
