// drive.mjs for Firefox: stock firefox-esr driven over WebDriver BiDi by puppeteer-core (the
// playwright build of Firefox is a patched one). Same options in, same JSON line out (talk.mjs).
// Firefox has no file-backed fake microphone, so a preload script replaces getUserMedia with a
// Web Audio stream that loops the WAV. Headless Firefox only runs an AudioContext when it has an
// audio output device: run it with a sound server, e.g. PULSE_SERVER=unix:... pointing at a
// PulseAudio with a null sink (the test's fixture starts one).
// Usage: node drive_firefox.mjs '{"url": ..., "mode": "webrtc"|"websocket", "wav": ..., ...}'
import { readFileSync } from "node:fs";
import puppeteer from "puppeteer-core";
import { talk } from "./talk.mjs";

const options = JSON.parse(process.argv[2]);
const prefs = {
  // The site may use the microphone, as if the user had allowed it: no prompt, and Firefox then
  // offers plain host addresses as ICE candidates (without a microphone permission, mDNS names,
  // which aiortc cannot resolve here; the replaced getUserMedia alone is no real capture).
  "permissions.default.microphone": 1,
  "media.autoplay.default": 0, // audible playback without a gesture
  "media.autoplay.blocking_policy": 0,
  // Like Chromium's --allow-loopback-in-peer-connection: the transport offers 127.0.0.1 only;
  // stock Firefox connects without it where the machine has any other interface.
  "media.peerconnection.ice.loopback": true,
};

/** The PCM16 samples of a WAV file as base64, with its rate and channel count. */
function readWav(path) {
  const wav = readFileSync(path);
  let format = null;
  for (let at = 12; at + 8 <= wav.length; ) {
    const id = wav.toString("ascii", at, at + 4);
    const size = wav.readUInt32LE(at + 4);
    if (id === "fmt ") format = { code: wav.readUInt16LE(at + 8), channels: wav.readUInt16LE(at + 10), rate: wav.readUInt32LE(at + 12), bits: wav.readUInt16LE(at + 22) };
    if (id === "data") {
      if (!format || format.code !== 1 || format.bits !== 16) throw new Error(`${path}: not a PCM16 WAV`);
      return { base64: wav.subarray(at + 8, at + 8 + size).toString("base64"), rate: format.rate, channels: format.channels };
    }
    at += 8 + size + (size % 2);
  }
  throw new Error(`${path}: no data chunk`);
}

// Runs in the page before its scripts: getUserMedia returns the WAV, looped, as a live stream.
function fakeMicrophone({ base64, rate, channels }) {
  navigator.mediaDevices.getUserMedia = async () => {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
    const ctx = new AudioContext();
    await ctx.resume();
    const frames = Math.floor(pcm.length / channels);
    const buffer = ctx.createBuffer(channels, frames, rate);
    for (let c = 0; c < channels; c++) {
      const data = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) data[i] = pcm[i * channels + c] / 32768;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.loop = true;
    const microphone = ctx.createMediaStreamDestination();
    source.connect(microphone);
    source.start();
    return microphone.stream;
  };
}

const browser = await puppeteer.launch({
  browser: "firefox", executablePath: "/usr/bin/firefox-esr", headless: true,
  userDataDir: options.profile, extraPrefsFirefox: prefs,
  timeout: options.launchTimeoutMs ?? 180_000, // a loaded machine starts a browser slowly (30 s by default)
});
let result;
try {
  const page = await browser.newPage();
  const audioState = await page.evaluate(() => {
    const ctx = new AudioContext();
    const timeout = new Promise((resolve) => setTimeout(resolve, 30_000)); // a deadline, not a speed claim
    return Promise.race([ctx.resume(), timeout]).then(() => ctx.state).finally(() => void ctx.close());
  });
  if (audioState !== "running") throw new Error(`AudioContext ${audioState}: Firefox has no audio output (PULSE_SERVER?)`);
  await page.evaluateOnNewDocument(fakeMicrophone, readWav(options.wav));
  result = await talk(page, options);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
