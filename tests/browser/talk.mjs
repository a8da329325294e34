// What drive.mjs (Chromium, playwright-core) and drive_firefox.mjs (Firefox, puppeteer-core)
// do once the browser is up; both libraries' pages have the calls used here.
// Open the page, Connect, wait for the user's final transcript and audible bot audio (measured
// by the page through Web Audio, `window.voicemesh`), take a screenshot, Hang up. Returns the
// result that the drivers print as one JSON line.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function talk(page, options) {
  const result = { mode: options.mode, console: [], pageErrors: [], timedOut: false };
  page.on("console", (msg) => result.console.push(`${msg.type()}: ${msg.text()}`.slice(0, 300)));
  page.on("pageerror", (err) => result.pageErrors.push(String(err).slice(0, 300)));
  // Each step (load, click, evaluate) may take long on a loaded machine; 30 s by default.
  page.setDefaultTimeout(options.timeoutMs);
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
    await sleep(250);
  }
  result.timedOut = Date.now() >= deadline;
  result.page = seen;
  result.connectedMode = seen && seen.mode;
  await page.screenshot({ path: options.screenshot, fullPage: true });
  await page.click("#hangup").catch(() => {});
  return result;
}
