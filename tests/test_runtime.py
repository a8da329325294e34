"""The shared runtime: model assembly, audio formats, configuration, stream helpers."""
from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest

from voicemesh.runtime import audio, models
from voicemesh.runtime.config import ServeSettings
from voicemesh.runtime.errors import InvalidInput
from voicemesh.runtime.streams import with_reader
from voicemesh.v1 import common_pb2


@pytest.fixture
def part_package(tmp_path, monkeypatch):
    """A throwaway installed package carrying two model parts."""
    package = tmp_path / "site" / "fake_model_parts"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data" / "a.bin").write_bytes(b"hello " * 1000)
    (package / "data" / "b.bin").write_bytes(b"world" * 1000)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("VOICEMESH_MODEL_DIR", str(tmp_path / "models"))
    joined = b"hello " * 1000 + b"world" * 1000
    return joined


def _spec(joined: bytes, sha: str | None = None) -> models.ModelSpec:
    return models.ModelSpec(
        name="fake", env_var="VOICEMESH_FAKE_MODEL", licence="MIT", upstream="test",
        parts=(models.PartSource("fake_model_parts", "data/a.bin"), models.PartSource("fake_model_parts", "data/b.bin")),
        output="fake/model.bin", size_bytes=len(joined), sha256=sha or hashlib.sha256(joined).hexdigest(),
    )


def test_assemble_joins_parts_in_order_and_checks_sha256(part_package, tmp_path):
    target = models.assemble(_spec(part_package))
    assert target.read_bytes() == part_package
    assert not list(target.parent.glob("*.partial"))


def test_assemble_rejects_a_wrong_hash_and_leaves_nothing(part_package):
    with pytest.raises(RuntimeError, match="sha256"):
        models.assemble(_spec(part_package, sha="0" * 64))
    assert not (models.model_dir() / "fake" / "model.bin").exists()


def test_model_path_env_override(monkeypatch, tmp_path):
    from voicemesh.llm.models import QWEN_05B

    monkeypatch.setenv("VOICEMESH_LLM_MODEL", str(tmp_path / "mine.gguf"))
    assert models.model_path(QWEN_05B) == tmp_path / "mine.gguf"


def test_model_dir_is_a_data_directory_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv("VOICEMESH_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert models.model_dir() == tmp_path / "data" / "voicemesh" / "models"
    monkeypatch.setenv("VOICEMESH_MODEL_DIR", str(tmp_path / "mine"))
    assert models.model_dir() == tmp_path / "mine"


def test_a_missing_model_says_how_to_set_it_up(part_package):
    spec = _spec(part_package)
    with pytest.raises(FileNotFoundError, match="voicemesh-models setup") as error:
        models.model_path(spec)
    assert "VOICEMESH_FAKE_MODEL" in str(error.value)
    models.setup((spec,))
    assert models.model_path(spec) == models.model_dir() / "fake" / "model.bin"


def test_each_service_declares_only_its_own_models():
    from voicemesh.runtime.serve import load_definition

    names = {kind: {spec.name for spec in load_definition(kind).models} for kind in ("vad", "stt", "llm", "tts", "orchestrator")}
    assert names == {"vad": {"silero-vad", "smart-turn"}, "stt": {"whisper-base"}, "llm": {"qwen2.5-0.5b-instruct"},
                     "tts": set(), "orchestrator": set()}


def test_mulaw_decode_matches_g711_reference_points():
    # G.711 mu-law: 0xFF and 0x7F are zero; 0x80 and 0x00 are the extremes.
    decoded = audio.mulaw_to_pcm16(bytes([0xFF, 0x7F, 0x80, 0x00]))
    assert decoded.tolist() == [0, 0, 32124, -32124]
    ramp = np.linspace(-32000, 32000, 2001).astype(np.int16)
    back = audio.mulaw_to_pcm16(audio.pcm16_to_mulaw(ramp)).astype(np.int32)
    assert np.all(np.abs(back - ramp) <= np.abs(ramp) * 0.07 + 8)  # 8-bit log quantisation


@pytest.mark.parametrize(
    "fmt, message",
    [
        (common_pb2.AudioFormat(encoding=0, sample_rate_hz=16000), "unsupported encoding"),
        (common_pb2.AudioFormat(encoding=1, sample_rate_hz=7999), "outside 8000-48000"),
        (common_pb2.AudioFormat(encoding=1, sample_rate_hz=48001), "outside 8000-48000"),
        (common_pb2.AudioFormat(encoding=1, sample_rate_hz=16000, channels=2), "2 channels"),
    ],
)
def test_bad_formats_are_rejected(fmt, message):
    with pytest.raises(InvalidInput, match=message):
        audio.validate_format(fmt, "test")


def test_inbound_audio_resamples_and_mixes_stereo():
    fmt = common_pb2.AudioFormat(encoding=1, sample_rate_hz=48000, channels=2)
    inbound = audio.InboundAudio(fmt, 16000, "test", max_channels=2)
    left = (np.sin(np.arange(4800) / 10) * 10000).astype(np.int16)
    stereo = np.stack((left, left), axis=1).reshape(-1)
    out = np.concatenate([inbound.convert(stereo[i : i + 1920].tobytes()) for i in range(0, len(stereo), 1920)])
    assert 1400 <= len(out) <= 1600  # 0.1 s at 16 kHz, less the streaming resampler's ~8 ms delay
    with pytest.raises(InvalidInput, match="whole number"):
        inbound.convert(b"\x00" * 6)


def test_settings_precedence(monkeypatch):
    monkeypatch.setenv("VOICEMESH_GRACE_SECONDS", "3")
    monkeypatch.setenv("VOICEMESH_STT_GRACE_SECONDS", "7")
    monkeypatch.setenv("VOICEMESH_PORT", "6000")
    assert ServeSettings.load("stt").grace_seconds == 7.0  # the per-kind variable wins
    assert ServeSettings.load("tts").grace_seconds == 3.0
    assert ServeSettings.load("tts", {"port": 7000}).port == 7000  # and a CLI flag wins over both
    assert ServeSettings.load("tts").port == 6000


async def test_with_reader_raises_reader_errors_while_results_wait():
    async def failing_reader():
        await asyncio.sleep(0.01)
        raise InvalidInput("bad chunk")

    async def never():
        await asyncio.Event().wait()
        yield None

    with pytest.raises(InvalidInput, match="bad chunk"):
        async for _ in with_reader(failing_reader(), never()):
            pass


async def test_with_reader_drains_results_after_a_clean_reader():
    async def reader():
        return None

    async def results():
        for value in range(3):
            await asyncio.sleep(0.01)
            yield value

    assert [v async for v in with_reader(reader(), results())] == [0, 1, 2]
