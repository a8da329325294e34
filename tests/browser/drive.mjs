// Drives Debian's chromium through the transport's page with a fake microphone playing a WAV:
// connect, wait for the user's final transcript and audible bot audio (measured by the page
// through Web Audio), take a screenshot, print what the page saw as one JSON line.
// Usage: node drive.mjs '{"url": ..., "mode": "webrtc"|"websocket", "wav": ..., "screenshot": ...,
//                          "profile": ..., "timeoutMs": ..., "expect": ["capital", "france"]}'
import { chromium } from "playwright-core";

const options = JSON.parse(process.argv[2]);
const args = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
  `--use-file-for-fake-audio-capture=${options.wav}`,
  "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
];
const result = { mode: options.mode, console: [], pageErrors: [], timedOut: false };
const context = await chromium.launchPersistentContext(options.profile, {
  executablePath: "/usr/bin/chromium", headless: true, args, ignoreDefaultArgs: ["--mute-audio"],
});
try {
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (msg) => result.console.push(`${msg.type()}: ${msg.text()}`.slice(0, 300)));
  page.on("pageerror", (err) => result.pageErrors.push(String(err).slice(0, 300)));
  await page.goto(`${options.url}/?transport=${options.mode}`);
  await page.click("#connect");
  const expect = options.expect.map((word) => word.toLowerCase());
  const deadline = Date.now() + options.timeoutMs;
  let seen = null;
  while (Date.now() < deadline) {
    seen = await page.evaluate(() => JSON.parse(JSON.stringify(window.voicemesh)));
    const heard = seen.userFinals.join(" ").toLowerCase();
    if (expect.every((word) => heard.includes(word)) && seen.botAudibleMs >= options.minBotAudibleMs && seen.botTexts.length) break;
    if (seen.errors.length && options.mode !== "auto" && !seen.sessionId) break; // never connected
    await page.waitForTimeout(250);
  }
  result.timedOut = Date.now() >= deadline;
  result.page = seen;
  result.connectedMode = seen && seen.mode;
  await page.screenshot({ path: options.screenshot, fullPage: true });
  await page.click("#hangup").catch(() => {});
} finally {
  await context.close();
}
console.log(JSON.stringify(result));
