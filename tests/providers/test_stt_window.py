"""The Whisper window's arithmetic, without a model (test_stt.py decodes on one)."""
from __future__ import annotations

from voicemesh.stt.providers.whisper_window import _repetitive, window_samples


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
