#!/usr/bin/env node
// Build step: copies the contract (protos/voicemesh/v1) into proto/ and generates the message
// types (generated/) with @grpc/proto-loader's proto-loader-gen-types. Both folders are build
// output, never committed or edited by hand. The runtime loads proto/ with the same options.
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { execFileSync } = require('node:child_process');
const { LOAD_OPTIONS, PROTO_FILES } = require('../src/proto');

const here = path.resolve(__dirname, '..');
const source = path.resolve(process.env.VOICEMESH_PROTOS || path.join(here, '..', '..', 'protos'));
const protoDir = path.join(here, 'proto');
const outDir = path.join(here, 'generated');

fs.rmSync(protoDir, { recursive: true, force: true });
fs.rmSync(outDir, { recursive: true, force: true });
for (const file of PROTO_FILES) {
  const from = path.join(source, file);
  if (!fs.existsSync(from)) throw new Error(`generate: ${from} not found (set VOICEMESH_PROTOS to the protos folder)`);
  fs.mkdirSync(path.dirname(path.join(protoDir, file)), { recursive: true });
  fs.copyFileSync(from, path.join(protoDir, file));
}
const bin = path.join(path.dirname(require.resolve('@grpc/proto-loader/package.json')), 'build', 'bin', 'proto-loader-gen-types.js');
execFileSync(process.execPath, [
  bin, '--grpcLib=@grpc/grpc-js', `--outDir=${outDir}`, `--includeDirs=${protoDir}`,
  `--longs=${LOAD_OPTIONS.longs.name}`, `--enums=${LOAD_OPTIONS.enums.name}`, '--defaults', '--oneofs',
  ...PROTO_FILES,
], { stdio: 'inherit' });
console.log(`generate: ${PROTO_FILES.length} protos -> proto/, types -> generated/`);
