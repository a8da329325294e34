"""The mesh as containers: the six images of `make images`, each run as its own container on the
host's network (podman run --network=host), every service bound to loopback on a free port.

The spoken question goes through Converse with the assertions of the end-to-end test
(tests/test_e2e.py::test_spoken_question_gets_spoken_answer). Every container started here is
removed by its ID when the test ends, however it ends. Without podman the container tests skip,
except under CI (CI set), where a missing podman or image fails.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import FIXTURES, ROOT
from voicemesh.cli.mesh import PROBE_OPTIONS, free_ports
from test_e2e import REPLY_WAIT_S, _non_silent_seconds


def _load_build_driver():
    """deploy/containers/build.py (the services, their ports and the tag scheme), under a name
    of its own: `build` alone is also the name of a PyPI package."""
    spec = importlib.util.spec_from_file_location("voicemesh_images_build", ROOT / "deploy" / "containers" / "build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


images = _load_build_driver()

WATCH_S = 5.0  # one health Watch at most; between two, the containers' states are looked at
START_S = 420.0  # deadline for a stage of containers to report SERVING: models load on 2 busy cores
STOP_S = 60  # podman stop's wait for a container to exit on SIGTERM before it kills it
ORDER = (("vad", "stt", "llm", "tts"), ("orchestrator",), ("transport",))  # started stage by stage
SERVING = health_pb2.HealthCheckResponse.SERVING


def podman_or_skip() -> str:
    path = shutil.which("podman")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("podman is not installed (make containers-apt installs it); under CI the container tests must run")
        pytest.skip("podman is not installed: `make containers-apt`, then `make images`")
    return path


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(images.CONTAINERS_CONF))}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def image_refs() -> dict[str, str]:
    """kind -> the image to run: the immutable tags of the last `make images` (its report), or
    localhost/voicemesh/KIND:$VOICEMESH_IMAGE_TAG when that is set."""
    tag = os.environ.get("VOICEMESH_IMAGE_TAG")
    if tag:
        return {kind: f"{service.repository}:{tag}" for kind, service in images.SERVICES.items()}
    report = images.OUT / "report.json"
    built = {}
    if report.exists():
        built = {entry["kind"]: entry["tags"][1] for entry in json.loads(report.read_text())["images"]}
    missing = sorted(set(images.SERVICES) - set(built))
    if missing:
        pytest.fail(f"no image built for {', '.join(missing)} ({report.relative_to(ROOT)}): run `make images`")
    return built


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    podman_or_skip()
    refs = image_refs()
    absent = [ref for ref in refs.values() if podman("image", "exists", ref, check=False).returncode != 0]
    if absent:
        pytest.fail(f"images not in podman's store: {', '.join(absent)}: run `make images`")
    return refs


# -- the images, without running them ------------------------------------------------------------

@pytest.mark.containers
def test_images_are_configured(refs):
    """Non-root, exec-form entry point of the runtime, the gRPC port declared, SIGTERM, labels,
    the models' directory where the service has models."""
    problems = []
    for kind, ref in refs.items():
        service = images.SERVICES[kind]
        config = json.loads(podman("image", "inspect", ref).stdout)[0]["Config"]
        env = dict(item.split("=", 1) for item in config.get("Env", []))
        expect = {
            "User": "10001:10001",
            "Entrypoint": ["/opt/voicemesh/venv/bin/voicemesh-serve", kind],
            "StopSignal": "SIGTERM",
            "ExposedPorts": sorted(f"{port}/tcp" for port in service.ports),
            "version label": True,
            "model dir": "/opt/voicemesh/models" if service.models else None,
        }
        seen = {
            "User": config.get("User"), "Entrypoint": config.get("Entrypoint"), "StopSignal": config.get("StopSignal"),
            "ExposedPorts": sorted(config.get("ExposedPorts", {})),
            "version label": bool(config.get("Labels", {}).get("org.opencontainers.image.version")),
            "model dir": env.get("VOICEMESH_MODEL_DIR"),
        }
        problems += [f"{kind}: {key} is {seen[key]!r}, expected {value!r}" for key, value in expect.items() if seen[key] != value]
    assert not problems, "\n".join(problems)


# -- the mesh as six containers ------------------------------------------------------------------

def watch_until_serving(channel: grpc.Channel, container: "Container", seconds: float) -> bool:
    """Follow the health status for up to `seconds` (waiting for the port to listen first);
    True once SERVING. Records the last answer, or error, in container.health."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        for answer in stub.Watch(health_pb2.HealthCheckRequest(), timeout=seconds, wait_for_ready=True):
            container.health = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            if answer.status == SERVING:
                return True
    except grpc.RpcError as exc:
        if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            raise AssertionError(f"{container.kind}: health Watch failed: {exc.code().name}: {exc.details()}") from None
        if exc.code() == grpc.StatusCode.UNAVAILABLE or container.health == "not asked yet":
            container.health = f"{exc.code().name}: {exc.details()}"
    return False


@dataclass
class Container:
    kind: str
    ref: str
    port: int
    id: str = ""
    health: str = "not asked yet"  # the last health answer or error, for the failure message

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class ContainerMesh:
    refs: dict[str, str]
    log_dir: Path
    http_port: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    containers: dict[str, Container] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ports = free_ports((*images.SERVICES, "http"))
        self.http_port = ports.pop("http")
        self.containers = {kind: Container(kind, self.refs[kind], ports[kind]) for kind in images.SERVICES}

    def env(self, kind: str) -> dict[str, str]:
        upper = kind.upper()
        env = {f"VOICEMESH_{upper}_HOST": "127.0.0.1", f"VOICEMESH_{upper}_PORT": str(self.containers[kind].port)}
        if kind == "orchestrator":
            env.update({f"VOICEMESH_{k.upper()}_ADDR": self.containers[k].address for k in ORDER[0]})
        if kind == "transport":
            env.update({"VOICEMESH_ORCHESTRATOR_ADDR": self.containers["orchestrator"].address,
                        "VOICEMESH_TRANSPORT_HTTP_HOST": "127.0.0.1", "VOICEMESH_TRANSPORT_HTTP_PORT": str(self.http_port)})
        return env

    def start(self) -> None:
        for stage in ORDER:
            for kind in stage:
                container = self.containers[kind]
                env_args = [arg for name, value in self.env(kind).items() for arg in ("--env", f"{name}={value}")]
                result = podman("run", "--detach", "--network=host", "--label", f"io.voicemesh.test-run={self.run_id}",
                                f"--stop-timeout={STOP_S}", *env_args, container.ref)
                container.id = result.stdout.strip().splitlines()[-1]
            self.wait_serving([self.containers[kind] for kind in stage])

    def states(self) -> dict[str, dict]:
        ids = [c.id for c in self.containers.values() if c.id]
        if not ids:
            return {}
        found = json.loads(podman("container", "inspect", *ids).stdout)
        by_id = {entry["Id"]: entry["State"] for entry in found}
        return {c.kind: by_id.get(c.id, {}) for c in self.containers.values() if c.id}

    def wait_serving(self, waiting: list[Container]) -> None:
        """Until each of `waiting` answers SERVING (health Watch: the server says when its status
        changes); fails as soon as a container started so far has exited, and at the deadline
        saying what each one last answered."""
        deadline = time.monotonic() + START_S
        channels = {c.kind: grpc.insecure_channel(c.address, options=PROBE_OPTIONS) for c in waiting}
        try:
            pending = list(waiting)
            while pending:
                exited = {kind: s for kind, s in self.states().items() if s.get("Status") != "running"}
                if exited:
                    raise AssertionError("containers stopped while starting: " + ", ".join(
                        f"{kind} ({s.get('Status')}, exit code {s.get('ExitCode')})" for kind, s in exited.items()))
                if time.monotonic() > deadline:
                    raise AssertionError(f"not SERVING after {START_S:.0f} s: " + ", ".join(
                        f"{c.kind} on {c.address} ({c.health})" for c in pending))
                container = pending[0]
                if watch_until_serving(channels[container.kind], container, WATCH_S):
                    pending.pop(0)
        finally:
            for channel in channels.values():
                channel.close()

    def logs(self, container: Container, lines: int = 40) -> str:
        result = podman("logs", "--tail", str(lines), container.id, check=False)
        return (result.stdout + result.stderr).strip() or "(no output)"

    def report(self) -> str:
        """Each container's state and the tail of its log, for a failure message."""
        states = self.states()
        parts = []
        for c in self.containers.values():
            if not c.id:
                parts.append(f"--- {c.kind}: not started")
                continue
            state = states.get(c.kind, {})
            parts.append(f"--- {c.kind} {c.id[:12]} ({c.ref}) on {c.address}: {state.get('Status')}, "
                         f"exit code {state.get('ExitCode')}, health {c.health}\n{self.logs(c)}")
        return "\n".join(parts)

    @contextlib.contextmanager
    def explained(self):
        """Failures inside carry each container's state and log tail."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n\ncontainers:\n{self.report()}") from None

    def stop(self) -> dict[str, int]:
        """SIGTERM, callers first (transport, orchestrator, then the backends); each container's exit code."""
        for stage in reversed(ORDER):
            ids = [self.containers[kind].id for kind in stage if self.containers[kind].id]
            if ids:
                podman("stop", f"--time={STOP_S}", *ids, timeout=STOP_S + 60)
        return {kind: state.get("ExitCode") for kind, state in self.states().items()}

    def remove(self) -> None:
        """Remove every container started here, by ID, after saving its whole log. A `podman run`
        that failed or timed out after creating its container left no ID here: those are found
        by this run's own label (unique per run), so they go too."""
        ids = [c.id for c in self.containers.values() if c.id]
        labelled = podman("ps", "--all", "--quiet", "--no-trunc", "--filter", f"label=io.voicemesh.test-run={self.run_id}",
                          check=False).stdout.split()
        ids += [found for found in labelled if not any(found.startswith(known) or known.startswith(found) for known in ids)]
        for c in self.containers.values():
            if c.id:
                with contextlib.suppress(Exception):
                    log = podman("logs", c.id, check=False)
                    (self.log_dir / f"{c.kind}.log").write_text(log.stdout + log.stderr)
        if ids:
            podman("rm", "--force", f"--time={STOP_S}", *ids, check=False, timeout=STOP_S + 120)


@pytest.fixture(scope="module")
def container_mesh(refs, tmp_path_factory):
    mesh = ContainerMesh(refs, tmp_path_factory.mktemp("container-mesh"))
    try:
        with mesh.explained():
            mesh.start()
        yield mesh
    finally:
        mesh.remove()


@pytest.mark.containers
@pytest.mark.e2e
@pytest.mark.models
def test_spoken_question_through_the_containers(container_mesh, tmp_path):
    """`voicemesh talk` on the fixture against the orchestrator's container: transcript, reply
    text and reply audio; the transport's container serves gRPC health and its page over HTTP;
    all six stop cleanly on SIGTERM."""
    reply = tmp_path / "reply.wav"
    with container_mesh.explained():
        result = subprocess.run(
            [sys.executable, "-m", "voicemesh.cli", "talk", str(FIXTURES / "question_capital.wav"),
             "--addr", container_mesh.containers["orchestrator"].address, "--out", str(reply), "--json",
             "--wait-after", str(REPLY_WAIT_S)],
            capture_output=True, text=True, timeout=REPLY_WAIT_S + 300, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        transcript = " ".join(report["user_transcripts"]).lower()
        assert "capital" in transcript and "france" in transcript, report
        reply_text = " ".join(report["bot_texts"])
        assert reply_text.strip(), report
        assert "paris" in reply_text.lower(), report
        assert len(report["turns"]) == 1 and report["turns"][0]["latency_ms"] > 0, report
        with wave.open(str(reply)) as wav:
            pcm, rate = wav.readframes(wav.getnframes()), wav.getframerate()
        assert _non_silent_seconds(pcm, rate) > 0.5
        assert report["audio_seconds"] > 0.5, report
        container_mesh.wait_serving([container_mesh.containers["transport"]])  # still up after the call
        http = f"http://127.0.0.1:{container_mesh.http_port}"
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
        with direct.open(f"{http}/healthz", timeout=30) as answer:
            assert json.loads(answer.read())["status"] == "serving"
        with direct.open(f"{http}/", timeout=30) as answer:  # the page, from the transport's wheel
            assert answer.status == 200 and b"<html" in answer.read().lower()
        exit_codes = container_mesh.stop()
        assert exit_codes == {kind: 0 for kind in images.SERVICES}, f"exit codes after SIGTERM: {exit_codes}"


# -- the build driver, without podman ------------------------------------------------------------

def test_every_service_has_a_containerfile_of_the_pattern():
    """FROM scratch, pip from the wheelhouse alone, a non-root user, the runtime's entry point in
    exec form, the default gRPC port declared, SIGTERM."""
    from voicemesh.runtime.config import DEFAULT_PORTS

    problems = []
    for kind, service in images.SERVICES.items():
        text = (ROOT / service.folder / "Containerfile").read_text()
        final = text[text.rindex("\nFROM "):]
        checks = {
            "FROM scratch": all(line == "FROM scratch" for line in text.splitlines() if line.startswith("FROM ")),
            "pip --no-index": "--no-index" in text and f"'{service.requirement}'" in text,
            "non-root USER": re.search(r"^USER 10001(:10001)?$", final, re.M) is not None,
            "exec-form ENTRYPOINT": f'ENTRYPOINT ["/opt/voicemesh/venv/bin/voicemesh-serve", "{kind}"]' in final,
            f"EXPOSE {DEFAULT_PORTS[kind]}": re.search(rf"^EXPOSE .*\b{DEFAULT_PORTS[kind]}\b", final, re.M) is not None,
            "STOPSIGNAL SIGTERM": "\nSTOPSIGNAL SIGTERM\n" in final,
            "models copied": ("COPY models/" in final) == service.models,
        }
        problems += [f"{service.folder}/Containerfile: {name}" for name, ok in checks.items() if not ok]
    assert not problems, "\n".join(problems)


def _wheel(directory: Path, name: str, requires: list[str]) -> Path:
    path = directory / f"{name.replace('-', '_')}-1.2.3-py3-none-any.whl"
    info = f"{name.replace('-', '_')}-1.2.3.dist-info"
    metadata = "\n".join(["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.2.3",
                          *(f"Requires-Dist: {r}" for r in requires)])
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{info}/METADATA", metadata + "\n")
        archive.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n")
    return path


def test_wheelhouse_follows_local_wheels_extras_and_markers(tmp_path):
    """The voicemesh wheels a service needs come from build/wheels, through extras; the rest is
    the third-party set its install needs on this platform, for pip to fetch with the constraints."""
    wheels = {
        "voicemesh-runtime": _wheel(tmp_path, "voicemesh-runtime", ["grpcio", "uvloop; sys_platform != 'win32'",
                                                                    "pywin32; sys_platform == 'win32'"]),
        "voicemesh-vad": _wheel(tmp_path, "voicemesh-vad", ["voicemesh-runtime", "onnxruntime; extra == 'silero'",
                                                            "torch; extra == 'torch'"]),
        "voicemesh-stt": _wheel(tmp_path, "voicemesh-stt", ["voicemesh-runtime"]),
    }
    own, third_party = images.resolve_local(images.Service("vad", "services/vad", "voicemesh-vad", ("silero",)), wheels)
    assert sorted(p.name for p in own) == ["voicemesh_runtime-1.2.3-py3-none-any.whl", "voicemesh_vad-1.2.3-py3-none-any.whl"]
    assert third_party == ["grpcio", "onnxruntime", "uvloop"]
    with pytest.raises(images.BuildError, match="voicemesh-llm"):
        images.resolve_local(images.Service("llm", "services/llm", "voicemesh-llm"), wheels)
