"""What the image build driver (build.py) builds, and the few helpers its steps share: the
repository's paths, the services, errors, logging, commands, and sha256 (remembered per file)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "images"
REGISTRY = os.environ.get("VOICEMESH_IMAGE_REGISTRY", "localhost")  # the name prefix; nothing is pushed
PREFIX = "voicemesh"


@dataclass(frozen=True)
class Service:
    kind: str
    folder: str  # holds the Containerfile
    distribution: str  # the wheel it installs
    extras: tuple[str, ...] = ()
    models: bool = False  # has model files to bake in
    ports: tuple[int, ...] = ()  # declared with EXPOSE; the first is gRPC (and gRPC health)

    @property
    def requirement(self) -> str:
        return self.distribution + (f"[{','.join(self.extras)}]" if self.extras else "")

    @property
    def repository(self) -> str:
        return f"{REGISTRY}/{PREFIX}/{self.kind}"


SERVICES = {
    s.kind: s
    for s in (
        Service("vad", "services/vad", "voicemesh-vad", ("silero",), models=True, ports=(50052,)),
        # Each image carries its embedded provider and every cloud provider but Azure Speech (its
        # SDK is proprietary: docs/licences.md), so a provider swap is an env change, not an image.
        Service("stt", "services/stt", "voicemesh-stt", ("whisper", "riva", "aws", "deepgram"), models=True, ports=(50053,)),
        Service("llm", "services/llm", "voicemesh-llm", ("llamacpp", "openai", "azure-openai", "bedrock"), models=True,
                ports=(50054,)),
        # hibari's voice is in its wheel
        Service("tts", "services/tts", "voicemesh-tts", ("hibari", "riva", "polly", "elevenlabs", "cartesia"), ports=(50055,)),
        Service("orchestrator", "orchestrator", "voicemesh-orchestrator", ports=(50051,)),
        Service("transport", "services/transport", "voicemesh-transport", ports=(50056, 8080)),
    )
}


class BuildError(RuntimeError):
    pass


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the repository when inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def log(text: str) -> None:
    print(f"[images] {text}", file=sys.stderr, flush=True)


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(args))
    try:
        return subprocess.run(args, check=True, **kwargs)
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{args[0]} failed (exit {exc.returncode}): {' '.join(args)}") from None


class HashCache:
    """sha256 of files, remembered in build/images/hashes.json by (path, size, mtime): the
    models are hundreds of MB, and a rebuild that changed nothing should not read them again."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key, stamp = str(file.resolve()), [stat.st_size, stat.st_mtime_ns]
        entry = self.known.get(key)
        if entry and entry[0] == stamp:
            return entry[1]
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            while block := handle.read(8 << 20):
                digest.update(block)
        self.known[key] = [stamp, digest.hexdigest()]
        return digest.hexdigest()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.known, indent=0, sort_keys=True))


HASHES = HashCache(OUT / "hashes.json")


def hash_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
