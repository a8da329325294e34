'use strict';
// The Node client against a running orchestrator: VOICEMESH_ORCHESTRATOR_ADDR=host:port
// `node --test test/` (tests/test_clients_node_go.py starts the orchestrator with fake services
// behind it and runs this). The fakes' script: services/runtime/voicemesh/runtime/fakes.py.
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { connect, VoicemeshError, status } = require('../src/index');
const { readWav, writeWav } = require('../src/wav');
const { address, record, is, tone, silence, speakUntil } = require('./helpers');

const ADDR = address();
const skip = ADDR ? false : 'set VOICEMESH_ORCHESTRATOR_ADDR to a running orchestrator';
const WEATHER = {
  name: 'get_weather',
  description: 'Weather in a city',
  parameters: { type: 'object', properties: { city: { type: 'string' } } },
};

async function withSession(config, body) {
  const client = connect(ADDR);
  const session = await client.start(config);
  const log = record(session);
  try {
    await body(session, log);
  } finally {
    session.abort();
    await log.finished;
    client.close();
  }
}

test('a spoken turn: transcript, reply, audio and TurnEnded', { skip }, async () => {
  await withSession({ metrics: true }, async (session, log) => {
    assert.ok(session.sessionId);
    assert.equal(session.outputFormat.sampleRateHz, 24000);
    await speakUntil(session, log, Buffer.concat([tone(1.0), silence(0.3)]), is('turnEnded', { turnNumber: 1 }), 'TurnEnded of turn 1');
    const [ended] = log.of('turnEnded');
    assert.equal(ended.reason, 'REASON_ANSWERED', log.kinds().join(', '));
    const finals = log.of('userTranscript').filter((t) => t.isFinal);
    assert.equal(finals.length, 1, log.kinds().join(', '));
    assert.ok(finals[0].text.length > 0);
    assert.deepEqual(log.of('botText').map((t) => t.text), [`You said: ${finals[0].text}.`]);
    assert.ok(log.of('audio').length > 0, 'bot audio');
    assert.ok(log.of('audio').every((a) => a.turnNumber === 1 && a.chunk.data.length > 0));
    await session.end();
    await log.waitFor(is('sessionEnded', { reason: 'REASON_ENDED' }), 'SessionEnded(ENDED)');
  });
});

test('a typed turn, then End', { skip }, async () => {
  await withSession({}, async (session, log) => {
    session.sendText('hello there');
    await log.waitFor(is('turnEnded', { turnNumber: 1 }), 'TurnEnded of turn 1');
    assert.deepEqual(log.of('botText').map((t) => t.text), ['You said: hello there.']);
    assert.equal(log.of('turnEnded')[0].reason, 'REASON_ANSWERED');
    await session.end();
    await log.waitFor(is('sessionEnded', { reason: 'REASON_ENDED' }), 'SessionEnded(ENDED)');
    await log.finished;
    assert.equal(log.error, null);
  });
});

test('a tool call answered by the client', { skip }, async () => {
  await withSession({ tools: { tools: [WEATHER] } }, async (session, log) => {
    session.sendText('weather in Paris');
    const call = (await log.waitFor(is('toolCall'), 'ToolCallRequested')).toolCall;
    assert.equal(call.name, 'get_weather');
    assert.deepEqual(JSON.parse(call.argumentsJson), { city: 'Paris' });
    assert.equal(call.turnNumber, 1);
    session.sendToolResult(call.id, 'sunny');
    await log.waitFor(is('turnEnded', { turnNumber: 1 }), 'TurnEnded of turn 1');
    assert.deepEqual(log.of('botText').map((t) => t.text), ['The tools said: sunny.']);
    await session.cancel();
    await log.waitFor(is('sessionEnded', { reason: 'REASON_CANCELLED' }), 'SessionEnded(CANCELLED)');
  });
});

test('barge-in: speech over the bot brings ClearPlayback and an interrupted turn', { skip }, async () => {
  await withSession({}, async (session, log) => {
    session.sendText('tell me a long story');
    await log.waitFor(is('speaking', { kind: 'KIND_BOT_STARTED' }), 'BOT_STARTED');
    const clear = await speakUntil(session, log, tone(1.0), is('clearPlayback'), 'ClearPlayback');
    assert.equal(clear.clearPlayback.turnNumber, 1);
    const ended = (await log.waitFor(is('turnEnded', { turnNumber: 1 }), 'TurnEnded of turn 1')).turnEnded;
    assert.equal(ended.interrupted, true);
    assert.equal(ended.reason, 'REASON_INTERRUPTED');
    const kinds = log.kinds();
    assert.ok(kinds.indexOf('clearPlayback') < kinds.indexOf('turnEnded(1,REASON_INTERRUPTED)'), kinds.join(', '));
  });
});

test('a bad config is refused with INVALID_ARGUMENT', { skip }, async () => {
  const client = connect(ADDR);
  try {
    await assert.rejects(
      client.start({ inputFormat: { encoding: 'AUDIO_ENCODING_PCM16', sampleRateHz: 4000 } }),
      (err) => err instanceof VoicemeshError && err.code === status.INVALID_ARGUMENT && /8000-48000/.test(err.details),
    );
  } finally {
    client.close();
  }
});

test('the talk example: a WAV in, transcript, reply, latency and a reply WAV out', { skip }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voicemesh-talk-'));
  try {
    const input = path.join(dir, 'question.wav');
    const output = path.join(dir, 'reply.wav');
    const format = { encoding: 'AUDIO_ENCODING_PCM16', sampleRateHz: 16000, channels: 1 };
    fs.writeFileSync(input, writeWav(Buffer.concat([silence(0.3), tone(1.0), silence(0.5)]), format));
    const script = path.join(__dirname, '..', 'examples', 'talk.js');
    const stdout = await new Promise((resolve, reject) => {
      execFile(process.execPath, [script, input, '--out', output, '--json', '--addr', ADDR, '--wait-after', '30'],
        { timeout: 120000 }, (err, out, errOut) => (err ? reject(new Error(`talk failed: ${err.message}\n${out}\n${errOut}`)) : resolve(out)));
    });
    const result = JSON.parse(stdout);
    assert.equal(result.turns.length, 1, stdout);
    const [turn] = result.turns;
    assert.ok(turn.user_transcript.length > 0, stdout);
    assert.equal(turn.bot_text, `You said: ${turn.user_transcript}.`);
    assert.equal(turn.reason, 'ANSWERED');
    assert.ok(typeof turn.latency_ms === 'number' && turn.latency_ms > 0, stdout);
    assert.ok(result.audio_seconds > 0);
    const reply = readWav(fs.readFileSync(output));
    assert.equal(reply.format.sampleRateHz, 24000);
    assert.ok(reply.data.length > 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Credentials (src/credentials.js): the Python client's env names and rules; no server needed.
test('credentials: key and TLS from options or the environment, unusable files named', () => {
  const { apiKey, channelCredentials, envTls } = require('../src/credentials');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'voicemesh-creds-'));
  try {
    const keyFile = path.join(dir, 'key');
    fs.writeFileSync(keyFile, ' from-file \n');
    assert.equal(apiKey({}, { VOICEMESH_API_KEY_FILE: keyFile }), 'from-file');
    assert.equal(apiKey({}, { VOICEMESH_API_KEY: 'from-env', VOICEMESH_API_KEY_FILE: keyFile }), 'from-env');
    assert.equal(apiKey({ apiKey: '' }, { VOICEMESH_API_KEY: 'from-env' }), null); // explicit: none
    assert.equal(apiKey({ token: 'older-name' }, {}), 'older-name');
    assert.throws(() => apiKey({}, { VOICEMESH_API_KEY_FILE: path.join(dir, 'absent') }), /cannot read the API key file .*absent/);
    assert.equal(envTls({}), null);
    assert.deepEqual(envTls({ VOICEMESH_CLIENT_TLS_SERVER_NAME: 'orch' }), { caFile: '', certFile: '', keyFile: '', serverName: 'orch' });
    assert.equal(channelCredentials({}, {}).secure, false);
    assert.equal(channelCredentials({ tls: false }, { VOICEMESH_CLIENT_TLS_SERVER_NAME: 'orch' }).secure, false);
    const named = channelCredentials({}, { VOICEMESH_CLIENT_TLS_SERVER_NAME: 'orch' });
    assert.equal(named.secure, true);
    assert.deepEqual(named.channelOptions, { 'grpc.ssl_target_name_override': 'orch' });
    assert.throws(() => channelCredentials({ tls: { caFile: path.join(dir, 'ca.pem') } }), /cannot read the CA certificate .*ca\.pem: no such file/);
    assert.throws(() => channelCredentials({ tls: { certChain: Buffer.from('x') } }), /needs both its certificate and its key/);
    const client = connect('127.0.0.1:1', { apiKey: 'k', metadata: { client: 'test' } });
    assert.equal(client.metadata().get('authorization')[0], 'Bearer k');
    assert.equal(client.metadata().get('client')[0], 'test');
    client.close();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
