"""The swap: one spoken conversation (two turns, the end-to-end fixture) with each cloud provider
swapped in turn into one service through one env var, the orchestrator and the other services
untouched, gives the same events as the embedded mesh.

Each swap redeploys one service process on the same port with VOICEMESH_<KIND>_PROVIDER set
(tests/cloud/swap_rig.py); its fake speaks the provider's real protocol to the real SDK, with
real content behind it: recognition by a Whisper STT service, speech by a hibari TTS service,
text by llama.cpp's own OpenAI-compatible server.
"""
from __future__ import annotations

import contextlib
import importlib.util

import pytest

from cloud.conftest import DUMMY_AWS
from cloud.fakes.backends import OpenAiChat, VoicemeshStt, VoicemeshTts
from cloud.swap_rig import SwapRig
from conftest import utterances
from support import START_S, ConverseProbe, Processes, event_is, free_port
from voicemesh.cli.mesh import wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.models]
REPLY_WAIT_S = 240  # a liveness bound for a reply on the embedded models behind a fake, not a speed claim
HAS_AZURE_SPEECH = importlib.util.find_spec("azure.cognitiveservices.speech") is not None
SWAPS = [
    ("stt", "riva"), ("stt", "aws"), ("stt", "azure"), ("stt", "deepgram"),
    ("tts", "riva"), ("tts", "polly"), ("tts", "azure"), ("tts", "elevenlabs"), ("tts", "cartesia"),
    ("llm", "openai"), ("llm", "azure-openai"), ("llm", "bedrock"),
]
# What the two turns must show, whatever the provider (the answers' wording may differ).
QUESTIONS = ("france", "japan")


def _fakes(stt: VoicemeshStt, tts: VoicemeshTts, chat: OpenAiChat, llama) -> tuple[list, dict[str, str]]:
    """Every fake provider, with the embedded models' content behind it, and the environment that
    points each provider at its fake (credentials included)."""
    from cloud.fakes.aws_transcribe import FakeTranscribe
    from cloud.fakes.bedrock import FakeBedrock
    from cloud.fakes.cartesia import FakeCartesia
    from cloud.fakes.deepgram import FakeDeepgram
    from cloud.fakes.elevenlabs import FakeElevenLabs
    from cloud.fakes.openai_sse import OpenAiSseFake
    from cloud.fakes.polly import FakePolly
    from cloud.fakes.riva import FakeRiva

    riva = FakeRiva(stt_backend=stt, tts_backend=tts)
    transcribe, polly = FakeTranscribe(backend=stt), FakePolly(backend=tts)
    deepgram, elevenlabs, cartesia = FakeDeepgram(backend=stt), FakeElevenLabs(backend=tts), FakeCartesia(backend=tts)
    azure_openai = OpenAiSseFake(backend=chat, azure=True, models=None)
    bedrock = FakeBedrock(backend=chat)
    fakes = [riva, transcribe, polly, deepgram, elevenlabs, cartesia, azure_openai, bedrock]
    if HAS_AZURE_SPEECH:
        from cloud.fakes.azure_speech import FakeAzureSpeech

        fakes.append(FakeAzureSpeech(stt=stt, tts=tts))
    for fake in fakes:
        fake.start()
    env = {
        **DUMMY_AWS,
        "VOICEMESH_STT_RIVA_ENDPOINT": riva.address, "VOICEMESH_TTS_RIVA_ENDPOINT": riva.address,
        **transcribe.service_env(), **polly.service_env(), **deepgram.env(), **elevenlabs.env(), **cartesia.env(),
        "VOICEMESH_LLM_OPENAI_BASE_URL": llama.base_url, "VOICEMESH_LLM_OPENAI_MODEL": llama.model,
        "OPENAI_API_KEY": llama.api_key,
        "VOICEMESH_LLM_AZURE_OPENAI_ENDPOINT": azure_openai.endpoint,
        "VOICEMESH_LLM_AZURE_OPENAI_DEPLOYMENT": azure_openai.deployment, "AZURE_OPENAI_API_KEY": azure_openai.api_key,
        **bedrock.env(),
    }
    if HAS_AZURE_SPEECH:
        env.update({**fakes[-1].env("stt"), **fakes[-1].env("tts")})
    return fakes, env


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    from cloud.fakes.openai_sse import start_llama_server

    procs = Processes(tmp_path_factory.mktemp("swap"))
    fakes: list = []
    llama = None
    try:
        # The content behind the fakes: a Whisper STT and a hibari TTS of their own, llama.cpp's server.
        ports = {"stt": free_port(), "tts": free_port()}
        backends = {kind: procs.serve(kind, port, name=f"backend-{kind}") for kind, port in ports.items()}
        llama = start_llama_server(threads=2, context=4096)
        for kind, proc in backends.items():
            wait_serving(f"127.0.0.1:{ports[kind]}", proc, timeout=START_S)
        chat = OpenAiChat(llama.base_url, llama.model, llama.api_key)
        stt, tts = VoicemeshStt(f"127.0.0.1:{ports['stt']}"), VoicemeshTts(f"127.0.0.1:{ports['tts']}")
        fakes, env = _fakes(stt, tts, chat, llama)
        yield SwapRig(procs, env).start()
    finally:
        procs.stop_all()
        for fake in fakes:
            with contextlib.suppress(Exception):
                fake.stop()
        if llama is not None:
            llama.stop()


async def _conversation(rig: SwapRig) -> ConverseProbe:
    """The two questions of two_questions.wav, the second once the first is answered."""
    from voicemesh.client import config_request

    first, second = utterances("two_questions.wav")
    async with ConverseProbe(rig.address("orchestrator"), config_request(client="voicemesh-swap-test").config) as probe:
        await probe.speak_until(first, event_is("turn_ended", turn_number=1), timeout=REPLY_WAIT_S)
        await probe.speak_until(second, event_is("turn_ended", turn_number=2), timeout=REPLY_WAIT_S)
    return probe


def _shape(probe: ConverseProbe) -> list[str]:
    """The events of a conversation, as a sequence a provider must not change: streaming detail
    (how many interims, text deltas, audio chunks, metrics) collapsed, the order kept. TurnDelayed
    reports a final later than 2 s, which depends on the machine's load, not on the provider."""
    shape: list[str] = []
    for kind in probe.kinds():
        if kind in ("user_transcript:interim", "metrics", "turn_delayed") or (shape and shape[-1] == kind):
            continue
        shape.append(kind)
    return shape


def _check_turns(probe: ConverseProbe, label: str) -> None:
    ended = [t.turn_number for t in probe.of("turn_ended")]
    assert ended == [1, 2], f"{label}: turns ended {ended}; events {probe.kinds()}"
    for number, topic in zip((1, 2), QUESTIONS, strict=True):
        finals = " ".join(t.text for t in probe.of("user_transcript") if t.is_final and t.turn_number == number).lower()
        assert topic in finals, f"{label}: turn {number} heard {finals!r}"
        reply = "".join(t.text for t in probe.of("bot_text") if t.turn_number == number)
        assert reply.strip(), f"{label}: turn {number} got no reply text; events {probe.kinds()}"
    assert len(probe.audio_bytes()) > 16000, f"{label}: almost no reply audio ({len(probe.audio_bytes())} bytes)"
    assert not probe.of("error"), f"{label}: errors {[(e.source, e.code, e.message) for e in probe.of('error')]}"


_BASELINE: list[list[str]] = []  # the embedded mesh's conversation shape, once per module


async def _baseline(rig: SwapRig) -> list[str]:
    if not _BASELINE:
        for kind in ("stt", "llm", "tts"):
            rig.use(kind, "")
        probe = await _conversation(rig)
        _check_turns(probe, "embedded")
        _BASELINE.append(_shape(probe))
    return _BASELINE[0]


@pytest.mark.parametrize("kind, provider", SWAPS, ids=[f"{k}-{p}" for k, p in SWAPS])
async def test_one_provider_swapped_in_gives_the_same_conversation(rig, kind, provider):
    if provider == "azure" and not HAS_AZURE_SPEECH:
        pytest.skip("the Azure Speech SDK (proprietary, not in the default install) is not installed; make test adds it")
    baseline = await _baseline(rig)
    for other in ("stt", "llm", "tts"):
        if other != kind:
            rig.use(other, "")  # every other service back on its embedded provider
    rig.use(kind, provider)
    probe = await _conversation(rig)
    label = f"{kind}={provider}"
    _check_turns(probe, label)
    assert _shape(probe) == baseline, f"{label}: events differ from the embedded mesh's"
