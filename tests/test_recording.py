"""The session recorder: stereo alignment, WAV and streamed audio, transcript, option checks.

Pure unit tests: the recorder takes explicit monotonic times, so a synthetic session (user
tone in its first second, a bot tone sent at 1.5 s with Playout's 250 ms lead) is exact.
"""
from __future__ import annotations

import datetime
import os
import re
import wave

import numpy as np
import pytest

from support import tone
from voicemesh.orchestrator.recording import RECORDING_DIR_ENV, SessionRecorder
from voicemesh.runtime.audio import pcm16_to_mulaw
from voicemesh.runtime.errors import InvalidInput
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

START = 1000.0  # the session clock's origin, in monotonic seconds
TOLERANCE_S = 0.05
PCM24 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=24000)
MULAW8 = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000)


def encode(samples: np.ndarray, fmt: common_pb2.AudioFormat) -> bytes:
    return pcm16_to_mulaw(samples) if fmt.encoding == common_pb2.AUDIO_ENCODING_MULAW else samples.astype("<i2").tobytes()


def synthetic_session(recorder: SessionRecorder, bot_format: common_pb2.AudioFormat, seconds: float = 2.5):
    """Caller: 60 ms chunks in real time (tone for 1 s, then silence), arriving 0-9 ms late.
    Bot: a 0.5 s tone whose first 250 ms are sent at once at 1.5 s, the rest paced."""
    events = []
    user = np.concatenate([tone(1.0, 16000, hz=440), np.zeros(round((seconds - 1.0) * 16000), np.int16)])
    step = 960
    for index in range(len(user) // step):
        arrival = START + (index + 1) * step / 16000 + (index * 7 % 10) / 1000
        events.append((arrival, "user", user[index * step:(index + 1) * step]))
    rate = bot_format.sample_rate_hz
    bot = tone(0.5, rate, hz=1000 if rate > 8000 else 700)
    step = rate * 20 // 1000
    for index in range(len(bot) // step):
        sent = START + 1.5 + max(0.0, index * 0.02 - 0.25)
        events.append((sent, "bot", encode(bot[index * step:(index + 1) * step], bot_format)))
    for when, kind, payload in sorted(events, key=lambda item: item[0]):
        if kind == "user":
            recorder.user_audio(payload, when)
        else:
            recorder.bot_audio(payload, when)
    recorder.close(START + seconds)


def read_wav(path) -> tuple[int, np.ndarray]:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (2, 2)
        return wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2)


def loud_span(channel: np.ndarray, rate: int, threshold: int = 1500) -> tuple[float, float] | None:
    loud = np.flatnonzero(np.abs(channel.astype(np.int32)) > threshold)
    return (loud[0] / rate, loud[-1] / rate) if len(loud) else None


def recorded(options: pb.RecordingOptions, bot_format=PCM24):
    events: list[pb.ConverseResponse] = []
    recorder = SessionRecorder(options, events.append, bot_format, start_monotonic=START)
    return recorder, events


def stream_of(events) -> list[common_pb2.AudioChunk]:
    return [event.recording.chunk for event in events if event.WhichOneof("event") == "recording"]


@pytest.mark.parametrize("bot_format", [PCM24, MULAW8], ids=["pcm16-24k", "mulaw-8k"])
@pytest.mark.parametrize("rate", [16000, 48000])
def test_channels_line_up_in_time(tmp_path, bot_format, rate):
    path = tmp_path / "session.wav"
    options = pb.RecordingOptions(wav_path=str(path), stream_audio=True, sample_rate_hz=rate if rate != 16000 else 0)
    recorder, events = recorded(options, bot_format)
    synthetic_session(recorder, bot_format)

    wav_rate, frames = read_wav(path)
    assert wav_rate == rate
    assert abs(len(frames) / rate - 2.5) < TOLERANCE_S
    user_span, bot_span = loud_span(frames[:, 0], rate), loud_span(frames[:, 1], rate)
    assert user_span is not None and bot_span is not None
    assert abs(user_span[0] - 0.0) < TOLERANCE_S and abs(user_span[1] - 1.0) < TOLERANCE_S, user_span
    assert abs(bot_span[0] - 1.5) < TOLERANCE_S and abs(bot_span[1] - 2.0) < TOLERANCE_S, bot_span
    # Each tone is on its own channel only.
    assert loud_span(frames[round(1.1 * rate):, 0], rate) is None
    assert loud_span(frames[: round(1.4 * rate), 1], rate) is None

    chunks = stream_of(events)
    assert b"".join(chunk.data for chunk in chunks) == frames.tobytes()
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    offsets = [chunk.offset_ms for chunk in chunks]
    assert offsets == sorted(offsets) and offsets[0] == 0
    # The stream flowed during the session, in 250 ms pieces, not all at close.
    assert all(len(chunk.data) == rate // 4 * 4 for chunk in chunks[:-1])
    assert len(chunks) >= 9


def test_bot_audio_never_overwrites_earlier_bot_audio(tmp_path):
    """Bot chunks sent faster than real time play back to back, all of them."""
    path = tmp_path / "burst.wav"
    recorder, _ = recorded(pb.RecordingOptions(wav_path=str(path)), PCM24)
    beeps = [tone(0.2, 24000, hz=500 + 100 * index) for index in range(3)]
    for beep in beeps:  # all three sent at once at 0.5 s
        recorder.bot_audio(beep.tobytes(), START + 0.5)
    recorder.close(START + 1.0)
    rate, frames = read_wav(path)
    span = loud_span(frames[:, 1], rate)
    assert abs(span[0] - 0.5) < TOLERANCE_S and abs(span[1] - 1.1) < TOLERANCE_S, span
    assert abs(len(frames) / rate - 1.1) < TOLERANCE_S  # the recording reaches the end of the bot audio


def test_text_only_session_streams_silence_and_bot_audio():
    """No caller audio at all (a text chat): the clock alone settles the user channel."""
    recorder, events = recorded(pb.RecordingOptions(stream_audio=True), PCM24)
    beep = tone(0.5, 24000, hz=800)
    for index in range(25):
        recorder.bot_audio(beep[index * 480:(index + 1) * 480].tobytes(), START + 2.0 + index * 0.02)
    for second in range(3, 6):
        recorder.advance(START + second)
    before_close = len(stream_of(events))
    recorder.close(START + 6.0)
    chunks = stream_of(events)
    assert before_close >= 12  # at least the first 3 s went out before close
    frames = np.frombuffer(b"".join(chunk.data for chunk in chunks), dtype="<i2").reshape(-1, 2)
    assert len(frames) == 6 * 16000
    assert loud_span(frames[:, 0], 16000) is None
    span = loud_span(frames[:, 1], 16000)
    assert abs(span[0] - 2.0) < TOLERANCE_S and abs(span[1] - 2.5) < TOLERANCE_S, span


def test_caller_pause_leaves_a_gap_and_jitter_does_not():
    """A caller that stops sending for a second gets silence there; small lateness does not."""
    recorder, events = recorded(pb.RecordingOptions(stream_audio=True), PCM24)
    chunk = tone(0.06, 16000, hz=300)
    arrivals = [0.06 * (index + 1) + (0.1 if index == 5 else 0.0) for index in range(10)]  # one late chunk
    arrivals += [1.6 + 0.06 * (index + 1) for index in range(10)]  # resumes at 1.6 s
    for arrival in arrivals:
        recorder.user_audio(chunk, START + arrival)
    recorder.close(START + 2.4)
    frames = np.frombuffer(b"".join(c.data for c in stream_of(events)), dtype="<i2").reshape(-1, 2)
    left = np.abs(frames[:, 0].astype(np.int32))
    first, second = loud_span(frames[: 16000, 0], 16000), loud_span(frames[16000:, 0], 16000)
    assert abs(first[0]) < TOLERANCE_S and abs(first[1] - 0.6) < TOLERANCE_S, first
    assert np.all(left[: 9600].reshape(-1, 160).max(axis=1) > 1500)  # no hole at the late chunk
    assert abs(1.0 + second[0] - 1.6) < TOLERANCE_S and abs(1.0 + second[1] - 2.2) < TOLERANCE_S, second


def test_transcript_entries_are_sent_in_order_with_utc_timestamps():
    recorder, events = recorded(pb.RecordingOptions(transcript=True))
    recorder.entry("user", "What is the capital of France?")
    recorder.entry("assistant", "The capital of France is", interrupted=True)
    recorder.entry("user", "Thanks.")
    sent = [event.transcript for event in events if event.WhichOneof("event") == "transcript"]
    assert [(e.role, e.text, e.interrupted) for e in sent] == [
        ("user", "What is the capital of France?", False),
        ("assistant", "The capital of France is", True),
        ("user", "Thanks.", False),
    ]
    assert list(recorder.entries) == sent
    times = []
    for item in sent:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", item.timestamp), item.timestamp
        parsed = datetime.datetime.fromisoformat(item.timestamp)
        assert parsed.utcoffset() == datetime.timedelta(0)
        assert abs(parsed - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=1)
        times.append(parsed)
    assert times == sorted(times)
    recorder.close()
    assert not [event for event in events if event.WhichOneof("event") == "recording"]


def test_transcript_off_keeps_entries_but_sends_nothing():
    recorder, events = recorded(pb.RecordingOptions())
    recorder.entry("user", "hello")
    recorder.user_audio(tone(0.5, 16000, hz=300), START + 0.5)  # nothing asked for: ignored
    recorder.close(START + 1.0)
    assert [e.text for e in recorder.entries] == ["hello"] and events == []
    with pytest.raises(ValueError):
        recorder.entry("system", "not a transcript role")


@pytest.mark.parametrize("rate", [7999, 48001, 96000])
def test_bad_rate_is_rejected(rate):
    with pytest.raises(InvalidInput, match="sample_rate_hz"):
        recorded(pb.RecordingOptions(stream_audio=True, sample_rate_hz=rate))


@pytest.fixture(autouse=True)
def recording_dir(tmp_path, monkeypatch):
    """Server-side recording is allowed under the test's own directory."""
    monkeypatch.setenv(RECORDING_DIR_ENV, str(tmp_path))


def test_wav_path_refused_unless_the_operator_allows_a_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(RECORDING_DIR_ENV)
    with pytest.raises(InvalidInput, match="recording is off"):
        recorded(pb.RecordingOptions(wav_path=str(tmp_path / "session.wav")))


def test_bad_wav_paths_are_rejected(tmp_path):
    with pytest.raises(InvalidInput, match="absolute"):
        recorded(pb.RecordingOptions(wav_path="session.wav"))
    with pytest.raises(InvalidInput, match="does not exist"):
        recorded(pb.RecordingOptions(wav_path=str(tmp_path / "missing" / "session.wav")))
    existing = tmp_path / "existing.wav"
    existing.write_bytes(b"keep me")
    with pytest.raises(InvalidInput, match="already exists"):
        recorded(pb.RecordingOptions(wav_path=str(existing)))
    assert existing.read_bytes() == b"keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InvalidInput, match="not writable"):
            recorded(pb.RecordingOptions(wav_path=str(locked / "session.wav")))


def test_recording_dir_confines_wav_path(tmp_path, monkeypatch):
    allowed, outside = tmp_path / "recordings", tmp_path / "elsewhere"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    monkeypatch.setenv(RECORDING_DIR_ENV, str(allowed))
    for path in (outside / "a.wav", allowed / ".." / "elsewhere" / "b.wav", allowed / "escape" / "c.wav", allowed):
        with pytest.raises(InvalidInput, match="outside"):
            recorded(pb.RecordingOptions(wav_path=str(path)))
    assert list(outside.iterdir()) == []
    (allowed / "day1").mkdir()
    recorder, _ = recorded(pb.RecordingOptions(wav_path=str(allowed / "day1" / "ok.wav")))
    recorder.close(START)
    assert read_wav(allowed / "day1" / "ok.wav")[1].shape == (0, 2)


def test_write_failure_stops_recording_but_not_the_session(tmp_path):
    recorder, events = recorded(pb.RecordingOptions(wav_path=str(tmp_path / "s.wav"), stream_audio=True))

    def disk_full(data):
        raise OSError(28, "No space left on device")

    recorder._wav.writeframes = disk_full
    recorder.user_audio(tone(0.5, 16000, hz=300), START + 0.5)
    recorder.bot_audio(tone(0.5, 24000, hz=300).tobytes(), START + 0.6)
    recorder.close(START + 1.5)
    errors = [event.error for event in events if event.WhichOneof("event") == "error"]
    assert len(errors) == 1 and not errors[0].fatal and "No space left" in errors[0].message
    assert len(stream_of(events)) == 6  # streaming went on: 1.5 s in 250 ms pieces
