"""A typed conversation over Converse: each line becomes a TextInput turn, and the bot's text
is handed back as it is spoken (`voicemesh chat` drives it from a terminal)."""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

from voicemesh.client.channel import WRITE_ERRORS, config_request, wait_event
from voicemesh.client.session import SessionTracker, open_session
from voicemesh.v1 import orchestrator_pb2

pb = orchestrator_pb2


async def chat_session(
    addr: str,
    read_line: Callable[[], Awaitable[str | None]],
    write: Callable[[str], None],
    *,
    system_prompt: str = "",
    voice: str = "",
    start_timeout: float = 30.0,
    turn_timeout: float = 180.0,
    end_timeout: float = 30.0,
):
    """A typed conversation: each line from `read_line` (None = EOF) becomes a TextInput turn;
    the bot's text is written as it is spoken, and the next line is read once the turn ends.
    Returns a `TalkResult` (bot audio included)."""
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
