"""PNG plots of latest.json (runs in bench/.venv-pipecat, which has matplotlib).

`python -m bench.plots latest.json OUT_DIR` writes added_latency.png, capacity.png, vad.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _errorbar(ax, xs, entries, key, label):
    keep = [(x, e) for x, e in zip(xs, entries, strict=True) if e.get(key) is not None]
    if not keep:
        return
    xs, entries = [x for x, _ in keep], [e for _, e in keep]
    ys = [e[key] for e in entries]
    lo = [e[key] - ((e.get(f"{key}_spread") or {}).get("min") or e[key]) for e in entries]
    hi = [((e.get(f"{key}_spread") or {}).get("max") or e[key]) - e[key] for e in entries]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label=label)


def added_latency(results: dict, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("p50", "p99"), strict=True):
        for name, label in (("mesh_added_latency_ms", "mesh"), ("pipecat_added_latency_ms", "Pipecat (lean)")):
            data = results.get(name) or {}
            xs = sorted(int(n) for n in data)
            if xs:
                _errorbar(ax, xs, [data[str(n)] for n in xs], key, label)
        ax.set(title=f"added latency per turn, {key}", xlabel="concurrent sessions", ylabel="ms (symlog)")
        ax.set_yscale("symlog", linthresh=1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "added_latency.png", dpi=110)


def capacity(results: dict, out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("orchestrator_capacity", "mesh orchestrator"), ("pipecat_lean_capacity", "Pipecat lean"),
                       ("pipecat_defaults_capacity", "Pipecat defaults")):
        cap = results.get(key)
        if not cap:
            continue
        xs = sorted(int(n) for n in cap["points"] if cap["points"][n]["p99"] is not None)
        ax1.plot(xs, [cap["points"][str(n)]["p99"] for n in xs], marker="o", label=label)
        ax2.plot(xs, [cap["points"][str(n)]["cpu_cores"] for n in xs], marker="o", label=label)
    ax1.set(title="p99 added latency, one core", xlabel="sessions", ylabel="ms", yscale="log")
    ax2.set(title="server CPU, one core", xlabel="sessions", ylabel="cores")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=110)


def vad(results: dict, out: Path) -> None:
    cap = results.get("vad_capacity")
    if not cap:
        return
    xs = sorted(int(n) for n in cap["points"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(xs, [cap["points"][str(n)]["event_latency_ms"]["p99"] for n in xs], marker="o", label="p99 event latency")
    ax.set(title="VAD service (Silero), one core", xlabel="streams", ylabel="ms", yscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "vad.png", dpi=110)


if __name__ == "__main__":
    data = json.loads(Path(sys.argv[1]).read_text())
    target = Path(sys.argv[2])
    for plot in (added_latency, capacity, vad):
        plot(data, target)
    print(f"plots in {target}")
