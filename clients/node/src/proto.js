'use strict';
// Loads the contract copied into proto/ by `npm run generate` (never edited by hand).
const path = require('node:path');
const fs = require('node:fs');

const PROTO_FILES = ['voicemesh/v1/common.proto', 'voicemesh/v1/llm.proto', 'voicemesh/v1/orchestrator.proto'];
// The same options make the runtime objects and the generated types (generated/) agree:
// camelCase fields, enums as their names, 64-bit integers as numbers, defaults filled in,
// and a virtual field naming the member set in each oneof.
const LOAD_OPTIONS = { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: [] };

let cached;
function loadPackage() {
  if (cached) return cached;
  const protoLoader = require('@grpc/proto-loader');
  const grpc = require('@grpc/grpc-js');
  const dir = path.join(__dirname, '..', 'proto');
  if (!fs.existsSync(path.join(dir, PROTO_FILES[2]))) {
    throw new Error(`@voicemesh/client: ${dir} is missing; run \`npm run generate\` (or \`make clients\`) first`);
  }
  const definition = protoLoader.loadSync(PROTO_FILES, { ...LOAD_OPTIONS, includeDirs: [dir] });
  cached = grpc.loadPackageDefinition(definition).voicemesh.v1;
  return cached;
}

module.exports = { PROTO_FILES, LOAD_OPTIONS, loadPackage };
