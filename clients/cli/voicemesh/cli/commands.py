"""`voicemesh talk`, `voicemesh chat` and `voicemesh assistant`: the client library
(`voicemesh.client`) on a terminal."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import sys
import threading

from voicemesh.client import wavio
from voicemesh.client.channel import ADDR_ENV, default_addr
from voicemesh.client.chat import chat_session
from voicemesh.client.session import talk_session
from voicemesh.client.wavio import write_wav
from voicemesh.v1 import orchestrator_pb2


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


def run_chat(
    addr: str,
    system_prompt: str = "",
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
        return await chat_session(addr, reader, _print_out, system_prompt=system_prompt, voice=voice)

    try:
        result = asyncio.run(chat())
    except asyncio.CancelledError:
        return 1
    if out and result.bot_audio:
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
            talk_session(
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


def run_assistant(argv: list[str]) -> int:
    """`voicemesh assistant`: its own distribution (voicemesh-assistant), imported only here, so
    every other subcommand works where it is not installed; it parses its own flags."""
    try:
        from voicemesh.assistant import cli as assistant_cli
    except ImportError as err:
        print(f"error: `voicemesh assistant` needs the voicemesh-assistant distribution ({err}); install it with "
              "`pip install -e clients/assistant` from the repository (`make install` does)", file=sys.stderr)
        return 2
    args = assistant_cli.build_parser().parse_args(argv)
    return assistant_cli.run(args, read_line=None if args.wav else LineReader())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--addr", default=default_addr(), help=f"orchestrator address (env {ADDR_ENV})")
        parser.add_argument("--out", help="write the bot's audio to this WAV file (24 kHz mono)")
        parser.add_argument("--system-prompt", default="", help="system prompt for the LLM (default: the orchestrator's)")
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
    sub.add_parser("assistant", help="the daily-life assistant: calendar, tasks, reminders, notes, smart home, e-mail "
                   "(docs/assistant.md)", add_help=False)
