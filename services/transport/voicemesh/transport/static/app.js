// voicemesh page: talk to the bot over WebRTC (Opus, events on a data channel) or, where
// WebRTC is unavailable or fails, over a WebSocket (PCM16 frames, JSON events).
// Plain JS, no build step. `window.voicemesh` exposes what the page saw, for tests.
"use strict";

const $ = (id) => document.getElementById(id);
const OUTPUT_RATE = 24000; // bot audio over the WebSocket
const SILENCE_RMS = 0.01; // -40 dBFS: quieter counts as silence in the level meter

const stats = (window.voicemesh = {
  mode: null, status: "idle", sessionId: null, userFinals: [], botTexts: [], turns: [], errors: [],
  botAudibleMs: 0, botPeak: 0, clears: 0, ended: null,
});

let call = null; // the live connection: {mode, close(), setMuted(bool)}
let audio = null; // {ctx, analyser, sink}

function setStatus(text) {
  stats.status = text;
  $("status").textContent = text;
}

function showError(text) {
  stats.errors.push(text);
  $("error").textContent = text;
  $("error").hidden = false;
}

function setButtons(connected) {
  $("connect").disabled = connected;
  $("hangup").disabled = !connected;
  $("mute").disabled = !connected;
  $("transport").disabled = connected;
}

// -- audio: one AudioContext; bot audio of either transport passes an analyser ---------------

function setupAudio() {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 2048;
  const sink = ctx.createGain(); // keeps the analyser pulled without playing it twice
  sink.gain.value = 0;
  analyser.connect(sink).connect(ctx.destination);
  const samples = new Float32Array(analyser.fftSize);
  const tickMs = 50;
  setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    $("bot-level").value = Math.min(1, rms * 4);
    if (rms > SILENCE_RMS) stats.botAudibleMs += tickMs;
    stats.botPeak = Math.max(stats.botPeak, rms);
  }, tickMs);
  return { ctx, analyser };
}

// -- events: the same JSON on the data channel and the WebSocket ----------------------------

function addLine(cls, text) {
  const li = document.createElement("li");
  li.className = cls;
  li.textContent = text;
  $("conversation").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
  return li;
}

function turnItem(turn) {
  let li = document.querySelector(`#turns li[data-turn="${turn}"]`);
  if (!li) {
    li = document.createElement("li");
    li.dataset.turn = turn;
    li.innerHTML = `<span class="summary">turn ${turn}: listening…</span><div class="waterfall">per-service TTFB: not reported</div>`;
    $("turns").appendChild(li);
  }
  return li;
}

// Per-service time to first byte, once the API reports it (TurnEnded.metrics, or a `metrics`
// event). Accepts {stt: ms, llm: ms, ...} or [{service|name|processor, ttfb_ms|ms|value}].
function drawWaterfall(li, metrics) {
  const box = li.querySelector(".waterfall");
  const source = metrics && (metrics.ttfb || metrics.ttfb_ms || metrics.services || metrics);
  let entries = [];
  if (Array.isArray(source)) {
    entries = source.map((m) => [m.service || m.name || m.processor, Number(m.ttfb_ms ?? m.ms ?? m.value)]);
  } else if (source && typeof source === "object") {
    entries = Object.entries(source).filter(([, v]) => typeof v === "number");
  }
  const order = (name) => ((i) => (i < 0 ? 9 : i))(["stt", "llm", "tts"].indexOf(name));
  entries = entries.filter(([name, ms]) => name && ms >= 0).sort((a, b) => order(a[0]) - order(b[0]));
  if (!entries.length) {
    box.textContent = "per-service TTFB: not reported";
    return;
  }
  const total = entries.reduce((sum, [, ms]) => sum + ms, 0) || 1;
  box.textContent = "";
  let start = 0;
  for (const [name, ms] of entries) {
    const bar = document.createElement("span");
    bar.className = `bar ${["stt", "llm", "tts"].includes(name) ? name : "other"}`;
    bar.style.left = `${(100 * start) / total}%`;
    bar.style.width = `${(100 * ms) / total}%`;
    bar.textContent = `${name} ${Math.round(ms)} ms`;
    bar.title = bar.textContent;
    box.appendChild(bar);
    start += ms;
  }
}

let botLine = null;

function onEvent(ev) {
  switch (ev.type) {
    case "session_started":
      stats.sessionId = ev.session_id;
      setStatus(`connected over ${stats.mode} (session ${ev.session_id})`);
      break;
    case "user_transcript":
      if (ev.final) {
        $("user-interim").textContent = "";
        if (ev.text) addLine("user", ev.text);
        stats.userFinals.push(ev.text);
      } else {
        $("user-interim").textContent = ev.text;
      }
      break;
    case "bot_text":
      stats.botTexts.push(ev.text);
      if (!botLine || botLine.dataset.turn !== String(ev.turn)) {
        botLine = addLine("bot", "");
        botLine.dataset.turn = ev.turn;
      }
      botLine.textContent = `${botLine.textContent} ${ev.text}`.trim();
      break;
    case "speaking":
      $(`${ev.who}-speaking`)?.classList.toggle("on", ev.state === "started");
      break;
    case "turn_started":
      turnItem(ev.turn);
      break;
    case "turn_ended": {
      stats.turns.push(ev);
      const li = turnItem(ev.turn);
      const latency = ev.latency_ms > 0 ? `${Math.round(ev.latency_ms)} ms voice-to-voice` : "no spoken reply";
      li.querySelector(".summary").innerHTML =
        `turn ${ev.turn}: <b>${latency}</b>, ${ev.duration_s.toFixed(1)} s` +
        (ev.interrupted ? ' <span class="interrupted">(interrupted)</span>' : "");
      if (ev.metrics) drawWaterfall(li, ev.metrics);
      break;
    }
    case "metrics":
      drawWaterfall(turnItem(ev.turn_number ?? ev.turn), ev);
      break;
    case "clear":
      stats.clears += 1;
      call?.clearPlayback?.();
      break;
    case "error":
      showError(`${ev.source || "server"}: ${ev.code} ${ev.message}`);
      break;
    case "session_ended":
      stats.ended = ev.reason;
      setStatus(`session ended (${ev.reason})`);
      break;
  }
}

// -- controls --------------------------------------------------------------------------------

async function connect() {
  $("error").hidden = true;
  setButtons(true);
  setStatus("starting microphone…");
  try {
    audio = audio || setupAudio();
    await audio.ctx.resume();
    const mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const wanted = new URLSearchParams(location.search).get("transport") || $("transport").value;
    if (wanted !== "websocket" && "RTCPeerConnection" in window) {
      try {
        setStatus("connecting over WebRTC…");
        stats.mode = "webrtc";
        call = await connectWebRTC(mic);
      } catch (err) {
        if (wanted === "webrtc") throw err;
        showError(`WebRTC unavailable (${err.message}); using the WebSocket`);
      }
    }
    if (!call) {
      setStatus("connecting over WebSocket…");
      stats.mode = "websocket";
      call = await connectWebSocket(mic);
    }
  } catch (err) {
    showError(err.message || String(err));
    setStatus("not connected");
    setButtons(false);
    call = null;
  }
}

function hangUp() {
  call?.close();
  call = null;
  setButtons(false);
  setStatus("hung up");
}

$("connect").addEventListener("click", connect);
$("hangup").addEventListener("click", hangUp);
$("mute").addEventListener("click", () => {
  const muted = $("mute").getAttribute("aria-pressed") !== "true";
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute" : "Mute";
  call?.setMuted(muted);
});
const preset = new URLSearchParams(location.search).get("transport");
if (preset) $("transport").value = preset;
