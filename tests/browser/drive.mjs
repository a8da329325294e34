// Drives Debian's chromium through the transport's page with a fake microphone playing a WAV:
// connect, wait for the user's final transcript and audible bot audio (measured by the page
// through Web Audio), take a screenshot, print what the page saw as one JSON line (talk.mjs).
// Usage: node drive.mjs '{"url": ..., "mode": "webrtc"|"websocket", "wav": ..., "screenshot": ...,
//                          "profile": ..., "timeoutMs": ..., "expect": ["capital", "france"],
//                          "launchTimeoutMs": ... (optional, default 180000)}'
import { chromium } from "playwright-core";
import { talk } from "./talk.mjs";

const options = JSON.parse(process.argv[2]);
const args = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  `--use-file-for-fake-audio-capture=${options.wav}`,
  "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
];
const context = await chromium.launchPersistentContext(options.profile, {
  executablePath: "/usr/bin/chromium", headless: true, args, ignoreDefaultArgs: ["--mute-audio"],
  timeout: options.launchTimeoutMs ?? 180_000, // a loaded machine starts a browser slowly (30 s by default)
});
let result;
try {
  result = await talk(context.pages()[0] || (await context.newPage()), options);
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
