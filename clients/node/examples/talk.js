#!/usr/bin/env node
// talk: a WAV in (streamed in real time, as a microphone would), the conversation out.
//
//   node examples/talk.js question.wav --out reply.wav [--json] [--addr host:port]
//        [--system-prompt TEXT] [--voice NAME] [--wait-after SECONDS]
//        [--api-key K] [--tls] [--ca-file F] [--cert-file F --key-file F] [--server-name N]
//
// The key and TLS default to the environment, as for `voicemesh talk`: VOICEMESH_API_KEY (or
// _FILE) and VOICEMESH_CLIENT_TLS_CA_FILE, _CERT_FILE, _KEY_FILE, _SERVER_NAME (docs/clients.md).
//
// Prints each turn (transcript, reply, latency) or, with --json, one JSON object like
// `voicemesh talk --json`. Latency is measured from the input audio itself: a speech segment
// ends when the chunk holding its last loud sample is sent; the turn's latency runs from then to
// the first bot audio of the reply that follows.
'use strict';
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const { connect, defaultAddress } = require('../src/index');
const { readWav, writeWav, bytesPerSecond } = require('../src/wav');

const CHUNK_MS = 40;

function usage(message) {
  if (message) console.error(`talk: ${message}`);
  console.error('usage: talk.js IN.wav [--out reply.wav] [--json] [--addr host:port] [--system-prompt T] [--voice V] [--wait-after S]\n'
    + '       [--api-key K] [--tls] [--ca-file F] [--cert-file F --key-file F] [--server-name N]');
  process.exit(2);
}

function mulawToLinear(byte) {
  const u = ~byte & 0xff;
  const t = (((u & 0x0f) << 3) + 0x84) << ((u & 0x70) >> 4);
  return u & 0x80 ? 0x84 - t : t - 0x84;
}

/** Sample index ranges (in frames) of speech: 20 ms windows louder than a threshold, short gaps merged. */
function speechSegments(data, format) {
  const channels = format.channels || 1;
  const mulaw = format.encoding === 'AUDIO_ENCODING_MULAW';
  const frames = Math.floor(data.length / (channels * (mulaw ? 1 : 2)));
  const sample = (i) => {
    let sum = 0;
    for (let c = 0; c < channels; c++) {
      const k = i * channels + c;
      sum += mulaw ? mulawToLinear(data[k]) : data.readInt16LE(2 * k);
    }
    return sum / channels;
  };
  const win = Math.max(1, Math.round(format.sampleRateHz / 50));
  const rms = [];
  for (let start = 0; start < frames; start += win) {
    let acc = 0;
    const end = Math.min(frames, start + win);
    for (let i = start; i < end; i++) acc += sample(i) ** 2;
    rms.push(Math.sqrt(acc / (end - start)));
  }
  const peak = Math.max(0, ...rms);
  const threshold = Math.max(300, 0.1 * peak);
  const gap = 15; // 300 ms of quiet windows joins two pieces of speech
  const segments = [];
  rms.forEach((value, index) => {
    if (value < threshold) return;
    const last = segments[segments.length - 1];
    if (last && index - last.endWin <= gap) last.endWin = index + 1;
    else segments.push({ startWin: index, endWin: index + 1 });
  });
  return segments
    .filter((s) => s.endWin - s.startWin >= 5) // at least 100 ms
    .map((s) => ({ start: s.startWin * win, end: Math.min(frames, s.endWin * win) }));
}

/** TLS from the flags: files, or --tls (the system's roots); none: the environment decides. */
function tlsOption(values) {
  const files = { caFile: values['ca-file'], certFile: values['cert-file'], keyFile: values['key-file'], serverName: values['server-name'] };
  if (Object.values(files).some(Boolean)) return files;
  return values.tls ? true : undefined;
}

async function main() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      out: { type: 'string' }, json: { type: 'boolean', default: false }, addr: { type: 'string' },
      'system-prompt': { type: 'string', default: '' }, voice: { type: 'string', default: '' },
      'api-key': { type: 'string' }, token: { type: 'string' }, tls: { type: 'boolean', default: false },
      'ca-file': { type: 'string' }, 'cert-file': { type: 'string' }, 'key-file': { type: 'string' },
      'server-name': { type: 'string' },
      'wait-after': { type: 'string', default: '20' }, help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) usage();
  if (positionals.length !== 1) usage('one input WAV is needed');
  const input = readWav(fs.readFileSync(positionals[0]));
  const waitAfterMs = 1000 * Number(values['wait-after']);
  const frameBytes = (input.format.channels || 1) * (input.format.encoding === 'AUDIO_ENCODING_MULAW' ? 1 : 2);
  const chunkFrames = Math.round((input.format.sampleRateHz * CHUNK_MS) / 1000);
  const chunkBytes = chunkFrames * frameBytes;
  const segments = speechSegments(input.data, input.format);

  const client = connect(values.addr || defaultAddress(), { tls: tlsOption(values), apiKey: values['api-key'] ?? values.token });
  const session = await client.start({
    systemPrompt: values['system-prompt'], voice: values.voice, inputFormat: input.format,
    metadata: { client: 'voicemesh-node-talk' },
  });

  const turns = new Map();
  const turn = (n) => {
    if (!turns.has(n)) turns.set(n, { number: n, user_transcript: '', bot_text: '', latency_ms: null, server_latency_ms: null, interrupted: false, reason: '', delayed: false });
    return turns.get(n);
  };
  const state = { open: new Set(), speaking: 0, lastTurnEnd: -Infinity, lastEvent: performance.now(), firstAudio: new Map(), ended: '', errors: [] };
  const userTranscripts = [];
  const botAudio = [];
  const reader = (async () => {
    for await (const ev of session) {
      const now = (state.lastEvent = performance.now());
      const body = ev[ev.event];
      switch (ev.event) {
        case 'audio':
          if (!state.firstAudio.has(body.turnNumber)) state.firstAudio.set(body.turnNumber, now);
          botAudio.push(body.chunk.data);
          break;
        case 'userTranscript':
          if (body.isFinal && body.text.trim()) {
            const t = turn(body.turnNumber);
            t.user_transcript = `${t.user_transcript} ${body.text.trim()}`.trim();
            userTranscripts.push(body.text.trim());
          }
          break;
        case 'botText':
          if (body.text.trim()) { const t = turn(body.turnNumber); t.bot_text = `${t.bot_text} ${body.text.trim()}`.trim(); }
          break;
        case 'speaking':
          if (body.kind === 'KIND_USER_STARTED') state.speaking += 1;
          if (body.kind === 'KIND_USER_STOPPED') state.speaking = Math.max(0, state.speaking - 1);
          break;
        case 'turnStarted': turn(body.turnNumber); state.open.add(body.turnNumber); break;
        case 'turnEnded': {
          const t = turn(body.turnNumber);
          t.interrupted = body.interrupted;
          t.reason = body.reason.replace(/^REASON_/, '');
          t.server_latency_ms = body.latencyMs || null;
          state.open.delete(body.turnNumber);
          state.lastTurnEnd = now;
          break;
        }
        case 'turnDelayed': turn(body.turnNumber).delayed = true; break;
        case 'error': state.errors.push(body); if (!values.json) console.error(`error from ${body.source}: ${body.code}: ${body.message}`); break;
        case 'sessionEnded': state.ended = body.reason.replace(/^REASON_/, ''); break;
        default: break;
      }
    }
  })();
  const readerDone = reader.then(() => null, (err) => err);

  // The input in real time, then silence until the last utterance is answered (or the server idles).
  const sentAt = [];
  const start = performance.now();
  const lastSegment = segments[segments.length - 1];
  let audioDone = null;
  let lastSpeechEnd = null;
  for (let index = 0; !session.closed; index++) {
    let data;
    if (index * chunkBytes < input.data.length) {
      data = Buffer.alloc(chunkBytes, input.format.encoding === 'AUDIO_ENCODING_MULAW' ? 0xff : 0);
      input.data.copy(data, 0, index * chunkBytes, Math.min(input.data.length, (index + 1) * chunkBytes));
    } else {
      if (audioDone === null) {
        audioDone = performance.now();
        lastSpeechEnd = lastSegment ? sentAt[Math.floor((lastSegment.end - 1) / chunkFrames)] : null;
      }
      const answered = state.open.size === 0 && state.speaking === 0 && (lastSpeechEnd === null || state.lastTurnEnd >= lastSpeechEnd);
      if (answered || performance.now() - Math.max(audioDone, state.lastEvent) >= waitAfterMs) break;
      data = Buffer.alloc(chunkBytes, input.format.encoding === 'AUDIO_ENCODING_MULAW' ? 0xff : 0);
    }
    const due = start + index * CHUNK_MS;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait)); // real-time pacing
    session.sendAudio(data);
    sentAt.push(performance.now());
  }
  await session.end();
  const failure = await readerDone;
  client.close();

  // Each speech segment's end, matched to the first reply audio that follows it.
  const ends = segments.map((s) => sentAt[Math.floor((s.end - 1) / chunkFrames)]).filter((t) => t !== undefined);
  const firsts = [...state.firstAudio.entries()].sort((a, b) => a[1] - b[1]);
  let e = 0;
  for (const [number, at] of firsts) {
    let latest = null;
    while (e < ends.length && ends[e] <= at) latest = ends[e++];
    if (latest !== null) turn(number).latency_ms = Math.round((at - latest) * 10) / 10;
  }

  const audio = Buffer.concat(botAudio);
  const outFormat = session.outputFormat;
  if (values.out) fs.writeFileSync(values.out, writeWav(audio, outFormat));
  const ordered = [...turns.values()].sort((a, b) => a.number - b.number);
  const result = {
    user_transcripts: userTranscripts,
    bot_texts: ordered.map((t) => t.bot_text).filter(Boolean),
    turns: ordered,
    audio_seconds: Math.round((audio.length / bytesPerSecond(outFormat)) * 1000) / 1000,
    session_id: session.sessionId,
  };
  if (values.json) console.log(JSON.stringify(result, null, 2));
  else {
    for (const t of ordered) {
      console.log(`turn ${t.number}: you: ${t.user_transcript || '-'}`);
      console.log(`        bot: ${t.bot_text || '-'}  (${t.latency_ms === null ? 'no latency' : `${t.latency_ms} ms`}, ${t.reason || 'open'})`);
    }
    if (values.out) console.log(`reply audio: ${values.out} (${result.audio_seconds} s)`);
  }
  if (failure) { console.error(`talk: ${failure.message}`); process.exit(1); }
  if (state.ended === 'ERROR' || state.errors.some((err) => err.fatal)) process.exit(1);
}

main().catch((err) => { console.error(`talk: ${err.message}`); process.exit(1); });
