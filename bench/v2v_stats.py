"""Pure logic of the voice-to-voice comparison (bench/v2v_compare.py): word error rate by
edit distance, the right-answer check, noise at a given SNR, and the summary of paired turns.

No model, process or clock here, so tests/test_bench_units.py covers all of it."""
from __future__ import annotations

import re

import numpy as np

from bench.stats import percentile

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped: Whisper's "Paris." and the reference's "paris"
    are the same word."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words: the fewest substitutions, deletions and insertions."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1,  # deletion
                               current[j - 1] + 1,  # insertion
                               previous[j - 1] + (ref_word != hyp_word)))  # substitution or match
        previous = current
    return previous[-1]


def word_error_rate(pairs: list[tuple[str, str]]) -> float | None:
    """Corpus WER over (reference, hypothesis) pairs: total edits / total reference words, the
    usual definition (a mean of per-utterance rates would overweight short utterances)."""
    edits = total = 0
    for reference, hypothesis in pairs:
        ref = words(reference)
        edits += edit_distance(ref, words(hypothesis))
        total += len(ref)
    return None if total == 0 else edits / total


def answered_right(bot_text: str, expected: str) -> bool:
    """The reply names the expected answer as a word ("Paris", not "Parisian")."""
    return expected.lower() in words(bot_text)


def add_noise(clean: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White noise over the whole clip, at `snr_db` below the power of the speech in it.

    The speech power is measured over the louder half of 20 ms frames, so leading and trailing
    silence does not make the noise quieter than the SNR says. Seeded: the same clip gets the
    same noise on both sides of the comparison."""
    samples = clean.astype(np.float64)
    frame = 320
    count = len(samples) // frame
    powers = np.sort(np.mean(samples[: count * frame].reshape(count, frame) ** 2, axis=1)) if count else np.zeros(1)
    speech_power = float(np.mean(powers[len(powers) // 2:])) if powers.size else 0.0
    noise = np.random.default_rng(seed).standard_normal(len(samples)) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    return np.clip(np.round(samples + noise), -32768, 32767).astype(np.int16)


def pct(values, q) -> float | None:
    value = percentile([v for v in values if v is not None], q)
    return None if value is None else round(value, 1)


def summarise_side(rows: list[dict], stage_keys: tuple[str, ...]) -> dict:
    """One side's turns: v2v p50/p90, each stage's p50, WER and right-answer rate per voice."""
    good = [r for r in rows if r.get("v2v_ms") is not None]
    voices = sorted({r["voice"] for r in rows})
    return {
        "turns": len(rows),
        "answered": len(good),
        "p50": pct([r["v2v_ms"] for r in good], 50),
        "p90": pct([r["v2v_ms"] for r in good], 90),
        "stages_p50": {key: pct([r.get(key) for r in good], 50) for key in stage_keys},
        "per_voice": {voice: voice_figures([r for r in rows if r["voice"] == voice]) for voice in voices},
        "wer": _round(word_error_rate([(r["reference"], r.get("transcript", "")) for r in rows])),
        "right_answer_rate": _rate([r.get("right", False) for r in rows]),
        "failures": [r["failure"] for r in rows if r.get("failure")],
    }


def voice_figures(rows: list[dict]) -> dict:
    return {
        "turns": len(rows),
        "p50": pct([r.get("v2v_ms") for r in rows], 50),
        "wer": _round(word_error_rate([(r["reference"], r.get("transcript", "")) for r in rows])),
        "right_answer_rate": _rate([r.get("right", False) for r in rows]),
    }


def pair_ratios(pairs: list[tuple[dict, dict]]) -> dict:
    """Mesh / Pipecat voice-to-voice, turn by turn (same clip, back to back): the median and
    p10-p90 of the ratios, over the pairs where both answered."""
    ratios = [a["v2v_ms"] / b["v2v_ms"] for a, b in pairs
              if a.get("v2v_ms") is not None and b.get("v2v_ms") not in (None, 0)]
    return {"pairs": len(ratios), "median": _round(percentile(ratios, 50)),
            "p10": _round(percentile(ratios, 10)), "p90": _round(percentile(ratios, 90))}


def _rate(flags: list[bool]) -> float | None:
    return None if not flags else round(sum(1 for f in flags if f) / len(flags), 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
