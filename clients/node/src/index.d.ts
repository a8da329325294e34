// Types of the voicemesh Node client. The message types come from generated/ (made from the
// contract by proto-loader-gen-types at build time, never edited by hand).
import type * as grpc from '@grpc/grpc-js';
import type { SessionConfig } from '../generated/voicemesh/v1/SessionConfig';
import type { Tool } from '../generated/voicemesh/v1/Tool';
import type { ToolOptions } from '../generated/voicemesh/v1/ToolOptions';
import type { AudioFormat, AudioFormat__Output } from '../generated/voicemesh/v1/AudioFormat';
import type { ConverseResponse__Output } from '../generated/voicemesh/v1/ConverseResponse';
import type { SessionControl } from '../generated/voicemesh/v1/SessionControl';
import type { ChatMessage } from '../generated/voicemesh/v1/ChatMessage';
import type { OrchestratorServiceInfoResponse__Output } from '../generated/voicemesh/v1/OrchestratorServiceInfoResponse';

export type { SessionConfig, Tool, AudioFormat, ConverseResponse__Output as ConverseEvent, ChatMessage };

/** A tool whose JSON schema may be given as an object (`parameters`) instead of text. */
export interface ToolSpec extends Tool {
  parameters?: unknown;
}

/** SessionConfig, with tools as a list or ToolOptions and schemas as objects. */
export interface Config extends Omit<SessionConfig, 'tools'> {
  tools?: ToolSpec[] | (Omit<ToolOptions, 'tools'> & { tools?: ToolSpec[] });
}

/** TLS from PEM files (what the VOICEMESH_CLIENT_TLS_* variables give) or PEM buffers. */
export interface TlsOptions {
  /** The CA that signed the orchestrator's certificate; unset: the system's roots. */
  caFile?: string;
  /** This client's certificate and key, for an orchestrator with mTLS (both or neither). */
  certFile?: string;
  keyFile?: string;
  /** Check the certificate against this name instead of the address's host. */
  serverName?: string;
  rootCerts?: Buffer;
  privateKey?: Buffer;
  certChain?: Buffer;
}

export interface ConnectOptions {
  /**
   * true: TLS with the system roots; an object: your own CA, client certificate, server name;
   * false: plaintext. Unset: TLS when any VOICEMESH_CLIENT_TLS_* variable is set.
   */
  tls?: boolean | TlsOptions;
  /** Sent as `authorization: Bearer <key>` on every call; unset: $VOICEMESH_API_KEY, else $VOICEMESH_API_KEY_FILE's content. */
  apiKey?: string;
  /** The same as apiKey (the older name). */
  token?: string;
  /** More metadata on every call. */
  metadata?: Record<string, string>;
  channelOptions?: grpc.ChannelOptions;
}

export interface StartOptions {
  startTimeoutMs?: number;
  signal?: AbortSignal;
}

export declare const ADDR_ENV: 'VOICEMESH_ORCHESTRATOR_ADDR';
export declare const DEFAULT_INPUT_FORMAT: Readonly<AudioFormat>;
export declare const DEFAULT_OUTPUT_FORMAT: Readonly<AudioFormat>;
export declare const status: typeof grpc.status;

/** A gRPC status that ended or refused a call. */
export declare class VoicemeshError extends Error {
  readonly code: grpc.status;
  readonly codeName: string;
  readonly details: string;
  readonly metadata?: grpc.Metadata;
}

export declare class Session implements AsyncIterable<ConverseResponse__Output> {
  readonly sessionId: string;
  readonly outputFormat: AudioFormat__Output;
  readonly closed: boolean;
  readonly error: VoicemeshError | null;
  /** Events after SessionStarted; ends after SessionEnded; throws VoicemeshError on a non-OK status. */
  /** Leaving the loop early (break, return, throw) drops the call (abort()). */
  [Symbol.asyncIterator](): AsyncIterator<ConverseResponse__Output>;
  next(): Promise<IteratorResult<ConverseResponse__Output>>;
  sendAudio(data: Buffer | Int16Array | Uint8Array): boolean;
  sendText(text: string): boolean;
  sendToolResult(toolCallId: string, content: string | object, options?: { isError?: boolean; runLlm?: boolean }): boolean;
  sendDtmf(digit: string): boolean;
  control(action: SessionControl): boolean;
  say(text: string): boolean;
  interrupt(): boolean;
  mute(muted?: boolean): boolean;
  appendContext(messages: ChatMessage[], options?: { runLlm?: boolean }): boolean;
  /** End gracefully and half-close; resolves when the stream is over. */
  end(options?: { timeoutMs?: number }): Promise<void>;
  /** Cancel now and half-close; resolves when the stream is over. */
  cancel(options?: { timeoutMs?: number }): Promise<void>;
  /** Drop the call at once (local CANCELLED, not reported as an error). */
  abort(): void;
}

export declare class Client {
  readonly address: string;
  /** Whether the channel is TLS. */
  readonly secure: boolean;
  constructor(address?: string, options?: ConnectOptions);
  info(options?: { timeoutMs?: number }): Promise<OrchestratorServiceInfoResponse__Output>;
  start(config?: Config, options?: StartOptions): Promise<Session>;
  close(): void;
}

export declare function connect(address?: string, options?: ConnectOptions): Client;
export declare function defaultAddress(): string;
export declare function sessionConfig(config?: Config): SessionConfig;
