"""Client pieces that need no server: WAV input, speech timing, pacing, result folding, launcher guards."""
from __future__ import annotations

import argparse
import json
import socket
import wave
from pathlib import Path

import numpy as np
import pytest

from voicemesh.cli import commands, mesh as launcher, up as up_command
from voicemesh.client.session import SessionTracker, TalkResult, TurnResult
from voicemesh.v1 import common_pb2
from voicemesh.v1 import orchestrator_pb2 as pb
from voicemesh.client.wavio import (
    assign_latencies, chunk_send_times, load_for_sending, read_wav, send_time, speech_segments, write_wav,
)

RATE = 16000
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tone(seconds: float, freq: float = 440.0, amplitude: float = 0.5, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return amplitude * np.sin(2 * np.pi * freq * t)


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(round(seconds * rate)))


def write_pcm_wav(path, channels: list[np.ndarray], rate: int) -> None:
    """Float channels in [-1, 1] -> interleaved PCM16 WAV."""
    interleaved = np.stack(channels, axis=1).reshape(-1)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(len(channels))
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.round(interleaved * 32767).astype("<i2").tobytes())


def amplitude_at(samples: np.ndarray, freq: float, rate: int = RATE) -> float:
    """Amplitude of a sinusoid at `freq` (Hann-windowed FFT, normalised)."""
    window = np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(samples * window)) / window.sum() * 2
    return float(spectrum[int(round(freq * len(samples) / rate))])


# -- speech segments ---------------------------------------------------------------------------


def test_tone_bursts_become_segments_and_short_gaps_merge():
    rng = np.random.default_rng(0)
    # 0.3 s quiet | 0.5 s tone | 0.15 s gap | 0.4 s tone | 1.0 s quiet | 0.6 s tone | 0.5 s quiet
    signal = np.concatenate([
        silence(0.3), tone(0.5), silence(0.15), tone(0.4), silence(1.0), tone(0.6, 300), silence(0.5),
    ])
    signal += rng.normal(0, 0.001, len(signal))  # a noise floor 50 dB below the tones
    pcm16 = np.round(signal * 32767).astype(np.int16)

    segments = speech_segments(pcm16, RATE)

    assert len(segments) == 2, [(s.start_ms, s.end_ms) for s in segments]
    first, second = segments
    # Boundaries are exact to one 20 ms frame.
    assert first.start_ms == pytest.approx(300, abs=20) and first.end_ms == pytest.approx(1350, abs=20)
    assert second.start_ms == pytest.approx(2350, abs=20) and second.end_ms == pytest.approx(2950, abs=20)


def test_gap_longer_than_merge_threshold_splits_and_the_threshold_is_honoured():
    signal = np.concatenate([silence(0.2), tone(0.4), silence(0.45), tone(0.4), silence(0.2)])
    assert len(speech_segments(signal, RATE, merge_gap_ms=300)) == 2
    assert len(speech_segments(signal, RATE, merge_gap_ms=600)) == 1


def test_silence_and_clicks_are_not_speech():
    assert speech_segments(np.zeros(RATE, dtype=np.int16), RATE) == []
    click = np.concatenate([silence(0.5), tone(0.01), silence(0.5), tone(0.3), silence(0.2)])
    segments = speech_segments(click, RATE)
    assert len(segments) == 1 and segments[0].start_ms == pytest.approx(1010, abs=20)


def test_fixture_speech_matches_its_annotation():
    annotation = json.loads((FIXTURES / "fixtures.json").read_text())["two_questions.wav"]
    segments = speech_segments(load_for_sending(FIXTURES / "two_questions.wav"), RATE)
    assert len(segments) == len(annotation)
    for segment, spoken in zip(segments, annotation, strict=False):
        assert segment.start_ms == pytest.approx(spoken["start_ms"], abs=60)
        assert segment.end_ms == pytest.approx(spoken["end_ms"], abs=60)


# -- WAV input ---------------------------------------------------------------------------------


def test_stereo_44k_is_mixed_to_mono_and_resampled_to_16k(tmp_path):
    path = tmp_path / "stereo.wav"
    # Left 440 Hz at 0.6, right 1000 Hz at 0.2: the mono mix has both at half amplitude.
    write_pcm_wav(path, [tone(1.0, 440, 0.6, 44100), tone(1.0, 1000, 0.2, 44100)], 44100)

    samples = load_for_sending(path)

    assert samples.dtype == np.int16
    assert abs(len(samples) - RATE) <= 2
    as_float = samples.astype(np.float64) / 32768
    assert amplitude_at(as_float, 440) == pytest.approx(0.3, rel=0.03)
    assert amplitude_at(as_float, 1000) == pytest.approx(0.1, rel=0.03)
    assert amplitude_at(as_float, 3000) < 0.002  # nothing invented in between


def test_16k_mono_pcm16_passes_through_unchanged(tmp_path):
    original = np.round(tone(0.5, 523.0, 0.4) * 32767).astype(np.int16)
    path = tmp_path / "mono.wav"
    write_wav(path, original, RATE)
    assert np.array_equal(load_for_sending(path), original)


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_every_integer_sample_width_reads_to_the_same_scale(tmp_path, width):
    values = np.array([0.0, 0.5, -0.5, 0.25, -0.999])
    scale = {1: 127, 2: 32767, 3: 8388607, 4: 2147483647}[width]
    ints = np.round(values * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()  # 8-bit WAV is unsigned
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints)
    path = tmp_path / f"w{width}.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(width)
        wav.setframerate(8000)
        wav.writeframes(raw)
    samples, rate = read_wav(path)
    assert rate == 8000
    np.testing.assert_allclose(samples, values, atol=1.5 / scale + 1e-6)


def test_non_pcm_wav_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "not.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(ValueError, match="ffmpeg"):
        read_wav(path)


# -- pacing and latency ------------------------------------------------------------------------


def test_send_schedule_does_not_drift():
    chunk = 0.04
    times = chunk_send_times(100_000, chunk, start=1000.0)  # over an hour of 40 ms chunks
    assert times[0] == pytest.approx(1000.04, abs=1e-9)  # a chunk leaves once it is "recorded"
    assert times[-1] == pytest.approx(1000.0 + 100_000 * chunk, abs=1e-6)
    gaps = np.diff(times)
    assert np.all(np.abs(gaps - chunk) < 1e-6)
    # Any chunk's time depends only on its index, never on when earlier chunks went out.
    assert send_time(1000.0, 99_999, chunk) == times[-1]


def test_latency_is_measured_from_each_utterance_end_to_its_reply():
    # Two turns; the first reply arrives 0.8 s after speech ends, the second 0.6 s after.
    assert assign_latencies([1.0, 5.0], {1: 1.8, 2: 5.6}) == pytest.approx({1: 800.0, 2: 600.0})
    # One utterance with a pause (two segments, one turn): timed from the later end.
    assert assign_latencies([1.0, 1.5], {1: 2.0}) == pytest.approx({1: 500.0})
    # A slow first reply that starts while the user speaks again is not the second's answer.
    assert assign_latencies([1.0, 5.0], {1: 4.0, 2: 5.7}) == pytest.approx({1: 3000.0, 2: 700.0})
    # No reply after the last utterance: no latency for it.
    assert assign_latencies([1.0, 9.0], {1: 1.5}) == pytest.approx({1: 500.0})


# -- results -----------------------------------------------------------------------------------


def events() -> list[pb.ConverseResponse]:
    audio = lambda n: pb.ConverseResponse(audio=pb.BotAudio(  # noqa: E731
        chunk=common_pb2.AudioChunk(data=bytes(960 * 2)), turn_number=n))
    return [
        pb.ConverseResponse(session_started=pb.SessionStarted(
            session_id="s-1", output_format=common_pb2.AudioFormat(encoding=1, sample_rate_hz=24000))),
        pb.ConverseResponse(turn_started=pb.TurnStarted(turn_number=1)),
        pb.ConverseResponse(speaking=pb.SpeakingEvent(kind=pb.SpeakingEvent.KIND_USER_STARTED, turn_number=1)),
        pb.ConverseResponse(user_transcript=pb.UserTranscript(text="what is", is_final=False, turn_number=1)),
        pb.ConverseResponse(speaking=pb.SpeakingEvent(kind=pb.SpeakingEvent.KIND_USER_STOPPED, turn_number=1)),
        pb.ConverseResponse(user_transcript=pb.UserTranscript(text=" What is the capital of France? ", is_final=True,
                                                              turn_number=1)),
        *[audio(1) for _ in range(25)],
        pb.ConverseResponse(bot_text=pb.BotText(text="The capital of France is Paris.", turn_number=1)),
        pb.ConverseResponse(bot_text=pb.BotText(text="It is lovely.", turn_number=1)),
        pb.ConverseResponse(turn_ended=pb.TurnEnded(turn_number=1, latency_ms=640.25)),
        pb.ConverseResponse(turn_started=pb.TurnStarted(turn_number=2)),
    ]


async def test_tracker_folds_events_into_turns_and_waits_for_open_turns():
    tracker = SessionTracker()
    for response in events():
        tracker.handle(response)
    assert not tracker.reply_complete(None)  # turn 2 started and has not ended
    tracker.handle(pb.ConverseResponse(turn_ended=pb.TurnEnded(turn_number=2, interrupted=True)))
    assert tracker.reply_complete(None)
    assert not tracker.reply_complete(tracker.last_turn_end + 1.0)  # speech after the last turn ended

    result = tracker.finish()
    assert result.session_id == "s-1"
    assert result.user_transcripts == ["What is the capital of France?"]  # finals only, trimmed
    assert [t.number for t in result.turns] == [1, 2]
    assert result.turns[0].bot_text == "The capital of France is Paris. It is lovely."
    assert result.turns[0].server_latency_ms == pytest.approx(640.25)
    assert result.turns[1].interrupted and result.turns[1].server_latency_ms is None
    assert result.audio_seconds == pytest.approx(1.0)  # 25 chunks of 40 ms at 24 kHz
    assert 1 in tracker.first_audio and 2 not in tracker.first_audio


def test_json_output_shape():
    result = TalkResult(session_id="abc", user_transcripts=["hello"], bot_audio=bytearray(24000 * 2 * 3 // 2))
    result.turns = [
        TurnResult(1, "hello", "Hi there.", latency_ms=812.345, server_latency_ms=640.0, reason="ANSWERED"),
        TurnResult(2, "", "", latency_ms=None, server_latency_ms=None, interrupted=True, reason="INTERRUPTED", delayed=True),
    ]
    report = json.loads(json.dumps(result.to_json()))
    assert set(report) == {"user_transcripts", "bot_texts", "turns", "audio_seconds", "session_id"}
    assert report["user_transcripts"] == ["hello"] and report["bot_texts"] == ["Hi there."]
    assert report["audio_seconds"] == pytest.approx(1.5) and report["session_id"] == "abc"
    assert report["turns"][0] == {
        "number": 1, "user_transcript": "hello", "bot_text": "Hi there.",
        "latency_ms": 812.3, "server_latency_ms": 640.0, "interrupted": False, "reason": "ANSWERED", "delayed": False,
    }
    assert report["turns"][1]["latency_ms"] is None and report["turns"][1]["interrupted"] is True
    assert report["turns"][1]["reason"] == "INTERRUPTED" and report["turns"][1]["delayed"] is True


def test_result_ok_only_when_the_session_ended_cleanly():
    assert TalkResult(end_reason="ENDED").ok
    assert not TalkResult(end_reason="ERROR").ok
    assert not TalkResult(end_reason="ENDED", failure="UNAVAILABLE: down").ok
    assert not TalkResult().ok  # no SessionEnded at all


# -- CLI and launcher guards -------------------------------------------------------------------


def test_cli_parsers_take_the_documented_flags():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    commands.add_parsers(sub)
    up_command.add_parser(sub)
    talk = parser.parse_args(["talk", "in.wav", "--out", "r.wav", "--json", "--wait-after", "5", "--voice", "v"])
    assert (talk.wav, talk.out, talk.json, talk.wait_after, talk.voice) == ("in.wav", "r.wav", True, 5.0, "v")
    assert talk.system_prompt == "" and callable(talk.handler)  # empty: the orchestrator's default prompt
    up = parser.parse_args(["up", "--port", "6000", "--stt-port", "6003", "--chat"])
    assert (up.port, up.stt_port, up.vad_port, up.chat) == (6000, 6003, 50052, True)


def test_mesh_refuses_a_busy_port_before_starting_anything(tmp_path):
    ports = launcher.free_ports()
    assert len(set(ports.values())) == len(ports)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["stt"]))
        busy.listen()
        assert launcher.port_in_use("127.0.0.1", ports["stt"])
        mesh = launcher.Mesh(ports=ports, log_dir=tmp_path)
        with pytest.raises(launcher.MeshError, match="stt"):
            mesh.start()
    assert all(child.process is None for child in mesh.children.values())
    assert not launcher.port_in_use("127.0.0.1", ports["stt"])
