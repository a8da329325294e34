"""`voicemesh assistant` as a user runs it, a process of its own against the mesh of
test_assistant_converse.py (fake VAD/STT/TTS, the real `openai` LLM provider on the SSE fake):
a WAV in with --json out, and a typed chat on stdin."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np

from assistant import test_assistant_converse as converse
from assistant.test_assistant_converse import PARIS, START, calls, last, said
from support import ROOT, silence, tone
from voicemesh.assistant.clock import ManualClock
from voicemesh.assistant.dispatch import ToolRunner
from voicemesh.assistant.registry import all_tools, make_context
from voicemesh.client.wavio import write_wav

# The same mesh fixtures (a mesh of this module's own: they are module-scoped).
llm_fake, mesh, model = converse.llm_fake, converse.mesh, converse.model
RUN_S = 180  # a hang guard for the command, never a speed claim


def add_buy_milk(messages):
    if last(messages)["role"] == "tool":
        return said("Added buy milk.")
    return calls("call_add", "tasks_add", title="buy milk")


def assistant_command(mesh, data, *flags) -> list[str]:
    return [sys.executable, "-m", "voicemesh.cli", "assistant", "--addr", mesh.orchestrator_address, "--data", str(data),
            "--tz", "Europe/Paris", *flags]


def task_titles(data) -> list[str]:
    runner = ToolRunner(all_tools(make_context(data, PARIS, ManualClock(START)), ("tasks",)))
    outcome = asyncio.run(runner.run(*runner.resolve("tasks_list", "{}")))
    return [task["title"] for task in json.loads(outcome.content)["tasks"]]


def test_a_wav_request_prints_transcripts_replies_and_tool_calls_as_json(mesh, model, tmp_path):
    model(add_buy_milk)
    wav = tmp_path / "request.wav"
    write_wav(wav, np.concatenate([silence(0.3), tone(1.0), silence(1.5)]), 16000)  # the fake STT hears "utterance 1"
    done = subprocess.run(assistant_command(mesh, tmp_path / "data", "--wav", str(wav), "--json"), capture_output=True,
                          text=True, timeout=RUN_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # one object, nothing else on stdout
    assert result["user_transcripts"] == ["utterance 1"], result
    assert [(c["name"], c["arguments"], c["status"]) for c in result["tool_calls"]] == [
        ("tasks_add", {"title": "buy milk"}, "done")], result
    assert result["bot_texts"] == ["Added buy milk."] and result["announcements"] == [] and result["errors"] == []
    assert result["end_reason"] == "ENDED"
    assert task_titles(tmp_path / "data") == ["buy milk"]


def test_a_typed_chat_on_stdin_prints_the_replies(mesh, model, tmp_path):
    model(add_buy_milk)
    done = subprocess.run(assistant_command(mesh, tmp_path / "data"), input="add buy milk to my tasks\n",
                          capture_output=True, text=True, timeout=RUN_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["bot> Added buy milk."], done
    assert "you> add buy milk to my tasks" in done.stderr and '[tasks_add {"title": "buy milk"}]' in done.stderr
    assert task_titles(tmp_path / "data") == ["buy milk"]


def test_an_unreachable_orchestrator_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "voicemesh.cli", "assistant", "--addr", "127.0.0.1:1", "--data",
                           str(tmp_path)], input="hello\n", capture_output=True, text=True, timeout=RUN_S, cwd=ROOT)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr and "is the mesh running at 127.0.0.1:1" in done.stderr
