'use strict';
// The voicemesh Node client: one Session per Converse call.
//
//   const { connect } = require('@voicemesh/client');
//   const client = connect('127.0.0.1:50051');
//   const session = await client.start({ systemPrompt: 'Be brief.' });
//   session.sendText('hello');
//   for await (const ev of session) { if (ev.event === 'botText') console.log(ev.botText.text); }
//
// Message shapes are the contract's (protos/voicemesh/v1), loaded by @grpc/proto-loader with
// camelCase field names and enums as their names; their types are generated (generated/).
const grpc = require('@grpc/grpc-js');
const { loadPackage } = require('./proto');
const { apiKey, channelCredentials, unreachableHint } = require('./credentials');

const ADDR_ENV = 'VOICEMESH_ORCHESTRATOR_ADDR';
const DEFAULT_ADDR = '127.0.0.1:50051';
const MAX_MESSAGE_BYTES = 4 << 20;
// The formats a session gets when its config names none: the contract's server-side defaults,
// sent explicitly so the session never depends on an unstated default.
const DEFAULT_INPUT_FORMAT = Object.freeze({ encoding: 'AUDIO_ENCODING_PCM16', sampleRateHz: 16000, channels: 1 });
const DEFAULT_OUTPUT_FORMAT = Object.freeze({ encoding: 'AUDIO_ENCODING_PCM16', sampleRateHz: 24000, channels: 1 });
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.keepalive_time_ms': 20000,
  'grpc.keepalive_timeout_ms': 10000,
  'grpc.keepalive_permit_without_calls': 1,
};
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

/** A gRPC status that ended (or refused) a call: `code` is the number, `codeName` its name. */
class VoicemeshError extends Error {
  constructor(code, details, metadata) {
    super(`${STATUS_NAMES[code] || code}: ${details}`);
    this.name = 'VoicemeshError';
    this.code = code;
    this.codeName = STATUS_NAMES[code] || String(code);
    this.details = details;
    this.metadata = metadata;
  }
  static from(err) {
    if (err instanceof VoicemeshError) return err;
    return new VoicemeshError(typeof err.code === 'number' ? err.code : grpc.status.UNKNOWN, err.details || err.message, err.metadata);
  }
}

function defaultAddress() {
  return process.env[ADDR_ENV] || DEFAULT_ADDR;
}

/** Turns the typed config into a SessionConfig message: default formats, tools' schemas as JSON. */
function sessionConfig(config = {}) {
  const out = { ...config };
  if (config.tools) {
    const tools = Array.isArray(config.tools) ? { tools: config.tools } : { ...config.tools };
    tools.tools = (tools.tools || []).map((tool) => {
      const { parameters, ...rest } = tool;
      return parameters === undefined ? rest : { ...rest, parametersJson: JSON.stringify(parameters) };
    });
    out.tools = tools;
  }
  // A text-only session needs no input format, but one is always sent: an unset one is not
  // rejected by the server, which would assume PCM16 16 kHz silently.
  out.inputFormat = { ...DEFAULT_INPUT_FORMAT, ...(config.inputFormat || {}) };
  out.outputFormat = { ...DEFAULT_OUTPUT_FORMAT, ...(config.outputFormat || {}) };
  return out;
}

// grpc-js's own words when no call reached a server (refused, TLS handshake failed, reset).
const CONNECTION_FAILED = /no connection established|connection dropped|failed to connect|ECONNREFUSED|handshake|protocol error/i;

class Client {
  /**
   * @param {string} [address] host:port; default $VOICEMESH_ORCHESTRATOR_ADDR or 127.0.0.1:50051
   * @param {{tls?: boolean|{caFile?: string, certFile?: string, keyFile?: string, serverName?: string,
   *                          rootCerts?: Buffer, privateKey?: Buffer, certChain?: Buffer},
   *          apiKey?: string, token?: string, metadata?: Record<string,string>, channelOptions?: object}} [options]
   *   `tls` and `apiKey` unset: from the environment (src/credentials.js, as the Python client).
   */
  constructor(address, options = {}) {
    const pkg = loadPackage();
    this.address = address || defaultAddress();
    this.options = { ...options }; // without the key or TLS material, so printing the client never shows them
    delete this.options.apiKey;
    delete this.options.token;
    delete this.options.tls;
    const { credentials, channelOptions, secure } = channelCredentials(options);
    this.secure = secure;
    Object.defineProperty(this, '_apiKey', { value: apiKey(options), enumerable: false });
    this.stub = new pkg.OrchestratorService(this.address, credentials,
      { ...CHANNEL_OPTIONS, ...channelOptions, ...(options.channelOptions || {}) });
  }

  /** Every call's metadata: the options' pairs and, with a key, `authorization: Bearer <key>`. */
  metadata() {
    const md = new grpc.Metadata();
    for (const [key, value] of Object.entries(this.options.metadata || {})) md.set(key, value);
    if (this._apiKey) md.set('authorization', `Bearer ${this._apiKey}`);
    return md;
  }

  /** The orchestrator's Info: its own ServiceInfo and those of its services. */
  info({ timeoutMs = 10000 } = {}) {
    return new Promise((resolve, reject) => {
      this.stub.Info({}, this.metadata(), { deadline: Date.now() + timeoutMs }, (err, reply) =>
        (err ? reject(VoicemeshError.from(err)) : resolve(reply)));
    });
  }

  /**
   * Opens a Converse call, sends the config and resolves once SessionStarted has come.
   * Rejects with a VoicemeshError when the server refuses the config (e.g. INVALID_ARGUMENT).
   */
  async start(config = {}, { startTimeoutMs = 30000, signal } = {}) {
    const call = this.stub.Converse(this.metadata());
    let answered = false; // response headers came: an UNAVAILABLE after that is the server's own
    call.on('metadata', () => { answered = true; });
    const session = new Session(call);
    if (signal) {
      // An already-aborted signal drops the call at once; the listener goes when the call ends.
      const onAbort = () => session.cancel();
      if (signal.aborted) session.abort();
      else {
        signal.addEventListener('abort', onAbort, { once: true });
        call.on('status', () => signal.removeEventListener('abort', onAbort));
      }
    }
    call.write({ config: sessionConfig(config) });
    try {
      await session._started(startTimeoutMs);
    } catch (err) {
      // Only a failure to reach the orchestrator gets the connection hint; an UNAVAILABLE it
      // sends itself (a backend down) says what is wrong in its own words.
      if (err.code !== grpc.status.UNAVAILABLE || answered || !CONNECTION_FAILED.test(err.details || '')) throw err;
      throw new VoicemeshError(err.code, `${err.details} (${unreachableHint(this.address, this.secure)})`, err.metadata);
    }
    return session;
  }

  close() {
    this.stub.close();
  }
}

/** One conversation. Iterate it (for await) for the ConverseResponse events after SessionStarted. */
class Session {
  constructor(call) {
    this.call = call;
    this.sessionId = '';
    this.outputFormat = null;
    this._queue = [];
    this._waiters = [];
    this._error = null; // a VoicemeshError once the call ended with a non-OK status
    this._closed = false; // the response stream is over
    this._halfClosed = false;
    this._cancelled = false;
    this._startWaiter = null;
    call.on('data', (response) => this._onResponse(response));
    call.on('error', (err) => this._finish(this._cancelled && err.code === grpc.status.CANCELLED ? null : VoicemeshError.from(err)));
    call.on('end', () => this._finish(null));
    call.on('status', () => {});
  }

  _onResponse(response) {
    if (response.event === 'sessionStarted' && !this.sessionId) {
      this.sessionId = response.sessionStarted.sessionId;
      this.outputFormat = response.sessionStarted.outputFormat;
      if (this._startWaiter) this._startWaiter.resolve();
      return;
    }
    if (this._waiters.length) this._waiters.shift().resolve({ value: response, done: false });
    else this._queue.push(response);
  }

  _finish(error) {
    if (this._closed) return;
    this._closed = true;
    this._error = error;
    if (this._startWaiter) {
      if (this.sessionId) this._startWaiter.resolve();
      else this._startWaiter.reject(error || new VoicemeshError(grpc.status.INTERNAL, 'the stream closed before SessionStarted'));
    }
    for (const waiter of this._waiters.splice(0)) {
      if (error) waiter.reject(error);
      else waiter.resolve({ value: undefined, done: true });
    }
  }

  _started(timeoutMs) {
    if (this.sessionId) return Promise.resolve();
    if (this._closed) return Promise.reject(this._error || new VoicemeshError(grpc.status.INTERNAL, 'the stream closed before SessionStarted'));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.call.cancel();
        reject(new VoicemeshError(grpc.status.DEADLINE_EXCEEDED, `no SessionStarted within ${timeoutMs} ms`));
      }, timeoutMs);
      this._startWaiter = {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (err) => { clearTimeout(timer); reject(err); },
      };
    });
  }

  /** The next event; `{done: true}` once the stream closed with OK; rejects with the status otherwise. */
  next() {
    if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
    if (this._closed) return this._error ? Promise.reject(this._error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
  }

  [Symbol.asyncIterator]() {
    // Leaving a for-await loop early (break, return, throw) drops the call, as with Node's own
    // streams: nothing would read the events any more.
    return {
      next: () => this.next(),
      return: async () => {
        if (!this._closed) this.abort();
        return { value: undefined, done: true };
      },
    };
  }

  /** True once the response stream is over (SessionEnded or a status). */
  get closed() { return this._closed; }
  /** The status error that ended the call, or null. */
  get error() { return this._error; }

  _write(request) {
    if (this._halfClosed || this._closed) return false;
    return this.call.write(request);
  }

  /** Caller audio in the session's input format (20-100 ms a chunk). */
  sendAudio(data) {
    const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    return this._write({ audio: { data: bytes } });
  }
  /** A typed user turn. */
  sendText(text) { return this._write({ text: { text } }); }
  /** The answer to a ToolCallRequested. */
  sendToolResult(toolCallId, content, { isError = false, runLlm } = {}) {
    const result = { toolCallId, content: typeof content === 'string' ? content : JSON.stringify(content), isError };
    if (runLlm !== undefined) result.runLlm = runLlm;
    return this._write({ toolResult: result });
  }
  /** A keypad press (0-9, *, #, A-D). */
  sendDtmf(digit) { return this._write({ dtmf: { digit } }); }
  /** Any control: {say}, {interrupt}, {mute}, {appendContext}, {replaceContext}, {end}, {cancel}. */
  control(action) { return this._write({ control: action }); }
  say(text) { return this.control({ say: { text } }); }
  interrupt() { return this.control({ interrupt: {} }); }
  mute(muted = true) { return this.control({ mute: { muted } }); }
  appendContext(messages, { runLlm = false } = {}) { return this.control({ appendContext: { messages, runLlm } }); }

  /**
   * Graceful end: the current reply finishes, then SessionEnded(REASON_ENDED). Resolves with
   * the SessionEnded reason once the stream is over (events still queued stay readable).
   */
  async end({ timeoutMs = 30000 } = {}) {
    this.control({ end: {} });
    return this._closeAfter(timeoutMs);
  }

  /** Immediate end: SessionEnded(REASON_CANCELLED); queued bot audio is dropped. */
  async cancel({ timeoutMs = 10000 } = {}) {
    this.control({ cancel: {} });
    return this._closeAfter(timeoutMs);
  }

  async _closeAfter(timeoutMs) {
    if (!this._halfClosed && !this._closed) {
      this._halfClosed = true;
      this.call.end();
    }
    if (this._closed) return;
    await new Promise((resolve) => {
      const timer = setTimeout(() => { this._cancelled = true; this.call.cancel(); resolve(); }, timeoutMs);
      const done = () => { clearTimeout(timer); resolve(); };
      this.call.once('end', done);
      this.call.once('error', done);
      this.call.once('close', done);
    });
  }

  /** Drops the call at once, without a SessionEnded (a local CANCELLED, not reported as an error). */
  abort() {
    this._cancelled = true;
    this.call.cancel();
  }
}

function connect(address, options) {
  return new Client(address, options);
}

module.exports = {
  connect, Client, Session, VoicemeshError, sessionConfig, defaultAddress,
  ADDR_ENV, DEFAULT_INPUT_FORMAT, DEFAULT_OUTPUT_FORMAT, status: grpc.status,
};
