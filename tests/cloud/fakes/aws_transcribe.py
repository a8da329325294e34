"""A fake Amazon Transcribe streaming endpoint: the documented WebSocket API on 127.0.0.1, plus
the STS GetCallerIdentity call the provider's health probe makes.

- `GET /stream-transcription-websocket?...` (presigned, SigV4 query auth): the signature is
  recomputed with botocore from the same credentials, time and query and compared, as AWS
  does; a wrong key or secret gets the 403 handshake AWS gives (x-amzn-ErrorType header,
  JSON body). Then each binary message is one event-stream `AudioEvent`; after ~300 ms of
  audio a partial `TranscriptEvent` goes out (the backend's `interim`), and on the empty
  AudioEvent the backend recognises all the audio: one final TranscriptEvent with Items
  (pronunciation and punctuation), then the socket is closed.
- `POST /` with `Action=GetCallerIdentity` (STS query protocol, SigV4 header auth): XML.

Recorded: "request" (the handshake's query, no signature), "audio" (bytes of each AudioEvent),
"final" (the final text), "closed" (ended by the empty AudioEvent) or "cancelled" (the
client closed first; detail: audio bytes seen), "sts" (each GetCallerIdentity), "refused".
`fail_next`: auth -> 403 UnrecognizedClientException handshake; unavailable -> 503
ServiceUnavailableException handshake; throttle -> in-stream LimitExceededException;
not_found -> in-stream BadRequestException (vocabulary not found); bad_format -> in-stream
BadRequestException (media format). A language outside `languages` gets the in-stream
BadRequestException AWS sends for it.
"""
from __future__ import annotations

import datetime
import json
import re
import uuid
from urllib.parse import parse_qsl, quote, urlencode

from aiohttp import WSMsgType, web
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer

from cloud.conftest import DUMMY_AWS
from cloud.fakes.backends import RecognizedWord, ScriptedStt
from cloud.fakes.base import FakeProvider
from voicemesh.stt.providers import aws_eventstream

TIMESTAMP = "%Y%m%dT%H%M%SZ"
BAD_SIGNATURE = ("The request signature we calculated does not match the signature you provided. "
                 "Check your AWS Secret Access Key and signing method.")
BAD_KEY = "The security token included in the request is invalid."


def _credential(scope: str, access_key: str, region: str, service: str) -> str | None:
    """Why a credential scope (AKID/date/region/service/aws4_request) is refused, or None."""
    parts = scope.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        return "IncompleteSignature"
    if parts[0] != access_key:
        return "UnrecognizedClientException"
    if parts[2] != region or parts[3] != service:
        return "InvalidSignatureException"
    return None


def check_query_signature(host: str, path: str, query: list[tuple[str, str]], access_key: str, secret_key: str,
                          region: str, service: str) -> tuple[str, str] | None:
    """(error type, message) for a presigned URL AWS would refuse, else None."""
    params = dict(query)
    if "X-Amz-Signature" not in params:
        return "MissingAuthenticationToken", "Missing Authentication Token"
    if error := _credential(params.get("X-Amz-Credential", ""), access_key, region, service):
        return error, BAD_KEY if error == "UnrecognizedClientException" else BAD_SIGNATURE
    signed_at = datetime.datetime.strptime(params["X-Amz-Date"], TIMESTAMP).replace(tzinfo=datetime.timezone.utc)
    expires = int(params.get("X-Amz-Expires", "0"))
    if datetime.datetime.now(datetime.timezone.utc) > signed_at + datetime.timedelta(seconds=expires):
        return "InvalidSignatureException", "Signature expired"
    rest = [(k, v) for k, v in query if k != "X-Amz-Signature"]
    request = AWSRequest(method="GET", url=f"http://{host}{path}?{urlencode(rest, quote_via=quote)}", headers={"host": host})
    request.context["timestamp"] = params["X-Amz-Date"]
    auth = SigV4QueryAuth(Credentials(access_key, secret_key), service, region, expires=expires)
    if auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request) != params["X-Amz-Signature"]:
        return "InvalidSignatureException", BAD_SIGNATURE
    return None


def check_header_signature(request: web.Request, body: bytes, access_key: str, secret_key: str, region: str,
                           service: str) -> tuple[str, str] | None:
    """(error type, message) for a SigV4 Authorization header AWS would refuse, else None."""
    found = re.match(r"AWS4-HMAC-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), Signature=(\w+)",
                     request.headers.get("Authorization", ""))
    if not found or "X-Amz-Date" not in request.headers:
        return "MissingAuthenticationTokenException", "Missing Authentication Token"
    scope, signed, signature = found.groups()
    if error := _credential(scope, access_key, region, service):
        return error, BAD_KEY if error == "UnrecognizedClientException" else BAD_SIGNATURE
    headers = {name: request.headers.get(name, "") for name in signed.split(";")}
    signed_request = AWSRequest(method=request.method, url=f"http://{request.host}{request.path_qs}", headers=headers,
                                data=body)
    signed_request.context["timestamp"] = request.headers["X-Amz-Date"]
    auth = SigV4Auth(Credentials(access_key, secret_key), service, region)
    expected = auth.signature(auth.string_to_sign(signed_request, auth.canonical_request(signed_request)), signed_request)
    if expected != signature:
        return "InvalidSignatureException", BAD_SIGNATURE
    return None


def _items(words, final: bool) -> list[dict]:
    """AWS-style Items: pronunciations with times in seconds; trailing punctuation split off."""
    items = []
    for word in words:
        text = word.text.strip()
        bare = text.rstrip(".,?!")
        item = {"Content": bare, "StartTime": word.start_ms / 1000, "EndTime": word.end_ms / 1000,
                "Type": "pronunciation", "VocabularyFilterMatch": False}
        if final:
            item["Confidence"] = word.confidence
        items.append(item)
        if bare != text:
            items.append({"Content": text[len(bare):], "StartTime": word.end_ms / 1000, "EndTime": word.end_ms / 1000,
                          "Type": "punctuation", "VocabularyFilterMatch": False})
    return items


class FakeTranscribe(FakeProvider):
    """`FakeTranscribe(backend=ScriptedStt())`; the service env comes from `service_env()`."""

    name = "aws-transcribe"

    def __init__(self, backend=None, access_key: str = DUMMY_AWS["AWS_ACCESS_KEY_ID"],
                 secret_key: str = DUMMY_AWS["AWS_SECRET_ACCESS_KEY"], region: str = DUMMY_AWS["AWS_DEFAULT_REGION"],
                 languages: tuple[str, ...] = ("en-US", "en-GB", "es-US", "fr-FR", "de-DE"), partial_after_ms: int = 300):
        super().__init__()
        self.backend = backend or ScriptedStt()
        self.access_key, self.secret_key, self.region = access_key, secret_key, region
        self.languages = languages
        self.partial_after_ms = partial_after_ms
        self.reject_credentials = False  # every request refused as a bad key until reset (health tests)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def endpoint(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def service_env(self) -> dict[str, str]:
        return {**DUMMY_AWS, "VOICEMESH_STT_AWS_ENDPOINT": self.endpoint,
                "VOICEMESH_STT_AWS_STS_ENDPOINT": f"http://127.0.0.1:{self.port}"}

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/stream-transcription-websocket", self._stream)
        app.router.add_post("/", self._sts)
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
        """Stop listening (the endpoint is unreachable) until `come_back()`."""
        self.call(self._go_away())

    def come_back(self) -> None:
        self.call(self._listen())

    # --- STS -------------------------------------------------------------------------------
    async def _sts(self, request: web.Request) -> web.Response:
        body = await request.read()
        form = dict(parse_qsl(body.decode()))
        refused = check_header_signature(request, body, self.access_key, self.secret_key, self.region, "sts")
        if self.reject_credentials:
            refused = ("InvalidClientTokenId", BAD_KEY)
        self.record("sts", {"action": form.get("Action"), "refused": refused})
        if refused:
            code = "SignatureDoesNotMatch" if refused[0] == "InvalidSignatureException" else refused[0]
            xml = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                   f"<Code>{code}</Code><Message>{refused[1]}</Message></Error><RequestId>{uuid.uuid4()}</RequestId>"
                   "</ErrorResponse>")
            return web.Response(status=403, body=xml, content_type="text/xml")
        xml = ('<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><GetCallerIdentityResult>'
               f"<Arn>arn:aws:iam::123456789012:user/voicemesh</Arn><UserId>{self.access_key}</UserId>"
               "<Account>123456789012</Account></GetCallerIdentityResult>"
               f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></GetCallerIdentityResponse>")
        return web.Response(body=xml, content_type="text/xml")

    # --- streaming ---------------------------------------------------------------------------
    @staticmethod
    def _refuse(status: int, kind: str, message: str) -> web.Response:
        return web.json_response({"message": message}, status=status,
                                 headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazonaws.transcribe/",
                                          "x-amzn-ErrorMessage": message, "x-amzn-RequestId": str(uuid.uuid4())})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        query = parse_qsl(request.query_string, keep_blank_values=True)
        params = {k: v for k, v in query if k != "X-Amz-Signature"}
        refused = check_query_signature(request.host, request.path, query, self.access_key, self.secret_key,
                                        self.region, "transcribe")
        if self.reject_credentials:
            refused = ("UnrecognizedClientException", BAD_KEY)
        failure = self.take_failure() if not refused else None
        self.record("request", params)
        if refused or failure == "auth":
            refused = refused or ("UnrecognizedClientException", BAD_KEY)
            self.record("refused", refused)
            return self._refuse(403, *refused)
        if failure == "unavailable":
            self.record("refused", ("ServiceUnavailableException", 503))
            return self._refuse(503, "ServiceUnavailableException", "Service unavailable. Try your request again later.")
        ws = web.WebSocketResponse(autoping=True, max_msg_size=16 << 20)
        await ws.prepare(request)
        try:
            await self._transcribe(ws, params, failure)
        finally:
            if not ws.closed:
                await ws.close()
        return ws

    async def _transcribe(self, ws: web.WebSocketResponse, params: dict, failure: str | None) -> None:
        rate = int(params.get("sample-rate", "16000"))
        language = params.get("language-code", "")
        in_stream = {
            "throttle": ("LimitExceededException", "You have reached your limit of concurrent streams. Try again later."),
            "not_found": ("BadRequestException", "The requested vocabulary couldn't be found. Check the vocabulary name "
                                                 "and try your request again."),
            "bad_format": ("BadRequestException", "Your stream's media encoding or sample rate isn't supported."),
        }.get(failure or "")
        if in_stream is None and language not in self.languages:
            in_stream = ("BadRequestException", f"The language code {language} isn't supported for streaming transcription.")
        decoder = EventStreamBuffer()
        audio = bytearray()
        partial_sent = ended = False
        async for message in ws:
            if message.type != WSMsgType.BINARY:
                continue
            decoder.add_data(message.data)
            for event in decoder:
                if event.headers.get(":event-type") != "AudioEvent":
                    continue
                if in_stream is not None:  # AWS answers the first audio with the exception, then closes
                    self.record("refused", in_stream)
                    await ws.send_bytes(aws_eventstream.exception(*in_stream))
                    return
                if not event.payload:
                    ended = True
                    break
                audio += event.payload
                self.record("audio", bytes(event.payload))
                if not partial_sent and len(audio) * 1000 // (2 * rate) >= self.partial_after_ms:
                    partial_sent = True
                    if text := self.backend.interim(bytes(audio), rate):
                        end_s = len(audio) / (2 * rate)
                        words = [RecognizedWord(t, 0, int(end_s * 1000)) for t in text.split()]
                        await ws.send_bytes(self._event(text, True, 0.0, end_s, _items(words, False), language))
            if ended:
                break
        if not ended:
            self.record("cancelled", len(audio))
            return
        recognized = await self.backend.recognize(bytes(audio), rate, language)
        end_s = len(audio) / (2 * rate)
        if recognized.text:
            await ws.send_bytes(self._event(recognized.text, False, 0.0, end_s, _items(recognized.words, True), language))
        self.record("final", recognized.text)
        self.record("closed", len(audio))

    @staticmethod
    def _event(text: str, partial: bool, start_s: float, end_s: float, items: list[dict], language: str) -> bytes:
        result = {"ResultId": str(uuid.uuid4()), "StartTime": start_s, "EndTime": end_s, "IsPartial": partial,
                  "ChannelId": "ch_0", "LanguageCode": language,
                  "Alternatives": [{"Transcript": text, "Items": items}]}
        return aws_eventstream.event("TranscriptEvent", json.dumps({"Transcript": {"Results": [result]}}).encode(),
                                     "application/json")
