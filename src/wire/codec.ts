/**
 * Shared msgpack codec for every weftnet wire message (signaling socket and the `control` data channel).
 *
 * Layout: one msgpack map per message. Every map has
 *   v: number   protocol version (PROTOCOL_VERSION); a receiver rejects a *higher major* it cannot read
 *   t: string   message type
 * plus per-type fields. Decoders ignore unknown fields so a newer sender may append fields freely.
 *
 * Decoding is defensive: size is checked before msgpack runs, the result must be a plain map with a
 * known `t`, and each field is type-checked by the per-protocol validator (see signal.ts, control.ts).
 * Failures throw ProtocolError with a stable code; callers count and drop.
 */
import { Packr, Unpackr } from "msgpackr";
import { ProtocolError } from "../errors.js";

export const PROTOCOL_VERSION = 1;

const packr = new Packr({ useRecords: false, moreTypes: false, variableMapSize: true });
const unpackr = new Unpackr({ useRecords: false, moreTypes: false, mapsAsObjects: true, int64AsType: "number" });

export type WireMap = { v: number; t: string } & Record<string, unknown>;

export function encodeMessage(msg: WireMap): Uint8Array {
  return packr.pack(msg);
}

/** Decode a raw frame into a map with v/t checked. Does not validate per-type fields. */
export function decodeEnvelope(data: Uint8Array, maxBytes: number): WireMap {
  if (data.byteLength > maxBytes) {
    throw new ProtocolError("ERR_TOO_LARGE", `message of ${data.byteLength} bytes exceeds the ${maxBytes}-byte limit`);
  }
  let value: unknown;
  try {
    value = unpackr.unpack(data);
  } catch (e) {
    throw new ProtocolError("ERR_MALFORMED", `message is not valid msgpack: ${(e as Error).message}`, { cause: e });
  }
  if (!isPlainObject(value)) throw new ProtocolError("ERR_MALFORMED", "message is not a map");
  const { v, t } = value;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) throw new ProtocolError("ERR_MALFORMED", "message has no valid version field `v`");
  if (v > PROTOCOL_VERSION) throw new ProtocolError("ERR_VERSION", `message version ${v} is newer than supported ${PROTOCOL_VERSION}`);
  if (typeof t !== "string" || t.length === 0 || t.length > 32) throw new ProtocolError("ERR_MALFORMED", "message has no valid type field `t`");
  return value as WireMap;
}

export function isPlainObject(x: unknown): x is Record<string, unknown> {
  return typeof x === "object" && x !== null && !Array.isArray(x) && !(x instanceof Uint8Array);
}

// ---- small field validators used by the per-protocol decoders -------------------------------------

export function str(m: Record<string, unknown>, k: string, max = 256): string {
  const x = m[k];
  if (typeof x !== "string" || x.length > max) throw new ProtocolError("ERR_INVALID", `field ${k} must be a string of at most ${max} chars`);
  return x;
}
export function optStr(m: Record<string, unknown>, k: string, max = 256): string | undefined {
  return m[k] === undefined || m[k] === null ? undefined : str(m, k, max);
}
export function num(m: Record<string, unknown>, k: string): number {
  const x = m[k];
  if (typeof x !== "number" || !Number.isFinite(x)) throw new ProtocolError("ERR_INVALID", `field ${k} must be a finite number`);
  return x;
}
export function bytes(m: Record<string, unknown>, k: string, len?: number, max = 65536): Uint8Array {
  const x = m[k];
  if (!(x instanceof Uint8Array)) throw new ProtocolError("ERR_INVALID", `field ${k} must be bytes`);
  if (len !== undefined && x.byteLength !== len) throw new ProtocolError("ERR_INVALID", `field ${k} must be ${len} bytes`);
  if (x.byteLength > max) throw new ProtocolError("ERR_INVALID", `field ${k} too long`);
  return x;
}
export function obj(m: Record<string, unknown>, k: string): Record<string, unknown> {
  const x = m[k];
  if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", `field ${k} must be a map`);
  return x;
}
export function arr(m: Record<string, unknown>, k: string, max = 100_000): unknown[] {
  const x = m[k];
  if (!Array.isArray(x) || x.length > max) throw new ProtocolError("ERR_INVALID", `field ${k} must be an array of at most ${max} items`);
  return x;
}
/** Node ids are 16 lowercase hex chars (see identity.ts). */
export const NODE_ID_RE = /^[0-9a-f]{16}$/;
export function nodeId(m: Record<string, unknown>, k: string): string {
  const x = str(m, k, 16);
  if (!NODE_ID_RE.test(x)) throw new ProtocolError("ERR_INVALID", `field ${k} is not a node id`);
  return x;
}
