"""The rendered `local` overlay (deploy/kustomize/overlays/local) started by `podman kube play`
with the built images, and a spoken question sent through it.

What the manifests give podman is what runs: each Deployment's image, entry point, env (the
embedded providers, the per-service grace), its security context (uid 10001, read-only root
filesystem with an emptyDir on /tmp, no capabilities, no privilege escalation) and its resources.
Kubernetes' Services and DNS do not exist here, so the test changes only addresses: every pod
on the host's network (`--network host`), each service bound to 127.0.0.1 on a free port, and
the orchestrator's and transport's *_ADDR pointed at those ports.

What this does NOT prove: podman 4.3 ignores `grpc:` probes (startup and readiness) and runs
`tcpSocket` as `nc -z` inside the container (the images have no nc), ignores the preStop `sleep`
and terminationGracePeriodSeconds, has no Services, DNS, PodDisruptionBudgets, rolling updates or
scheduling; the rendered objects' schema is tests/test_kustomize.py's job, the probes' and the
drain's behaviour needs a real cluster. Health is checked here from outside, by the test itself.

Pods are named vmkp<random>-<kind>-pod-0 and removed by those names when the test ends.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import wave
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import FIXTURES, ROOT
from test_e2e import REPLY_WAIT_S, _non_silent_seconds
from voicemesh.cli.mesh import free_ports

KUBECTL = Path(sys.prefix) / "bin" / "kubectl"
OVERLAY = ROOT / "deploy" / "kustomize" / "overlays" / "local"
REPORT = ROOT / "build" / "images" / "report.json"
CONF = ROOT / "deploy" / "containers" / "containers.conf"
START_S = 420.0  # models load on 2 busy cores
STAGES = (("vad", "stt", "llm", "tts"), ("orchestrator",), ("transport",))

pytestmark = [pytest.mark.containers, pytest.mark.e2e, pytest.mark.models]


def podman(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "CONTAINERS_CONF": str(CONF)})
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def images() -> dict[str, str]:
    """kind -> the image to run: the immutable tags of the last build (report.json), or
    localhost/voicemesh/KIND:$VOICEMESH_IMAGE_TAG."""
    if os.environ.get("VOICEMESH_IMAGE_TAG"):
        return {kind: f"localhost/voicemesh/{kind}:{os.environ['VOICEMESH_IMAGE_TAG']}" for stage in STAGES for kind in stage}
    report = json.loads(REPORT.read_text())
    return {i["kind"]: next(t for t in i["tags"] if not t.endswith(":" + i["version"])) for i in report["images"]}


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    if shutil.which("podman") is None or not KUBECTL.exists():
        if os.environ.get("CI"):
            pytest.fail("podman and kubectl are needed under CI")
        pytest.skip("needs podman (make containers-apt) and kubectl (requirements/dev.txt)")
    if not REPORT.exists() and not os.environ.get("VOICEMESH_IMAGE_TAG"):
        pytest.skip("no images built: make images")
    found = images()
    for ref in found.values():
        if podman("image", "exists", ref, check=False).returncode != 0:
            pytest.skip(f"{ref} is not in podman's storage: make images")
    return found


def playable(objects: list[dict], refs: dict[str, str], ports: dict[str, int], prefix: str) -> list[dict]:
    """The overlay's Deployments, with only names, images and addresses changed."""
    out = []
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue  # Services, ServiceAccounts, PDBs, the Namespace: nothing podman runs
        kind = obj["metadata"]["name"]
        obj["metadata"] = {"name": f"{prefix}-{kind}", "labels": obj["metadata"].get("labels", {})}
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        container["image"] = refs[kind]
        # The host's network: no port mappings (podman refuses them there), and the ports moved.
        container.pop("ports", None)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            for action in ("grpc", "tcpSocket"):
                if action in container.get(probe, {}):
                    container[probe][action]["port"] = ports[kind]
        env = container.setdefault("env", [])
        addresses = {
            f"VOICEMESH_{kind.upper()}_HOST": "127.0.0.1",
            f"VOICEMESH_{kind.upper()}_PORT": str(ports[kind]),
        }
        if kind == "orchestrator":
            addresses.update({f"VOICEMESH_{k.upper()}_ADDR": f"127.0.0.1:{ports[k]}" for k in ("vad", "stt", "llm", "tts")})
        if kind == "transport":
            addresses.update({"VOICEMESH_ORCHESTRATOR_ADDR": f"127.0.0.1:{ports['orchestrator']}",
                              "VOICEMESH_TRANSPORT_HTTP_HOST": "127.0.0.1", "VOICEMESH_TRANSPORT_HTTP_PORT": str(ports["http"])})
        kept = [item for item in env if item["name"] not in addresses]
        container["env"] = kept + [{"name": name, "value": value} for name, value in addresses.items()]
        out.append(obj)
    return out


def serving(port: int, seconds: float) -> str:
    """SERVING, or the last answer/error within `seconds`."""
    last = "no answer"
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for answer in stub.Watch(health_pb2.HealthCheckRequest(), timeout=seconds, wait_for_ready=True):
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                if last == "SERVING":
                    break
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
    return last


def test_local_overlay_answers_a_spoken_question(refs, tmp_path):
    rendered = subprocess.run([str(KUBECTL), "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "KUBECONFIG": os.devnull})
    assert rendered.returncode == 0, rendered.stderr
    kinds = [kind for stage in STAGES for kind in stage]
    ports = free_ports([*kinds, "http"])
    prefix = f"vmkp{uuid.uuid4().hex[:8]}"
    deployments = {d["metadata"]["name"].removeprefix(prefix + "-"): d
                   for d in playable(list(yaml.safe_load_all(rendered.stdout)), refs, ports, prefix)}
    assert sorted(deployments) == sorted(kinds)
    for kind, deployment in deployments.items():  # what the test relies on being in the manifests
        context = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["capabilities"]["drop"] == ["ALL"], kind
    pods = [f"{prefix}-{kind}-pod-0" for kind in kinds]
    logs = tmp_path / "logs"
    logs.mkdir()

    def report() -> str:
        lines = []
        for kind in kinds:
            ps = podman("ps", "-a", "--filter", f"pod={prefix}-{kind}-pod-0", "--format", "{{.Names}} {{.Status}}", check=False)
            lines.append(f"{kind}: {ps.stdout.strip()}")
            for name in ps.stdout.split():
                if name.startswith(prefix) and not name.endswith("-infra"):
                    log = podman("logs", "--tail", "15", name, check=False)
                    lines.append("  " + (log.stdout + log.stderr).strip().replace("\n", "\n  ")[-1500:])
                    break
        return "\n".join(lines)

    try:
        for stage in STAGES:
            manifest = tmp_path / f"{'-'.join(stage)}.yaml"
            manifest.write_text(yaml.safe_dump_all([deployments[k] for k in stage]))
            podman("kube", "play", "--network", "host", str(manifest), timeout=300)
            deadline = time.monotonic() + START_S
            for kind in stage:
                status = serving(ports[kind], max(1.0, deadline - time.monotonic()))
                assert status == "SERVING", f"{kind}: {status}\n{report()}"

        # Each container runs as the manifests say: uid 10001, read-only root filesystem, no capabilities.
        for kind in kinds:
            names = podman("ps", "--filter", f"pod={prefix}-{kind}-pod-0", "--format", "{{.Names}}").stdout.split()
            (name,) = [n for n in names if not n.endswith("-infra")]
            inspect = json.loads(podman("inspect", name).stdout)[0]
            assert inspect["HostConfig"]["ReadonlyRootfs"] is True, kind
            assert inspect["Config"]["User"].split(":")[0] == "10001", (kind, inspect["Config"]["User"])
            assert not inspect["EffectiveCaps"], (kind, inspect["EffectiveCaps"])

        reply = tmp_path / "reply.wav"
        result = subprocess.run(
            [sys.executable, "-m", "voicemesh.cli", "talk", str(FIXTURES / "question_capital.wav"),
             "--addr", f"127.0.0.1:{ports['orchestrator']}", "--out", str(reply), "--json",
             "--wait-after", str(REPLY_WAIT_S)],
            capture_output=True, text=True, timeout=REPLY_WAIT_S + 300, cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr[-3000:] + "\n" + report()
        answer = json.loads(result.stdout)
        transcript = " ".join(answer["user_transcripts"]).lower()
        assert "capital" in transcript and "france" in transcript, answer
        assert "paris" in " ".join(answer["bot_texts"]).lower(), answer
        with wave.open(str(reply)) as wav:
            assert _non_silent_seconds(wav.readframes(wav.getnframes()), wav.getframerate()) > 0.5
        assert serving(ports["transport"], 30) == "SERVING", report()
    finally:
        for pod in reversed(pods):  # callers first; by the names this test gave them
            with contextlib.suppress(Exception):
                names = podman("ps", "-a", "--filter", f"pod={pod}", "--format", "{{.Names}}", check=False).stdout.split()
                for name in names:
                    log = podman("logs", name, check=False)
                    (logs / f"{name}.log").write_text(log.stdout + log.stderr)
            podman("pod", "rm", "--force", "--time", "15", pod, check=False, timeout=120)
