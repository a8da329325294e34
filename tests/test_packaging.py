"""Each service stands alone: folders spell import paths, one version and one set of pins, and
every service's wheels install into a fresh environment of their own that holds only what that
service needs, and from which it serves (the six fresh environments together answer a spoken
question)."""
from __future__ import annotations

import ast
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT

DISTS = {  # folder -> distribution
    "protos": "voicemesh-protos", "services/runtime": "voicemesh-runtime", "services/vad": "voicemesh-vad",
    "services/stt": "voicemesh-stt", "services/llm": "voicemesh-llm", "services/tts": "voicemesh-tts",
    "services/transport": "voicemesh-transport", "orchestrator": "voicemesh-orchestrator",
    "clients/python": "voicemesh-client", "clients/cli": "voicemesh-cli", "clients/assistant": "voicemesh-assistant",
}
# What each service installs (its embedded default provider) and what must NOT be in its environment.
MODEL_RUNTIMES = {"onnxruntime", "ctranslate2", "faster-whisper", "xllamacpp", "hibari-tts"}
SERVICES = {
    "vad": ("voicemesh-vad[silero]", MODEL_RUNTIMES - {"onnxruntime"} | {"aiortc", "aiohttp"}),
    # faster-whisper itself needs onnxruntime (its own Silero filter), so the STT holds it.
    "stt": ("voicemesh-stt[whisper]", {"xllamacpp", "hibari-tts", "aiortc", "aiohttp"}),
    "llm": ("voicemesh-llm[llamacpp]", {"faster-whisper", "ctranslate2", "hibari-tts", "onnxruntime", "aiortc"}),
    "tts": ("voicemesh-tts[hibari]", {"faster-whisper", "ctranslate2", "xllamacpp", "aiortc"}),
    "orchestrator": ("voicemesh-orchestrator", MODEL_RUNTIMES | {"aiortc", "aiohttp"}),
    "transport": ("voicemesh-transport", MODEL_RUNTIMES),
}
CLOUD_SDKS = {"azure-cognitiveservices-speech", "boto3", "botocore", "openai", "nvidia-riva-client"}
PIP = ["-m", "pip", "--disable-pip-version-check", "-q"]
INSTALL_S = 900  # deadline for one environment's install (a cold pip cache on a slow machine)


def _pyproject(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version.strip()
    return pins


def test_every_distribution_has_one_version_and_pinned_dependencies():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for folder, dist in DISTS.items():
        project = _pyproject(folder)["project"]
        assert project["name"] == dist
        assert project["version"] == root["version"], f"{dist} has version {project['version']}, not {root['version']}"
        requirements = [*project.get("dependencies", ()), *(r for extra in project.get("optional-dependencies", {}).values()
                                                             for r in extra)]
        for requirement in requirements:
            name = _name(requirement)
            if name.startswith("voicemesh-"):
                assert requirement.endswith(f"=={root['version']}"), f"{dist}: {requirement} must pin this version"
            else:
                assert name in pins, f"{dist} needs {name}, which requirements/constraints.txt does not pin"
                assert "=" not in requirement, f"{dist}: {requirement}: versions belong in constraints.txt"


def test_folders_spell_their_import_paths():
    """A module voicemesh.x.y lives at <dist>/voicemesh/x/y.py, no dist remaps a folder, and
    `voicemesh` is a namespace package (no __init__.py) shared by every distribution."""
    packages_seen = {}
    for folder in DISTS:
        config = _pyproject(folder).get("tool", {}).get("setuptools", {})
        assert "package-dir" not in config, f"{folder} remaps folders: {config['package-dir']}"
        namespace = ROOT / folder / "voicemesh"
        assert namespace.is_dir() and not (namespace / "__init__.py").exists(), f"{namespace} must be a namespace folder"
        for child in namespace.iterdir():
            if child.is_dir() and child.name != "__pycache__":
                assert child.name not in packages_seen, f"voicemesh.{child.name} in {folder} and {packages_seen[child.name]}"
                packages_seen[child.name] = folder
    assert set(packages_seen) == {"v1", "runtime", "vad", "stt", "llm", "tts", "transport", "orchestrator", "client", "cli",
                                  "assistant"}
    import voicemesh.orchestrator.turns
    import voicemesh.stt.providers.whisper

    for module in (voicemesh.stt.providers.whisper, voicemesh.orchestrator.turns):
        relative = Path(*module.__name__.split(".")).with_suffix(".py")
        assert Path(module.__file__).resolve().as_posix().endswith(relative.as_posix()), module.__file__


def test_the_client_and_the_runtime_do_not_import_each_other():
    """One role per module: the client library needs no service code, the runtime no client."""
    def imports(folder: str) -> set[str]:
        found = set()
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(alias.name for alias in node.names)
        return found

    def within(modules: set[str], *packages: str) -> set[str]:
        return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}

    assert not within(imports("clients/python/voicemesh"), "voicemesh.runtime", "voicemesh.cli", "voicemesh.assistant")
    assert not within(imports("services/runtime/voicemesh"), "voicemesh.client", "voicemesh.cli", "voicemesh.assistant")
    assert within(imports("clients/python/voicemesh"), "voicemesh.client")  # the walk found the client's imports
    # The assistant is a client like any other: the client library and the stubs, no service code.
    services = ("voicemesh.runtime", "voicemesh.cli", "voicemesh.orchestrator", "voicemesh.vad", "voicemesh.stt",
                "voicemesh.llm", "voicemesh.tts", "voicemesh.transport")
    assert not within(imports("clients/assistant/voicemesh"), *services)
    assert within(imports("clients/assistant/voicemesh"), "voicemesh.client")


def test_the_command_imports_the_assistant_only_when_asked():
    """`voicemesh assistant` is an optional distribution: the command imports it inside the
    subcommand, so every other subcommand runs where it is not installed."""
    for path in (ROOT / "clients/cli/voicemesh/cli").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(name.startswith("voicemesh.assistant") for name in names), f"{path}: {names}"


def test_models_setup_sets_up_one_service_alone(tmp_path):
    env = {**os.environ, "VOICEMESH_MODEL_DIR": str(tmp_path)}
    _run([sys.executable, "-m", "voicemesh.runtime.models", "setup", "vad"], env=env)
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*") if path.is_file()) == [
        "silero-vad/silero_vad.onnx", "smart-turn/smart-turn-v3.2-cpu.onnx"]


def test_serving_a_service_that_is_not_installed_says_what_to_install():
    result = subprocess.run([sys.executable, "-m", "voicemesh.runtime.serve", "asr"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "no service 'asr'" in result.stderr and "install voicemesh-asr" in result.stderr, result.stderr
    assert "stt" in result.stderr  # the installed ones are listed


# -- the wheels, each service in its own fresh environment --------------------------------------


def _run(args: list, timeout: float = INSTALL_S, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))[:300]}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """Every distribution's wheel, built from the sources. The protos are built from a copy that
    holds only the .proto files and the build files: the build itself makes the stubs."""
    out = tmp_path_factory.mktemp("wheels")
    protos = tmp_path_factory.mktemp("protos-src") / "protos"
    shutil.copytree(ROOT / "protos", protos, ignore=shutil.ignore_patterns("*_pb2*", ".stubs", "__pycache__", "build",
                                                                          "*.egg-info"))
    assert not list(protos.rglob("*_pb2.py"))
    folders = [protos, *(ROOT / f for f in DISTS if f != "protos")]
    _run([sys.executable, *PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", out, *folders], cwd=ROOT)
    built = {path.name.split("-")[0] for path in out.glob("*.whl")}
    assert built == {dist.replace("-", "_") for dist in DISTS.values()}, built
    return out


def _venv(root: Path, name: str, wheels: Path, requirement: str) -> Path:
    """A fresh venv holding one distribution (with its extras) from the wheels, pins from constraints."""
    env_dir = root / name
    _run([sys.executable, "-m", "venv", env_dir])
    python = env_dir / "bin" / "python"
    dist, _, extras = requirement.partition("[")
    local = {path.name.split("-")[0].replace("_", "-"): path for path in wheels.glob("*.whl")}
    wheel = str(local[dist]) + (f"[{extras}" if extras else "")
    # Local voicemesh wheels by path (never a same-named index package); the rest pinned by constraints.
    _run([python, *PIP, "install", "-c", ROOT / "requirements" / "constraints.txt", "--find-links", wheels, wheel])
    return python


def _installed(python: Path) -> set[str]:
    listing = _run([python, "-m", "pip", "--disable-pip-version-check", "list", "--format=freeze"]).stdout
    return {_name(line) for line in listing.splitlines() if line}


@pytest.fixture(scope="module")
def service_envs(wheels, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("envs")
    return {kind: _venv(root, kind, wheels, requirement) for kind, (requirement, _) in SERVICES.items()}


@pytest.mark.packaging
@pytest.mark.parametrize("kind", sorted(SERVICES))
def test_a_service_environment_holds_only_what_it_needs(service_envs, kind):
    python = service_envs[kind]
    installed = _installed(python)
    # A default install carries no cloud SDK, and never the proprietary Azure Speech SDK.
    forbidden = (SERVICES[kind][1] | CLOUD_SDKS) & installed
    assert not forbidden, f"the {kind} environment holds {sorted(forbidden)}"
    assert {"voicemesh-runtime", "voicemesh-protos", f"voicemesh-{kind}"} <= installed
    others = {f"voicemesh-{other}" for other in SERVICES if other != kind} | {"voicemesh-client", "voicemesh-cli",
                                                                                "voicemesh-assistant"}
    assert not others & installed, f"the {kind} environment holds {sorted(others & installed)}"
    _run([python, "-c",
          f"import voicemesh.{kind}.service; import voicemesh.v1.{kind if kind != 'transport' else 'transport'}_pb2"])
    listing = _run([python.parent / "voicemesh-serve", "--help"]).stdout
    assert kind in listing  # the service registered itself with the runtime
    cloud = {"stt": "riva"}.get(kind)  # a provider importing its SDK with its module (others import it on use)
    if cloud:  # a provider whose extra is not installed says which extra to install
        missing = subprocess.run([str(python.parent / "voicemesh-serve"), kind, "--provider", cloud, "--help"],
                                 capture_output=True, text=True, timeout=INSTALL_S)
        assert missing.returncode != 0 and f"pip install 'voicemesh-{kind}[{cloud}]'" in missing.stderr, missing.stderr


@pytest.mark.packaging
def test_the_client_library_installs_alone(wheels, tmp_path_factory):
    python = _venv(tmp_path_factory.mktemp("client-env"), "client", wheels, "voicemesh-client")
    installed = _installed(python)
    assert not installed & (MODEL_RUNTIMES | {"voicemesh-runtime", "opentelemetry-sdk", "aiortc"}), sorted(installed)
    _run([python, "-c", "from voicemesh.client import talk_session, config_request; config_request()"])


@pytest.mark.packaging
@pytest.mark.e2e
@pytest.mark.models
def test_the_six_fresh_environments_answer_a_spoken_question(service_envs, tmp_path):
    """Each service served by `voicemesh-serve` from its own environment (models from the model folder)."""
    from voicemesh.cli.mesh import ALL_SERVICES, TRANSPORT, Mesh, free_ports
    from voicemesh.client.session import talk_session
    from voicemesh.client.wavio import load_for_sending
    from voicemesh.runtime.models import MODEL_DIR_ENV, model_dir

    def command(kind: str, host: str, port: int) -> list[str]:
        return [str(service_envs[kind].parent / "voicemesh-serve"), kind, "--host", host, "--port", str(port)]

    services = (*ALL_SERVICES, TRANSPORT)
    env = {MODEL_DIR_ENV: str(model_dir()), "PYTHONPATH": ""}
    ports = free_ports((*services, "http"))
    mesh = Mesh(ports=ports, env=env, services=services, command=command, log_dir=tmp_path, ready_timeout=300,
                http_port=ports["http"])
    with mesh:
        for kind in services:  # each service runs on its own environment's interpreter
            cmdline = Path(f"/proc/{mesh.children[kind].process.pid}/cmdline").read_bytes().decode()
            assert str(service_envs[kind].parent) in cmdline, (kind, cmdline)
        result = asyncio.run(talk_session(mesh.orchestrator_address, load_for_sending(FIXTURES / "question_capital.wav"),
                                          wait_after=180))
    transcript = " ".join(turn.user_transcript for turn in result.turns).lower()
    reply = " ".join(turn.bot_text for turn in result.turns).lower()
    assert "capital" in transcript and "france" in transcript, result.to_json()
    assert "paris" in reply and result.audio_seconds > 0.5, result.to_json()
