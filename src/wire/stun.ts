/**
 * Minimal STUN codec (RFC 5389): exactly what a "what is my public address" responder needs, and the
 * matching client half (agents and tests use it for netcheck).
 *
 * Header (20 bytes, big endian)
 *    0                   1                   2                   3
 *   |0 0|     STUN Message Type     |         Message Length        |
 *   |                         Magic Cookie 0x2112A442               |
 *   |                     Transaction ID (96 bits)                  |
 * followed by `length` bytes of attributes, each TLV: type(2) length(2) value, padded to 4 bytes.
 *
 * Accepted: a Binding request (0x0001) with a valid header, the magic cookie, a length that matches the
 * datagram and a well-formed attribute list. Attributes are skipped, except FINGERPRINT, which must match
 * if present. Everything else (classic RFC 3489 requests without the cookie, indications, responses,
 * truncated or padded datagrams, non-STUN traffic) is rejected with a reason; nothing here throws on
 * input.
 *
 * Answer: a Binding success response (0x0101) with the same transaction id, XOR-MAPPED-ADDRESS
 * (0x0020) for IPv4 or IPv6 (port ^ 0x2112, address ^ cookie [|| transaction id]) and FINGERPRINT.
 *
 * Pure code: no sockets. IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, what a dual-stack UDP socket
 * reports for IPv4 clients) are answered as IPv4.
 */

import { formatIPv6 } from "../packet/ip.js";

export const STUN_MAGIC_COOKIE = 0x2112a442;
export const STUN_HEADER_BYTES = 20;
export const STUN_BINDING_REQUEST = 0x0001;
export const STUN_BINDING_SUCCESS = 0x0101;
export const STUN_ATTR_MAPPED_ADDRESS = 0x0001;
export const STUN_ATTR_XOR_MAPPED_ADDRESS = 0x0020;
export const STUN_ATTR_FINGERPRINT = 0x8028;
/** Largest datagram we look at; real Binding requests are well under this. */
export const STUN_MAX_BYTES = 1500;

const FINGERPRINT_XOR = 0x5354554e;

export type StunRejectReason =
  | "too-short"
  | "too-long"
  | "not-stun" // top two bits set: some other protocol multiplexed on the port
  | "no-magic-cookie"
  | "bad-length"
  | "wrong-type"
  | "bad-attribute"
  | "bad-fingerprint";

export interface StunAddress {
  family: "IPv4" | "IPv6";
  address: string;
  port: number;
}

export type StunParseResult<T> = { ok: true; value: T } | { ok: false; reason: StunRejectReason; detail?: string };

export interface StunBindingRequest {
  transactionId: Uint8Array; // 12 bytes
  /** the request carried a (valid) FINGERPRINT: a responder answers with one too, else without (smaller answer) */
  fingerprint: boolean;
}

export interface StunBindingSuccess {
  transactionId: Uint8Array;
  mapped: StunAddress;
}

// ---- header / attribute walking --------------------------------------------------------------------

interface RawMessage {
  type: number;
  transactionId: Uint8Array;
  attrs: { type: number; value: Uint8Array; offset: number }[];
}

function reject<T>(reason: StunRejectReason, detail?: string): StunParseResult<T> {
  return detail === undefined ? { ok: false, reason } : { ok: false, reason, detail };
}

function parseRaw(buf: Uint8Array): StunParseResult<RawMessage> {
  if (!(buf instanceof Uint8Array)) return reject("too-short", "not a byte buffer");
  if (buf.byteLength < STUN_HEADER_BYTES) return reject("too-short", `${buf.byteLength} bytes`);
  if (buf.byteLength > STUN_MAX_BYTES) return reject("too-long", `${buf.byteLength} bytes`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const type = dv.getUint16(0);
  if ((type & 0xc000) !== 0) return reject("not-stun");
  const length = dv.getUint16(2);
  if (dv.getUint32(4) !== STUN_MAGIC_COOKIE) return reject("no-magic-cookie");
  if (length % 4 !== 0 || STUN_HEADER_BYTES + length !== buf.byteLength) {
    return reject("bad-length", `header says ${length}, datagram carries ${buf.byteLength - STUN_HEADER_BYTES}`);
  }
  const transactionId = buf.slice(8, 20);
  const attrs: RawMessage["attrs"] = [];
  let off = STUN_HEADER_BYTES;
  let sawFingerprint = false;
  while (off < buf.byteLength) {
    if (sawFingerprint) return reject("bad-attribute", "attribute after FINGERPRINT");
    if (off + 4 > buf.byteLength) return reject("bad-attribute", "truncated attribute header");
    const at = dv.getUint16(off);
    const al = dv.getUint16(off + 2);
    const padded = al + ((4 - (al % 4)) % 4);
    if (off + 4 + padded > buf.byteLength) return reject("bad-attribute", `attribute 0x${at.toString(16)} overruns the message`);
    attrs.push({ type: at, value: buf.subarray(off + 4, off + 4 + al), offset: off });
    if (at === STUN_ATTR_FINGERPRINT) {
      if (al !== 4) return reject("bad-fingerprint", "FINGERPRINT must be 4 bytes");
      const want = (crc32(buf.subarray(0, off)) ^ FINGERPRINT_XOR) >>> 0;
      if (dv.getUint32(off + 4) !== want) return reject("bad-fingerprint");
      sawFingerprint = true;
    }
    off += 4 + padded;
  }
  return { ok: true, value: { type, transactionId, attrs } };
}

/** Parse a datagram that should be a Binding request. Never throws. */
export function parseBindingRequest(buf: Uint8Array): StunParseResult<StunBindingRequest> {
  const raw = parseRaw(buf);
  if (!raw.ok) return raw;
  if (raw.value.type !== STUN_BINDING_REQUEST) return reject("wrong-type", `type 0x${raw.value.type.toString(16).padStart(4, "0")}`);
  return { ok: true, value: { transactionId: raw.value.transactionId, fingerprint: raw.value.attrs.some((a) => a.type === STUN_ATTR_FINGERPRINT) } };
}

/** Parse a Binding success response (client side: netcheck, tests). Never throws. */
export function parseBindingSuccess(buf: Uint8Array): StunParseResult<StunBindingSuccess> {
  const raw = parseRaw(buf);
  if (!raw.ok) return raw;
  const { type, transactionId, attrs } = raw.value;
  if (type !== STUN_BINDING_SUCCESS) return reject("wrong-type", `expected a Binding success response, got type 0x${type.toString(16)}`);
  let mapped: StunAddress | undefined;
  for (const a of attrs) {
    if (a.type === STUN_ATTR_XOR_MAPPED_ADDRESS) {
      const addr = decodeAddress(a.value, transactionId, true);
      if (addr === undefined) return reject("bad-attribute", "malformed XOR-MAPPED-ADDRESS");
      mapped = addr;
    } else if (a.type === STUN_ATTR_MAPPED_ADDRESS && mapped === undefined) {
      const addr = decodeAddress(a.value, transactionId, false);
      if (addr === undefined) return reject("bad-attribute", "malformed MAPPED-ADDRESS");
      mapped = addr;
    }
  }
  if (mapped === undefined) return reject("bad-attribute", "no (XOR-)MAPPED-ADDRESS");
  return { ok: true, value: { transactionId, mapped } };
}

// ---- encoders --------------------------------------------------------------------------------------

function header(type: number, length: number, transactionId: Uint8Array): Uint8Array {
  if (transactionId.byteLength !== 12) throw new RangeError("STUN transaction id must be 12 bytes");
  const out = new Uint8Array(STUN_HEADER_BYTES + length);
  const dv = new DataView(out.buffer);
  dv.setUint16(0, type);
  dv.setUint16(2, length);
  dv.setUint32(4, STUN_MAGIC_COOKIE);
  out.set(transactionId, 8);
  return out;
}

function appendFingerprint(msg: Uint8Array): Uint8Array {
  const out = new Uint8Array(msg.byteLength + 8);
  out.set(msg);
  const dv = new DataView(out.buffer);
  dv.setUint16(2, msg.byteLength - STUN_HEADER_BYTES + 8); // length includes the fingerprint attribute
  dv.setUint16(msg.byteLength, STUN_ATTR_FINGERPRINT);
  dv.setUint16(msg.byteLength + 2, 4);
  dv.setUint32(msg.byteLength + 4, (crc32(out.subarray(0, msg.byteLength)) ^ FINGERPRINT_XOR) >>> 0);
  return out;
}

/** A Binding request with a fresh or given transaction id (client side). */
export function encodeBindingRequest(transactionId: Uint8Array, opts: { fingerprint?: boolean } = {}): Uint8Array {
  const msg = header(STUN_BINDING_REQUEST, 0, transactionId);
  return opts.fingerprint ? appendFingerprint(msg) : msg;
}

/**
 * The answer to a Binding request: XOR-MAPPED-ADDRESS of the sender plus FINGERPRINT.
 * Throws RangeError for an address that is not an IP literal (a bug in the caller, not remote input).
 */
export function encodeBindingSuccess(transactionId: Uint8Array, mapped: StunAddress, opts: { fingerprint?: boolean } = {}): Uint8Array {
  const ip = parseIp(mapped.address);
  if (ip === undefined) throw new RangeError(`not an IP address: ${mapped.address}`);
  if (!Number.isInteger(mapped.port) || mapped.port < 0 || mapped.port > 65535) throw new RangeError(`bad port ${mapped.port}`);
  const v4 = ip.byteLength === 4;
  const valueLen = v4 ? 8 : 20;
  const msg = header(STUN_BINDING_SUCCESS, 4 + valueLen, transactionId);
  const dv = new DataView(msg.buffer);
  let off = STUN_HEADER_BYTES;
  dv.setUint16(off, STUN_ATTR_XOR_MAPPED_ADDRESS);
  dv.setUint16(off + 2, valueLen);
  off += 4;
  msg[off] = 0;
  msg[off + 1] = v4 ? 0x01 : 0x02;
  dv.setUint16(off + 2, mapped.port ^ (STUN_MAGIC_COOKIE >>> 16));
  const mask = xorMask(transactionId);
  for (let i = 0; i < ip.byteLength; i++) msg[off + 4 + i] = ip[i]! ^ mask[i]!;
  return opts.fingerprint === false ? msg : appendFingerprint(msg);
}

function xorMask(transactionId: Uint8Array): Uint8Array {
  const mask = new Uint8Array(16);
  new DataView(mask.buffer).setUint32(0, STUN_MAGIC_COOKIE);
  mask.set(transactionId, 4);
  return mask;
}

function decodeAddress(v: Uint8Array, transactionId: Uint8Array, xor: boolean): StunAddress | undefined {
  if (v.byteLength < 4) return undefined;
  const family = v[1];
  const len = family === 0x01 ? 4 : family === 0x02 ? 16 : 0;
  if (len === 0 || v.byteLength !== 4 + len) return undefined;
  const dv = new DataView(v.buffer, v.byteOffset, v.byteLength);
  const mask = xorMask(transactionId);
  const port = dv.getUint16(2) ^ (xor ? STUN_MAGIC_COOKIE >>> 16 : 0);
  const ip = new Uint8Array(len);
  for (let i = 0; i < len; i++) ip[i] = v[4 + i]! ^ (xor ? mask[i]! : 0);
  return { family: len === 4 ? "IPv4" : "IPv6", address: formatIp(ip), port };
}

// ---- IP text <-> bytes -----------------------------------------------------------------------------

/** Parse an IPv4 or IPv6 literal; IPv4-mapped IPv6 comes back as 4 bytes. Zone ids (%eth0) are dropped. */
export function parseIp(s: string): Uint8Array | undefined {
  if (typeof s !== "string") return undefined;
  const v4 = parseIpv4(s);
  if (v4) return v4;
  const v6 = parseIpv6(s.replace(/%.*$/, ""));
  if (!v6) return undefined;
  const mapped = v6.subarray(0, 10).every((b) => b === 0) && v6[10] === 0xff && v6[11] === 0xff;
  return mapped ? v6.slice(12) : v6;
}

function parseIpv4(s: string): Uint8Array | undefined {
  const parts = s.split(".");
  if (parts.length !== 4) return undefined;
  const out = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    const p = parts[i]!;
    if (!/^\d{1,3}$/.test(p)) return undefined;
    const n = Number(p);
    if (n > 255) return undefined;
    out[i] = n;
  }
  return out;
}

function parseIpv6(s: string): Uint8Array | undefined {
  if (s.length === 0 || s.length > 45) return undefined;
  const halves = s.split("::");
  if (halves.length > 2) return undefined;
  const groups = (h: string): number[] | undefined => {
    if (h === "") return [];
    const out: number[] = [];
    const parts = h.split(":");
    for (let i = 0; i < parts.length; i++) {
      const p = parts[i]!;
      if (i === parts.length - 1 && p.includes(".")) {
        const v4 = parseIpv4(p);
        if (!v4) return undefined;
        out.push((v4[0]! << 8) | v4[1]!, (v4[2]! << 8) | v4[3]!);
      } else {
        if (!/^[0-9a-fA-F]{1,4}$/.test(p)) return undefined;
        out.push(parseInt(p, 16));
      }
    }
    return out;
  };
  const head = groups(halves[0]!);
  const tail = halves.length === 2 ? groups(halves[1]!) : [];
  if (!head || !tail) return undefined;
  const total = head.length + tail.length;
  if (halves.length === 1 ? total !== 8 : total > 7) return undefined;
  const all = [...head, ...new Array<number>(8 - total).fill(0), ...tail];
  const out = new Uint8Array(16);
  all.forEach((g, i) => {
    out[2 * i] = g >> 8;
    out[2 * i + 1] = g & 0xff;
  });
  return out;
}

/** Format 4 or 16 bytes as an IP literal (IPv6 in RFC 5952 short form, see packet/ip.ts). */
export function formatIp(ip: Uint8Array): string {
  if (ip.byteLength === 4) return Array.from(ip).join(".");
  let v = 0n;
  for (let i = 0; i < 16; i++) v = (v << 8n) | BigInt(ip[i] ?? 0);
  return formatIPv6(v);
}

// ---- CRC-32 (IEEE), for FINGERPRINT ----------------------------------------------------------------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(data: Uint8Array): number {
  let c = 0xffffffff;
  for (let i = 0; i < data.byteLength; i++) c = CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
