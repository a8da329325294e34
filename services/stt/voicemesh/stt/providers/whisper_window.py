"""One Whisper decode on an encoder window cut to the audio.

Whisper was trained on 30 s windows, and faster-whisper pads every clip to one, so for a 2-3 s
utterance about 70 % of a decode went to encoding the padding (base, 2 threads: ~430 ms of a
~600 ms decode). CTranslate2's encoder takes shorter inputs, and the decoder attends to
whatever the encoder gives it, so a decode here encodes the audio plus WINDOW_PAD_S of
silence, rounded up to whole seconds (a few distinct shapes). Measured on the bench's voices
(docs/performance.md#stt-levers): ~6x faster, at +0.9 points of word error rate against the
30 s window. "full" keeps faster-whisper's own window (its features zero-padded to 30 s).

The decode itself is what faster-whisper's batched pipeline did on one clip: greedy (or beam)
search without timestamp tokens, the language fixed, its non-speech tokens suppressed, and
word times from the cross-attention alignment (without faster-whisper's clamping of overlong
first and last words). The output is capped by the audio's length, so a degenerate loop on
noise cannot run to the model's 448 tokens; a decode that reaches the cap without repeating
itself (a dense script: zlib compression ratio under 2.4, faster-whisper's rule for a loop) is
run again with the model's whole budget.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

RATE_HZ = 16_000
HOP = 160  # samples per mel frame
FULL_WINDOW_S = 30
WINDOW_PAD_S = 2.0  # silence after the audio: the decoder sees where speech ends
# Output cap: a fast talker says ~4 words (~6 tokens) a second; twice that, plus a margin.
TOKENS_PER_S = 12
TOKENS_MARGIN = 16
# faster-whisper's defaults for attaching punctuation to the word before or after it.
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
WINDOWS = ("fit", "full")
COMPRESSION_RATIO_LOOP = 2.4


@dataclass(frozen=True)
class WindowResult:
    text: str
    avg_logprob: float
    no_speech_prob: float
    words: tuple[tuple[str, float, float, float], ...]  # (word, start s, end s, probability)


def window_samples(audio_samples: int, window: str) -> int:
    """The padded length of a decode: the audio plus WINDOW_PAD_S, in whole seconds, at most 30 s;
    "full": always 30 s."""
    if window == "full":
        return FULL_WINDOW_S * RATE_HZ
    seconds = math.ceil((audio_samples + WINDOW_PAD_S * RATE_HZ) / RATE_HZ)
    return min(FULL_WINDOW_S, max(1, seconds)) * RATE_HZ


def _repetitive(text: str) -> bool:
    """faster-whisper's test for a decoding loop: the text compresses more than 2.4x."""
    raw = text.encode("utf-8")
    return bool(raw) and len(raw) / len(zlib.compress(raw)) > COMPRESSION_RATIO_LOOP


class WindowedWhisper:
    """Decodes with one faster_whisper.WhisperModel (its feature extractor, CTranslate2 model
    and tokenizer). Not thread-safe: the provider runs every decode on one thread."""

    def __init__(self, model: Any, window: str = "fit") -> None:
        if window not in WINDOWS:
            raise ValueError(f"VOICEMESH_STT_WINDOW: {window!r} is not one of {', '.join(WINDOWS)}")
        self.model, self.window = model, window
        self._tokenizers: dict[str, tuple[Any, tuple[int, ...]]] = {}

    @property
    def is_multilingual(self) -> bool:
        return bool(self.model.model.is_multilingual)

    def _tokenizer(self, language: str) -> tuple[Any, tuple[int, ...]]:
        """The language's tokenizer and the tokens a decode suppresses, made once per language."""
        from faster_whisper.tokenizer import Tokenizer

        from faster_whisper.transcribe import get_suppressed_tokens

        language = language if self.is_multilingual else "en"
        if language not in self._tokenizers:
            tokenizer = Tokenizer(self.model.hf_tokenizer, self.is_multilingual, task="transcribe", language=language)
            self._tokenizers[language] = (tokenizer, get_suppressed_tokens(tokenizer, [-1]))
        return self._tokenizers[language]

    def decode(self, audio: np.ndarray, language: str, beam_size: int, words: bool) -> WindowResult:
        """float32 16 kHz mono audio, under 30 s -> one segment's text, scores and word times."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.transcribe import merge_punctuations

        audio = audio[: FULL_WINDOW_S * RATE_HZ]  # the stream never sends more (MAX_DECODE_MS)
        if self.window == "full":  # as faster-whisper's pipeline: the clip's features, zero-padded
            features = pad_or_trim(self.model.feature_extractor(audio)[..., :-1])
        else:
            padded = np.zeros(window_samples(len(audio), self.window), np.float32)
            padded[: len(audio)] = audio
            features = self.model.feature_extractor(padded)[..., :-1]  # (mels, frames); the last is the pad's edge
        encoded = self.model.encode(features)
        tokenizer, suppressed = self._tokenizer(language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        budget = self.model.max_length // 2
        capped = min(budget, TOKENS_MARGIN + math.ceil(TOKENS_PER_S * len(audio) / RATE_HZ))
        for max_new in dict.fromkeys((capped, budget)):  # the whole budget only if the cap was reached
            result = self.model.model.generate(
                encoded, [prompt], beam_size=beam_size, max_length=len(prompt) + max_new,
                return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                suppress_tokens=suppressed,
            )[0]
            generated = result.sequences_ids[0]
            if len(generated) < max_new or _repetitive(tokenizer.decode(generated)):
                break  # complete, or a loop that more tokens would only prolong
        tokens = [t for t in generated if t < tokenizer.eot]
        avg_logprob = result.scores[0] * len(generated) / (len(generated) + 1)  # length-normalised -> mean
        timed: tuple[tuple[str, float, float, float], ...] = ()
        if words and tokens:
            frames = min(features.shape[-1], max(2, math.ceil(len(audio) / HOP)))  # the audio's, not the padding's
            alignment = self.model.find_alignment(tokenizer, [tokens], encoded, frames)[0]
            merge_punctuations(alignment, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
            timed = tuple((w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
                          for w in alignment if w["word"])
        return WindowResult(tokenizer.decode(tokens).strip(), float(avg_logprob), float(result.no_speech_prob), timed)
