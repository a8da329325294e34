'use strict';
// WAV files to and from the contract's audio formats: PCM16 (format 1, 16-bit) and mu-law
// (format 7), any rate, 1 or 2 channels.

/** Parses a WAV: `{ format: {encoding, sampleRateHz, channels}, data }` (data: the sample bytes). */
function readWav(buffer) {
  if (buffer.toString('ascii', 0, 4) !== 'RIFF' || buffer.toString('ascii', 8, 12) !== 'WAVE') throw new Error('not a RIFF/WAVE file');
  let offset = 12;
  let fmt = null;
  while (offset + 8 <= buffer.length) {
    const id = buffer.toString('ascii', offset, offset + 4);
    const size = buffer.readUInt32LE(offset + 4);
    const body = offset + 8;
    if (id === 'fmt ') {
      fmt = { tag: buffer.readUInt16LE(body), channels: buffer.readUInt16LE(body + 2), rate: buffer.readUInt32LE(body + 4), bits: buffer.readUInt16LE(body + 14) };
      if (fmt.tag === 0xfffe && size >= 26) fmt.tag = buffer.readUInt16LE(body + 24); // WAVE_FORMAT_EXTENSIBLE
    } else if (id === 'data') {
      if (!fmt) throw new Error('WAV data before its fmt chunk');
      let encoding;
      if (fmt.tag === 1 && fmt.bits === 16) encoding = 'AUDIO_ENCODING_PCM16';
      else if (fmt.tag === 7 && fmt.bits === 8) encoding = 'AUDIO_ENCODING_MULAW';
      else throw new Error(`unsupported WAV format ${fmt.tag}/${fmt.bits} bits: use 16-bit PCM or mu-law`);
      const data = buffer.subarray(body, Math.min(body + size, buffer.length));
      return { format: { encoding, sampleRateHz: fmt.rate, channels: fmt.channels }, data };
    }
    offset = body + size + (size & 1);
  }
  throw new Error('WAV has no data chunk');
}

/** A WAV file of `data` in `format` (PCM16 or mu-law). */
function writeWav(data, format) {
  const mulaw = format.encoding === 'AUDIO_ENCODING_MULAW';
  const channels = format.channels || 1;
  const bytesPerSample = mulaw ? 1 : 2;
  const header = Buffer.alloc(44);
  header.write('RIFF', 0, 'ascii');
  header.writeUInt32LE(36 + data.length, 4);
  header.write('WAVEfmt ', 8, 'ascii');
  header.writeUInt32LE(16, 16);
  header.writeUInt16LE(mulaw ? 7 : 1, 20);
  header.writeUInt16LE(channels, 22);
  header.writeUInt32LE(format.sampleRateHz, 24);
  header.writeUInt32LE(format.sampleRateHz * channels * bytesPerSample, 28);
  header.writeUInt16LE(channels * bytesPerSample, 32);
  header.writeUInt16LE(bytesPerSample * 8, 34);
  header.write('data', 36, 'ascii');
  header.writeUInt32LE(data.length, 40);
  return Buffer.concat([header, data]);
}

/** Bytes per second of audio in `format`. */
function bytesPerSecond(format) {
  return format.sampleRateHz * (format.channels || 1) * (format.encoding === 'AUDIO_ENCODING_MULAW' ? 1 : 2);
}

module.exports = { readWav, writeWav, bytesPerSecond };
