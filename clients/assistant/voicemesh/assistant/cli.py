"""`voicemesh assistant`: the assistant on a terminal, typed (the default) or from a WAV file.

    voicemesh assistant                          # type; replies print as they are spoken
    voicemesh assistant --wav request.wav --json # one JSON object: transcripts, replies, tool calls

The `voicemesh` command (voicemesh-cli) imports this module only for this subcommand and
hands it a line reader for stdin; secrets come from files or the environment, never flags.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from voicemesh.assistant.app import AssistantSession
from voicemesh.assistant.clock import SystemClock
from voicemesh.assistant.prompt import system_prompt
from voicemesh.assistant.registry import all_tools, make_context, reminder_store
from voicemesh.client.channel import ADDR_ENV, default_addr
from voicemesh.client.wavio import load_for_sending, write_wav
from voicemesh.v1 import orchestrator_pb2 as pb

DEFAULT_TOOL_TIMEOUT_S = 20.0  # an SMTP server or Home Assistant may take a few seconds
# Settings flags -> Context.settings keys (tools/home.py, tools/email.py, tools/notes.py read them).
SETTINGS = {"home_assistant_url": "Home Assistant's URL, e.g. http://homeassistant.local:8123",
            "smtp_host": "SMTP server for sending e-mail", "smtp_port": "its port (default 25, 587 with --smtp-starttls)",
            "smtp_from": "the user's e-mail address (the From of what is sent)", "smtp_username": "SMTP login",
            "notes_dir": "the notes folder (default DATA/notes)", "maildir": "the Maildir read (default DATA/Maildir)"}
SECRET_FILES = {"home_assistant_token": "a file holding Home Assistant's long-lived access token "
                                        "(else env HOME_ASSISTANT_TOKEN)",
                "smtp_password": "a file holding the SMTP password (else env SMTP_PASSWORD)"}


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "voicemesh" / "assistant"


def local_zone_name() -> str:
    """The system's IANA zone (TZ, else /etc/localtime's target), else UTC."""
    if os.environ.get("TZ", "").strip(":"):
        return os.environ["TZ"].strip(":")
    try:
        target = os.path.realpath("/etc/localtime")
    except OSError:
        return "UTC"
    return target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else "UTC"


def build_parser(prog: str = "voicemesh assistant") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="A daily-life voice assistant: calendar, tasks, reminders, "
                                     "notes, smart home and e-mail, its tools run here (docs/assistant.md).")
    parser.add_argument("--addr", default=default_addr(), help=f"orchestrator address (env {ADDR_ENV})")
    parser.add_argument("--wav", help="send this WAV as the user's voice instead of typing")
    parser.add_argument("--json", action="store_true", help="with --wav: print one JSON object on stdout, nothing else")
    parser.add_argument("--data", default=str(default_data_dir()), metavar="DIR",
                        help="where the calendar, tasks, reminders and notes live (default: %(default)s)")
    parser.add_argument("--tz", default=local_zone_name(), metavar="ZONE",
                        help="the user's IANA time zone (default: %(default)s)")
    parser.add_argument("--voice", default="", help="TTS voice (default: the provider's)")
    parser.add_argument("--out", help="write the bot's audio to this WAV file (24 kHz mono)")
    parser.add_argument("--tool-timeout", type=float, default=DEFAULT_TOOL_TIMEOUT_S, metavar="SECONDS",
                        help="how long a tool may run before the orchestrator gives up on it (default: %(default)s)")
    parser.add_argument("--wait-after", type=float, default=30.0, metavar="SECONDS",
                        help="with --wav: stop waiting once the server has been silent this long")
    group = parser.add_argument_group("tool settings")
    for key, text in SETTINGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest=key, default="", help=text)
    group.add_argument("--smtp-starttls", action="store_true", help="upgrade the SMTP connection with STARTTLS")
    for key, text in SECRET_FILES.items():
        group.add_argument("--" + key.replace("_", "-") + "-file", dest=key + "_file", default="", metavar="FILE", help=text)
    return parser


def settings_from(args: argparse.Namespace) -> dict[str, str]:
    """The tools' settings from the flags; secrets read from their files. ValueError says what is wrong."""
    settings = {key: getattr(args, key) for key in SETTINGS if getattr(args, key)}
    if args.smtp_starttls:
        settings["smtp_starttls"] = "true"
    for key in SECRET_FILES:
        path = getattr(args, key + "_file")
        if path:
            try:
                settings[key] = Path(path).expanduser().read_text().strip()
            except OSError as err:
                raise ValueError(f"cannot read --{key.replace('_', '-')}-file {path}: {err.strerror}") from None
    return settings


def run(args: argparse.Namespace, read_line: Callable[[], Awaitable[str | None]] | None = None) -> int:
    """Run the assistant; returns an exit code. `read_line` (None = EOF) feeds the typed chat."""
    try:
        tz = ZoneInfo(args.tz)
    except (ZoneInfoNotFoundError, ValueError):
        print(f"error: unknown time zone {args.tz!r}: use an IANA name such as Europe/Paris or America/New_York",
              file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
        data = Path(args.data).expanduser()
        data.mkdir(parents=True, exist_ok=True)
        samples = load_for_sending(args.wav) if args.wav else None
    except OSError as err:
        print(f"error: cannot use the data folder {args.data}: {err.strerror}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json and samples is None:
        print("error: --json goes with --wav (a typed chat prints as it goes)", file=sys.stderr)
        return 2
    if samples is None and read_line is None:
        print("error: no --wav and no terminal to type on", file=sys.stderr)
        return 2
    clock = SystemClock(tz)
    ctx = make_context(data, tz, clock, settings)
    tools = all_tools(ctx)
    quiet = bool(args.json and samples is not None)
    session = AssistantSession(tools, clock, system_prompt=system_prompt(tools, clock.now()), voice=args.voice,
                               reminders=reminder_store(ctx), tool_timeout_s=args.tool_timeout,
                               on_event=None if quiet else _show_event, on_record=None if quiet else _show_call)

    async def converse() -> None:
        async with session.connect(args.addr) as live:
            if live is None:
                return
            if samples is not None:
                await session.stream_audio(samples, args.wait_after)
                return
            if sys.stdin.isatty():
                print(f"connected to {args.addr}; data in {data}; type a message, /quit or Ctrl-D to end", file=sys.stderr)
            while not session.tracker.ended.is_set():
                line = await read_line()
                if line is None or line.strip() == "/quit":
                    break
                if line.strip():
                    await session.text_turn(line.strip())

    try:
        asyncio.run(converse())
    except KeyboardInterrupt:
        return 130
    result = session.result()
    if args.out and result.bot_audio:
        write_wav(args.out, result.bot_audio, result.output_rate_hz)
    if quiet:
        print(json.dumps(session.to_json()))
    if result.failure:
        print(f"error: {result.failure}", file=sys.stderr)
        if result.failure.startswith("UNAVAILABLE"):
            print(f"  is the mesh running at {args.addr}? Start it with `make up` or `voicemesh up`.", file=sys.stderr)
    return 0 if result.ok else 1


def _show_event(response: pb.ConverseResponse) -> None:
    kind = response.WhichOneof("event")
    if kind == "user_transcript" and response.user_transcript.is_final and not sys.stdin.isatty():
        print(f"you> {response.user_transcript.text.strip()}", file=sys.stderr)
    elif kind == "bot_text" and response.bot_text.text.strip():
        print(f"bot> {response.bot_text.text.strip()}", flush=True)
    elif kind == "error":
        error = response.error
        print(f"error: {error.code} from {error.source or 'server'}: {error.message}", file=sys.stderr)


def _show_call(record: dict) -> None:
    if record["status"] == "running":
        print(f"  [{record['name']} {json.dumps(record['arguments'])}]", file=sys.stderr)
    else:
        print(f"  [{record['name']}: {record['status']}]", file=sys.stderr)
