"""End to end on the embedded models: every service a separate process, real gRPC on loopback."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, utterances
from support import ConverseProbe, event_is
from voicemesh.v1 import orchestrator_pb2 as pb

pytestmark = [pytest.mark.e2e, pytest.mark.models]
REPLY_WAIT_S = 180  # deadline for a reply on the embedded models: generous, no speed is asserted


def _config() -> pb.SessionConfig:
    from voicemesh.client import config_request

    return config_request(client="voicemesh-tests").config


def _finals(probe: ConverseProbe, turn_number: int) -> str:
    return " ".join(t.text for t in probe.of("user_transcript") if t.is_final and t.turn_number == turn_number).lower()


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
         "--addr", real_mesh.orchestrator_address, "--out", str(reply), "--json", "--wait-after", str(REPLY_WAIT_S)],
        capture_output=True, text=True, timeout=REPLY_WAIT_S + 300, cwd=ROOT,
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


async def test_two_turn_conversation_keeps_history(real_mesh):
    """The second question (two_questions.wav) once the first is answered, as a user would."""
    first, second = utterances("two_questions.wav")
    async with ConverseProbe(real_mesh.orchestrator_address, _config()) as probe:
        await probe.speak_until(first, event_is("turn_ended", turn_number=1), timeout=REPLY_WAIT_S)
        await probe.speak_until(second, event_is("turn_ended", turn_number=2), timeout=REPLY_WAIT_S)
    assert [t.turn_number for t in probe.of("turn_ended")] == [1, 2], probe.kinds()
    assert "france" in _finals(probe, 1) and "japan" in _finals(probe, 2), probe.of("user_transcript")
    assert all(any(t.turn_number == n for t in probe.of("bot_text")) for n in (1, 2)), probe.kinds()


async def test_barge_in_on_the_embedded_models(real_mesh):
    """The user talks over the bot's answer (barge_in.wav's second sentence, said once the bot
    is speaking): the answer is cut, and the new question answered."""
    ask, interrupt = utterances("barge_in.wav")

    async with ConverseProbe(real_mesh.orchestrator_address, _config()) as probe:
        def answered_after_the_first(event: pb.ConverseResponse) -> bool:  # a later turn the bot spoke to the end
            ended = event.turn_ended if event.HasField("turn_ended") else None
            return (ended is not None and ended.turn_number > 1 and not ended.interrupted
                    and any(t.turn_number == ended.turn_number for t in probe.of("bot_text")))

        await probe.speak_until(ask, event_is("speaking", kind=pb.SpeakingEvent.KIND_BOT_STARTED, turn_number=1),
                                timeout=REPLY_WAIT_S)
        last = (await probe.speak_until(interrupt, answered_after_the_first, timeout=REPLY_WAIT_S)).turn_ended.turn_number
    ended = {t.turn_number: t for t in probe.of("turn_ended")}
    assert "paris" in _finals(probe, 1), probe.of("user_transcript")
    assert ended[1].interrupted, probe.kinds()
    assert "berlin" in _finals(probe, last), probe.of("user_transcript")
