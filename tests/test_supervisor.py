"""The local supervisor cleans up: `voicemesh up` stops its services on SIGINT, SIGTERM and
SIGHUP however it was started, a SIGKILLed supervisor leaves no service behind (the lifeline
pipe), and a dead OTLP endpoint does not hold up a stopping service.

Real processes on free loopback ports; every process started here is stopped by pid, even when
a test fails. Nothing waits by sleeping: states are polled against deadlines.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from voicemesh.cli.mesh import ALL_SERVICES, LIFELINE_ENV, TRANSPORT, Mesh, free_ports, is_serving, port_in_use, wait_serving
from voicemesh.runtime.server import take_lifeline, watch_lifeline
from voicemesh.v1 import common_pb2, vad_pb2, vad_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SERVICES = (*ALL_SERVICES, TRANSPORT)
CHEAP = {"VOICEMESH_TTS_PROVIDER": "espeak", "HF_HUB_OFFLINE": "1"}  # espeak-ng starts at once; hibari loads a model
UP_TIMEOUT = 180.0  # six Python processes loading models, on a small CI machine (it took 16-26 s here)
GONE_TIMEOUT = 60.0


def _state(pid: int) -> str | None:
    """The process state letter from /proc, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")  # a zombie has let go of its ports; its reaper is not us


def _children(pid: int) -> list[int]:
    """The pids of a process's children (every thread's), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _is_service(pid: int) -> bool:
    """Still one of the services started here (not a recycled pid), before killing it."""
    try:
        return b"voicemesh.runtime.serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _catch(function, errors: list[BaseException]) -> None:
    try:
        function()
    except BaseException as err:  # noqa: BLE001 - handed to the test's thread
        errors.append(err)


class Up:
    """One `voicemesh up` on free ports, its output in files; `cleanup()` kills what is left."""

    def __init__(self, tmp_path: Path, ignore_sigint: bool = False, env: dict[str, str] | None = None):
        ports = free_ports((*SERVICES, "http"))
        self.ports = ports
        flags = [f"--{'port' if kind == 'orchestrator' else kind + '-port'}={ports[kind]}" for kind in SERVICES]
        argv = [sys.executable, "-m", "voicemesh.cli", "up", *flags, f"--http-port={ports['http']}",
                f"--log-dir={tmp_path / 'logs'}"]
        if ignore_sigint:
            # What a shell without job control does to a background job; exec keeps SIG_IGN.
            argv = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                    "os.execv(sys.argv[1], sys.argv[1:])", *argv]
        self.out, self.err = tmp_path / "up.out", tmp_path / "up.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=ROOT,
                                         env={**os.environ, **CHEAP, **(env or {})})
        self.pids: dict[str, int] = {}

    def output(self) -> str:
        return f"stdout:\n{self.out.read_text(errors='replace')}\nstderr:\n{self.err.read_text(errors='replace')[-3000:]}"

    def wait_up(self) -> dict[str, int]:
        """Until the table of services is printed; then every service must be SERVING."""
        self.wait_printed()
        for kind in SERVICES:
            wait_serving(f"127.0.0.1:{self.ports[kind]}", timeout=10)
        return self.pids

    def wait_printed(self) -> dict[str, int]:
        """Until the table of services is printed (every service reported up): their pids."""
        deadline = time.monotonic() + UP_TIMEOUT
        while "Ctrl-C stops the mesh." not in self.out.read_text(errors="replace"):
            if self.proc.poll() is not None:
                pytest.fail(f"voicemesh up exited with {self.proc.returncode} before it was up\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"voicemesh up not up within {UP_TIMEOUT:.0f} s\n{self.output()}")
            time.sleep(0.2)
        for line in self.out.read_text().splitlines():  # "  vad  127.0.0.1:PORT  PID  LOG"
            words = line.split()
            if len(words) == 4 and words[0] in SERVICES and words[2].isdigit():
                self.pids[words[0]] = int(words[2])
        assert sorted(self.pids) == sorted(SERVICES), self.output()
        return self.pids

    def wait_gone(self, timeout: float = GONE_TIMEOUT) -> None:
        """Until no service process is alive and no port is held, else fail saying what is left."""
        ports = [("127.0.0.1", port) for port in self.ports.values()]
        deadline = time.monotonic() + timeout
        while True:
            alive = {kind: pid for kind, pid in self.pids.items() if _alive(pid)}
            held = [port for host, port in ports if port_in_use(host, port)]
            if not alive and not held:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"{timeout:.0f} s after the supervisor went: still alive {alive}, ports still held {held}\n"
                            f"{self.output()}")
            time.sleep(0.2)

    def cleanup(self) -> None:
        if self.proc.poll() is None:  # also what it started that the test never saw (a failed start)
            known = set(self.pids.values())
            self.pids.update({f"pid {pid}": pid for pid in _children(self.proc.pid) if pid not in known})
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pid in self.pids.values():
            if _alive(pid) and _is_service(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.models
@pytest.mark.e2e
def test_a_sigkilled_supervisor_leaves_no_service_behind(tmp_path):
    up = Up(tmp_path)
    try:
        pids = up.wait_up()
        os.kill(up.proc.pid, signal.SIGKILL)
        assert up.proc.wait(timeout=10) == -signal.SIGKILL
        up.wait_gone()  # each service saw its lifeline close and stopped by itself
        for kind in pids:
            log = (tmp_path / "logs" / f"{kind}.log").read_text(errors="replace")
            assert "supervisor gone" in log, f"{kind} did not stop on its lifeline:\n{log[-2000:]}"
    finally:
        up.cleanup()


@pytest.mark.models
@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda sig: sig.name)
def test_a_signal_stops_the_mesh_even_when_started_with_sigint_ignored(tmp_path, sig):
    up = Up(tmp_path, ignore_sigint=True)
    try:
        up.wait_up()
        up.proc.send_signal(sig)
        try:
            code = up.proc.wait(timeout=GONE_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"voicemesh up still running {GONE_TIMEOUT:.0f} s after {sig.name}\n{up.output()}")
        assert code == 0, up.output()
        assert "stopping the mesh" in up.err.read_text()
        up.wait_gone(timeout=5)  # the supervisor waited for each; nothing may be left now
    finally:
        up.cleanup()


def test_a_dead_otlp_endpoint_does_not_hold_up_the_stop(tmp_path):
    grace = 1.0
    port, dead = free_ports(("vad", "otlp")).values()  # nothing listens on `dead`
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{dead}",
           "OTEL_EXPORTER_OTLP_INSECURE": "true", "VOICEMESH_GRACE_SECONDS": str(grace)}
    log_path = tmp_path / "vad.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "voicemesh.runtime.serve", "vad", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, proc, timeout=120)
        fmt = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000, channels=1)
        requests = [vad_pb2.DetectRequest(config=vad_pb2.VadConfig(format=fmt)),
                    *[vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=b"\0\0" * 1600))] * 3]
        with grpc.insecure_channel(address) as channel:  # a stream, so there are metrics to flush
            assert list(vad_pb2_grpc.VadServiceStub(channel).Detect(iter(requests), timeout=10)) == []
        limit = grace + 5.0  # the exporter alone used to retry for 10+ s
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still stopping {limit:.0f} s after SIGTERM with a dead OTLP endpoint; log:\n"
                        f"{log_path.read_text(errors='replace')[-3000:]}")
        assert code == 0, log_path.read_text(errors="replace")[-3000:]
        print(f"stopped {time.monotonic() - began:.2f} s after SIGTERM")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_services_outlive_the_thread_that_started_them(tmp_path):
    """`async with Mesh` starts from a worker thread: a death signal tied to that thread (what
    PR_SET_PDEATHSIG does) would stop the services when it ends; the lifeline does not."""
    mesh = Mesh(ports=free_ports(("tts",)), services=("tts",), env=CHEAP, log_dir=tmp_path, ready_timeout=120)
    try:
        errors: list[BaseException] = []
        starter = threading.Thread(target=lambda: _catch(mesh.start, errors))
        starter.start()
        starter.join(timeout=150)
        assert not starter.is_alive() and not errors, errors
        with grpc.insecure_channel(mesh.address("tts")) as channel:
            assert is_serving(channel), mesh.children["tts"].tail()
        assert mesh.exited() is None
    finally:
        codes = mesh.stop()
    assert codes == {"tts": 0}


def test_the_lifeline_is_taken_once_and_not_inherited(monkeypatch):
    read, write = os.pipe()
    try:
        os.set_inheritable(read, True)  # as pass_fds leaves it in the child
        monkeypatch.setenv(LIFELINE_ENV, str(read))
        assert take_lifeline() == read
        assert LIFELINE_ENV not in os.environ  # subprocesses of the service never see it
        assert not os.get_inheritable(read)
        assert take_lifeline() is None  # started by hand: behaves as before
        monkeypatch.setenv(LIFELINE_ENV, "not-a-number")
        assert take_lifeline() is None and LIFELINE_ENV not in os.environ
        with open(os.devnull) as not_a_pipe:
            monkeypatch.setenv(LIFELINE_ENV, str(not_a_pipe.fileno()))
            assert take_lifeline() is None
    finally:
        os.close(read)
        os.close(write)


async def test_the_lifeline_reports_the_supervisor_gone_once():
    read, write = os.pipe()
    gone = asyncio.Event()
    calls = []
    try:
        watch_lifeline(asyncio.get_running_loop(), read, lambda: (calls.append(1), gone.set()))
        os.close(write)  # what the supervisor's death does
        write = None
        await asyncio.wait_for(gone.wait(), timeout=5)
        for _ in range(10):  # a reader left installed would fire again on each turn of the loop (EOF lasts)
            await asyncio.sleep(0)
        assert calls == [1]
    finally:
        os.close(read)
        if write is not None:
            os.close(write)
