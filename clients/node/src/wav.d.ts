import type { AudioFormat } from '../generated/voicemesh/v1/AudioFormat';
export declare function readWav(buffer: Buffer): { format: Required<Pick<AudioFormat, 'encoding' | 'sampleRateHz' | 'channels'>>; data: Buffer };
export declare function writeWav(data: Buffer, format: AudioFormat): Buffer;
export declare function bytesPerSecond(format: AudioFormat): number;
