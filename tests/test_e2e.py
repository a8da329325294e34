"""End to end on the embedded models: every service a separate process, real gRPC on loopback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.models]


def _non_silent_seconds(pcm: bytes, rate: int) -> float:
    """Seconds of audio in 20 ms frames louder than -40 dBFS."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    frame = rate // 50
    frames = samples[: len(samples) // frame * frame].reshape(-1, frame)
    rms = np.sqrt((frames**2).mean(axis=1))
    return float((rms > 32768 * 10 ** (-40 / 20)).sum() * 0.02)


def test_spoken_question_gets_spoken_answer(real_mesh, tmp_path):
    """`voicemesh talk` on the fixture: transcript, reply text and reply audio."""
    reply = tmp_path / "reply.wav"
    result = subprocess.run(
        [sys.executable, "-m", "voicemesh.cli", "talk", str(FIXTURES / "question_capital.wav"),
         "--addr", real_mesh.orchestrator_address, "--out", str(reply), "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    transcript = " ".join(report["user_transcripts"]).lower()
    assert "capital" in transcript and "france" in transcript
    reply_text = " ".join(report["bot_texts"])
    assert reply_text.strip()
    assert "paris" in reply_text.lower()
    assert len(report["turns"]) == 1 and report["turns"][0]["latency_ms"] > 0
    import wave

    with wave.open(str(reply)) as wav:
        pcm, rate = wav.readframes(wav.getnframes()), wav.getframerate()
    assert _non_silent_seconds(pcm, rate) > 0.5
    assert report["audio_seconds"] > 0.5


def test_two_turn_conversation_keeps_history(real_mesh):
    from voicemesh.talk import talk_session
    from voicemesh.wavio import load_for_sending
    import asyncio

    samples = load_for_sending(FIXTURES / "two_questions.wav")
    result = asyncio.run(talk_session(real_mesh.orchestrator_address, samples))
    assert len(result.turns) == 2
    transcripts = " ".join(t.user_transcript for t in result.turns).lower()
    assert "france" in transcripts and "japan" in transcripts
    assert all(t.bot_text for t in result.turns)


def test_barge_in_on_the_embedded_models(real_mesh):
    """The user talks over the bot's answer: the answer is cut, and the new question answered."""
    from voicemesh.talk import talk_session
    from voicemesh.wavio import load_for_sending
    import asyncio

    result = asyncio.run(talk_session(real_mesh.orchestrator_address, load_for_sending(FIXTURES / "barge_in.wav")))
    assert len(result.turns) >= 2, result.to_json()
    first, last = result.turns[0], result.turns[-1]
    assert "paris" in first.user_transcript.lower()
    assert first.interrupted, result.to_json()
    assert "berlin" in last.user_transcript.lower()
    assert not last.interrupted and last.bot_text
