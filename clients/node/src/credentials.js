'use strict';
// Credentials toward the orchestrator (docs/security.md): an API key, sent as
// `authorization: Bearer <key>` on every call, and TLS (mTLS with a client certificate).
// Options of connect(), else the environment, with the Python client's names and rules:
//   VOICEMESH_API_KEY, else the content of the file VOICEMESH_API_KEY_FILE;
//   VOICEMESH_CLIENT_TLS_CA_FILE (unset: the system's roots), _CERT_FILE + _KEY_FILE (mTLS),
//   _SERVER_NAME (check the certificate against this name instead of the address's host).
// Setting any of the TLS variables makes the channel TLS.
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');

const API_KEY_ENV = 'VOICEMESH_API_KEY';
const API_KEY_FILE_ENV = 'VOICEMESH_API_KEY_FILE';
const TLS_ENV = 'VOICEMESH_CLIENT_TLS_'; // + CA_FILE, CERT_FILE, KEY_FILE, SERVER_NAME

function readFile(file, what) {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    throw new Error(`cannot read the ${what} ${file}: ${err.code === 'ENOENT' ? 'no such file' : err.message}`);
  }
}

/** The key of the options (apiKey, or token), else $VOICEMESH_API_KEY, else $VOICEMESH_API_KEY_FILE's content. */
function apiKey(options = {}, env = process.env) {
  const given = options.apiKey !== undefined ? options.apiKey : options.token;
  if (given !== undefined && given !== null) return String(given).trim() || null;
  const key = (env[API_KEY_ENV] || '').trim();
  if (key) return key;
  const file = (env[API_KEY_FILE_ENV] || '').trim();
  return file ? readFile(file, 'API key file').toString().trim() || null : null;
}

/** TLS files from the environment: {caFile, certFile, keyFile, serverName}, or null when none is set. */
function envTls(env = process.env) {
  const [caFile, certFile, keyFile, serverName] = ['CA_FILE', 'CERT_FILE', 'KEY_FILE', 'SERVER_NAME']
    .map((part) => (env[TLS_ENV + part] || '').trim());
  return caFile || certFile || keyFile || serverName ? { caFile, certFile, keyFile, serverName } : null;
}

/**
 * The channel's credentials and extra channel options. `options.tls`: true (the system's roots),
 * {caFile, certFile, keyFile, serverName} (files), {rootCerts, privateKey, certChain} (PEM
 * buffers), false (plaintext, the environment ignored), or unset (the environment decides).
 */
function channelCredentials(options = {}, env = process.env) {
  let tls = options.tls;
  if (tls === undefined) tls = envTls(env) || false;
  if (!tls) return { secure: false, credentials: grpc.credentials.createInsecure(), channelOptions: {} };
  if (tls === true) tls = {};
  const rootCerts = tls.rootCerts || (tls.caFile ? readFile(tls.caFile, 'CA certificate') : null);
  const certChain = tls.certChain || (tls.certFile ? readFile(tls.certFile, 'client certificate') : null);
  const privateKey = tls.privateKey || (tls.keyFile ? readFile(tls.keyFile, 'client key') : null);
  if (!certChain !== !privateKey) throw new Error('a client certificate needs both its certificate and its key (certFile and keyFile)');
  const serverName = tls.serverName || '';
  return {
    secure: true,
    credentials: grpc.credentials.createSsl(rootCerts, privateKey, certChain),
    channelOptions: serverName ? { 'grpc.ssl_target_name_override': serverName } : {},
  };
}

/**
 * What to check when a call could not reach the orchestrator (UNAVAILABLE before
 * SessionStarted): gRPC's own message says only that the connection failed.
 */
function unreachableHint(address, secure) {
  if (!secure) return `no connection to the orchestrator at ${address} over plaintext: is it up there? If it serves TLS, set ${TLS_ENV}CA_FILE (docs/security.md)`;
  return `no connection to the orchestrator at ${address} over TLS: is it up there? If it refused the handshake: with mTLS it needs a client `
    + `certificate (${TLS_ENV}CERT_FILE and _KEY_FILE) from a CA it trusts; its own certificate must chain to ${TLS_ENV}CA_FILE `
    + `and name the host (or ${TLS_ENV}SERVER_NAME)`;
}

module.exports = { apiKey, envTls, channelCredentials, unreachableHint, API_KEY_ENV, API_KEY_FILE_ENV, TLS_ENV };
