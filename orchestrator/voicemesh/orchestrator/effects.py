"""Carrying out the turn controller's effects: the I/O half of turn-taking.

`EffectRunner` is the part of a Session that feeds events to its TurnController and does
what comes back, in order: stream writes, the reply tasks (a BotReply per turn, speculative
ones behind a HeldPlayout), playout and tool calls, the context, timers, the lifecycle
observers. It decides nothing about turns (every `if` about them is in turns.py), with one
watchdog: a reply that makes no progress for REPLY_STALL_S (a hung LLM or TTS replica) is
cancelled and reported as failed, so no turn waits forever. An LLM that queues the request
behind other generations says so every few seconds (GenerateResponse.queued): that counts as
progress, so load delays a reply and never fails it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from voicemesh.orchestrator import events, turn_events as ev
from voicemesh.orchestrator.clients import ServiceClients
from voicemesh.orchestrator.context import ConversationContext
from voicemesh.orchestrator.forwarding import CallerAudio
from voicemesh.orchestrator.playout import HeldPlayout, Playout
from voicemesh.orchestrator.reply import BotReply, EmptyReply, ReplyCalls, ReplyEnv, call_metadata
from voicemesh.orchestrator.seams import ServiceStream, TurnObserver
from voicemesh.orchestrator.tools import ToolBroker
from voicemesh.orchestrator.tracing import SessionTracing, metrics
from voicemesh.orchestrator.turn_events import Speculation, Turn
from voicemesh.orchestrator.lifecycle import SessionLifecycle
from voicemesh.runtime import telemetry
from voicemesh.v1 import common_pb2, llm_pb2, stt_pb2, vad_pb2

log = logging.getLogger("voicemesh.session")
REPLY_STALL_ENV = "VOICEMESH_REPLY_STALL_SECS"
REPLY_STALL_S = 15.0  # no audio, no text to the TTS, no tool call for this long: the reply has hung


# What StartReply may go ahead of: effects that only report or keep time, and the context it reads.
_PASSABLE = (ev.Emit, ev.RecordTtfb, ev.Log, ev.CountDelayed, ev.StartTimer, ev.CancelTimer, ev.AddToContext)


@dataclass(frozen=True)
class _UpdateContext:
    """The context half of an AddToContext that StartReply passed: the reply reads it."""
    effect: ev.AddToContext


@dataclass(frozen=True)
class _TellObservers:
    """Its observers' half, left where the AddToContext was: a recorder's transcript entry
    still reaches the caller after the transcript and turn events that came before it."""
    effect: ev.AddToContext


def _reply_first(effects: list) -> list:
    """StartReply ahead of the effects just before it that only report (the final transcript to
    the caller, the STT's TTFB, timers): the reply's LLM request is the turn's critical path, and
    a reply task scheduled first runs before the caller's writer wakes for the transcript (about
    0.3 ms sooner here). The context it reads is still added first, and nothing the caller sees
    changes order: the observers hear of the context where they did, and the reply's first audio
    comes only after the LLM and the TTS have answered."""
    for index, effect in enumerate(effects):
        if type(effect) is ev.StartReply:
            start = index
            while start and isinstance(effects[start - 1], _PASSABLE):
                start -= 1
            passed = effects[start:index]
            ahead = [_UpdateContext(e) for e in passed if type(e) is ev.AddToContext]
            behind = [_TellObservers(e) if type(e) is ev.AddToContext else e for e in passed]
            return effects[:start] + ahead + [effect] + behind + effects[index + 1:]
    return effects


def reply_stall_s() -> float:
    raw = os.environ.get(REPLY_STALL_ENV, "")
    try:
        value = float(raw) if raw else REPLY_STALL_S
    except ValueError:
        raise ValueError(f"{REPLY_STALL_ENV}={raw!r}: expected seconds") from None
    return value if value > 0 else REPLY_STALL_S


class _Progress:
    """A ReplySink in front of the playout that counts what the reply delivers (the watchdog's pulse)."""

    def __init__(self, sink, pulse):
        self.sink, self.pulse = sink, pulse

    def audio(self, message, seconds: float, turn_number: int) -> None:
        self.pulse()
        self.sink.audio(message, seconds, turn_number)

    def marker(self, fire) -> None:
        self.pulse()
        self.sink.marker(fire)

    async def room(self) -> None:
        await self.sink.room()
        self.pulse()  # waiting for the caller to hear queued audio is not a stall


class EffectRunner:
    """Base of Session. Uses only these of its stages (set by Session):"""

    session_id: str
    clock: object  # () -> float, the controller's clock
    controller: SessionLifecycle  # the turn controller behind the session lifecycle rules
    clients: ServiceClients
    playout: Playout
    tools: ToolBroker
    context: ConversationContext
    reply_env: ReplyEnv
    tracing: SessionTracing
    observers: list[TurnObserver]
    caller_audio: CallerAudio
    vad_call: ServiceStream
    stt_call: ServiceStream

    def __init__(self) -> None:
        self.reply_task: asyncio.Task | None = None
        self._calls: dict[Turn, ReplyCalls] = {}  # opened at the user's stop, before the final
        self._speculations: dict[Speculation, tuple[HeldPlayout, asyncio.Task]] = {}
        self._timers: dict[tuple[str, Turn | None], asyncio.TimerHandle] = {}
        self._drain_task: asyncio.Future | None = None  # End's wait for the playout, cancelled at session end
        self.stt_turn: Turn | None = None  # the last turn whose TurnContext went to the STT (replayed on a reopen)
        self._reply_turn: Turn | None = None
        self._pulse = 0  # bumped by whatever the reply in progress delivers
        self._stall = (0, 0.0)  # (the reply's progress as last seen, when it last changed)
        self._stall_s = reply_stall_s()
        self._handlers = {
            ev.Emit: lambda e: self.emit(events.response(e.event, e.fields)),
            ev.EmitError: self._error,
            ev.Log: lambda e: getattr(log, e.level)("%s", e.message),
            ev.CountDelayed: lambda e: metrics().delayed.add(1, {"waiting_for": e.waiting_for}),
            ev.RecordTtfb: lambda e: metrics().ttfb.record(e.ms, {"service": e.service}),
            ev.OpenReplyCalls: self._open_calls,
            ev.CloseReplyCalls: lambda e: self._close_calls(e.turn),
            ev.StartReply: self._start_reply,
            ev.StartBotReply: self._start_bot_reply,
            ev.Speculate: self._speculate,
            ev.ConfirmSpeculation: self._confirm,
            ev.DropSpeculation: self._drop,
            ev.CancelReply: lambda e: self.reply_task and not self.reply_task.done() and self.reply_task.cancel(),
            ev.CancelTools: lambda e: self.tools.cancel_all(e.reason),
            ev.ClearPlayout: lambda e: self.playout.clear(e.turn_number),
            ev.ResetPlayoutClock: lambda e: self.playout.reset_clock(),
            ev.AddToContext: self._add_to_context,
            _UpdateContext: lambda e: self._update_context(e.effect),
            _TellObservers: lambda e: self._tell_observers(e.effect),
            ev.StartTimer: self._start_timer,
            ev.CancelTimer: self._cancel_timer,
            ev.TurnOpened: lambda e: [observer.turn_opened(e.turn) for observer in self.observers],
            ev.TurnFinished: lambda e: [observer.turn_finished(e.turn) for observer in self.observers],
            ev.Close: lambda e: self.close(e.reason),
            ev.CloseWhenDrained: self._start_close_when_drained,
        }

    def emit(self, message) -> None:
        raise NotImplementedError

    def close(self, reason: int) -> None:
        raise NotImplementedError

    # ---- feeding the controller ----------------------------------------------------------
    def feed(self, event) -> None:
        """An event from a callback, a timer or a reader; its effects write to no stream."""
        for effect in _reply_first(self.controller.handle(event, self.clock())):
            if isinstance(effect, ev.ASYNC_EFFECTS):  # not produced for these events; kept in order regardless
                asyncio.ensure_future(self._write(effect))
            else:
                self._handlers[type(effect)](effect)

    async def feed_async(self, event) -> None:
        """An event whose effects may write to the VAD and STT streams (awaited in order)."""
        for effect in _reply_first(self.controller.handle(event, self.clock())):
            if isinstance(effect, ev.ASYNC_EFFECTS):
                await self._write(effect)
            else:
                self._handlers[type(effect)](effect)

    async def _write(self, effect) -> None:
        turn = effect.turn
        if isinstance(effect, ev.SendTurnStart):
            traceparent, tracestate = telemetry.traceparent_of(turn.span) if turn.span else ("", "")
            context = common_pb2.TurnContext(turn_id=turn.turn_id, turn_number=turn.number, audio_offset_ms=effect.offset_ms,
                                             trace=common_pb2.TraceContext(traceparent=traceparent, tracestate=tracestate))
            await self.vad_call.write(vad_pb2.DetectRequest(turn=context))  # its speech segment span joins the turn
            self.stt_turn = turn
            await self.caller_audio.flush_stt()  # the STT hears the turn's pre-roll before its start
            await self.stt_call.write(stt_pb2.RecognizeRequest(turn_start=context))
        else:  # SendFinalize
            await self.caller_audio.flush_stt(effect.offset_ms)
            await self.stt_call.write(stt_pb2.RecognizeRequest(finalize=stt_pb2.Finalize(turn_id=turn.turn_id)))
            if effect.resume:
                await self.feed_async(ev.FinalizeSent(turn))

    # ---- effects -------------------------------------------------------------------------
    def _error(self, effect: ev.EmitError) -> None:
        self.tracing.error(effect.code, effect.source)
        self.emit(events.error(effect.code, effect.message, effect.source))
        if effect.source == "stt" and effect.code == "DEADLINE_EXCEEDED":  # a final given up: the STT call has hung
            self.stt_call.abandon("DEADLINE_EXCEEDED", "a final transcript never came (the STT service is not answering)")

    # ---- the reply watchdog --------------------------------------------------------------
    def reply_progress(self) -> None:
        self._pulse += 1

    def _watch_reply(self, turn: Turn) -> None:
        self._reply_turn = turn
        self._stall = (-1, self.clock())

    def check_reply(self) -> None:
        """Called on every tick: a reply silent for REPLY_STALL_S (tool calls aside) has hung."""
        task, turn = self.reply_task, self._reply_turn
        if task is None or task.done() or turn is None or turn.ended:
            return
        now, mark = self.clock(), self._pulse + turn.tts_characters + len(turn.ttfb_ms) + turn.llm_queued
        if mark != self._stall[0] or self.tools.in_progress:
            self._stall = (mark, now)
            return
        if now - self._stall[1] < self._stall_s:
            return
        task.cancel()
        details = (f"no response from the LLM or TTS service for {self._stall_s:g} s ({REPLY_STALL_ENV}); "
                   f"turn {turn.number} is given up")
        log.warning("session %s: %s", self.session_id, details)
        self.feed(ev.ReplyFailed(turn, "DEADLINE_EXCEEDED", details))

    def _open_calls(self, effect: ev.OpenReplyCalls) -> None:
        if effect.turn not in self._calls:
            self._calls[effect.turn] = ReplyCalls.open(self.clients, call_metadata(effect.turn, speculative=False))

    def _close_calls(self, turn: Turn) -> None:
        calls = self._calls.pop(turn, None)
        if calls:
            calls.cancel()

    def _start_reply(self, effect: ev.StartReply) -> None:
        reply = BotReply(self.reply_env, _Progress(self.playout, self.reply_progress), effect.turn)
        # The turn's calls stay open until it ends, so that ending it closes them even if the reply never ran.
        work = reply.run(self.context.snapshot(), self._calls.get(effect.turn))
        self.reply_task = asyncio.ensure_future(self._finish_reply(work, effect.turn))
        self._watch_reply(effect.turn)

    def _start_bot_reply(self, effect: ev.StartBotReply) -> None:
        reply = BotReply(self.reply_env, _Progress(self.playout, self.reply_progress), effect.turn)
        if effect.text:
            work = reply.say(effect.text)
        else:
            extra = [llm_pb2.ChatMessage(role="user", content=effect.instruction)] if effect.instruction else []
            work = reply.run(self.context.snapshot(*extra))
        self.reply_task = asyncio.ensure_future(self._finish_reply(work, effect.turn))
        self._watch_reply(effect.turn)

    def _speculate(self, effect: ev.Speculate) -> None:
        held = HeldPlayout(self.playout)
        reply = BotReply(self.reply_env, held, effect.turn, held=held)
        messages = self.context.snapshot(llm_pb2.ChatMessage(role="user", content=effect.speculation.text))
        task = asyncio.ensure_future(self._finish_reply(reply.run(messages), effect.turn, held, effect.speculation))
        self._speculations[effect.speculation] = (held, task)

    def _confirm(self, effect: ev.ConfirmSpeculation) -> None:
        held, self.reply_task = self._speculations.pop(effect.speculation)
        self._watch_reply(effect.turn)
        self._close_calls(effect.turn)  # the speculation has its own
        held.release()  # its audio, already synthesised, starts playing now

    def _drop(self, effect: ev.DropSpeculation) -> None:
        entry = self._speculations.pop(effect.speculation, None)
        if entry:
            entry[1].cancel()

    def _add_to_context(self, effect: ev.AddToContext) -> None:
        self._update_context(effect)
        self._tell_observers(effect)

    def _update_context(self, effect: ev.AddToContext) -> None:
        if effect.role == "user":
            self.context.add_user(effect.text)
        else:
            self.context.add_assistant(effect.text, interrupted=effect.interrupted)

    def _tell_observers(self, effect: ev.AddToContext) -> None:
        for observer in self.observers:
            observer.said(effect.role, effect.text, effect.interrupted)

    def _start_timer(self, effect: ev.StartTimer) -> None:
        self._cancel_timer(effect)
        delay = max(0.0, effect.deadline - self.clock())
        handle = asyncio.get_running_loop().call_later(delay, self._timer_expired, effect.name, effect.turn)
        self._timers[(effect.name, effect.turn)] = handle

    def _timer_expired(self, name: str, turn: Turn | None) -> None:
        self._timers.pop((name, turn), None)
        self.feed(ev.TimerExpired(name, turn))

    def _cancel_timer(self, effect) -> None:
        handle = self._timers.pop((effect.name, effect.turn), None)
        if handle:
            handle.cancel()

    def cancel_timers(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._drain_task is not None:
            self._drain_task.cancel()

    def _start_close_when_drained(self, effect: ev.CloseWhenDrained) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.ensure_future(self._close_when_drained(effect.reason))

    def cancel_replies(self) -> None:
        """The session is over: the reply and any speculation stop."""
        if self.reply_task:
            self.reply_task.cancel()
        for _, task in self._speculations.values():
            task.cancel()

    async def _close_when_drained(self, reason: int) -> None:
        await self.playout.drained()
        self.close(reason)

    async def _finish_reply(self, work, turn: Turn, held: HeldPlayout | None = None,
                            speculation: Speculation | None = None) -> None:
        try:
            await work
            if held is not None:
                await held.released.wait()
            await self.playout.drained()
            self.feed(ev.ReplyDone(turn))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any failure ends this turn with a reason, never silently
            if isinstance(err, grpc.aio.AioRpcError):
                code, details = err.code().name, err.details()
            elif isinstance(err, EmptyReply):
                code, details = err.code, str(err)
            else:
                log.exception("session %s: bot reply failed", self.session_id)
                code, details = "INTERNAL", f"{type(err).__name__}: {err}"
            if held is not None and not held.released.is_set():
                log.info("session %s: speculative reply failed: %s", self.session_id, details)
                self._speculations.pop(speculation, None)
                self.feed(ev.SpeculationFailed(turn, speculation))
                return
            self.feed(ev.ReplyFailed(turn, code, details))
