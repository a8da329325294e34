"""A fake Amazon Polly: its REST-JSON API on 127.0.0.1, as boto3 calls it with `endpoint_url`.

- `POST /v1/speech` (SynthesizeSpeech; JSON body, `SampleRate` a string): OutputFormat pcm is
  answered `audio/pcm`, chunked, each chunk written as the backend yields it (`pace_s`
  between chunks makes it take as long as a real synthesis would); OutputFormat json with
  SpeechMarkTypes ["word"] is answered with word marks (JSON lines), spread over the audio.
- `GET /v1/voices` (DescribeVoices; `Engine`, `IncludeAdditionalLanguageCodes`, `NextToken`,
  paged by `page_size`).

Every request must carry a SigV4 Authorization header for service polly in `region`, signed
with the fake's credentials: the signature is recomputed with botocore and compared. Errors
are Polly's shapes (status, `x-amzn-ErrorType` header, JSON {"message"}).

Recorded: "auth" (the credential scope of each request), "request" (the speech body),
"voices" (each DescribeVoices), "audio" (bytes of each chunk written), "done" (all audio
written) or "cancelled" (the client went before the end; detail: bytes written), "refused"
(error type), "holding" (with `hold_after` = n, the synthesis stops after n chunks until
`release` is set or the client closes the connection). `fail_next`: auth -> 403
UnrecognizedClientException; throttle -> 400 ThrottlingException; not_found -> 400
ValidationException on voiceId; bad_format -> 400 InvalidSampleRateException; unavailable ->
500 ServiceFailureException.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid

from aiohttp import web

from cloud.conftest import DUMMY_AWS
from cloud.fakes.aws_transcribe import check_header_signature
from cloud.fakes.backends import ToneTts
from cloud.fakes.base import FakeProvider

ALL = ("neural", "standard", "generative")
VOICES = (  # (id, language, additional languages, engines)
    ("Joanna", "en-US", (), ALL), ("Matthew", "en-US", (), ALL), ("Amy", "en-GB", (), ("neural", "standard")),
    ("Lea", "fr-FR", (), ("neural", "standard")), ("Kajal", "en-IN", ("hi-IN",), ("neural",)),
    ("Aditi", "en-IN", ("hi-IN",), ("standard",)),
)
FAILURES = {
    "auth": (403, "UnrecognizedClientException", "The security token included in the request is invalid."),
    "throttle": (400, "ThrottlingException", "Rate exceeded"),
    "not_found": (400, "ValidationException", "1 validation error detected: Value at 'voiceId' failed to satisfy "
                                              "constraint: Member must satisfy enum value set"),
    "bad_format": (400, "InvalidSampleRateException", "The specified sample rate is not valid."),
    "unavailable": (500, "ServiceFailureException", "An unknown condition has caused a service failure."),
}


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status,
                             headers={"x-amzn-ErrorType": kind, "x-amzn-RequestId": str(uuid.uuid4())})


class FakePolly(FakeProvider):
    """`FakePolly(backend=ToneTts())`; the service env comes from `service_env()`."""

    name = "polly"

    def __init__(self, backend=None, voices=VOICES, access_key: str = DUMMY_AWS["AWS_ACCESS_KEY_ID"],
                 secret_key: str = DUMMY_AWS["AWS_SECRET_ACCESS_KEY"], region: str = DUMMY_AWS["AWS_DEFAULT_REGION"],
                 pace_s: float = 0.0, page_size: int = 4):
        super().__init__()
        self.backend = backend or ToneTts()
        self.voice_table = voices
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.pace_s = pace_s
        self.page_size = page_size
        self.reject_credentials = False  # every request refused as a bad key until reset (health tests)
        self.hold_after = 0  # > 0: after that many chunks, wait for `release` or for the client to go
        self.release = threading.Event()
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def service_env(self) -> dict[str, str]:
        return {**DUMMY_AWS, "VOICEMESH_TTS_POLLY_ENDPOINT": self.endpoint}

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/speech", self._speech)
        app.router.add_get("/v1/voices", self._voices)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()
        self.port = self._site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _go_away(self) -> None:
        await self._site.stop()
        for connection in self._runner.server.connections:  # kept-alive ones too: nothing answers
            connection.force_close()

    def go_away(self) -> None:
        """Stop listening (Polly is unreachable) until `come_back()`."""
        self.call(self._go_away())

    def come_back(self) -> None:
        self.call(self._listen())

    def _refused(self, request: web.Request, body: bytes) -> web.Response | None:
        scope = re.search(r"Credential=([^,]+)", request.headers.get("Authorization", ""))
        self.record("auth", scope.group(1) if scope else None)
        refused = check_header_signature(request, body, self.access_key, self.secret_key, self.region, "polly")
        if self.reject_credentials:
            refused = ("UnrecognizedClientException", FAILURES["auth"][2])
        if refused:
            self.record("refused", refused[0])
            return _error(403, *refused)
        return None

    async def _voices(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request, b"")) is not None:
            return refused
        engine = request.query.get("Engine", "")
        extra = request.query.get("IncludeAdditionalLanguageCodes", "false") == "true"
        self.record("voices", dict(request.query))
        matching = [v for v in self.voice_table if not engine or engine in v[3]]
        start = int(request.query.get("NextToken") or 0)
        page = matching[start:start + self.page_size]
        voices = [{"Id": vid, "Name": vid, "Gender": "Female", "LanguageCode": lang, "LanguageName": lang,
                   "SupportedEngines": list(engines), **({"AdditionalLanguageCodes": list(more)} if extra and more else {})}
                  for vid, lang, more, engines in page]
        answer = {"Voices": voices}
        if start + self.page_size < len(matching):
            answer["NextToken"] = str(start + self.page_size)
        return web.json_response(answer)

    def _check(self, body: dict) -> tuple[int, str, str] | None:
        """Polly's own validation of a SynthesizeSpeech body."""
        voice = next((v for v in self.voice_table if v[0] == body.get("VoiceId")), None)
        if voice is None:
            return 400, "ValidationException", (f"1 validation error detected: Value '{body.get('VoiceId')}' at 'voiceId' "
                                                "failed to satisfy constraint: Member must satisfy enum value set")
        if body.get("Engine", "standard") not in voice[3]:
            return 400, "EngineNotSupportedException", "This voice does not support the selected engine."
        if body.get("OutputFormat") == "pcm" and body.get("SampleRate", "16000") not in ("8000", "16000"):
            return 400, "InvalidSampleRateException", "The specified sample rate is not valid."
        if body.get("LanguageCode") and body["LanguageCode"] not in (voice[1], *voice[2]):
            return 400, "ValidationException", f"Language {body['LanguageCode']} is not supported by voice {voice[0]}."
        if len(body.get("Text", "")) > 3000:
            return 400, "TextLengthExceededException", "Maximum text length has been exceeded"
        return None

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if (refused := self._refused(request, raw)) is not None:
            return refused
        body = json.loads(raw)
        self.record("request", body)
        if failure := self.take_failure():
            self.record("refused", FAILURES[failure][1])
            return _error(*FAILURES[failure])
        if problem := self._check(body):
            self.record("refused", problem[1])
            return _error(*problem)
        text = re.sub(r"<[^>]+>", "", body["Text"]) if body.get("TextType") == "ssml" else body["Text"]
        rate = int(body.get("SampleRate", "16000"))
        if body.get("OutputFormat") == "json":
            return await self._marks(text, rate, body)
        response = web.StreamResponse(headers={"Content-Type": "audio/pcm", "x-amzn-RequestCharacters": str(len(text)),
                                               "x-amzn-RequestId": str(uuid.uuid4())})
        response.enable_chunked_encoding()
        await response.prepare(request)
        written = chunks = 0
        try:
            async for chunk in self.backend.synthesize(text, rate, body["VoiceId"]):
                await response.write(chunk)
                written, chunks = written + len(chunk), chunks + 1
                self.record("audio", len(chunk))
                if chunks == self.hold_after and not await self._held(request):
                    self.record("cancelled", written)
                    return response
                if self.pace_s:
                    await asyncio.sleep(self.pace_s)  # a real synthesis takes time: the client may leave meanwhile
            await response.write_eof()
        except asyncio.CancelledError:
            self.record("cancelled", written)
            raise
        except ConnectionError:  # the client closed the stream: what Polly sees on a cancel
            self.record("cancelled", written)
            return response
        self.record("done", written)
        return response

    async def _held(self, request: web.Request) -> bool:
        """Hold the synthesis until released (True) or the client closes the connection (False)."""
        self.record("holding", None)
        while not self.release.is_set():
            if request.transport is None or request.transport.is_closing():
                return False
            await asyncio.sleep(0.01)  # the fake checks its socket; nothing in a test waits on time
        return True

    async def _marks(self, text: str, rate: int, body: dict) -> web.Response:
        if body.get("SpeechMarkTypes") != ["word"]:
            return _error(400, "MarksNotSupportedForFormatException", "Speech marks are not supported for this request.")
        total = 0
        async for chunk in self.backend.synthesize(text, rate, body["VoiceId"]):
            total += len(chunk)
        duration_ms = total * 1000 // (2 * rate)
        lines = []
        for found in re.finditer(r"\S+", text):
            start = found.start()
            lines.append(json.dumps({"time": duration_ms * start // max(len(text), 1), "type": "word", "start": start,
                                     "end": found.end(), "value": found.group().strip(".,!?")}))
        self.record("marks", len(lines))
        return web.Response(body="\n".join(lines) + "\n", content_type="application/x-json-stream")
