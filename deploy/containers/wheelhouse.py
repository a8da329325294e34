"""Steps 2 and 3 of the image build: a service's wheelhouse and its models.

The wheelhouse: deps/, the third-party wheels the service needs, pinned by
requirements/constraints.txt, and voicemesh/, its wheels from build/wheels (`make wheels`).
The models: joined and checked on this machine (`voicemesh-models setup KIND`) into the build
context, so the image carries the model files, not the part packages.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from common import HASHES, ROOT, BuildError, Service, hash_json, link_or_copy, log, run, shown

# build.py's --wheels and --models-command set these two.
WHEELS = ROOT / "build" / "wheels"
MODELS_COMMAND = ROOT / ".venv" / "bin" / "voicemesh-models"  # the runtime's model setup command
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"


def wheel_identity(path: Path) -> str:
    """What a wheel holds, not how it was zipped: the sha256 of its RECORD (every file's own
    sha256), so a wheel rebuilt from the same sources with new timestamps is the same input."""
    with zipfile.ZipFile(path) as archive:
        record = next((n for n in archive.namelist() if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            return HASHES.sha256(path)
        return hashlib.sha256(archive.read(record)).hexdigest()



# -- 2. the wheelhouse ---------------------------------------------------------------------------

def local_wheels(wheel_dir: Path) -> dict[str, Path]:
    """canonical name -> wheel file, for the voicemesh wheels of `make wheels`."""
    wheels: dict[str, Path] = {}
    for path in sorted(wheel_dir.glob("*.whl")):
        name, _version, _build, _tags = parse_wheel_filename(path.name)
        if name in wheels:
            raise BuildError(f"two wheels of {name} in {wheel_dir}: {wheels[name].name}, {path.name}")
        wheels[name] = path
    return wheels


def wheel_requires(path: Path) -> list[Requirement]:
    with zipfile.ZipFile(path) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")]


def resolve_local(service: Service, wheels: dict[str, Path]) -> tuple[list[Path], list[str]]:
    """The local wheels a service installs and the third-party requirements they declare,
    following extras and markers (this machine is the image's platform: same Debian, Python, CPU)."""
    env = default_environment()
    needed: dict[str, Path] = {}
    third_party: set[str] = set()
    todo = [(canonicalize_name(service.distribution), set(service.extras))]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, extras = todo.pop()
        if name not in wheels:
            raise BuildError(f"no wheel of {name} in {shown(WHEELS)} (run `make wheels`)")
        needed[name] = wheels[name]
        for extra in ("", *sorted(extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            for req in wheel_requires(wheels[name]):
                if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                    continue
                dep = canonicalize_name(req.name)
                if dep in wheels:
                    todo.append((dep, set(req.extras)))
                else:
                    third_party.add(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
    return sorted(needed.values()), sorted(third_party)


def fill_wheelhouse(service: Service, wheels: dict[str, Path], dest: Path) -> list[Path]:
    """dest/deps/: the third-party wheels the service's install needs, pinned by the constraints,
    with a requirements.txt naming each exactly; dest/voicemesh/: its voicemesh wheels. Two
    folders, two image layers: a change to voicemesh code leaves the third-party layer cached.
    The third-party fill is skipped when its requirements and the constraints are unchanged."""
    own, third_party = resolve_local(service, wheels)
    deps, mine = dest / "deps", dest / "voicemesh"
    stamp_key = hash_json({"third_party": third_party, "constraints": CONSTRAINTS.read_text()})
    stamp = deps / ".filled"
    if stamp.exists() and stamp.read_text() == stamp_key:
        log(f"{service.kind}: third-party wheels unchanged ({len(list(deps.glob('*.whl')))} wheels)")
    else:
        if deps.exists():
            shutil.rmtree(deps)
        deps.mkdir(parents=True)
        if third_party:
            # `pip wheel`, not `pip download`: a dependency published only as source is built
            # here, where the tools are, and the image gets a wheel.
            run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "-q", "--wheel-dir", str(deps),
                 "-c", str(CONSTRAINTS), *third_party])
        found = {parse_wheel_filename(p.name)[:2] for p in deps.glob("*.whl")}
        strays = sorted(str(name) for name, _ in found if name.startswith("voicemesh"))
        if strays:  # a voicemesh name came from the index, not from build/wheels
            raise BuildError(f"{service.kind}: the third-party wheels include {', '.join(strays)} from the index")
        (deps / "requirements.txt").write_text("".join(f"{name}=={version}\n" for name, version in sorted(found)))
        stamp.write_text(stamp_key)
    if mine.exists():
        shutil.rmtree(mine)
    for path in own:
        link_or_copy(path, mine / path.name)
    return sorted([*deps.glob("*.whl"), *mine.glob("*.whl")])


# -- 3. models -----------------------------------------------------------------------------------

def stage_models(service: Service, dest: Path) -> list[Path]:
    """dest/: the service's model files, joined and sha256-checked on this machine by the
    runtime's own command (from the repository's .venv, which has the model part packages)."""
    dest.mkdir(parents=True, exist_ok=True)
    if service.models:
        command = MODELS_COMMAND
        if not command.exists():
            raise BuildError(f"{command} is missing (make install)")
        run([str(command), "setup", service.kind], env={**os.environ, "VOICEMESH_MODEL_DIR": str(dest)})
    return sorted(p for p in dest.rglob("*") if p.is_file() and not p.name.endswith(".partial"))
