"""`Mesh`: the whole mesh as local processes, one per service, supervised (`voicemesh up`).

It is also the end-to-end tests' and the bench's harness: it starts the real services on the ports given,
waits for gRPC health SERVING, and always stops what it started (SIGTERM by pid, then SIGKILL).

Its services die when it dies, SIGKILL included: each gets the read end of a "lifeline" pipe
whose only write end is here, and stops as on SIGTERM at EOF (voicemesh.runtime.server).
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voicemesh.runtime.config import DEFAULT_PORTS

BACKENDS = ("vad", "stt", "llm", "tts")
ALL_SERVICES = (*BACKENDS, "orchestrator")
TRANSPORT = "transport"  # started after the orchestrator when listed in Mesh.services (voicemesh up does)
DEFAULT_HTTP_PORT = 8080
DEFAULT_LOG_DIR = ".voicemesh/logs"
SERVING = health_pb2.HealthCheckResponse.SERVING
LIFELINE_ENV = "VOICEMESH_LIFELINE_FD"  # read (and cleared) by voicemesh.runtime.server.take_lifeline
# Health probes reconnect quickly: gRPC's default backoff grows to minutes after refusals.
PROBE_OPTIONS = [(f"grpc.{name}_reconnect_backoff_ms", ms) for name, ms in (("initial", 200), ("min", 200), ("max", 500))]


class MeshError(RuntimeError):
    """A service failed to start, exited, or did not become healthy in time."""


@dataclass
class Child:
    kind: str
    host: str
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    ready_seconds: float | None = None  # from launch to SERVING

    @property
    def address(self) -> str:
        """Where to connect: a wildcard bind address is reached on loopback."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{host}:{self.port}"

    def tail(self, lines: int = 20) -> str:
        """The last lines of this service's log, for crash reports."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def describe_exit(self) -> str:
        code = self.process.returncode if self.process else None
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"{self.kind} ({self.address}) exited, {how}; last lines of {self.log_path}:\n{self.tail()}"


def port_in_use(host: str, port: int) -> bool:
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return False
        except OSError:
            return True


def free_ports(kinds: Sequence[str] = ALL_SERVICES, host: str = "127.0.0.1") -> dict[str, int]:
    """Ports the OS reports free right now, one per service (for tests running beside a real mesh)."""
    with contextlib.ExitStack() as stack:
        sockets = {kind: stack.enter_context(socket.socket()) for kind in kinds}
        for sock in sockets.values():
            sock.bind((host, 0))  # all bound at once, so no two services get the same port
        return {kind: sock.getsockname()[1] for kind, sock in sockets.items()}


def serve_command(kind: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "voicemesh.runtime.serve", kind, "--port", str(port), "--host", host]


@dataclass
class Mesh:
    """Starts services as child processes; use as a (sync or async) context manager.

    ports: service -> port (missing ones take DEFAULT_PORTS); env: extra environment on top of
    os.environ; services: which to run (the orchestrator is pointed at the backends started
    here); command: builds each child's argv (default `python -m voicemesh.runtime.serve KIND`).
    """

    ports: Mapping[str, int] | None = None
    env: Mapping[str, str] | None = None
    host: str = "127.0.0.1"
    log_dir: str | Path = DEFAULT_LOG_DIR
    ready_timeout: float = 180.0
    stop_timeout: float = 15.0
    services: Sequence[str] = ALL_SERVICES
    extra_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    command: Callable[[str, str, int], list[str]] | None = None
    http_port: int = DEFAULT_HTTP_PORT  # the transport's page and WebSockets
    progress: Callable[[str], None] = lambda text: None  # noqa: E731 - progress lines, e.g. print
    children: dict[str, Child] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        log_dir = Path(self.log_dir)
        for kind in self.services:
            port = (self.ports or {}).get(kind) or DEFAULT_PORTS[kind]
            self.children[kind] = Child(kind, self.host, port, log_dir / f"{kind}.log")
        self._stopping = threading.Event()
        self._lifeline: tuple[int, int] | None = None  # (read, write) ends of the pipe

    def address(self, kind: str) -> str:
        return self.children[kind].address

    @property
    def orchestrator_address(self) -> str:
        return self.address("orchestrator")

    def start(self) -> "Mesh":
        """Backends first (in parallel), then the orchestrator; returns once all are SERVING.
        Raises MeshError (after stopping everything) if any fails. Idempotent."""
        if any(c.process is not None for c in self.children.values()):
            return self
        busy = ", ".join(f"{c.kind} {c.host}:{c.port}" for c in self.children.values() if port_in_use(c.host, c.port))
        if TRANSPORT in self.children and port_in_use(self.host, self.http_port):
            busy = ", ".join(filter(None, (busy, f"transport http {self.host}:{self.http_port}")))
        if busy:
            raise MeshError(f"port already in use: {busy} (another mesh running? choose other ports)")
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        # A pipe, not PR_SET_PDEATHSIG: that fires when the *thread* that forked a child ends
        # (`async with Mesh` starts from a worker thread) and needs a preexec_fn, unsafe beside
        # our gRPC threads. Only this process holds the write end (children get the read end
        # via pass_fds), so it closes when we end, and the EOF lasts: a child still importing
        # then stops once it is up. Children not on the shared runtime (command=) ignore it.
        self._lifeline = os.pipe()
        atexit.register(self.stop)
        try:
            backends = [self.children[k] for k in BACKENDS if k in self.children]
            self._launch(backends, {})
            self._wait_healthy(backends)
            if "orchestrator" in self.children:
                orchestrator = [self.children["orchestrator"]]
                self._launch(orchestrator, {f"VOICEMESH_{c.kind.upper()}_ADDR": c.address for c in backends})
                self._wait_healthy(orchestrator)
            if TRANSPORT in self.children:
                transport = [self.children[TRANSPORT]]
                self._launch(transport, {"VOICEMESH_ORCHESTRATOR_ADDR": self.orchestrator_address,
                                         "VOICEMESH_TRANSPORT_HTTP_HOST": self.host,
                                         "VOICEMESH_TRANSPORT_HTTP_PORT": str(self.http_port)})
                self._wait_healthy(transport)
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, children: list[Child], extra_env: dict[str, str]) -> None:
        if self._lifeline is None:  # stop() ran meanwhile, from another thread
            raise MeshError("stopped while starting")
        lifeline = self._lifeline[0]
        env = {**os.environ, **(self.env or {}), **extra_env, "PYTHONUNBUFFERED": "1", LIFELINE_ENV: str(lifeline)}
        env.setdefault("HF_HUB_OFFLINE", "1")
        for child in children:
            argv = [*(self.command or serve_command)(child.kind, child.host, child.port), *self.extra_args.get(child.kind, ())]
            with open(child.log_path, "wb") as log:
                # Own session: a Ctrl-C in the terminal reaches only the launcher, which then
                # stops the children in order (orchestrator first) instead of all at once.
                child.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                 env=env, start_new_session=True, pass_fds=(lifeline,))
            child.started_at = time.monotonic()
            self.progress(f"starting {child.kind} on {child.address} (pid {child.process.pid}, log {child.log_path})")

    def _wait_healthy(self, children: list[Child]) -> None:
        deadline = time.monotonic() + self.ready_timeout
        channels = {c.kind: self.probe_channel(c) for c in children}
        try:
            pending = list(children)
            while pending:
                if (crashed := self.exited()) is not None:  # any child, not only those awaited
                    raise MeshError(crashed.describe_exit())
                for child in list(pending):
                    if is_serving(channels[child.kind]):
                        child.ready_seconds = time.monotonic() - child.started_at
                        self.progress(f"{child.kind} is serving ({child.ready_seconds:.1f} s)")
                        pending.remove(child)
                    elif self.fresh_probe_channel(child):
                        channels[child.kind].close()
                        channels[child.kind] = self.probe_channel(child)
                if pending and time.monotonic() > deadline:
                    names, first = ", ".join(c.kind for c in pending), pending[0]
                    raise MeshError(f"not healthy after {self.ready_timeout:.0f} s: {names}; "
                                    f"last lines of {first.log_path}:\n{first.tail()}")
                if self._stopping.wait(0.25 if pending else 0):
                    raise MeshError("stopped while starting")
        finally:
            for channel in channels.values():
                channel.close()

    def probe_channel(self, child: Child) -> grpc.Channel:
        """The channel `child`'s health is asked on: plaintext here (`voicemesh up` adds TLS)."""
        return grpc.insecure_channel(child.address, options=PROBE_OPTIONS)

    def fresh_probe_channel(self, child: Child) -> bool:
        """Whether a probe that found `child` not serving gets a new channel for the next try."""
        return False

    def exited(self) -> Child | None:
        """The first child found to have exited, if any."""
        return next((c for c in self.children.values() if c.process and c.process.poll() is not None), None)

    def wait(self, poll_seconds: float = 0.5) -> Child | None:
        """Block until a child exits (or stop() is called from elsewhere, returning None)."""
        while not self._stopping.wait(poll_seconds):
            if (crashed := self.exited()) is not None:
                return crashed
        return None

    def stop(self) -> dict[str, int | None]:
        """SIGTERM the orchestrator, then the backends, each by pid; SIGKILL any that outlive
        stop_timeout. Idempotent. Returns each child's exit code."""
        self._stopping.set()
        atexit.unregister(self.stop)
        started = [c for c in self.children.values() if c.process is not None]
        try:  # callers' side first, so sessions end before the backends go away
            self._terminate([c for c in started if c.kind == TRANSPORT])
            self._terminate([c for c in started if c.kind == "orchestrator"])
            self._terminate([c for c in started if c.kind not in ("orchestrator", TRANSPORT)])
        except KeyboardInterrupt:  # a second Ctrl-C: no more patience
            self._terminate(started, patience=0)
        finally:  # anything started but not tracked (a signal inside Popen) stops on the EOF
            lifeline, self._lifeline = self._lifeline, None
            for fd in lifeline or ():
                os.close(fd)
        return {c.kind: c.process.returncode if c.process else None for c in self.children.values()}

    def _terminate(self, children: list[Child], patience: float | None = None) -> None:
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (self.stop_timeout if patience is None else patience)
        for child in children:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.progress(f"{child.kind} did not stop in time; killing pid {child.process.pid}")
                child.process.kill()
                child.process.wait()

    def __enter__(self) -> "Mesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> "Mesh":
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.stop)


def is_serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
    except grpc.RpcError:
        return False  # not listening yet, or still loading
    return reply.status == SERVING


# Single-process helpers, for tests and benchmarks that start processes one by one.
def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
    """Until something listens on the port; fails at once if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


def wait_serving(address: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> None:
    """Until grpc health reports SERVING; fails at once if `proc` (when given) exits first."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=PROBE_OPTIONS) as channel:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.args} exited with {proc.returncode}")
            if is_serving(channel):
                return
            time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING within {timeout} s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process we started (by its pid), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def launch_mesh(ports: Mapping[str, int] | None = None, env: Mapping[str, str] | None = None, **options) -> Mesh:
    """Start a mesh and return it once healthy; use `with launch_mesh(...) as mesh:` to stop it."""
    return Mesh(ports=ports, env=env, **options).start()
