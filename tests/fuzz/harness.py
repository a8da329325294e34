"""The fuzz mesh, one fuzz case against it, the checks, the counts, and the healthy session.

A case is one call: its payloads (wire bytes) go out over a generic call with identity
serializers, so malformed protobuf reaches the server's parser. What a case must show:
- no hang: the call ends within DEADLINE_S (DEADLINE_EXCEEDED on our side is a finding);
- a clear status: one of ALLOWED, with a message; never UNKNOWN or INTERNAL;
- in-band errors (DetectMany's per-stream errors, Converse's `Error` events) likewise;
- a Converse session that started and ended OK ends with `SessionEnded`;
- no crash: after the case the process is alive, its health SERVING and its Info answers.
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fuzz.rpcs import Rpc
from support import PCM16_16K, ConverseProbe, FakeScript, Processes, event_is, fake_mesh, silence, tone
from voicemesh.v1 import orchestrator_pb2 as opb

DEADLINE_S = 45.0  # a liveness bound, never a speed claim: End may wait up to 30 s for a turn in flight
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
IN_BAND_BAD = {"UNKNOWN", "INTERNAL", ""}
REPLY = "Fine, thanks."
# Fast fakes: every reply is REPLY, every sentence 30 ms of audio, so a turn takes well under a second.
SCRIPT = FakeScript(reply=REPLY, llm_first_token_ms=2, llm_token_ms=1, tts_first_audio_ms=2, tts_sentence_ms=30, stt_final_ms=5)
INFO = {"vad": "VadService", "stt": "SttService", "llm": "LlmService", "tts": "TtsService", "orchestrator": "OrchestratorService"}


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Tally:
    cases: int = 0
    messages: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    slowest_s: float = 0.0
    findings: list = field(default_factory=list)
    # In-band errors that are clear but say the orchestrator let through what a backend refused
    # (a config it should have rejected itself): counted and reported, not failed.
    in_band: collections.Counter = field(default_factory=collections.Counter)


def describe(rpc: Rpc, payloads) -> list[str]:
    """The payloads as a reader wants them: the parsed message, or the bytes that do not parse."""
    out = []
    for payload in payloads if rpc.streaming else [payloads]:
        try:
            text = str(rpc.request_cls.FromString(payload)).replace("\n", " ")[:300] or "(empty message)"
        except Exception:  # noqa: BLE001 - not a message: show the bytes
            text = f"bytes {payload[:80].hex()}{'...' if len(payload) > 80 else ''} ({len(payload)} B)"
        out.append(text)
    return out


class FuzzMesh:
    def __init__(self, log_dir, recording_dir):
        self.procs = Processes(log_dir)
        self.mesh = fake_mesh(self.procs, SCRIPT, env={"VOICEMESH_RECORDING_DIR": str(recording_dir)}, name="fuzz-mesh")
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channels = {kind: grpc.insecure_channel(self.mesh.address(kind), options=options) for kind in INFO}
        self.tallies: dict[str, Tally] = collections.defaultdict(Tally)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.procs.stop_all()

    def call(self, rpc: Rpc, payloads) -> Outcome:
        channel, started = self.channels[rpc.kind], time.monotonic()
        responses = []
        try:
            if rpc.streaming:
                for raw in channel.stream_stream(rpc.method)(iter(payloads), timeout=DEADLINE_S):
                    responses.append(rpc.response_cls.FromString(raw))
            else:
                responses.append(rpc.response_cls.FromString(channel.unary_unary(rpc.method)(payloads, timeout=DEADLINE_S)))
        except grpc.RpcError as err:
            return Outcome(err.code(), err.details() or "", responses, time.monotonic() - started)
        return Outcome(grpc.StatusCode.OK, "", responses, time.monotonic() - started)

    def problems(self, rpc: Rpc, outcome: Outcome) -> list[str]:
        found = []
        if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            found.append(f"hang: no status within {DEADLINE_S:.0f} s (got {len(outcome.responses)} responses)")
        elif outcome.code not in ALLOWED:
            found.append(f"status {outcome.code.name}: {outcome.details!r}")
        elif outcome.code != grpc.StatusCode.OK and not outcome.details.strip():
            found.append(f"status {outcome.code.name} with no message")
        for response in outcome.responses:
            if rpc.name.endswith("DetectMany"):
                found += [f"stream {e.stream_id} ended with in-band {e.error.code}: {e.error.message!r}"
                          for e in response.events if e.HasField("error") and e.error.code in IN_BAND_BAD]
            if rpc.name.endswith("Converse") and response.HasField("error"):
                error = response.error
                if error.code in IN_BAND_BAD:
                    found.append(f"in-band error {error.code!r} from {error.source}: {error.message!r}")
                else:
                    self.tallies[rpc.name].in_band[f"{error.source} {error.code}: {error.message[:120]}"] += 1
        if rpc.name.endswith("Converse") and outcome.code == grpc.StatusCode.OK and outcome.responses:
            if outcome.responses[-1].WhichOneof("event") != "session_ended":
                found.append(f"ended OK without SessionEnded (last event {outcome.responses[-1].WhichOneof('event')})")
        return found

    def serving(self, kind: str) -> str | None:
        """Why the process is not well after a case, or None."""
        child = self.mesh.children[kind]
        if child.process.poll() is not None:
            return child.describe_exit()
        try:
            check = health_pb2_grpc.HealthStub(self.channels[kind]).Check(health_pb2.HealthCheckRequest(), timeout=30)
            if check.status != health_pb2.HealthCheckResponse.SERVING:
                return f"{kind} health is {health_pb2.HealthCheckResponse.ServingStatus.Name(check.status)}"
            self.channels[kind].unary_unary(f"/voicemesh.v1.{INFO[kind]}/Info")(b"", timeout=30)
        except grpc.RpcError as err:
            return f"{kind} health/Info failed after the case: {err.code().name} {err.details()}"
        return None

    def run_case(self, rpc: Rpc, payloads) -> None:
        """One case: call, check, count; raises AssertionError with the case on a finding."""
        outcome = self.call(rpc, payloads)
        found = self.problems(rpc, outcome)
        if (why := self.serving(rpc.kind)) is not None:
            found.append(f"not serving after the case: {why}")
        tally = self.tallies[rpc.name]
        tally.cases += 1
        tally.messages += len(payloads) if rpc.streaming else 1
        tally.statuses[outcome.code.name] += 1
        tally.slowest_s = max(tally.slowest_s, outcome.seconds)
        if found:
            tally.findings.append({"problems": found, "requests": describe(rpc, payloads), "details": outcome.details})
            del tally.findings[:-3]  # the last ones are Hypothesis's shrunk examples
            raise AssertionError(f"{rpc.name}: {'; '.join(found)}\nrequests: {describe(rpc, payloads)}")

    def report(self) -> dict:
        return {name: {"cases": t.cases, "messages": t.messages, "statuses": dict(t.statuses),
                       "slowest_s": round(t.slowest_s, 3), "findings": t.findings,
                       "in_band": dict(t.in_band.most_common(20))} for name, t in sorted(self.tallies.items())}

    def write_report(self, path, healthy: dict) -> None:
        with open(path, "w") as out:
            json.dump({"rpcs": self.report(), "healthy_session": healthy}, out, indent=1)


class HealthySession:
    """A scripted conversation on the orchestrator under fuzz, in a thread of its own: spoken
    turns (through the VAD streams the fuzzed sessions share) and typed turns, one after
    another until stopped, then End. Every turn must be answered with REPLY; no error event."""

    MAX_TURNS = 20_000  # a bound, far above what a make fuzz run reaches (400 turns in 7 min)

    def __init__(self, address: str):
        self.address = address
        self.stop = threading.Event()
        self.turns = 0
        self.problems: list[str] = []
        self.events: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="healthy-session", daemon=True)

    def start(self) -> "HealthySession":
        self.thread.start()
        return self

    async def _run(self) -> None:
        config = opb.SessionConfig(session_id="healthy-1", input_format=PCM16_16K)
        try:
            async with ConverseProbe(self.address, config) as probe:
                await probe.wait_for(event_is("session_started"))
                for number in range(1, self.MAX_TURNS + 1):
                    if self.stop.is_set():
                        break
                    ended = event_is("turn_ended", turn_number=number)
                    if number % 2:
                        await probe.speak_until(tone(0.6), ended)
                    else:
                        await probe.send_text(f"typed turn {number}")
                        await probe.wait_for(ended)
                    self._check_turn(probe, number)
                    await probe.send_audio(silence(0.2))
                await probe.end()
                await probe.wait_for(event_is("session_ended", reason=opb.SessionEnded.REASON_ENDED))
                self.events = probe.kinds()
                errors = [f"{e.code} {e.source}: {e.message}" for e in probe.of("error")]
                if errors:
                    self.problems.append(f"error events: {errors}")
        except Exception as err:  # noqa: BLE001 - reported by the test that checks this session
            self.problems.append(f"{type(err).__name__}: {err}")

    def _check_turn(self, probe: ConverseProbe, number: int) -> None:
        ended = [t for t in probe.of("turn_ended") if t.turn_number == number][-1]
        if ended.reason != opb.TurnEnded.REASON_ANSWERED:
            self.problems.append(f"turn {number} ended {opb.TurnEnded.Reason.Name(ended.reason)}")
        if not any(f.is_final and f.text for f in probe.of("user_transcript")):
            self.problems.append(f"turn {number}: no final transcript")
        spoken = [b.text for b in probe.of("bot_text") if b.turn_number == number]
        if REPLY not in " ".join(spoken):
            self.problems.append(f"turn {number}: bot said {spoken!r}, not {REPLY!r}")
        self.turns = number

    def state(self) -> dict:
        return {"turns": self.turns, "problems": list(self.problems), "last_events": self.events[-12:]}

    def finish(self, timeout: float = 120.0) -> dict:
        self.stop.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.problems.append(f"still running {timeout:.0f} s after it was asked to end")
        return self.state()
