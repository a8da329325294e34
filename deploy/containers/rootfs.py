"""Step 1 of the image build: the base root filesystem every image starts from (one layer).

`mmdebstrap --variant=apt` of Debian bookworm (Python 3.11) with the few packages the services
need, from this machine's own apt sources; made once, cached under build/images/base/ by a hash
of its inputs (the key).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from common import OUT, ROOT, BuildError, hash_json, log, run

# The base root filesystem. libgomp1: llama.cpp's OpenMP runtime (xllamacpp's wheel links the
# system one; every other native library the services load comes inside its wheel).
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "libgomp1")
# Leave out what no service reads at run time: manuals, docs (copyright files stay), translations.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
# mmdebstrap's own hook makes /usr merged and installs usr-is-merged: without it bookworm's
# init-system-helpers pulls in usrmerge, and with it all of perl (50 MB).
HOOKS = ("/usr/share/mmdebstrap/hooks/merged-usr",)
SOURCE_DATE_EPOCH = 1686355200  # 2023-06-10, bookworm's release: the base's file times



def host_sources() -> list[Path]:
    """This machine's apt source files that list the base's suite: mmdebstrap pastes them into
    the new root's sources, so the base comes from the same Debian mirror the machine uses."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
                  *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    found = []
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        lines = [line.split("#", 1)[0] for line in text.splitlines()]
        if path.suffix == ".sources":
            if any(re.match(r"(?i)\s*enabled:\s*no\b", line) for line in lines):
                continue
            if any(re.match(rf"(?i)\s*suites:.*\b{SUITE}\b", line) for line in lines):
                found.append(path)
        elif any(re.match(rf"\s*deb\s.*\s{SUITE}(\s|$)", line) for line in lines):
            found.append(path)
    if not found:
        raise BuildError(f"no apt source on this machine lists {SUITE!r} (looked in /etc/apt/sources.list"
                         f" and /etc/apt/sources.list.d/); the base is made from the machine's own sources")
    return found


def mmdebstrap_version() -> str:
    if not shutil.which("mmdebstrap"):
        raise BuildError("mmdebstrap is not installed (make containers-apt installs it)")
    out = subprocess.run(["mmdebstrap", "--version"], capture_output=True, text=True).stdout.strip()
    return out.split()[-1] if out else "unknown"


def ensure_base(rebuild: bool = False) -> tuple[Path, str]:
    """The base rootfs tarball, made once per set of inputs. Returns (path, key)."""
    sources = host_sources()
    inputs = {
        "suite": SUITE, "variant": "apt", "epoch": SOURCE_DATE_EPOCH, "packages": sorted(BASE_PACKAGES),
        "dpkg": list(DPKG_OPTIONS), "hooks": list(HOOKS),
        "sources": {str(p): p.read_text() for p in sources},
        "mmdebstrap": mmdebstrap_version(),
    }
    key = hash_json(inputs)[:12]
    path = OUT / "base" / f"{SUITE}-{key}.tar"
    if path.exists() and not rebuild:
        log(f"base rootfs: {path.relative_to(ROOT)} (cached)")
        return path, key
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tar.partial")
    started = time.monotonic()
    # SOURCE_DATE_EPOCH: fixed file times, so the same packages give the same tarball (and the
    # same image tags); a change in the packages Debian serves gives a new one.
    run(["mmdebstrap", "--variant=apt", "--mode=auto", "--format=tar", "--quiet",
         f"--include={','.join(BASE_PACKAGES)}", *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
         *(f"--hook-dir={hook}" for hook in HOOKS),
         SUITE, str(partial), *map(str, sources)],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)})
    partial.replace(path)
    (path.with_suffix(".json")).write_text(json.dumps({**inputs, "seconds": round(time.monotonic() - started, 1)}, indent=2))
    for old in path.parent.glob(f"{SUITE}-*.tar"):  # one base at a time
        if old != path:
            old.unlink()
            old.with_suffix(".json").unlink(missing_ok=True)
    log(f"base rootfs: {path.relative_to(ROOT)} ({path.stat().st_size / 1e6:.0f} MB, {time.monotonic() - started:.0f} s)")
    return path, key
