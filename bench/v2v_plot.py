"""bench/results/v2v.png from v2v.json (run in bench/.venv-pipecat, which has matplotlib):
voice-to-voice per turn on both sides, the milestones' p50 after the end of speech, and the
word error rate per voice. `python -m bench.v2v_plot V2V_JSON OUT_PNG`"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

SIDES = (("mesh", "voicemesh (embedded mesh)", "tab:blue"), ("pipecat", "Pipecat 1.14, same engines", "tab:orange"))
MILESTONES = ("vad_stop_ms", "user_stopped_ms", "stt_final_ms", "llm_first_token_ms", "first_bot_text_ms")


def main(source: str, target: str) -> None:
    data = json.loads(open(source).read())
    fig, (turns, stages, wer) = plt.subplots(1, 3, figsize=(16, 4.8))
    for side, label, colour in SIDES:
        values = [row.get("v2v_ms") for row in data["turns"][side]]
        turns.plot(range(1, len(values) + 1), [v if v is not None else float("nan") for v in values], "o-",
                   color=colour, label=f"{label}: p50 {data[side]['p50']} ms")
    turns.set(xlabel="turn (A B alternating, same clip)", ylabel="ms, end of speech -> first bot audio",
              title="Voice-to-voice per turn")
    turns.legend(fontsize=8)
    keys = [k for k in MILESTONES if any(data["stages_p50_ms"][s].get(k) is not None for s, _, _ in SIDES)] + ["v2v_ms"]
    width = 0.38
    for offset, (side, label, colour) in enumerate(SIDES):
        figures = {**data["stages_p50_ms"][side], "v2v_ms": data[side]["p50"]}
        stages.bar([i + (offset - 0.5) * width for i in range(len(keys))], [figures.get(k) or 0 for k in keys], width,
                   color=colour, label=label)
    stages.set_xticks(range(len(keys)), [k.removesuffix("_ms").replace("_", " ") for k in keys], rotation=20, fontsize=8)
    stages.set(ylabel="ms after the end of speech (p50)", title="Milestones (0 = not visible on that side)")
    stages.legend(fontsize=8)
    voices = sorted(data["wer"]["per_voice"])
    for offset, (side, label, colour) in enumerate(SIDES):
        wer.bar([i + (offset - 0.5) * width for i in range(len(voices))],
                [100 * (data["wer"]["per_voice"][v][side] or 0) for v in voices], width, color=colour, label=label)
    wer.set_xticks(range(len(voices)), voices, rotation=20, fontsize=8)
    wer.set(ylabel="word error rate, %", title="Final transcripts per voice")
    wer.legend(fontsize=8)
    load = data["machine"]
    fig.suptitle(f"Same models (Silero + Smart Turn v3, Whisper base, Qwen2.5 0.5B GGUF, hibari), {load['cores']} cores, "
                 f"load average {load['load_average_before'][0]} -> {load['load_average_after'][0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(target, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
