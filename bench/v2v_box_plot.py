"""bench/results/v2v_box.png from v2v_box.json (run in bench/.venv-pipecat, which has matplotlib):
voice-to-voice p50/p90 against concurrent conversations on both sides, with each side's
"p90 doubled" line, and the CPU-seconds per minute of conversation by process.
`python -m bench.v2v_box_plot V2V_BOX_JSON OUT_PNG`"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

SIDES = (("mesh", "voicemesh (embedded mesh)", "tab:blue"), ("pipecat", "Pipecat 1.14, one process per call", "tab:orange"))


def main(source: str, target: str) -> None:
    data = json.loads(open(source).read())
    fig, (latency, cpu) = plt.subplots(1, 2, figsize=(13, 4.8))
    held = data["conversations_per_box"]
    for side, label, colour in SIDES:
        levels = data[side]
        n = [level["conversations"] for level in levels]
        latency.plot(n, [level["p90"] or float("nan") for level in levels], "o-", color=colour,
                     label=f"{label}: p90 (holds {held[side]})")
        latency.plot(n, [level["p50"] or float("nan") for level in levels], "o:", color=colour, alpha=0.6, label="p50")
        if levels and levels[0]["p90"]:
            latency.axhline(2 * levels[0]["p90"], color=colour, linestyle="--", linewidth=0.8)
    latency.set(xlabel="concurrent spoken conversations", ylabel="voice-to-voice, ms",
                title="Voice-to-voice under concurrency (dashed: 2 x p90 at 1)")
    latency.legend(fontsize=8)
    width = 0.38
    for offset, (side, label, colour) in enumerate(SIDES):
        levels = data[side]
        cpu.bar([level["conversations"] + (offset - 0.5) * width for level in levels],
                [level["cpu_s_per_conversation_minute_total"] for level in levels], width, color=colour, label=label)
    cpu.set(xlabel="concurrent spoken conversations", ylabel="CPU-seconds per minute of conversation",
            title="CPU per conversation-minute, all processes")
    cpu.legend(fontsize=8)
    for axes in (latency, cpu):
        axes.set_xticks(held["levels_tried"])
    fig.suptitle(f"Same models, {data['machine']['cores']} cores; rule: {data['rule']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
