"""The soak's plot (runs in bench/.venv-pipecat, which has matplotlib).

`python -m bench.soak_plot soak-NAME.json soak-NAME.png`: RSS of every process over time (top)
and the p50 and p99 added latency per window (bottom), the warm-up shaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(result: dict, out: Path) -> None:
    fig, (rss_ax, lat_ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    samples = result["samples"]
    times = [s["t"] / 60 for s in samples]
    for name in samples[0]["rss_kib"] if samples else ():
        values = [(s["rss_kib"].get(name) or float("nan")) / 1024 for s in samples]
        rss_ax.plot(times, values, label=name + (" (not judged)" if name == "client" else ""))
    rss_ax.set(title=f"Soak: {result['what']}: RSS per process", ylabel="MiB")
    windows = [w for w in result["windows"] if w["p99"] is not None]
    mids = [(w["from_s"] + (result["windows"][1]["from_s"] if len(result["windows"]) > 1 else 0) / 2) / 60 for w in windows]
    lat_ax.plot(mids, [w["p99"] for w in windows], marker="o", label="p99")
    lat_ax.plot(mids, [w["p50"] for w in windows], marker=".", label="p50")
    lat_ax.set(title="added latency per turn, per window", xlabel="minutes", ylabel="ms")
    for ax in (rss_ax, lat_ax):
        ax.axvspan(0, result["warmup_s"] / 60, color="grey", alpha=0.15, label="warm-up")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
