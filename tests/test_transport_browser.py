"""Debian's headless chromium through the whole embedded mesh, via the transport's page.

The fake microphone plays "What is the capital of France?" (tests/fixtures) in a loop; the
page must show the user transcript and receive non-silent bot audio, measured in the page
through Web Audio. Once over WebRTC and once over the WebSocket. Screenshots are saved
under test-artifacts/.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from conftest import FIXTURES, ROOT, Processes
from transport_harness import start_transport

pytestmark = [pytest.mark.e2e, pytest.mark.models]
BROWSER_DIR = ROOT / "tests" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def page_transport(real_mesh, tmp_path_factory):
    if not CHROMIUM.exists() or not (BROWSER_DIR / "node_modules" / "playwright-core").exists():
        pytest.fail("chromium or playwright-core missing: `make install` installs both (apt chromium, npm ci in tests/browser)")
    procs = Processes(tmp_path_factory.mktemp("transport-browser"))
    try:
        yield start_transport(procs, real_mesh.orchestrator_address)
    finally:
        procs.stop_all()


def fake_microphone_wav(path: Path) -> Path:
    """The question at 48 kHz with silence around it, so the VAD ends the turn before it loops."""
    with wave.open(str(FIXTURES / "question_capital.wav")) as src:
        rate, pcm = src.getframerate(), np.frombuffer(src.readframes(src.getnframes()), dtype="<i2")
    speech = soxr.resample(pcm, rate, 48000).astype("<i2")
    samples = np.concatenate((np.zeros(48000, "<i2"), speech, np.zeros(48000 * 6, "<i2")))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(48000)
        out.writeframes(samples.tobytes())
    return path


@pytest.mark.parametrize("mode", ["webrtc", "websocket"])
def test_browser_talks_to_the_mesh(page_transport, mode, tmp_path):
    screenshot = tmp_path / f"transport-{mode}.png"
    options = {
        "url": page_transport.http_url, "mode": mode, "wav": str(fake_microphone_wav(tmp_path / "mic.wav")),
        "screenshot": str(screenshot), "profile": str(tmp_path / "profile"), "timeoutMs": 120_000,
        "expect": ["capital", "france"], "minBotAudibleMs": 500,
    }
    run = subprocess.run(["node", "drive.mjs", json.dumps(options)], cwd=BROWSER_DIR, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    if screenshot.exists():
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(screenshot, ARTIFACTS / screenshot.name)
    page = result["page"]
    assert not result["pageErrors"], result["pageErrors"]
    assert page["mode"] == mode and page["sessionId"], (page, result["console"][-10:])
    heard = " ".join(page["userFinals"]).lower()
    assert "capital" in heard and "france" in heard, page
    # Bot audio reached the page's Web Audio graph, louder than -40 dBFS for at least 0.5 s.
    assert page["botAudibleMs"] >= 500 and page["botPeak"] > 0.01, page
    assert page["botTexts"], page
    assert screenshot.exists()
