"""SessionConfig checks against the backends, on the real orchestrator in front of the fake
services (each its own process): a voice the TTS service does not list, or a language the STT
service does not, is refused at config time with INVALID_ARGUMENT naming it and listing what
there is, before any session state (no SessionStarted); what they have is taken.

The Info answers are cached per endpoint and asked again on a miss, so a voice deployed since
is taken at once; an Info that cannot be fetched refuses nothing (the turn reports the failure).
For those two the orchestrator's TTS is `VoiceList`, a TTS service in this process (the real
wire protocol) whose voices the test changes and whose Info it can make fail.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from support import START_S, ConverseProbe, Processes, backend_env, event_is, fake_mesh, free_port, wait_serving
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb, tts_pb2, tts_pb2_grpc

LANGUAGES = "de-DE,en-US"  # what the fake STT's Info lists (details["languages"], as the Riva provider's)


class VoiceList(tts_pb2_grpc.TtsServiceServicer):
    """A TTS service whose Info lists `voices`, or fails while `down`; Synthesize is not offered
    (UNIMPLEMENTED), so a turn that reaches it fails visibly."""

    def __init__(self, voices: list[str]):
        self.voices, self.down, self.infos = list(voices), False, 0
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        tts_pb2_grpc.add_TtsServiceServicer_to_server(self, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def Info(self, request, context):
        with self._lock:
            self.infos += 1
            if self.down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the TTS replica is restarting")
            return tts_pb2.TtsServiceInfoResponse(info=common_pb2.ServiceInfo(service="tts", provider="list"),
                                                  voices=self.voices)


@pytest.fixture(scope="module")
def orchestrators(tmp_path_factory):
    """(the orchestrator over the fake mesh, the orchestrator whose TTS is a VoiceList, that VoiceList)."""
    procs = Processes(tmp_path_factory.mktemp("config-checks"))
    voices = VoiceList(["alto", "bass"])
    try:
        mesh = fake_mesh(procs, FakeScript(details={"languages": LANGUAGES}))
        port = free_port()
        proc = procs.serve("orchestrator", port, {**backend_env(mesh), "VOICEMESH_TTS_ADDR": voices.address},
                           name="orchestrator-voice-list")
        wait_serving(f"127.0.0.1:{port}", proc, START_S)
        yield mesh.orchestrator_address, f"127.0.0.1:{port}", voices
    finally:
        procs.stop_all()
        voices.server.stop(grace=None)


async def refused(address: str, **config) -> str:
    """A session with this config: it must be refused with INVALID_ARGUMENT before SessionStarted; the message."""
    async with ConverseProbe(address, pb.SessionConfig(**config)) as probe:
        await probe.wait_closed()
    assert probe.status == grpc.StatusCode.INVALID_ARGUMENT, (probe.status, probe.details)
    assert probe.kinds() == [], probe.kinds()
    return probe.details


async def answered(address: str, **config) -> None:
    """A session with this config starts and answers a typed turn."""
    async with ConverseProbe(address, pb.SessionConfig(**config)) as probe:
        await probe.send_text("hello")
        ended = (await probe.wait_for(event_is("turn_ended", turn_number=1))).turn_ended
        assert ended.reason == pb.TurnEnded.REASON_ANSWERED, probe.kinds()
        assert not probe.of("error"), probe.of("error")


async def test_an_unknown_voice_is_refused_naming_the_voices_there_are(orchestrators):
    address, _, _ = orchestrators
    message = await refused(address, voice="nobody")
    assert "voice 'nobody'" in message and "available: tone" in message, message
    await answered(address, voice="tone")  # the fake TTS's one voice
    await answered(address)  # no voice: the provider's default, nothing to check


@pytest.mark.parametrize("language,ok", [("fr-FR", False), ("en-GB", False), ("en", True), ("en-US", True), ("DE-de", True)])
async def test_a_language_the_stt_does_not_list_is_refused(orchestrators, language, ok):
    address, _, _ = orchestrators
    if ok:
        await answered(address, language=language)
        return
    message = await refused(address, language=language)
    assert f"language {language!r}" in message and "available: de-DE, en-US" in message, message


async def test_a_voice_deployed_since_is_taken_and_an_unreachable_info_refuses_nothing(orchestrators):
    _, address, voices = orchestrators
    message = await refused(address, voice="tenor")
    assert "voice 'tenor'" in message and "available: alto, bass" in message, message
    asked = voices.infos
    await refused(address, voice="tenor")  # a miss asks again (and the refusal still stands)
    assert voices.infos == asked + 1, (asked, voices.infos)
    voices.voices.append("tenor")  # deployed
    async with ConverseProbe(address, pb.SessionConfig(voice="tenor")) as probe:
        await probe.wait_for(lambda e: e.HasField("session_started"))
    voices.down = True  # Info fails: the config is not refused; the turn reports what is wrong
    async with ConverseProbe(address, pb.SessionConfig(voice="soprano")) as probe:
        await probe.wait_for(lambda e: e.HasField("session_started"))
        await probe.send_text("hello")
        ended = (await probe.wait_for(event_is("turn_ended", turn_number=1))).turn_ended
        assert ended.reason == pb.TurnEnded.REASON_REPLY_FAILED, probe.kinds()
        (error,) = probe.of("error")
        assert error.source == "llm/tts" and not error.fatal, error


@pytest.mark.parametrize("raw,expected", [("", 10.0), ("2.5", 2.5), ("0", 0.0), ("abc", None), ("-1", None), ("inf", None)])
def test_the_config_timeout_setting_is_checked_at_startup(monkeypatch, raw, expected):
    from voicemesh.orchestrator.service import CONFIG_TIMEOUT_ENV, config_timeout_secs

    monkeypatch.setenv(CONFIG_TIMEOUT_ENV, raw)
    if expected is not None:
        assert config_timeout_secs() == expected
        return
    with pytest.raises(ValueError, match=f"{CONFIG_TIMEOUT_ENV}={raw!r}: expected a number of seconds"):
        config_timeout_secs()
