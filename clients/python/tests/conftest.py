"""Fixtures: a real `headwised` child process on a temporary socket and data dir.

The binary comes from $HEADWISED (ctest sets it, tests/python/CMakeLists.txt); without it the
newest <repo>/build*/cachesvc/daemon/headwised is used, and the tests are skipped when there is
none. The generated stubs are found as the package finds them ($HEADWISE_PY_STUBS, set by ctest).
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "clients" / "python"))

import headwise  # noqa: E402

TOKEN = "py-test-token"


def _find_daemon() -> str:
    env = os.environ.get("HEADWISED")
    if env:
        if not os.access(env, os.X_OK):
            pytest.fail(f"$HEADWISED={env} is not an executable")
        return env
    found = sorted(REPO.glob("build*/cachesvc/daemon/headwised"), key=lambda p: p.stat().st_mtime,
                   reverse=True)
    if not found:
        pytest.skip("no headwised binary: set $HEADWISED or build the target headwised")
    return str(found[0])


class Daemon:
    def __init__(self, binary: str):
        # Short path: a Unix socket path must stay under 108 bytes.
        self.work_dir = tempfile.mkdtemp(prefix="hwpy.", dir="/tmp")
        self.socket = os.path.join(self.work_dir, "headwised.sock")
        self.target = "unix://" + self.socket
        self.log_path = os.path.join(self.work_dir, "headwised.log")
        self.token = TOKEN
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--socket={self.socket}", f"--data_dir={self.work_dir}/data",
                 "--metrics=none", f"--token={TOKEN}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_serving(30.0)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait_serving(self, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        last = None
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"headwised exited with {self.proc.returncode} during start; "
                                   f"log:\n{self.log_tail()}")
            if os.path.exists(self.socket):
                try:
                    client = headwise.Client(self.target, token=TOKEN, deadline=2.0,
                                             reconnect_deadline=0.0)
                    client.close()
                    return
                except headwise.HeadwiseError as e:
                    last = e
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"headwised did not answer Health: {last}; log:\n{self.log_tail()}")

    def client(self, **kwargs) -> headwise.Client:
        kwargs.setdefault("token", TOKEN)
        return headwise.Client(self.target, **kwargs)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def daemon():
    d = Daemon(_find_daemon())
    yield d
    d.stop()
    assert d.proc.returncode == 0, f"headwised exit status {d.proc.returncode}:\n{d.log_tail()}"


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c
