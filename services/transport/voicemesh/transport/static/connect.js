// The two ways the page reaches the transport; both return {mode, send, setMuted,
// clearPlayback, close}. Loaded after app.js, whose helpers (onEvent, audio, stats) they use.
"use strict";

// The caller's key, when the transport requires one (docs/security.md): the page is opened as
// /?token=<key>, and passes it on as the transport asks (a header for the offer; the query for
// the WebSocket, which a browser cannot give headers).
const callerToken = new URLSearchParams(location.search).get("token") || "";

// -- WebRTC ----------------------------------------------------------------------------------

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => pc.iceGatheringState === "complete" && resolve();
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // send what we have
  });
}

async function connectWebRTC(mic) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  const channel = pc.createDataChannel("events");
  channel.onmessage = (e) => onEvent(JSON.parse(e.data));
  pc.ontrack = (e) => {
    const stream = e.streams[0] || new MediaStream([e.track]);
    $("bot-audio").srcObject = stream; // plays it (Chromium also needs this for Web Audio to get data)
    audio.ctx.createMediaStreamSource(stream).connect(audio.analyser);
  };
  const connected = new Promise((resolve, reject) => {
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "connected") resolve();
      if (pc.connectionState === "failed") reject(new Error("WebRTC connection failed (ICE)"));
      if (["failed", "closed", "disconnected"].includes(pc.connectionState) && call?.pc === pc) {
        if (!stats.ended) setStatus(`WebRTC ${pc.connectionState}`);
      }
    };
    setTimeout(() => reject(new Error("WebRTC did not connect within 15 s")), 15000);
  });
  await pc.setLocalDescription(await pc.createOffer());
  await iceGathered(pc, 3000);
  const reply = await fetch("/api/offer", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...(callerToken ? { Authorization: `Bearer ${callerToken}` } : {}) },
    body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, config: { interim_transcripts: true } }),
  });
  const answer = await reply.json().catch(() => ({ error: `HTTP ${reply.status}` }));
  if (!reply.ok) {
    pc.close();
    throw new Error(`offer refused: ${answer.error}`);
  }
  await pc.setRemoteDescription(answer);
  try {
    await connected;
  } catch (err) {
    pc.close();
    throw err;
  }
  return {
    mode: "webrtc",
    pc,
    send: (msg) => channel.readyState === "open" && channel.send(JSON.stringify(msg)),
    setMuted: (muted) => mic.getAudioTracks().forEach((t) => (t.enabled = !muted)),
    clearPlayback: () => {}, // the server drops its queued audio; the jitter buffer is short
    close: () => {
      if (channel.readyState === "open") channel.send(JSON.stringify({ type: "cancel" }));
      setTimeout(() => pc.close(), 100);
    },
  };
}

// -- WebSocket -------------------------------------------------------------------------------

async function connectWebSocket(mic) {
  const { ctx } = audio;
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  const capture = new AudioWorkletNode(ctx, "capture");
  const silent = ctx.createGain();
  silent.gain.value = 0;
  ctx.createMediaStreamSource(mic).connect(capture).connect(silent).connect(ctx.destination);
  const playback = ctx.createGain();
  playback.connect(ctx.destination);
  playback.connect(audio.analyser);
  let sources = [];
  let nextTime = 0;
  let muted = false;

  const query = callerToken ? `?token=${encodeURIComponent(callerToken)}` : "";
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${query}`;
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("WebSocket connection failed"));
  });
  ws.send(JSON.stringify({
    type: "start",
    input: { encoding: "pcm16", sample_rate: ctx.sampleRate, channels: 1 },
    output: { encoding: "pcm16", sample_rate: OUTPUT_RATE },
    interim_transcripts: true,
  }));
  capture.port.onmessage = (e) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(muted ? new ArrayBuffer(e.data.byteLength) : e.data); // muted: silence keeps the session alive
  };
  ws.onmessage = (e) => {
    if (typeof e.data === "string") return onEvent(JSON.parse(e.data));
    const pcm = new Int16Array(e.data);
    const buffer = ctx.createBuffer(1, pcm.length, OUTPUT_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) channel[i] = pcm[i] / 32768;
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(playback);
    nextTime = Math.max(nextTime, ctx.currentTime + 0.05);
    source.start(nextTime);
    nextTime += buffer.duration;
    sources.push(source);
    source.onended = () => (sources = sources.filter((s) => s !== source));
  };
  ws.onclose = (e) => {
    capture.port.onmessage = null;
    if (e.code !== 1000) showError(`connection closed: ${e.code} ${e.reason}`);
    if (!stats.ended) setStatus(`closed (${e.code} ${e.reason || "no reason"})`);
    setButtons(false);
  };
  return {
    mode: "websocket",
    send: (msg) => ws.readyState === WebSocket.OPEN && ws.send(JSON.stringify(msg)),
    setMuted: (value) => (muted = value),
    clearPlayback: () => {
      sources.forEach((s) => s.stop());
      sources = [];
      nextTime = 0;
    },
    close: () => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "cancel" }));
      ws.close(1000, "hang up");
    },
  };
}
