"""One Whisper decode on an encoder window cut to the audio.

Whisper was trained on 30 s windows, and faster-whisper pads every clip to one, so for a 2-3 s
utterance about 70 % of a decode went to encoding the padding (base, 2 threads: ~430 ms of a
~600 ms decode). CTranslate2's encoder takes shorter inputs, and the decoder attends to
whatever the encoder gives it, so a decode here encodes the audio plus WINDOW_PAD_S of
silence, rounded up to whole seconds (a few distinct shapes). Measured on the bench's voices
(docs/stt-levers.md): ~6x faster, at +0.9 points of word error rate against the
30 s window. "full" keeps faster-whisper's own window (its features zero-padded to 30 s).

The decode itself is what faster-whisper's batched pipeline did on one clip: greedy (or beam)
search without timestamp tokens, the language fixed, its non-speech tokens suppressed, and
word times from the cross-attention alignment (without faster-whisper's clamping of overlong
first and last words). The output is capped by the audio's length, so a degenerate loop on
noise cannot run to the model's 448 tokens.

On a short window the decoder sometimes loops: it reads a clip it has transcribed once more
from the start ("Add buy milk to my tasks. Add buy milk to my tasks. Add ..."), which on 30 s it
does not. So a "fit" decode that repeats a run of tokens back to back, or that reaches the
cap, is decoded again on faster-whisper's 30 s window: that turn pays a full decode (~0.6 s),
the transcript is the 30 s window's. On the 30 s window a decode that reaches the cap without
repeating itself (a dense script) runs again with the model's whole budget.
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
# A loop: this many tokens or more (about three words) said twice back to back; speech repeats
# a word or two ("no, no"), the decoder's loops repeat whole phrases.
LOOP_MIN_TOKENS = 4


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


def first_repeat(tokens: list[int]) -> int | None:
    """Where the first run of LOOP_MIN_TOKENS or more tokens that comes twice in a row starts
    again (a decoding loop; zlib's ratio misses one on a short text: two and a half copies of a
    sentence compress 2x), or None."""
    count = len(tokens)
    for start in range(count - 2 * LOOP_MIN_TOKENS + 1):
        for span in range(LOOP_MIN_TOKENS, (count - start) // 2 + 1):
            if tokens[start:start + span] == tokens[start + span:start + 2 * span]:
                return start + span
    return None


def repeats_itself(tokens: list[int]) -> bool:
    return first_repeat(tokens) is not None


@dataclass(frozen=True)
class _Generated:
    tokens: list[int]  # without the end-of-text token
    avg_logprob: float
    no_speech_prob: float
    suspect: bool  # reached the cap, or repeats itself: a "fit" decode goes again on 30 s


class WindowedWhisper:
    """Decodes with one faster_whisper.WhisperModel (its feature extractor, CTranslate2 model
    and tokenizer). Not thread-safe: the provider runs every decode on one thread."""

    def __init__(self, model: Any, window: str = "fit") -> None:
        if window not in WINDOWS:
            raise ValueError(f"VOICEMESH_STT_WINDOW: {window!r} is not one of {', '.join(WINDOWS)}")
        self.model, self.window = model, window
        self.fallbacks = 0  # "fit" decodes that went again on the 30 s window (a loop or the cap)
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

    def decode(self, audio: np.ndarray, language: str, beam_size: int, words: bool,
               fall_back: bool = True) -> WindowResult:
        """float32 16 kHz mono audio, under 30 s -> one segment's text, scores and word times.
        `fall_back`: a "fit" decode that loops or hits its cap is decoded again on 30 s (interims
        pass False: a later decode replaces them, and the worker's time is the final's; a loop
        there is cut where it starts again)."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.transcribe import merge_punctuations

        audio = audio[: FULL_WINDOW_S * RATE_HZ]  # the stream never sends more (MAX_DECODE_MS)
        tokenizer, suppressed = self._tokenizer(language)
        generated = None
        if self.window == "fit":
            padded = np.zeros(window_samples(len(audio), self.window), np.float32)
            padded[: len(audio)] = audio
            features = self.model.feature_extractor(padded)[..., :-1]  # (mels, frames); the last is the pad's edge
            encoded = self.model.encode(features)
            full = len(padded) >= FULL_WINDOW_S * RATE_HZ  # already the 30 s window: nothing to go back to
            generated = self._generate(encoded, tokenizer, suppressed, len(audio), beam_size, retry=full)
            if generated.suspect and fall_back and not full:
                self.fallbacks += 1
                generated = None
        if generated is None:  # as faster-whisper's pipeline: the clip's features, zero-padded to 30 s
            features = pad_or_trim(self.model.feature_extractor(audio)[..., :-1])
            encoded = self.model.encode(features)
            generated = self._generate(encoded, tokenizer, suppressed, len(audio), beam_size, retry=True)
        tokens = generated.tokens
        if not fall_back and generated.suspect:
            tokens = tokens[: first_repeat(tokens) or len(tokens)]  # a caption: its first copy is enough
        timed: tuple[tuple[str, float, float, float], ...] = ()
        if words and tokens:
            frames = min(features.shape[-1], max(2, math.ceil(len(audio) / HOP)))  # the audio's, not the padding's
            alignment = self.model.find_alignment(tokenizer, [tokens], encoded, frames)[0]
            merge_punctuations(alignment, PREPEND_PUNCTUATION, APPEND_PUNCTUATION)
            timed = tuple((w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
                          for w in alignment if w["word"])
        return WindowResult(tokenizer.decode(tokens).strip(), generated.avg_logprob, generated.no_speech_prob, timed)

    def fit_text(self, audio: np.ndarray, language: str) -> str:
        """What the short window alone reads (greedy, the output capped), loop or not: for tests
        and measurements of how often decode() goes again on 30 s."""
        padded = np.zeros(window_samples(len(audio), "fit"), np.float32)
        padded[: len(audio)] = audio
        tokenizer, suppressed = self._tokenizer(language)
        encoded = self.model.encode(self.model.feature_extractor(padded)[..., :-1])
        return tokenizer.decode(self._generate(encoded, tokenizer, suppressed, len(audio), 1, retry=False).tokens).strip()

    def _generate(self, encoded: Any, tokenizer: Any, suppressed: tuple[int, ...], audio_samples: int,
                  beam_size: int, retry: bool) -> _Generated:
        """One search on an encoded window, its output capped by the audio's length; `retry`: run
        again with the whole budget when the cap was reached without a loop."""
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        budget = self.model.max_length // 2
        capped = min(budget, TOKENS_MARGIN + math.ceil(TOKENS_PER_S * audio_samples / RATE_HZ))
        for max_new in dict.fromkeys((capped, budget) if retry else (capped,)):
            result = self.model.model.generate(
                encoded, [prompt], beam_size=beam_size, max_length=len(prompt) + max_new,
                return_scores=True, return_no_speech_prob=True, suppress_blank=True,
                suppress_tokens=suppressed,
            )[0]
            generated = result.sequences_ids[0]
            tokens = [t for t in generated if t < tokenizer.eot]
            loops = repeats_itself(tokens) or _repetitive(tokenizer.decode(tokens))
            if len(generated) < max_new or loops:
                break  # complete, or a loop that more tokens would only prolong
        avg_logprob = result.scores[0] * len(generated) / (len(generated) + 1)  # length-normalised -> mean
        return _Generated(tokens, float(avg_logprob), float(result.no_speech_prob),
                          suspect=loops or len(generated) >= max_new)
