"""Smart Turn: its features, the real model, the segmenter's held stops, and a real VAD service.

The model judges prosody, and the fixtures are synthetic speech, so no test relies on the
probability it gives them: the held-stop logic is driven by injected probabilities.
"""
from __future__ import annotations

import asyncio
import sys
import wave

import grpc
import numpy as np
import pytest
from faster_whisper.feature_extractor import FeatureExtractor

from conftest import FIXTURES
from support import START_S, Processes, free_port, wait_serving
from voicemesh.v1 import common_pb2, vad_pb2, vad_pb2_grpc
from voicemesh.vad import smart_turn
from voicemesh.vad.segmenter import EventKind, SegmenterParams, SpeechSegmenter
from voicemesh.vad.smart_turn import FRAMES, N_MELS, WINDOW_SAMPLES, SmartTurnModel, TurnGate

RATE = 16000
WINDOW = 512  # Silero's window: the segmenter counts in these
WINDOW_MS = WINDOW * 1000 // RATE
# stop: 6 windows; max: 94; SMART asks the model once per pause, RECHECK again every 12 windows
SMART = SegmenterParams(smart_turn=True, stop_secs=0.2, max_silence_secs=3.0, smart_turn_recheck_secs=0)
STOP_WINDOWS, MAX_WINDOWS = 6, 94
RECHECK = SegmenterParams(smart_turn=True, stop_secs=0.2, max_silence_secs=3.0, smart_turn_recheck_secs=0.4)


def read_fixture(name: str) -> np.ndarray:
    with wave.open(str(FIXTURES / name)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), np.int16)


def feed(segmenter: SpeechSegmenter, probabilities, first_window: int = 0) -> list:
    """Push windows at speaking volume; returns [(window index, event)]."""
    events = []
    for i, p in enumerate(probabilities, start=first_window):
        events += [(i, e) for e in segmenter.push((i + 1) * WINDOW, p, 0.85)]
    return events


# -- features --------------------------------------------------------------------------------


def test_fit_window_keeps_the_last_8_s_right_aligned():
    short = np.full(1000, 16384, np.int16)
    fitted = smart_turn.fit_window(short)
    assert fitted.shape == (WINDOW_SAMPLES,) and fitted.dtype == np.float32
    assert np.all(fitted[:-1000] == 0) and np.all(fitted[-1000:] == 0.5)
    long = np.arange(WINDOW_SAMPLES + 500, dtype=np.float32)
    assert np.array_equal(smart_turn.fit_window(long), long[500:])


def test_mel_filters_are_unit_area_triangles():
    filters = smart_turn.mel_filterbank()
    assert filters.shape == (N_MELS, 201) and filters.min() >= 0
    centres = filters.argmax(axis=1)
    assert np.all(np.diff(centres) >= 0) and centres[-1] > 190  # ordered, up to 8 kHz
    # Slaney normalisation: each triangle has unit area in Hz (bins are 40 Hz apart); the
    # narrow low bands are too coarsely sampled for the sum to show it.
    np.testing.assert_allclose(filters[50:].sum(axis=1) * 40.0, 1.0, rtol=0.03)


def test_features_of_silence_and_of_a_tone():
    silence = smart_turn.log_mel_features(np.zeros(WINDOW_SAMPLES, np.float32))
    assert silence.shape == (N_MELS, FRAMES) and silence.dtype == np.float32
    assert np.all(silence == -1.5)  # log10 floor 1e-10 -> -10 -> (-10 + 4) / 4
    t = np.arange(WINDOW_SAMPLES) / RATE
    tone = smart_turn.log_mel_features((0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert tone.max() - tone.min() == pytest.approx(2.0)  # the 80 dB clamp, scaled by 1/4
    centres_hz = np.fft.rfftfreq(400, 1 / RATE)[smart_turn.mel_filterbank().argmax(axis=1)]
    loudest = tone[:, 10:-10].argmax(axis=0)
    assert np.all(np.abs(centres_hz[loudest] - 1000) <= 80)  # the band around 1 kHz, in every frame


def test_features_match_faster_whispers_extractor():
    """An independent implementation (faster-whisper's numpy extractor, float32) on speech."""
    audio = smart_turn.fit_window(read_fixture("question_capital.wav"))
    normalised = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    reference = FeatureExtractor(chunk_length=8)(normalised.astype(np.float32), padding=0)
    ours = smart_turn.log_mel_features(audio)
    assert reference.shape == ours.shape == (N_MELS, FRAMES)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)


# -- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    path = smart_turn.find_model()
    assert path is not None and path.name == "smart-turn-v3.2-cpu.onnx"
    loaded = SmartTurnModel(path)
    asyncio.run(loaded.load())
    yield loaded
    asyncio.run(loaded.close())


@pytest.mark.models
async def test_model_scores_speech_and_silence_in_0_1(model):
    speech = read_fixture("two_questions.wav")[-WINDOW_SAMPLES:]
    assert np.abs(speech).max() > 5000
    scores = [await model.score(speech), await model.score(np.zeros(4000, np.int16))]
    assert all(0.0 <= s <= 1.0 for s in scores)
    # Deterministic, and int16 or float input is the same audio.
    assert await model.score(speech) == scores[0]
    assert await model.score(speech.astype(np.float32) / 32768) == pytest.approx(scores[0], abs=1e-6)


@pytest.mark.models
async def test_scoring_leaves_the_event_loop_free(model):
    ticks = 0
    task = asyncio.ensure_future(model.score(read_fixture("counting_long.wav")))
    while not task.done():
        ticks += 1
        await asyncio.sleep(0)
    assert 0 <= task.result() <= 1 and ticks > 1


def test_missing_model_file_means_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("VOICEMESH_SMART_TURN_MODEL", str(tmp_path / "nothing.onnx"))
    assert smart_turn.find_model() is None
    assert asyncio.run(SmartTurnModel.load_if_available()) is None


# -- held stops, with injected end-of-turn probabilities -------------------------------------


def test_without_smart_turn_stops_are_plain():
    segmenter = SpeechSegmenter(SegmenterParams(stop_secs=0.2))
    events = feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    assert [(i, e.kind) for i, e in events] == [(5, EventKind.STARTED), (25, EventKind.STOPPED)]
    assert (events[1][1].end_of_turn_probability, events[1][1].silence_fallback) == (0.0, False)


def test_confident_model_confirms_the_stop():
    segmenter = SpeechSegmenter(SMART)
    events = feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    assert [(i, e.kind) for i, e in events] == [(5, EventKind.STARTED), (25, EventKind.STOP_CANDIDATE)]
    assert segmenter.speaking  # undecided until resolved
    (stopped,) = segmenter.resolve_stop(0.5)  # the threshold itself confirms
    assert (stopped.kind, stopped.offset_ms, stopped.end_of_turn_probability, stopped.silence_fallback) == (
        EventKind.STOPPED, 20 * WINDOW_MS, 0.5, False)
    assert stopped.probability == pytest.approx(0.9)
    assert not segmenter.speaking
    assert segmenter.resolve_stop(0.9) == []  # nothing pending any more


def test_held_stop_falls_back_after_max_silence():
    segmenter = SpeechSegmenter(SMART)
    feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    assert segmenter.resolve_stop(0.2) == []
    assert segmenter.speaking
    silence_so_far = STOP_WINDOWS
    assert feed(segmenter, [0.0] * (MAX_WINDOWS - silence_so_far - 1), first_window=26) == []
    assert segmenter.speaking
    ((index, stopped),) = feed(segmenter, [0.0] * 5, first_window=20 + MAX_WINDOWS - 1)
    assert index == 20 + MAX_WINDOWS - 1  # max_silence_secs after the speech end
    assert (stopped.kind, stopped.offset_ms, stopped.silence_fallback) == (EventKind.STOPPED, 20 * WINDOW_MS, True)
    assert stopped.end_of_turn_probability == 0.2  # what the model said about this pause
    assert not segmenter.speaking


def test_a_held_stop_is_put_to_the_model_again_as_the_silence_grows():
    """Recheck on: every 0.4 s (12 windows) of further silence proposes the held stop again; a
    confident answer then ends the turn at the speech end, decided by the model, not the fallback."""
    segmenter = SpeechSegmenter(RECHECK)
    feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    assert segmenter.resolve_stop(0.2) == [] and segmenter.speaking
    events = feed(segmenter, [0.0] * 12, first_window=26)
    assert [(i, e.kind) for i, e in events] == [(37, EventKind.STOP_CANDIDATE)]
    assert segmenter.resolve_stop(0.3) == []  # still doubted: held again
    assert [(i, e.kind) for i, e in feed(segmenter, [0.0] * 12, first_window=38)] == [(49, EventKind.STOP_CANDIDATE)]
    (stopped,) = segmenter.resolve_stop(0.8)
    assert (stopped.kind, stopped.offset_ms, stopped.end_of_turn_probability, stopped.silence_fallback) == (
        EventKind.STOPPED, 20 * WINDOW_MS, 0.8, False)


def test_rechecks_end_at_the_silence_fallback():
    segmenter = SpeechSegmenter(RECHECK)
    events = feed(segmenter, [0.9] * 20 + [0.0] * MAX_WINDOWS)  # never answered: each candidate stays pending
    assert [e.kind for _, e in events] == [EventKind.STARTED, EventKind.STOP_CANDIDATE, EventKind.STOPPED]
    assert events[-1][1].silence_fallback
    segmenter = SpeechSegmenter(RECHECK)
    feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    segmenter.resolve_stop(0.1)
    candidates = 0
    for window in range(26, 20 + MAX_WINDOWS):  # every candidate doubted
        for event in feed(segmenter, [0.0], first_window=window):
            if event[1].kind is EventKind.STOP_CANDIDATE:
                candidates += 1
                segmenter.resolve_stop(0.1)
    assert candidates == (MAX_WINDOWS - STOP_WINDOWS - 1) // 12  # one per 0.4 s until the fallback
    assert not segmenter.speaking  # the fallback stopped it


def test_resumed_speech_continues_the_held_segment():
    segmenter = SpeechSegmenter(SMART)
    feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    segmenter.resolve_stop(0.1)
    events = feed(segmenter, [0.0] * 10 + [0.8] * 30 + [0.0] * STOP_WINDOWS, first_window=26)
    # No second STARTED: the pause was inside the turn. The next pause is proposed again.
    assert [(i, e.kind) for i, e in events] == [(71, EventKind.STOP_CANDIDATE)]
    (stopped,) = segmenter.resolve_stop(0.7)
    assert stopped.offset_ms == 66 * WINDOW_MS and not stopped.silence_fallback
    assert stopped.end_of_turn_probability == 0.7
    # The mean covers the whole segment, pause included.
    assert stopped.probability == pytest.approx((20 * 0.9 + 16 * 0.0 + 30 * 0.8) / 66)


def test_speech_before_the_answer_makes_the_candidate_moot():
    segmenter = SpeechSegmenter(SMART)
    feed(segmenter, [0.9] * 20 + [0.0] * STOP_WINDOWS)
    feed(segmenter, [0.9] * 3, first_window=26)
    assert segmenter.resolve_stop(0.99) == [] and segmenter.speaking


# -- TurnGate: what the scorer hears ---------------------------------------------------------


class FakeScorer:
    def __init__(self, *answers: float):
        self.answers, self.heard = list(answers), []

    async def __call__(self, audio: np.ndarray) -> float:
        self.heard.append(audio.copy())
        return self.answers.pop(0)


async def drive(gate: TurnGate, probabilities, first_window: int = 0) -> list:
    events = []
    for i, p in enumerate(probabilities, start=first_window):
        # Each sample holds the index of its window, so the scored audio shows where it came from.
        gate.append(np.full(WINDOW, i % 30000, np.int16))
        events += [(i, e) for e in await gate.push((i + 1) * WINDOW, p, 0.85)]
    return events


async def test_gate_scores_the_turn_up_to_the_proposed_stop():
    scorer = FakeScorer(0.3, 0.95)
    gate = TurnGate(SpeechSegmenter(SMART), scorer)
    probabilities = [0.0] * 100 + [0.9] * 20 + [0.0] * 10 + [0.9] * 20 + [0.0] * STOP_WINDOWS
    events = await drive(gate, probabilities)
    assert [(i, e.kind) for i, e in events] == [(105, EventKind.STARTED), (155, EventKind.STOPPED)]
    assert events[1][1].end_of_turn_probability == 0.95
    first, second = scorer.heard
    # The stream so far (under 8 s) up to the proposal, the stop_secs of silence included.
    assert first[0] == 0 and first[-1] == 125 and len(first) == 126 * WINDOW
    assert second[0] == 0 and second[-1] == 155 and len(second) == 156 * WINDOW


async def test_gate_hears_the_last_8_s_across_segments_and_plain_stops_without_scorer():
    scorer = FakeScorer(0.9, 0.8)
    probabilities = [0.9] * 100 + [0.0] * STOP_WINDOWS + [0.0] * 100 + [0.9] * 100 + [0.0] * STOP_WINDOWS
    events = await drive(TurnGate(SpeechSegmenter(SMART), scorer), probabilities)
    assert [e.kind for _, e in events] == [EventKind.STARTED, EventKind.STOPPED] * 2
    # The second turn hears the end of the first (windows up to 99): the stream's 8 s.
    second = scorer.heard[1]
    assert len(second) == WINDOW_SAMPLES and second[-1] == 311 and second[0] == 312 - WINDOW_SAMPLES // WINDOW
    plain = await drive(TurnGate(SpeechSegmenter(SegmenterParams(stop_secs=0.2)), None), [0.9] * 20 + [0.0] * 6)
    assert [e.kind for _, e in plain] == [EventKind.STARTED, EventKind.STOPPED]


# -- a real VAD service over gRPC ------------------------------------------------------------

PCM16_16K = common_pb2.AudioFormat(encoding=common_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=RATE, channels=1)


@pytest.fixture(scope="module")
def vad_services(tmp_path_factory):
    """Two VAD processes: one with Smart Turn, one whose model path points nowhere."""
    procs = Processes(tmp_path_factory.mktemp("smart-turn-vad"))
    try:
        ports = free_port(), free_port()
        started = [procs.serve("vad", ports[0]),
                   procs.start("vad-no-smart-turn", [sys.executable, "-m", "voicemesh.runtime.serve", "vad", "--host",
                                                     "127.0.0.1", "--port", str(ports[1])],
                               env={"VOICEMESH_SMART_TURN_MODEL": "/nonexistent.onnx"})]
        addresses = [f"127.0.0.1:{port}" for port in ports]
        for address, proc in zip(addresses, started, strict=True):
            wait_serving(address, proc, timeout=START_S)
        yield addresses
    finally:
        procs.stop_all()


def detect(address: str, config: vad_pb2.VadConfig, pcm: np.ndarray) -> list:
    def requests():
        yield vad_pb2.DetectRequest(config=config)
        for start in range(0, len(pcm), 960):  # 60 ms pieces, as the orchestrator sends
            yield vad_pb2.DetectRequest(audio=common_pb2.AudioChunk(data=pcm[start : start + 960].tobytes()))

    with grpc.insecure_channel(address) as channel:
        return list(vad_pb2_grpc.VadServiceStub(channel).Detect(requests(), timeout=180))


@pytest.mark.models
def test_service_with_smart_turn_ends_the_turn(vad_services):
    pcm = np.concatenate([read_fixture("question_capital.wav"), np.zeros(4 * RATE, np.int16)])
    config = vad_pb2.VadConfig(format=PCM16_16K, stop_secs=0.2, smart_turn=True, smart_turn_threshold=0.5,
                               max_silence_secs=3.0)
    events = detect(vad_services[0], config, pcm)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds and kinds == ["speech_started", "speech_stopped"] * (len(kinds) // 2)
    for started, stopped in zip(events[::2], events[1::2], strict=True):
        stop = stopped.speech_stopped
        # Either the model judged the turn complete or the silence ran out: never both, never neither.
        assert 0.0 <= stop.end_of_turn_probability <= 1.0
        assert (stop.end_of_turn_probability >= 0.5) != stop.silence_fallback
        assert stop.offset_ms > started.speech_started.offset_ms
        assert stop.duration_ms == stop.offset_ms - started.speech_started.offset_ms
    # The question is 0.5-1.98 s into the file: the last segment ends where it does.
    assert 1500 <= events[-1].speech_stopped.offset_ms <= 2400
    with grpc.insecure_channel(vad_services[0]) as channel:
        info = vad_pb2_grpc.VadServiceStub(channel).Info(vad_pb2.VadServiceInfoRequest(), timeout=10).info
    assert info.details["smart_turn"] == "smart-turn-v3.2-cpu"


@pytest.mark.models
def test_smart_turn_is_the_default_where_the_model_is(vad_services):
    pcm = np.concatenate([read_fixture("question_capital.wav"), np.zeros(4 * RATE, np.int16)])
    by_default = detect(vad_services[0], vad_pb2.VadConfig(format=PCM16_16K), pcm)[-1].speech_stopped
    assert by_default.end_of_turn_probability >= 0.5 and not by_default.silence_fallback  # the model decided
    switched_off = detect(vad_services[0], vad_pb2.VadConfig(format=PCM16_16K, smart_turn=False), pcm)[-1].speech_stopped
    assert switched_off.end_of_turn_probability == 0 and not switched_off.silence_fallback
    # Same speech end either way; only who decides it (and how soon) differs.
    assert abs(by_default.offset_ms - switched_off.offset_ms) <= 64


@pytest.mark.models
def test_service_without_the_model_refuses_smart_turn_only(vad_services):
    pcm = read_fixture("question_capital.wav")
    with pytest.raises(grpc.RpcError) as err:
        detect(vad_services[1], vad_pb2.VadConfig(format=PCM16_16K, smart_turn=True), pcm)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "VOICEMESH_SMART_TURN_MODEL" in err.value.details()
    # The same service still detects speech the plain way.
    events = detect(vad_services[1], vad_pb2.VadConfig(format=PCM16_16K), pcm)
    assert [e.WhichOneof("event") for e in events] == ["speech_started", "speech_stopped"]
    assert events[1].speech_stopped.end_of_turn_probability == 0 and not events[1].speech_stopped.silence_fallback


@pytest.mark.models
def test_service_rejects_max_silence_below_stop_secs(vad_services):
    config = vad_pb2.VadConfig(format=PCM16_16K, smart_turn=True, stop_secs=1.0, max_silence_secs=0.5)
    with pytest.raises(grpc.RpcError) as err:
        detect(vad_services[0], config, np.zeros(960, np.int16))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_silence_secs" in err.value.details()
