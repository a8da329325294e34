'use strict';
// Test helpers: an event log per session with deadline waits that say what was seen, and a
// microphone that sends audio in real time (pacing, not synchronisation).
const { ADDR_ENV } = require('../src/index');

const WAIT_MS = 60000; // a liveness bound, never a speed claim
const RATE = 16000;
const CHUNK_MS = 40;

/** The orchestrator under test, or null (the tests then skip, except under CI=true). */
function address() {
  const addr = process.env[ADDR_ENV];
  if (!addr && process.env.CI === 'true') throw new Error(`${ADDR_ENV} is not set (CI=true: no skipping)`);
  return addr || null;
}

function describeEvent(ev) {
  const body = ev[ev.event];
  if (ev.event === 'speaking') return `speaking:${body.kind.replace('KIND_', '')}`;
  if (ev.event === 'userTranscript') return body.isFinal ? `userTranscript(${JSON.stringify(body.text)})` : 'userTranscript:interim';
  if (ev.event === 'botText') return `botText(${JSON.stringify(body.text)})`;
  if (ev.event === 'turnEnded') return `turnEnded(${body.turnNumber},${body.reason})`;
  if (ev.event === 'error') return `error(${body.code}: ${body.message})`;
  return ev.event;
}

/** Reads every event of `session` into `log.events`; `log.waitFor(pred, what)` waits with a deadline. */
function record(session) {
  const log = { events: [], done: false, error: null, listeners: new Set() };
  const notify = () => { for (const fn of log.listeners) fn(); };
  log.finished = (async () => {
    try {
      for await (const ev of session) { log.events.push(ev); notify(); }
    } catch (err) {
      log.error = err;
    } finally {
      log.done = true;
      notify();
    }
  })();
  log.kinds = () => log.events.filter((e) => e.event !== 'audio').map(describeEvent);
  log.of = (kind) => log.events.filter((e) => e.event === kind).map((e) => e[kind]);
  log.waitFor = (predicate, what, timeoutMs = WAIT_MS) => new Promise((resolve, reject) => {
    let seen = 0;
    let timer = null;
    const check = () => {
      for (; seen < log.events.length; seen++) {
        if (predicate(log.events[seen])) { cleanup(); resolve(log.events[seen]); return; }
      }
      if (log.done) {
        cleanup();
        reject(new Error(`stream ended (${log.error ? log.error.message : 'OK'}) before ${what}; events: ${log.kinds().join(', ')}`));
      }
    };
    const cleanup = () => { clearTimeout(timer); log.listeners.delete(check); };
    timer = setTimeout(() => { cleanup(); reject(new Error(`no ${what} within ${timeoutMs} ms; events: ${log.kinds().join(', ')}`)); }, timeoutMs);
    log.listeners.add(check);
    check();
  });
  return log;
}

const is = (kind, fields = {}) => (ev) => ev.event === kind && Object.entries(fields).every(([k, v]) => ev[kind][k] === v);

/** PCM16 16 kHz mono: a 220 Hz tone (speech to the fake VAD) or silence. */
function tone(seconds, amplitude = 8000) {
  const n = Math.round(seconds * RATE);
  const buf = Buffer.alloc(2 * n);
  for (let i = 0; i < n; i++) buf.writeInt16LE(Math.round(amplitude * Math.sin((2 * Math.PI * 220 * i) / RATE)), 2 * i);
  return buf;
}
const silence = (seconds) => Buffer.alloc(2 * Math.round(seconds * RATE));

/**
 * Sends `audio` in real time, then silence (the microphone stays open) until an event
 * satisfies `predicate`; resolves with that event.
 */
async function speakUntil(session, log, audio, predicate, what, timeoutMs = WAIT_MS) {
  const step = (2 * RATE * CHUNK_MS) / 1000;
  let stop = false;
  const waiting = log.waitFor(predicate, what, timeoutMs).finally(() => { stop = true; });
  const mic = (async () => {
    const start = performance.now();
    for (let index = 0; !stop && !session.closed; index++) {
      const begin = index * step;
      const chunk = begin < audio.length ? audio.subarray(begin, begin + step) : Buffer.alloc(step);
      session.sendAudio(chunk.length === step ? chunk : Buffer.concat([chunk, Buffer.alloc(step - chunk.length)]));
      const wait = start + (index + 1) * CHUNK_MS - performance.now();
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    }
  })();
  try {
    return await waiting;
  } finally {
    stop = true;
    await mic;
  }
}

module.exports = { address, record, is, tone, silence, speakUntil, WAIT_MS };
