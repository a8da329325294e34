"""Client side of the public API (`OrchestratorService/Converse`): `voicemesh talk` and `voicemesh chat`.

The shared session plumbing lives here; the real-time audio streaming and latency
measurement of `talk` are in `voicemesh.talk`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import sys
import threading
from collections.abc import Awaitable, Callable

import grpc

from voicemesh.runtime.config import DEFAULT_PORTS, grpc_channel_options
from voicemesh.v1 import common_pb2, orchestrator_pb2

DEFAULT_SYSTEM_PROMPT = "You are a helpful voice assistant. Answer in one or two short sentences."
ADDR_ENV = "VOICEMESH_ORCHESTRATOR_ADDR"
INPUT_RATE_HZ = 16000
OUTPUT_RATE_HZ = 24000
pb = orchestrator_pb2
END_REQUEST = pb.ConverseRequest(control=pb.SessionControl(end=pb.EndSession()))
# Errors that mean the call is over (or was never usable): stop writing, the reader reports why.
WRITE_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def default_addr() -> str:
    return os.environ.get(ADDR_ENV) or f"127.0.0.1:{DEFAULT_PORTS['orchestrator']}"


def open_channel(addr: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(addr, options=grpc_channel_options())


def config_request(
    system_prompt: str = DEFAULT_SYSTEM_PROMPT, voice: str = "", session_id: str = "", client: str = "voicemesh"
) -> orchestrator_pb2.ConverseRequest:
    """The first Converse message: PCM16 16 kHz mono in, PCM16 24 kHz mono out."""
    pcm16 = common_pb2.AUDIO_ENCODING_PCM16
    return pb.ConverseRequest(
        config=pb.SessionConfig(
            session_id=session_id,
            system_prompt=system_prompt,
            voice=voice,
            input_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=INPUT_RATE_HZ, channels=1),
            output_format=common_pb2.AudioFormat(encoding=pcm16, sample_rate_hz=OUTPUT_RATE_HZ, channels=1),
            interim_transcripts=True,
            metadata={"client": client},
        )
    )


async def wait_event(event: asyncio.Event, other: asyncio.Event, timeout: float | None) -> bool:
    """Wait for `event` unless `other` (the stream ending) comes first or time runs out."""
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
    return event.is_set()


def report_failure(result, addr: str) -> None:
    """Print what went wrong in a session to stderr."""
    if result.failure:
        print(f"error: {result.failure}", file=sys.stderr)
        if result.failure.startswith("UNAVAILABLE"):
            print(f"  is the mesh running at {addr}? Start it with `voicemesh up`.", file=sys.stderr)
    if result.end_reason and result.end_reason != "ENDED":
        print(f"session ended: {result.end_reason}", file=sys.stderr)


class LineReader:
    """Reads stdin lines in a daemon thread, one per request, so a blocked read never holds
    up exit and the prompt only shows when the REPL is ready for the next line."""

    def __init__(self, prompt: str = "you> "):
        self.interactive = sys.stdin.isatty()
        self.prompt = prompt if self.interactive else ""
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        threading.Thread(target=self._serve, name="stdin-reader", daemon=True).start()

    def _serve(self) -> None:
        while True:
            loop, future = self._requests.get()
            try:
                line = input(self.prompt) if self.interactive else (sys.stdin.readline() or None)
            except (EOFError, OSError, ValueError):
                line = None
            loop.call_soon_threadsafe(lambda f=future, v=line: f.done() or f.set_result(v))

    async def __call__(self) -> str | None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._requests.put((loop, future))
        return await future


def _print_out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def chat_session(
    addr: str,
    read_line: Callable[[], Awaitable[str | None]],
    write: Callable[[str], None] = _print_out,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    voice: str = "",
    start_timeout: float = 30.0,
    turn_timeout: float = 180.0,
    end_timeout: float = 30.0,
):
    """A typed conversation: each line from `read_line` (None = EOF) becomes a TextInput turn;
    the bot's text is written as it is spoken, and the next line is read once the turn ends.
    Returns a `voicemesh.talk.TalkResult` (bot audio included)."""
    from voicemesh.talk import SessionTracker, open_session

    spoke: set[int] = set()  # turns whose "bot> " prefix has been written

    def show(response: orchestrator_pb2.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "bot_text" and response.bot_text.text.strip():
            number = response.bot_text.turn_number
            write(("" if number in spoke else "bot> ") + response.bot_text.text.strip() + " ")
            spoke.add(number)
        elif kind == "turn_ended" and response.turn_ended.turn_number in spoke:
            write("[interrupted]\n" if response.turn_ended.interrupted else "\n")
        elif kind == "error":
            error = response.error
            print(f"error: {error.code} from {error.source or 'server'}: {error.message}", file=sys.stderr)

    tracker = SessionTracker(show)
    config = config_request(system_prompt, voice, client="voicemesh-chat")
    async with open_session(addr, config, tracker, start_timeout, end_timeout) as call:
        while call is not None and not tracker.ended.is_set():
            line_task = asyncio.ensure_future(read_line())
            ended = asyncio.ensure_future(tracker.ended.wait())
            await asyncio.wait([line_task, ended], return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            if not line_task.done():  # the server ended the session while we waited for input
                line_task.cancel()
                break
            line = line_task.result()
            if line is None or line.strip() == "/quit":
                break
            if line.strip():
                await _one_text_turn(call, tracker, line.strip(), turn_timeout)
    return tracker.finish()


async def _one_text_turn(call, tracker, text: str, timeout: float) -> None:
    """Send one typed turn and wait until the turn it starts has ended (or an error, or timeout)."""
    before_turn, before_errors = tracker.latest_turn, len(tracker.result.errors)
    try:
        await call.write(pb.ConverseRequest(text=pb.TextInput(text=text)))
    except WRITE_ERRORS:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not tracker.ended.is_set():
        number = tracker.latest_turn
        if number > before_turn and tracker.turns[number].ended:
            return
        if number == before_turn and len(tracker.result.errors) > before_errors:
            return  # rejected before a turn began
        if loop.time() >= deadline:
            print(f"error: no reply within {timeout:.0f} s", file=sys.stderr)
            return
        await wait_event(tracker.changed, tracker.ended, deadline - loop.time())


def run_chat(
    addr: str,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    voice: str = "",
    out: str | None = None,
    abort: threading.Event | None = None,
) -> int:
    """The chat REPL on stdin/stdout; returns an exit code. `abort`, set from another thread,
    ends the chat at once (`voicemesh up --chat` sets it when a service dies)."""
    reader = LineReader()
    if reader.interactive:
        print(f"connected to {addr}; type a message, /quit or Ctrl-D to end", file=sys.stderr)

    async def chat():
        if abort is not None:
            task, loop = asyncio.current_task(), asyncio.get_running_loop()

            def cancel_on_abort() -> None:
                abort.wait()
                with contextlib.suppress(RuntimeError):  # the loop may be gone by then
                    loop.call_soon_threadsafe(task.cancel)

            threading.Thread(target=cancel_on_abort, name="chat-abort", daemon=True).start()
        return await chat_session(addr, reader, system_prompt=system_prompt, voice=voice)

    try:
        result = asyncio.run(chat())
    except asyncio.CancelledError:
        return 1
    if out and result.bot_audio:
        from voicemesh.wavio import write_wav

        write_wav(out, result.bot_audio, result.output_rate_hz)
        print(f"wrote {result.audio_seconds:.1f} s of bot audio to {out}", file=sys.stderr)
    report_failure(result, addr)
    return 0 if result.ok else 1


def _chat(args: argparse.Namespace) -> int:
    try:
        return run_chat(args.addr, args.system_prompt, args.voice, args.out)
    except KeyboardInterrupt:
        return 130


def _talk(args: argparse.Namespace) -> int:
    from voicemesh import talk, wavio

    try:
        samples = wavio.load_for_sending(args.wav)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    live = not args.json and sys.stderr.isatty()

    def show(response: orchestrator_pb2.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "error":
            error = response.error
            print(f"error: {error.code} from {error.source or 'server'}: {error.message}", file=sys.stderr)
        elif live and kind == "user_transcript" and response.user_transcript.is_final:
            print(f"you> {response.user_transcript.text.strip()}", file=sys.stderr)
        elif live and kind == "bot_text":
            print(f"bot> {response.bot_text.text.strip()}", file=sys.stderr)

    if live:
        print(f"streaming {len(samples) / wavio.SEND_RATE_HZ:.1f} s of audio to {args.addr} in real time", file=sys.stderr)
    try:
        result = asyncio.run(
            talk.talk_session(
                args.addr, samples, system_prompt=args.system_prompt, voice=args.voice,
                wait_after=args.wait_after, on_event=show,
            )
        )
    except KeyboardInterrupt:
        return 130
    if args.out:
        wavio.write_wav(args.out, result.bot_audio, result.output_rate_hz)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        if result.session_id:
            print(f"session {result.session_id}: {len(result.turns)} turn(s), {result.audio_seconds:.1f} s of bot audio")
        for turn in result.turns:
            latency = f"{turn.latency_ms:.0f} ms" if turn.latency_ms is not None else "n/a"
            server = f"{turn.server_latency_ms:.0f} ms" if turn.server_latency_ms is not None else "n/a"
            flag = "" if turn.reason in ("ANSWERED", "") else f" ({turn.reason.lower().replace('_', ' ')})"
            print(f"turn {turn.number}: latency {latency} (server-reported {server}){flag}")
            print(f"  you> {turn.user_transcript}")
            print(f"  bot> {turn.bot_text}")
        if args.out:
            print(f"bot audio: {args.out}")
    report_failure(result, args.addr)
    return 0 if result.ok else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--addr", default=default_addr(), help=f"orchestrator address (env {ADDR_ENV})")
        parser.add_argument("--out", help="write the bot's audio to this WAV file (24 kHz mono)")
        parser.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system prompt for the LLM")
        parser.add_argument("--voice", default="", help="TTS voice (default: the provider's)")

    talk = sub.add_parser("talk", help="send a WAV file as the user's voice; print transcripts, replies, latency")
    talk.add_argument("wav", help="input WAV (integer PCM, any rate, mono or stereo)")
    common(talk)
    talk.add_argument("--json", action="store_true", help="print one JSON object on stdout, nothing else")
    talk.add_argument(
        "--wait-after", type=float, default=20.0, metavar="SECONDS",
        help="after the audio, give up waiting when the server has been silent this long",
    )
    talk.set_defaults(handler=_talk)

    chat = sub.add_parser("chat", help="type to the voice agent; its replies print as they are spoken")
    common(chat)
    chat.set_defaults(handler=_chat)
