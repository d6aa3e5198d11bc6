"""Run a service as a real subprocess on a free 127.0.0.1 port and wait until it is SERVING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.service.security import ClientSecurity
from tests.helpers.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]


def health_status(
    address: str, service: str = "", timeout: float = 2.0, tls: ClientSecurity | None = None
) -> str:
    """The health status name, or `error:CODE`; `tls` for a service that serves TLS or mTLS."""
    with (tls or ClientSecurity()).open_channel(address, []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return f"error:{e.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def pids_with_arg(text: str) -> list[int]:
    """Processes whose command line contains `text` (our forks keep rank 0's command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


class ServiceProcess:
    """`python -m MODULE ARGS --listen 127.0.0.1:PORT` with its log in a temporary file. `tls`: how
    to reach its health service when it serves TLS or mTLS (health needs no token);
    `new_session`: start it in a process group of its own (`os.killpg(proc.pid, ...)` ends all of
    it)."""

    def __init__(
        self,
        module: str,
        args: list[str],
        port: int | None = None,
        *,
        tls: ClientSecurity | None = None,
        new_session: bool = False,
    ) -> None:
        self.tls = tls
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile(prefix=f"{module}-", suffix=".log", delete=False)  # noqa: SIM115 - lives as long as the process
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--listen", self.address],
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=new_session,
        )

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def wait_serving(self, timeout: float = 90.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            if health_status(self.address, timeout=1.0, tls=self.tls) == "SERVING":
                return self
            time.sleep(0.2)
        raise TimeoutError(f"service not SERVING after {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def leftover_pids(self, timeout: float = 10.0) -> list[int]:
        """Processes of this service still alive after it stopped (waits for them to go)."""
        deadline = time.monotonic() + timeout
        while (pids := pids_with_arg(f"--listen {self.address}")) and time.monotonic() < deadline:
            time.sleep(0.1)
        return pids

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        for pid in pids_with_arg(f"--listen {self.address}"):
            os.kill(pid, signal.SIGKILL)
