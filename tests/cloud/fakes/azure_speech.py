"""A fake Azure AI Speech service: the Speech SDK's websocket protocol (USP) for recognition and
synthesis, and the REST calls a probe and a voice list make, on 127.0.0.1 (aiohttp).

The real SDK (azure-cognitiveservices-speech) connects to it with `SpeechConfig(host=self.host)`.
Wire protocol, as the SDK speaks it:
- Handshake `GET` with subprotocol `USP`, the key in `Ocp-Apim-Subscription-Key` (or
  `Authorization: Bearer <token>`), `X-ConnectionId`. A refused handshake is an HTTP status;
  the STT SDK retries 429/404/5xx a few times with the same X-ConnectionId, so a failure sticks
  to that connection id (the real service keeps refusing a retry that soon too). The TTS SDK
  retries a 429 handshake with a new connection id, so TTS throttling is the in-turn close
  the service uses for it (4429).
- Text messages: header lines (`Path:`, `X-RequestId:`, `Content-Type:` ...), a blank line, a
  body. Binary messages: a 2-byte big-endian header length, the header lines, the payload.
- STT (`/speech/recognition/conversation/cognitiveservices/v1?language=..&format=detailed`):
  the client sends `speech.config`, `speech.context`, then `audio` (the first one a RIFF
  header, the last one empty: the end of the audio). The server answers `turn.start`,
  `speech.startDetected`, `speech.hypothesis` every ~300 ms of audio, and at the end
  `speech.phrase` (detailed: NBest with Words, Offset/Duration in 100 ns ticks),
  `speech.endDetected`, `turn.end`.
- TTS (`/cognitiveservices/websocket/v1`): the client sends `speech.config`,
  `synthesis.context` (output format, word boundaries wanted), `ssml`; the server answers
  `turn.start`, `response`, binary `audio` messages and `audio.metadata` (WordBoundary, Offset
  in ticks) as the backend produces them, then `turn.end`. One connection serves many requests.
- In-stream errors are websocket close codes with a reason: 1007 (bad request: unsupported
  locale, voice or audio format; quota), 4429 (TTS throttled), 1011 (service error).

Recorded: "auth" (key header value), "request" ({"path", "query", "connection"}), "stt_context"
(speech.context JSON), "audio" (payload bytes of each audio message), "audio_end" (total bytes),
"synthesis_context" (JSON), "ssml" (the SSML text), "turn_end" (request id), "closed" (a
connection ended: {"kind", "bytes", "complete"}), "cancelled" (the client closed a connection
before the turn it had started was over; the detail is its bytes: audio received for STT,
sent for TTS), "holding" (a TTS turn stopped at `hold_after_chunks`), "probe" (path of a REST call).

Failures: `fail_next(kind)` for the next connection (handshake refusals, which stick to that
X-ConnectionId) or the next turn (in-stream closes); `set_outage(status)` refuses every
handshake until cleared; `api_key` can be changed to refuse the service's key; `go_away()` /
`come_back()` stop and resume listening on the same port.
"""
from __future__ import annotations

import asyncio
import html
import json
import re
import uuid

from aiohttp import WSMsgType, web

from cloud.fakes.backends import ScriptedStt, ToneTts
from cloud.fakes.base import FakeProvider

STT_PATH = "/speech/recognition/conversation/cognitiveservices/v1"
TTS_PATH = "/cognitiveservices/websocket/v1"
VOICES = ("en-US-AvaMultilingualNeural", "en-US-AndrewMultilingualNeural", "de-DE-SeraphinaMultilingualNeural")
LANGUAGES = ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "ja-JP")
FORMATS = {"raw-8khz-16bit-mono-pcm": 8000, "raw-16khz-16bit-mono-pcm": 16000, "raw-22050hz-16bit-mono-pcm": 22050,
           "raw-24khz-16bit-mono-pcm": 24000, "raw-44100hz-16bit-mono-pcm": 44100, "raw-48khz-16bit-mono-pcm": 48000}
HYPOTHESIS_EVERY_MS = 300
TICKS_PER_MS = 10_000
# How the service refuses a handshake, per error class. STT: a Custom Speech endpoint id it does not
# have is a 404. TTS throttling comes in the turn instead (close code 4429), as the service does it.
STT_HANDSHAKE_FAILURES = {"auth": 401, "throttle": 429, "unavailable": 503, "not_found": 404}
TTS_HANDSHAKE_FAILURES = {"auth": 401, "unavailable": 503}
THROTTLED = "The request is throttled because you have exceeded the concurrent request limit allowed for your subscription."


def _text(path: str, request_id: str, body: dict) -> str:
    return (f"X-RequestId:{request_id}\r\nPath:{path}\r\nContent-Type:application/json; charset=utf-8\r\n"
            f"X-Timestamp:2026-01-01T00:00:00.000Z\r\n\r\n{json.dumps(body)}")


def _audio(request_id: str, payload: bytes) -> bytes:
    head = f"X-RequestId:{request_id}\r\nPath:audio\r\nX-StreamId:1\r\n".encode()
    return len(head).to_bytes(2, "big") + head + payload


def _headers(block: str) -> dict[str, str]:
    return {name.strip().lower(): value.strip() for name, _, value in
            (line.partition(":") for line in block.split("\r\n") if line)}


def _parse_text(message: str) -> tuple[dict[str, str], str]:
    head, _, body = message.partition("\r\n\r\n")
    return _headers(head), body


def _parse_binary(message: bytes) -> tuple[dict[str, str], bytes]:
    size = int.from_bytes(message[:2], "big")
    return _headers(message[2:2 + size].decode()), message[2 + size:]


class FakeAzureSpeech(FakeProvider):
    name = "azure-speech"

    def __init__(self, stt=None, tts=None, api_key: str = "azure-test-key", voices=VOICES, languages=LANGUAGES):
        super().__init__()
        self.stt = stt or ScriptedStt()
        self.tts = tts or ToneTts()
        self.api_key = api_key  # the key it accepts; change it to make it refuse the service's
        self.voices = tuple(voices)
        self.languages = tuple(languages)
        self.hold_after_chunks: int | None = None  # TTS: stop after this many chunks until `release()`
        self.outage: int | None = None  # an HTTP status every handshake gets while set (see set_outage)
        self._released = asyncio.Event()
        self._failing: dict[str, str] = {}  # X-ConnectionId -> the failure it keeps getting
        self._idle_tts: dict[web.WebSocketResponse, asyncio.Transport | None] = {}
        self._open_ws: set[web.WebSocketResponse] = set()
        self._tokens: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def host(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def env(self, kind: str) -> dict[str, str]:
        """What a `kind` (stt or tts) service needs to use this fake."""
        return {f"VOICEMESH_{kind.upper()}_AZURE_ENDPOINT": self.host, "AZURE_SPEECH_KEY": self.api_key}

    # --- lifecycle ---------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get(STT_PATH, self._recognize)
        app.router.add_get(TTS_PATH, self._synthesize)
        app.router.add_post("/sts/v1.0/issueToken", self._issue_token)
        app.router.add_get("/cognitiveservices/voices/list", self._voice_list)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - port 0 -> the one bound

    async def _stop(self) -> None:
        for ws in list(self._open_ws):
            await ws.close(code=1001, message=b"going away")
        if self._runner is not None:
            await self._runner.cleanup()

    def clear(self) -> None:
        with self._changed:
            self.events.clear()

    def release(self) -> None:
        """Let a held synthesis (hold_after_chunks) go on."""
        self.loop.call_soon_threadsafe(self._released.set)

    def fail_next(self, error_class: str) -> None:
        """As the base; for a failure the service gives at the handshake, idle TTS connections are
        dropped too (as they are after a while), so that it reaches the next synthesis."""
        super().fail_next(error_class)
        if error_class in TTS_HANDSHAKE_FAILURES:
            self.call(self._drop_idle())

    def set_outage(self, status: int | None) -> None:
        """Every handshake is refused with `status` (e.g. 503) until set_outage(None): an outage
        outlasts the SDK's own retries, whatever their number."""
        self.outage = status
        self.call(self._drop_idle())

    async def _drop_idle(self) -> None:
        # The TCP connection goes, as when a load balancer drops an idle one. (A close frame on an
        # idle connection makes this SDK stall ~40 s on its next handshake if that one fails.)
        for transport in list(self._idle_tts.values()):
            if transport is not None:
                transport.close()

    def go_away(self) -> None:
        async def stop() -> None:
            await self._site.stop()
            await self._runner.server.shutdown(1.0)
        self.call(stop())

    def come_back(self) -> None:
        async def start() -> None:
            self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await self._site.start()
        self.call(start())

    # --- REST --------------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return request.headers.get("Ocp-Apim-Subscription-Key") == self.api_key or bearer in self._tokens

    async def _issue_token(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        if request.headers.get("Ocp-Apim-Subscription-Key") != self.api_key:
            return web.json_response({"error": {"code": "401", "message": "Access denied due to invalid subscription key "
                                                "or wrong API endpoint."}}, status=401)
        token = uuid.uuid4().hex
        self._tokens.add(token)
        return web.Response(text=token)

    async def _voice_list(self, request: web.Request) -> web.Response:
        self.record("probe", request.path)
        if not self._authorized(request):
            return web.Response(status=401)
        return web.json_response([{"ShortName": v, "Locale": v[:5], "Name": f"Microsoft Server Speech Text to Speech Voice "
                                   f"({v[:5]}, {v[6:]})"} for v in self.voices])

    # --- handshake ---------------------------------------------------------------------------
    async def _open(self, request: web.Request, refusals: dict[str, int]) -> tuple[web.StreamResponse, str | None]:
        """(the websocket, or a refusal; the failure this connection gets in the stream)."""
        self.record("auth", request.headers.get("Ocp-Apim-Subscription-Key") or request.headers.get("Authorization", ""))
        connection = request.headers.get("X-ConnectionId", "")
        self.record("request", {"path": request.path, "query": dict(request.query), "connection": connection})
        failure = self._failing.get(connection) or self.take_failure()
        if failure:
            self._failing[connection] = failure  # the SDK's retries of this connection fail alike
        if failure in refusals:
            return web.Response(status=refusals[failure], text=failure), None
        if self.outage:
            return web.Response(status=self.outage, text="outage"), None
        if not self._authorized(request):
            return web.Response(status=401, text="Access denied due to invalid subscription key."), None
        ws = web.WebSocketResponse(protocols=("USP",), autoping=True, timeout=2.0)  # close: wait 2 s for the answer
        await ws.prepare(request)
        self._open_ws.add(ws)
        return ws, failure

    # --- recognition -------------------------------------------------------------------------
    async def _recognize(self, request: web.Request) -> web.StreamResponse:
        ws, failure = await self._open(request, STT_HANDSHAKE_FAILURES)
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        try:
            return await self._recognition(request, ws, failure)
        finally:
            self._open_ws.discard(ws)

    async def _recognition(self, request: web.Request, ws: web.WebSocketResponse, failure: str | None) -> web.WebSocketResponse:
        language = request.query.get("language", "en-US")
        pcm, request_id, started, ended, complete, hypotheses = bytearray(), "", False, False, False, 0
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                headers, body = _parse_text(message.data)
                if headers.get("path") == "speech.context":
                    request_id = headers.get("x-requestid", request_id)
                    self.record("stt_context", json.loads(body or "{}"))
                continue
            if message.type != WSMsgType.BINARY:
                break
            headers, payload = _parse_binary(message.data)
            request_id = headers.get("x-requestid", request_id)
            if not payload:  # the end of the audio
                ended = True
                self.record("audio_end", len(pcm))
                await self._final(ws, request_id, bytes(pcm), language)
                complete = True
                continue
            if payload.startswith(b"RIFF"):  # the SDK's first audio message: a WAV header, no samples
                payload = payload[44:]
                if not payload:
                    continue
            if not started:
                started = True
                if language not in self.languages:
                    await ws.close(code=1007, message=(f'Status(StatusCode="InvalidArgument", Detail="Bad client request: '
                                                       f'Unsupported Locale \\"{language}\\".")').encode())
                    break
                if failure == "bad_format":
                    await ws.close(code=1007, message=b"Unsupported audio format")
                    break
                await ws.send_str(_text("turn.start", request_id, {"context": {"serviceTag": uuid.uuid4().hex}}))
                await ws.send_str(_text("speech.startDetected", request_id, {"Offset": 0}))
            pcm += payload
            self.record("audio", len(payload))
            if len(pcm) // (32 * HYPOTHESIS_EVERY_MS) > hypotheses:
                hypotheses = len(pcm) // (32 * HYPOTHESIS_EVERY_MS)
                if text := self.stt.interim(bytes(pcm), 16000):
                    await ws.send_str(_text("speech.hypothesis", request_id, {
                        "Text": text, "Offset": 0, "Duration": len(pcm) // 32 * TICKS_PER_MS}))
        self.record("closed", {"kind": "stt", "bytes": len(pcm), "complete": complete})
        if started and not ended:
            self.record("cancelled", len(pcm))
        return ws

    async def _final(self, ws: web.WebSocketResponse, request_id: str, pcm: bytes, language: str) -> None:
        recognized = await self.stt.recognize(pcm, 16000, language)
        duration = len(pcm) // 32 * TICKS_PER_MS
        if recognized.text:
            words = [{"Word": w.text, "Offset": w.start_ms * TICKS_PER_MS, "Duration": (w.end_ms - w.start_ms) * TICKS_PER_MS,
                      "Confidence": w.confidence} for w in recognized.words]
            offset = words[0]["Offset"] if words else 0
            display = recognized.text[:1].upper() + recognized.text[1:] + "."
            phrase = {"RecognitionStatus": "Success", "Offset": offset, "Duration": duration - offset, "DisplayText": display,
                      "NBest": [{"Confidence": recognized.confidence, "Lexical": recognized.text, "ITN": recognized.text,
                                 "MaskedITN": recognized.text, "Display": display, "Words": words}]}
        else:
            phrase = {"RecognitionStatus": "NoMatch", "Offset": 0, "Duration": duration}
        await ws.send_str(_text("speech.phrase", request_id, phrase))
        await ws.send_str(_text("speech.endDetected", request_id, {"Offset": duration}))
        await ws.send_str(_text("turn.end", request_id, {}))
        self.record("turn_end", request_id)

    # --- synthesis ---------------------------------------------------------------------------
    async def _synthesize(self, request: web.Request) -> web.StreamResponse:
        ws, failure = await self._open(request, TTS_HANDSHAKE_FAILURES)
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        # One reader, so that a held synthesis still sees the client close the connection.
        inbox: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()

        async def read() -> None:
            try:
                async for message in ws:
                    if message.type == WSMsgType.TEXT:
                        inbox.put_nowait(message.data)
            finally:
                gone.set()
                inbox.put_nowait(None)

        reader = asyncio.create_task(read())
        context: dict = {}
        sent, in_turn = 0, False
        self._idle_tts[ws] = request.transport
        try:
            while (data := await inbox.get()) is not None:
                headers, body = _parse_text(data)
                if headers.get("path") == "synthesis.context":
                    context = json.loads(body or "{}")
                    self.record("synthesis_context", context)
                elif headers.get("path") == "ssml":
                    self._idle_tts.pop(ws, None)
                    in_turn = True
                    try:
                        sent, finished = await self._speak(ws, gone, headers.get("x-requestid", ""), body, context,
                                                           failure or self.take_failure())
                    except ConnectionError:  # the client went away while audio was going out
                        finished = False
                    in_turn = not finished
                    failure = None
                    if in_turn:
                        break
                    self._idle_tts[ws] = request.transport
        finally:
            self._idle_tts.pop(ws, None)
            self._open_ws.discard(ws)
            await ws.close()
            await reader
        self.record("closed", {"kind": "tts", "bytes": sent, "complete": not in_turn})
        if in_turn:
            self.record("cancelled", sent)
        return ws

    async def _speak(self, ws: web.WebSocketResponse, gone: asyncio.Event, request_id: str, ssml: str, context: dict,
                     failure: str | None) -> tuple[int, bool]:
        """One synthesis: (audio bytes sent, whether the turn was over when it returned: false if
        the client closed the connection first). A failure closes the connection, as the service does."""
        self.record("ssml", ssml)
        voice = (re.search(r"<voice[^>]*\bname=['\"]([^'\"]+)['\"]", ssml) or [None, ""])[1]
        text = html.unescape(re.sub(r"<[^>]+>", " ", ssml)).split()
        words = re.findall(r"[\w']+", " ".join(text))  # boundaries are words; punctuation has its own kind
        audio = (context.get("synthesis") or {}).get("audio") or {}
        output = audio.get("outputFormat", "")
        words_wanted = (audio.get("metadataOptions") or {}).get("wordBoundaryEnabled", False)
        await ws.send_str(_text("turn.start", request_id, {"context": {"serviceTag": uuid.uuid4().hex}}))
        if failure == "throttle":
            await ws.close(code=4429, message=THROTTLED.encode())
            return 0, True
        if failure == "not_found" or voice not in self.voices:
            await ws.close(code=1007, message=f"Unsupported voice {voice or '(none)'}.".encode())
            return 0, True
        if failure == "bad_format" or output not in FORMATS:
            await ws.close(code=1007, message=f"Unsupported output format {output or '(none)'}.".encode())
            return 0, True
        rate = FORMATS[output]
        await ws.send_str(_text("response", request_id, {"context": {"serviceTag": uuid.uuid4().hex},
                                                         "audio": {"type": "inline", "streamId": uuid.uuid4().hex}}))
        sent, chunks, pending = 0, 0, list(words)
        self._released.clear()
        async for pcm in self.tts.synthesize(" ".join(text), rate, voice):
            if words_wanted and pending:  # each word starts where the audio is when its chunk goes
                word = pending.pop(0)
                await ws.send_str(_text("audio.metadata", request_id, {"Metadata": [{"Type": "WordBoundary", "Data": {
                    "Offset": sent // 2 * 1000 // rate * TICKS_PER_MS, "Duration": 1_000_000,
                    "text": {"Text": word, "Length": len(word), "BoundaryType": "WordBoundary"}}}]}))
            await ws.send_bytes(_audio(request_id, pcm))
            sent += len(pcm)
            chunks += 1
            if self.hold_after_chunks is not None and chunks == self.hold_after_chunks:
                self.record("holding", sent)
                waits = {asyncio.ensure_future(gone.wait()), asyncio.ensure_future(self._released.wait())}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()
            if gone.is_set():
                return sent, False
        await ws.send_str(_text("turn.end", request_id, {}))
        self.record("turn_end", request_id)
        return sent, True
