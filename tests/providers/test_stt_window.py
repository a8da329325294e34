"""The Whisper window's arithmetic, without a model (test_stt.py decodes on one)."""
from __future__ import annotations

from voicemesh.stt.providers.whisper_window import _repetitive, first_repeat, repeats_itself, window_samples


def test_a_decode_encodes_the_audio_and_some_silence_not_a_30_s_window():
    assert window_samples(16_000 * 2, "fit") == 16_000 * 4  # 2 s + WINDOW_PAD_S, whole seconds
    assert window_samples(16_000 * 2 + 1, "fit") == 16_000 * 5
    assert window_samples(16_000 * 29, "fit") == 16_000 * 30  # never past Whisper's window
    assert window_samples(16_000 * 2, "full") == 16_000 * 30


def test_a_loop_is_told_from_a_dense_script_by_how_well_it_compresses():
    """A decode that hits its length cap runs again only when it is not a loop (whisper_window)."""
    assert _repetitive("you know, " * 30)
    assert not _repetitive("Please count slowly from one to twenty, and then tell me a short story.")
    assert not _repetitive("")


def test_a_run_of_tokens_said_twice_in_a_row_is_a_loop_a_repeated_word_is_not():
    """zlib's ratio misses a short loop (two and a half copies of a sentence compress ~2x)."""
    sentence = [2144, 416, 76, 22019, 281, 452, 8891, 13]  # 8 tokens, as "Add bymilk to my tasks."
    assert repeats_itself(sentence + sentence + sentence[:3])
    assert repeats_itself([1, 2, 3, 4, 5, 6, 7] + [3, 4, 5, 6] * 2)  # anywhere, not only at the start
    assert not repeats_itself(sentence)
    assert not repeats_itself([1, 2, 3, 1, 2, 3, 9])  # three tokens twice: a phrase said again ("no, no")
    assert not repeats_itself([1, 2, 3, 4, 9, 1, 2, 3, 4])  # the same run, not back to back
    assert not repeats_itself([])
    # A caption that loops is cut where its loop starts again: the first copy stays.
    assert first_repeat(sentence + sentence + sentence[:3]) == len(sentence)
    assert first_repeat([1, 2, 3, 4, 5, 6, 7] + [3, 4, 5, 6] * 2) == 11
    assert first_repeat(sentence) is None
