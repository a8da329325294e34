"""Debian's headless chromium and firefox-esr through the whole embedded mesh, via the transport's page.

The fake microphone plays "What is the capital of France?" (tests/fixtures) in a loop; the
page must show the user transcript and receive non-silent bot audio, measured in the page
through Web Audio. Each browser once over WebRTC and once over the WebSocket. Screenshots are
saved under test-artifacts/.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from conftest import FIXTURES
from support import ROOT, START_S, Processes
from transport_harness import start_transport

pytestmark = [pytest.mark.e2e, pytest.mark.models]
BROWSER_DIR = ROOT / "tests" / "browser"
# Deadlines, not speed claims (each wait ends as soon as the page has what it needs): starting a
# browser, and the page hearing the question and playing the answer, on a loaded machine.
LAUNCH_MS, TALK_MS = 180_000, 300_000
ARTIFACTS = ROOT / "test-artifacts"
# browser: (driver in tests/browser, the browser it starts, the npm package the driver uses)
BROWSERS = {
    "chromium": ("drive.mjs", Path("/usr/bin/chromium"), "playwright-core"),
    "firefox": ("drive_firefox.mjs", Path("/usr/bin/firefox-esr"), "puppeteer-core"),
}


@pytest.fixture(scope="module")
def page_transport(real_mesh, tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("transport-browser"))
    try:
        yield start_transport(procs, real_mesh.orchestrator_address)
    finally:
        procs.stop_all()


@pytest.fixture(scope="module")
def sound_server(tmp_path_factory):
    """PulseAudio with just a null sink, reached through a unix socket in a temporary folder:
    headless Firefox never starts an AudioContext without an audio output device. Yields the
    environment that points the browser at it."""
    if not shutil.which("pulseaudio"):
        pytest.fail("pulseaudio missing: `make install` installs it (apt)")
    home = tmp_path_factory.mktemp("pulse")
    socket_path = home / "native"
    procs = Processes(home)
    try:
        # -n: no default.pa, so no TCP, no D-Bus, no hardware; never exits on its own.
        proc = procs.start("pulseaudio", [
            "pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no", "--exit-idle-time=-1", "--realtime=no",
            "--high-priority=no", "--log-target=stderr", "-L", "module-null-sink",
            "-L", f"module-native-protocol-unix auth-anonymous=1 socket={socket_path}",
        ], {"HOME": str(home), "XDG_RUNTIME_DIR": str(home), "XDG_CONFIG_HOME": str(home)})
        deadline = time.monotonic() + START_S
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pulseaudio did not start: {(home / 'pulseaudio.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield {"PULSE_SERVER": f"unix:{socket_path}", "PULSE_COOKIE": str(home / "cookie")}
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
@pytest.mark.parametrize("browser", list(BROWSERS))
def test_browser_talks_to_the_mesh(browser, mode, tmp_path, request):
    driver, executable, package = BROWSERS[browser]
    if not executable.exists() or not (BROWSER_DIR / "node_modules" / package).exists():
        pytest.fail(f"{executable} or npm {package} missing: `make install` installs both (apt, npm ci in tests/browser)")
    env = {**os.environ, **request.getfixturevalue("sound_server")} if browser == "firefox" else None
    page_transport = request.getfixturevalue("page_transport")  # after the checks: it loads every model
    screenshot = tmp_path / (f"transport-{mode}.png" if browser == "chromium" else f"transport-{browser}-{mode}.png")
    options = {
        "url": page_transport.http_url, "mode": mode, "wav": str(fake_microphone_wav(tmp_path / "mic.wav")),
        "screenshot": str(screenshot), "profile": str(tmp_path / "profile"), "timeoutMs": TALK_MS, "launchTimeoutMs": LAUNCH_MS,
        "expect": ["capital", "france"], "minBotAudibleMs": 500,
    }
    run = subprocess.run(["node", driver, json.dumps(options)], cwd=BROWSER_DIR, capture_output=True, text=True,
                         timeout=(LAUNCH_MS + 2 * TALK_MS) / 1000, env=env)
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
