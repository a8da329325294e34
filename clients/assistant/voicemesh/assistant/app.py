"""One assistant session over Converse: the tools declared, each call the model makes run here
and answered, confirmations asked and read, reminders spoken as they come due.

The session is a `voicemesh.client` session (open_session, SessionTracker) with a handler on
every event:

- ToolCallRequested: the call runs as a task of its own; its ToolCallResult carries the
  tool's text, or is_error with the ToolError's message (an unknown tool and arguments that
  are not JSON or do not fit the schema are errors too, before anything runs).
- ToolCallCancelled (barge-in, the orchestrator's timeout, the session's end): the task is
  cancelled and nothing is sent for that call afterwards.
- A tool with `confirm`: confirm.py explains the design.
- Reminders: announcer.py; it speaks through `say`, which waits until nobody has the floor,
  since a `say` opens a bot turn and would cut off the turn in flight.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from voicemesh.assistant.announcer import Announcer, ReminderStore
from voicemesh.assistant.clock import Clock
from voicemesh.assistant.confirm import Pending, yes_or_no
from voicemesh.assistant.dispatch import Outcome, ToolRunner
from voicemesh.assistant.toolkit import Tool, ToolError
from voicemesh.client.channel import WRITE_ERRORS, config_request, wait_event
from voicemesh.client.session import SessionTracker, TalkResult, open_session
from voicemesh.client.wavio import SEND_RATE_HZ, send_time, speech_segments
from voicemesh.v1 import common_pb2, orchestrator_pb2 as pb

log = logging.getLogger("voicemesh.assistant")
CHUNK_MS = 40
INTERRUPTED = pb.TurnEnded.REASON_INTERRUPTED
# Added to an error result when the model makes a call that already failed: small models
# otherwise repeat it until the LLM service's limit of tool rounds ends the turn unanswered.
# At the GIVE_UP_AFTER-th identical failure the model is stopped (run_llm false) and the
# assistant says the error itself, so the user always hears why.
REPEATED = " (This exact call failed before: change the arguments, or tell the user what went wrong.)"
GIVE_UP_AFTER = 3


class AssistantSession:
    def __init__(self, tools: Sequence[Tool], clock: Clock, *, system_prompt: str = "", voice: str = "",
                 reminders: ReminderStore | None = None, tool_timeout_s: float = 0.0,
                 on_event: Callable[[pb.ConverseResponse], None] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 configure: Callable[[pb.SessionConfig], None] | None = None):
        """`on_event` sees every Converse event; `on_record` each tool call's record when it
        changes; `configure` may adjust the SessionConfig before it is sent."""
        self.runner = ToolRunner(tools)
        self.clock = clock
        self.system_prompt, self.voice, self.tool_timeout_s = system_prompt, voice, tool_timeout_s
        self.reminders = reminders
        self.on_event, self.on_record, self.configure = on_event, on_record, configure
        self.tracker = SessionTracker(self._handle)
        self.tool_calls: list[dict[str, Any]] = []  # one record per call, in order (for --json)
        self.announcements: list[str] = []  # what the assistant said by itself (`say`)
        self.pending: Pending | None = None  # a call waiting for the user's yes or no
        self.announcer: Announcer | None = None
        self._call = None
        self._calls: dict[str, asyncio.Task] = {}  # running tool calls by id
        self._cancelled: set[str] = set()  # ids the orchestrator gave up on: never answered after
        self._failed: dict[tuple[str, str], int] = {}  # (name, arguments) of calls that got an error: how often
        self._apology: tuple[int, str] | None = None  # (turn, text) to say once that turn is over
        self._tasks: set[asyncio.Task] = set()
        self._work: set[asyncio.Task] = set()
        self._write_lock = asyncio.Lock()  # one write at a time on the stream (audio, results, controls)
        self._say_lock = asyncio.Lock()  # one `say` at a time, each until its turn has begun

    # ---- the session ------------------------------------------------------------------------
    def config(self) -> pb.ConverseRequest:
        request = config_request(self.system_prompt, self.voice, client="voicemesh-assistant")
        request.config.tools.tools.extend(self.runner.declarations())
        if self.tool_timeout_s:
            request.config.tools.timeout_secs = self.tool_timeout_s
        if self.configure is not None:
            self.configure(request.config)
        return request

    @contextlib.asynccontextmanager
    async def connect(self, addr: str, start_timeout: float = 30.0, end_timeout: float = 30.0):
        """Open the session; yields self once it started, or None (`result().failure` says why).
        On a normal exit the session ends gracefully (End), with the reply in flight finished."""
        try:
            async with open_session(addr, self.config(), self.tracker, start_timeout, end_timeout) as call:
                self._call = call
                background = None
                if call is not None and self.reminders is not None:
                    self.announcer = Announcer(self.reminders, self.clock, self.say)
                    background = self._spawn(self._announce(), work=False)
                try:
                    yield self if call is not None else None
                finally:
                    if background is not None:
                        background.cancel()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _announce(self) -> None:
        await self.announcer.report_missed()
        await self.announcer.run()

    def result(self) -> TalkResult:
        return self.tracker.finish()

    def to_json(self) -> dict[str, Any]:
        result = self.result()
        return {**result.to_json(), "tool_calls": self.tool_calls, "announcements": self.announcements,
                "errors": [str(error) for error in result.errors], "end_reason": result.end_reason,
                **({"failure": result.failure} if result.failure else {})}

    # ---- what the caller does -----------------------------------------------------------------
    async def send_text(self, text: str) -> int:
        """A typed user turn; returns the latest turn number before it, for `wait_settled`."""
        before = self.tracker.latest_turn
        await self._write(pb.ConverseRequest(text=pb.TextInput(text=text)))
        return before

    async def text_turn(self, text: str, timeout: float = 180.0) -> bool:
        """Type one line and wait until its turn, and whatever it set off, is over."""
        before = await self.send_text(text)
        return await self.wait_settled(after_turn=before, timeout=timeout)

    async def say(self, text: str) -> bool:
        """Speak `text` as soon as nobody has the floor; False if the session is over first."""
        async with self._say_lock:
            if not await self.wait_for(lambda: self._floor_free()):
                return False
            before = self.tracker.latest_turn
            if not await self._write(pb.ConverseRequest(control=pb.SessionControl(say=pb.Say(text=text)))):
                return False
            self.announcements.append(text)
            # The next `say` waits until this one's turn has begun (and then, for the floor).
            return await self.wait_for(lambda: self.tracker.latest_turn > before)

    async def stream_audio(self, samples: np.ndarray, wait_after: float = 20.0) -> None:
        """`samples` (16 kHz int16) in real time, then silence until every utterance has been
        answered and the session has settled, or the server has said nothing for `wait_after` s."""
        chunk = SEND_RATE_HZ * CHUNK_MS // 1000
        segments = speech_segments(samples, SEND_RATE_HZ)
        self.tracker.result.segments = segments
        start, index, sent_at, done_at, last_end = time.monotonic(), 0, [], None, None
        while not self.tracker.ended.is_set():
            if index * chunk < len(samples):
                data = samples[index * chunk:(index + 1) * chunk].astype("<i2").tobytes().ljust(2 * chunk, b"\0")
            else:
                if done_at is None:
                    done_at = time.monotonic()
                    last_end = sent_at[(segments[-1].end - 1) // chunk] if segments else None
                idle = time.monotonic() - max(done_at, self.tracker.last_event)
                if (self.tracker.reply_complete(last_end) and self.settled()) or idle >= wait_after:
                    return
                data = bytes(2 * chunk)
            await asyncio.sleep(max(0.0, send_time(start, index, CHUNK_MS / 1000) - time.monotonic()))
            audio = common_pb2.AudioChunk(data=data, seq=index, offset_ms=index * CHUNK_MS)
            if not await self._write(pb.ConverseRequest(audio=audio)):
                return
            sent_at.append(time.monotonic())
            index += 1

    async def wait_settled(self, after_turn: int = -1, timeout: float | None = None) -> bool:
        """Until a turn after `after_turn` has ended and nothing is left to do (no turn, tool
        call, question or announcement in flight). False on timeout or the session's end."""
        return await self.wait_for(lambda: self.tracker.latest_turn > after_turn and self.settled(), timeout)

    # ---- events -----------------------------------------------------------------------------
    def _handle(self, response: pb.ConverseResponse) -> None:
        kind = response.WhichOneof("event")
        event = getattr(response, kind) if kind else None
        if kind == "tool_call":
            self._calls[event.id] = self._spawn(self._answer(event))
        elif kind == "tool_call_cancelled":
            self._cancel(list(event.ids), event.reason)
        elif kind == "user_transcript" and event.is_final and event.text.strip():
            self._user_said(event.text, event.turn_number)
        elif kind == "turn_ended":
            self._turn_ended(event)
        if self.on_event is not None:
            self.on_event(response)

    async def _answer(self, event: pb.ToolCallRequested) -> None:
        record = {"id": event.id, "name": event.name, "arguments": _arguments(event.arguments_json),
                  "turn": event.turn_number, "status": "running"}
        self.tool_calls.append(record)
        self._record(record)
        try:
            tool, arguments = self.runner.resolve(event.name, event.arguments_json)
        except ToolError as err:
            await self._send(event.id, Outcome(str(err), is_error=True), record, "rejected")
            return
        pending = self.pending
        if pending is not None and pending.answer is not None and pending.matches(tool.name, arguments):
            await self._answer_confirmed(event.id, pending, record)
        elif tool.confirm is not None:
            await self._ask_first(event, tool, arguments, record)
        else:
            outcome = await self.runner.run(tool, arguments)
            if self.announcer is not None:
                self.announcer.changed()  # a reminder may have been set or cancelled
            await self._send(event.id, outcome, record, "error" if outcome.is_error else "done")

    async def _ask_first(self, event: pb.ToolCallRequested, tool: Tool, arguments: dict, record: dict) -> None:
        try:
            question = tool.confirm(arguments)
        except ToolError as err:
            await self._send(event.id, Outcome(str(err), is_error=True), record, "error")
            return
        except Exception:  # a bug in the question: still ask, plainly
            log.exception("the confirm question of %s failed", tool.name)
            question = f"Run {tool.name.replace('_', ' ')} with {json.dumps(arguments)}?"
        if self.pending is not None and self.pending.answer is None:
            self._settle_pending("dropped")  # a new question replaces one not yet answered
        self.pending = Pending(tool, arguments, question, event.turn_number, record=record)
        record["question"] = question
        waiting = json.dumps({"status": "not done yet: waiting for the user's confirmation", "question": question})
        # run_llm false: the question is spoken word for word once this turn is over.
        await self._send(event.id, Outcome(waiting), record, "awaiting confirmation", run_llm=False)

    async def _answer_confirmed(self, call_id: str, pending: Pending, record: dict) -> None:
        """The model calls again after the user's answer: the confirmed outcome, or the refusal."""
        pending.reported = True
        if pending.answer == "yes":
            outcome = await asyncio.shield(pending.outcome)  # a cancelled call never cancels the run
            await self._send(call_id, outcome, record, "error" if outcome.is_error else "done")
        else:
            await self._send(call_id, Outcome(f"not done: the user said no, so {pending.tool.name} did not run"),
                             record, "declined")

    def _user_said(self, text: str, turn_number: int) -> None:
        pending = self.pending
        if pending is None or not pending.asked or pending.answer is not None:
            return
        pending.answer, pending.answer_turn = yes_or_no(text), turn_number
        if pending.answer == "yes":
            pending.outcome = self._spawn(self._run_confirmed(pending))
            self._settle_pending("confirmed", keep=True)
        elif pending.answer == "no":
            self._settle_pending("declined", keep=True)
        else:
            self._settle_pending("dropped")  # the user moved on

    async def _run_confirmed(self, pending: Pending) -> Outcome:
        outcome = await self.runner.run(pending.tool, pending.arguments)
        pending.record.update(result=outcome.content, is_error=outcome.is_error)
        self._record(pending.record)
        if self.announcer is not None:
            self.announcer.changed()
        return outcome

    def _turn_ended(self, event: pb.TurnEnded) -> None:
        if self._apology is not None and self._apology[0] == event.turn_number:
            self._spawn(self.say(self._apology[1]))
            self._apology = None
        pending = self.pending
        if pending is None:
            return
        if not pending.asked and event.turn_number == pending.asked_in_turn:
            if event.reason == INTERRUPTED:
                self._settle_pending("dropped")  # the user spoke over it: they want something else
            else:
                pending.asked = True
                self._spawn(self.say(pending.question))
        elif pending.answer is not None and event.turn_number == pending.answer_turn:
            self.pending = None
            if pending.answer == "yes" and not pending.reported and event.reason != INTERRUPTED:
                self._spawn(self._say_outcome(pending))

    async def _say_outcome(self, pending: Pending) -> None:
        """The model did not call the tool again after the user's yes: say how it went."""
        outcome = await pending.outcome
        await self.say(f"Sorry, that did not work: {outcome.content}" if outcome.is_error else "Done.")

    def _settle_pending(self, status: str, keep: bool = False) -> None:
        self.pending.record["status"] = status
        self._record(self.pending.record)
        if not keep:
            self.pending = None

    def _cancel(self, ids: list[str], reason: str) -> None:
        for call_id in ids:
            self._cancelled.add(call_id)
            task = self._calls.pop(call_id, None)
            if task is not None:
                task.cancel()
            for record in self.tool_calls:
                if record["id"] == call_id and record["status"] == "running":
                    record["status"] = f"cancelled: {reason}"
                    self._record(record)

    # ---- plumbing ---------------------------------------------------------------------------
    async def _send(self, call_id: str, outcome: Outcome, record: dict, status: str, run_llm: bool | None = None) -> None:
        async with self._write_lock:
            self._calls.pop(call_id, None)
            if call_id in self._cancelled:  # cancelled while it ran: the orchestrator wants nothing more
                return
            if outcome.is_error:
                call = (record["name"], json.dumps(record["arguments"], sort_keys=True))
                failures = self._failed[call] = self._failed.get(call, 0) + 1
                if failures >= GIVE_UP_AFTER:
                    run_llm = False
                    self._apology = (record["turn"], f"Sorry, I could not do that: {outcome.content}")
                if failures > 1:
                    outcome = Outcome(outcome.content + REPEATED, is_error=True)
            record.update(status=status, result=outcome.content, is_error=outcome.is_error)
            self._record(record)
            result = pb.ToolCallResult(tool_call_id=call_id, content=outcome.content, is_error=outcome.is_error,
                                       **({} if run_llm is None else {"run_llm": run_llm}))
            await self._write_locked(pb.ConverseRequest(tool_result=result))

    async def _write(self, request: pb.ConverseRequest) -> bool:
        async with self._write_lock:
            return await self._write_locked(request)

    async def _write_locked(self, request: pb.ConverseRequest) -> bool:
        if self._call is None or self.tracker.ended.is_set():
            return False
        try:
            await self._call.write(request)
        except WRITE_ERRORS:  # the call is over; the tracker records why
            return False
        return True

    def _floor_free(self) -> bool:
        return not self.tracker.open_turns and self.tracker.user_speaking == 0

    def settled(self) -> bool:
        """Nothing in flight but, maybe, a question waiting for the user."""
        question_coming = self.pending is not None and not self.pending.asked
        return self._floor_free() and not self._work and not self._say_lock.locked() and not question_coming

    async def wait_for(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait for `condition` over the tracker's events; False when the session ends first or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed = self.tracker.changed  # taken before the check: no event can slip between
            if condition():
                return True
            if self.tracker.ended.is_set():
                return False
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            await wait_event(changed, self.tracker.ended, left)

    def _spawn(self, coroutine, work: bool = True) -> asyncio.Task:
        """A task of this session; `work` ones (tool calls, questions, outcomes) keep it unsettled."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        if work:
            self._work.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._work.discard(task)
        # Waiters on "settled" look again: the tracker's own signal, set and replaced as it does.
        self.tracker.changed.set()
        self.tracker.changed = asyncio.Event()
        if not task.cancelled() and task.exception() is not None:
            log.error("assistant task failed", exc_info=task.exception())

    def _record(self, record: dict) -> None:
        if self.on_record is not None:
            self.on_record(record)


def _arguments(arguments_json: str) -> Any:
    try:
        return json.loads(arguments_json or "{}")
    except json.JSONDecodeError:
        return arguments_json  # as the model wrote it
