"""A whole Session on in-memory service streams: the shell carries out the controller's effects
(stream writes, reply calls, playout, caller events) in the order the wire shows. No sockets:
the fakes below answer on the session's own event loop."""
from __future__ import annotations

import asyncio

from voicemesh.orchestrator.session import Session
from voicemesh.v1 import common_pb2, llm_pb2, orchestrator_pb2 as pb, stt_pb2, tts_pb2, vad_pb2


class FakeStream:
    """A bidi call: records what the session writes, yields what the test (or `answer`) puts."""

    def __init__(self, answer=None):
        self.written: list = []
        self.responses: asyncio.Queue = asyncio.Queue()
        self.answer = answer or (lambda message: [])
        self._cancelled = False

    async def write(self, message, urgent: bool = True) -> None:
        self.written.append(message)
        for response in self.answer(message):
            self.responses.put_nowait(response)

    async def done_writing(self) -> None:
        self.responses.put_nowait(None)

    def __aiter__(self):
        return self._read()

    async def _read(self):
        while (response := await self.responses.get()) is not None:
            yield response

    def cancel(self) -> bool:
        self._cancelled = True
        self.responses.put_nowait(None)
        return True

    def done(self) -> bool:
        return self._cancelled

    def cancelled(self) -> bool:
        return self._cancelled


def stt_answer(message: stt_pb2.RecognizeRequest) -> list:
    if message.HasField("finalize"):  # one final and one EndOfUtterance per Finalize
        turn_id = message.finalize.turn_id
        return [stt_pb2.RecognizeResponse(transcript=stt_pb2.Transcript(text="hello", is_final=True, turn_id=turn_id)),
                stt_pb2.RecognizeResponse(end_of_utterance=stt_pb2.EndOfUtterance(turn_id=turn_id))]
    return []


def llm_answer(message: llm_pb2.GenerateRequest) -> list:
    if message.HasField("chat"):
        return [llm_pb2.GenerateResponse(delta=llm_pb2.TextDelta(text="Hi there.")),
                llm_pb2.GenerateResponse(done=llm_pb2.Done(usage=llm_pb2.Usage(input_tokens=5, output_tokens=3))), None]
    return []


def tts_answer(chunks: int):
    """Each text piece is spoken as `chunks` pieces of 100 ms of audio (24 kHz), then SegmentDone."""
    def answer(message: tts_pb2.SynthesizeRequest) -> list:
        if not message.HasField("text"):
            return []
        segment = message.text.segment_id
        chunk = common_pb2.AudioChunk(data=bytes(4800))
        audio = tts_pb2.SynthesizeResponse(audio=tts_pb2.SegmentAudio(segment_id=segment, chunk=chunk))
        done = tts_pb2.SynthesizeResponse(segment_done=tts_pb2.SegmentDone(segment_id=segment, spoken_text=message.text.text))
        return [audio] * chunks + [done]

    return answer


class FakeClients:
    def __init__(self, tts_chunks: int = 1):
        self.vad = FakeStream()
        self.stt_stream = FakeStream(stt_answer)
        self.replies: list[tuple[str, FakeStream]] = []
        self.stt = type("Stt", (), {"Recognize": lambda _: self.stt_stream})()
        self.llm = type("Llm", (), {"Generate": lambda _, metadata: self._call("llm", llm_answer)})()
        self.tts = type("Tts", (), {"Synthesize": lambda _, metadata: self._call("tts", tts_answer(tts_chunks))})()

    def _call(self, kind, answer) -> FakeStream:
        self.replies.append((kind, FakeStream(answer)))
        return self.replies[-1][1]

    def open_vad_stream(self) -> FakeStream:
        return self.vad


def vad_event(**event) -> vad_pb2.DetectResponse:
    return vad_pb2.DetectResponse(**event)


async def _converse(config: pb.SessionConfig, script, tts_chunks: int = 1) -> tuple[list[str], FakeClients]:
    clients = FakeClients(tts_chunks)
    session = Session(config, clients)
    requests: asyncio.Queue = asyncio.Queue()

    async def request_iterator():
        while (request := await requests.get()) is not None:
            yield request

    runner = asyncio.ensure_future(session.run(request_iterator()))
    seen: list[str] = []

    async def until(kind: str) -> None:
        while True:
            message = await asyncio.wait_for(session.events.get(), 5)
            event = message.WhichOneof("event")
            seen.append(event if event != "speaking" else pb.SpeakingEvent.Kind.Name(message.speaking.kind))
            if seen[-1] == kind:
                return

    await script(clients, requests, until)
    await asyncio.wait_for(runner, 5)
    while not session.events.empty():
        message = session.events.get_nowait()
        if message is not None:
            seen.append(message.WhichOneof("event"))
    return seen, clients


async def test_a_spoken_turn_through_the_shell():
    async def script(clients, requests, until):
        await until("session_started")
        clients.vad.responses.put_nowait(vad_event(speech_started=vad_pb2.SpeechStarted(offset_ms=0)))
        await until("KIND_USER_STARTED")
        clients.vad.responses.put_nowait(vad_event(speech_stopped=vad_pb2.SpeechStopped(offset_ms=600)))
        await until("turn_ended")
        requests.put_nowait(pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession())))

    seen, clients = await _converse(pb.SessionConfig(session_id="w"), script)
    assert seen == ["session_started", "turn_started", "KIND_USER_STARTED", "KIND_USER_STOPPED", "user_transcript",
                    "KIND_BOT_STARTED", "audio", "bot_text", "KIND_BOT_STOPPED", "turn_ended", "session_ended"]
    stt_writes = [m.WhichOneof("request") for m in clients.stt_stream.written]
    assert stt_writes == ["config", "turn_start", "finalize"]
    assert [m.WhichOneof("request") for m in clients.vad.written] == ["config", "turn"]
    # The reply ran on the calls opened at the user's stop, before the final came.
    assert [kind for kind, _ in clients.replies] == ["llm", "tts"]
    assert clients.replies[0][1].written[0].chat.messages[-1].content == "hello"


async def test_barge_in_through_the_shell_cuts_the_reply_calls():
    async def script(clients, requests, until):
        await until("session_started")
        requests.put_nowait(pb.ConverseRequest(text=pb.TextInput(text="tell me a story")))
        await until("KIND_BOT_STARTED")
        clients.vad.responses.put_nowait(vad_event(speech_started=vad_pb2.SpeechStarted(offset_ms=100)))
        await until("KIND_USER_STARTED")
        requests.put_nowait(pb.ConverseRequest(control=pb.SessionControl(cancel=pb.CancelSession())))

    seen, clients = await _converse(pb.SessionConfig(session_id="w"), script, tts_chunks=20)  # 2 s of reply
    assert seen[:5] == ["session_started", "turn_started", "user_transcript", "KIND_BOT_STARTED", "audio"]
    assert "bot_text" not in seen  # cut before its segment was all sent
    cut = seen.index("KIND_BOT_STOPPED")
    assert seen[cut - 1] == "clear_playback" and seen[cut + 1:cut + 4] == ["turn_ended", "turn_started", "KIND_USER_STARTED"]
    assert seen[-2:] == ["turn_ended", "session_ended"]  # the new turn ends with the session
    assert all(call.cancelled() for _, call in clients.replies)
