"""Where the bench's own environment lives: bench/.venv-pipecat (Pipecat, matplotlib, py-spy,
pyinstrument), built by `make bench` from bench/requirements.txt, never the runtime venv."""
from __future__ import annotations

from pathlib import Path

BENCH_VENV = Path(__file__).resolve().parent / ".venv-pipecat"


def bench_bin(name: str) -> Path | None:
    path = BENCH_VENV / "bin" / name
    return path if path.exists() else None


def bench_python() -> Path | None:
    return bench_bin("python")
