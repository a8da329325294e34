"""The orchestrator, as a separate process, in front of the real services with their fake providers.

Asserts exact event sequences (order and content, never speed).
"""
from __future__ import annotations

import numpy as np
import pytest

from support import PCM16_16K, ConverseProbe, event_is, silence, tone
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

Speaking = pb.SpeakingEvent


async def test_text_turn_event_sequence(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("hello there")
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert probe.kinds() == [
            "session_started",
            "turn_started",
            "user_transcript",
            "speaking:BOT_STARTED",
            "bot_text",
            "speaking:BOT_STOPPED",
            "turn_ended",
            "session_ended",
        ]
        assert [t.text for t in probe.of("bot_text")] == ["You said: hello there."]
        assert probe.of("session_ended")[0].reason == pb.SessionEnded.REASON_ENDED
        # The fake TTS makes ms_per_char (20) ms of audio per character of the sentence.
        audio_seconds = len(probe.audio_bytes()) / (24000 * 2)
        assert audio_seconds == pytest.approx(len("You said: hello there.") * 0.020, abs=0.05)
        assert probe.of("turn_ended")[0].interrupted is False


async def test_spoken_turn_event_sequence(fake_mesh):
    async with ConverseProbe(fake_mesh, pb.SessionConfig(input_format=PCM16_16K, interim_transcripts=True)) as probe:
        # 32 ms steps: the fake VAD scores 32 ms windows (as Silero does), the segmenter decides.
        await probe.send_audio(np.concatenate((silence(0.32), tone(0.64), silence(1.0))))
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        kinds = probe.kinds()
        # Interims come every 200 ms of audio, from the user's first words until the final.
        assert [k for k in kinds if k != "user_transcript:interim"] == [
            "session_started", "turn_started", "speaking:USER_STARTED", "speaking:USER_STOPPED",
            "user_transcript", "speaking:BOT_STARTED", "bot_text", "speaking:BOT_STOPPED", "turn_ended"]
        first_interim = kinds.index("user_transcript:interim")
        assert kinds.index("speaking:USER_STARTED") < first_interim < kinds.index("speaking:USER_STOPPED")
        started, stopped = [s for s in probe.of("speaking") if s.kind in (Speaking.KIND_USER_STARTED, Speaking.KIND_USER_STOPPED)]
        assert started.offset_ms == 320 and stopped.offset_ms == 960  # where the tone begins and ends
        final = probe.of("user_transcript")[-1]
        assert final.is_final and final.text
        assert probe.of("bot_text")[0].text == f"You said: {final.text}."
        assert probe.of("turn_ended")[0].latency_ms > 0


async def test_barge_in_cancels_reply_and_drops_audio(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("tell me a long story")
        await probe.wait_for(lambda e: e.HasField("audio") and e.audio.turn_number == 1)  # the bot is being heard
        await probe.send_audio(np.concatenate((tone(0.5), silence(1.0))))
        ended = await probe.wait_for(event_is("turn_ended", turn_number=1))
        assert ended.turn_ended.interrupted
        await probe.wait_for(event_is("turn_ended", turn_number=2))
        kinds = probe.kinds()
        # The caller is told to drop unplayed audio; the interrupted turn ends (bot stopped
        # first) before the new one starts.
        first_end = kinds.index("turn_ended")
        assert kinds[first_end - 2 : first_end + 2] == ["clear_playback", "speaking:BOT_STOPPED", "turn_ended", "turn_started"]
        assert probe.of("clear_playback")[0].turn_number == 1
        # What was not sent by then is dropped: no audio of turn 1 after ClearPlayback ...
        events = [event.WhichOneof("event") for _, event in probe.events]
        clear = events.index("clear_playback")
        assert not [e for _, e in probe.events[clear:] if e.HasField("audio") and e.audio.turn_number == 1]
        # ... and of the 30 queued sentences (20 ms of audio per character) only a part was sent.
        reply = " ".join(f"This is sentence number {n} of a long story." for n in range(1, 31))
        turn1_audio = sum(len(a.chunk.data) for a in probe.of("audio") if a.turn_number == 1) / 48000
        assert 0 < turn1_audio < len(reply) * 0.020
        spoken_turn1 = [t.text for t in probe.of("bot_text") if t.turn_number == 1]
        assert len(spoken_turn1) < 30


async def test_cancel_ends_at_once(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("tell me a long story")
        await probe.wait_for(event_is("speaking", kind=Speaking.KIND_BOT_STARTED))
        await probe.cancel()
        ended = await probe.wait_for(lambda e: e.HasField("session_ended"))
        assert ended.session_ended.reason == pb.SessionEnded.REASON_CANCELLED
        # The turn in flight is told it ended with the session, just before SessionEnded.
        (turn,) = probe.of("turn_ended")
        assert turn.reason == pb.TurnEnded.REASON_SESSION_ENDED and turn.interrupted
        assert probe.kinds()[-2:] == ["turn_ended", "session_ended"]


async def test_end_waits_for_reply(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("hello")
        await probe.end()
        await probe.wait_for(lambda e: e.HasField("session_ended"))
        kinds = probe.kinds()
        assert kinds.index("bot_text") < kinds.index("turn_ended") < kinds.index("session_ended")
        assert probe.of("session_ended")[0].reason == pb.SessionEnded.REASON_ENDED


async def test_history_reaches_llm(fake_mesh):
    async with ConverseProbe(fake_mesh) as probe:
        await probe.send_text("first")
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        await probe.send_text("second")
        await probe.wait_for(event_is("turn_ended", turn_number=2))
        assert [t.text for t in probe.of("bot_text")] == ["You said: first.", "You said: second."]


async def test_mulaw_8k_in_and_out(fake_mesh):
    mulaw = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_MULAW, sample_rate_hz=8000, channels=1)
    from voicemesh.runtime.audio import pcm16_to_mulaw

    async with ConverseProbe(fake_mesh, pb.SessionConfig(input_format=mulaw, output_format=mulaw)) as probe:
        speech = np.concatenate((silence(0.2, 8000), tone(0.6, 8000), silence(1.0, 8000)))
        encoded = np.frombuffer(pcm16_to_mulaw(speech), dtype=np.uint8)
        await probe.send_audio(encoded, rate=8000)
        await probe.wait_for(event_is("turn_ended", turn_number=1))
        # 8 kHz mu-law: one byte per sample.
        expected = len(probe.of("bot_text")[0].text) * 0.020 * 8000
        assert len(probe.audio_bytes()) == pytest.approx(expected, rel=0.05)
