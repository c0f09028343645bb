/**
 * IPv4 / IPv6 header peek: just enough of the header to route a packet (version, addresses, lengths),
 * validated so that any byte string from a TUN device or a peer yields either a header or a typed drop.
 * Never throws, never allocates on the drop path (the drop objects are shared constants).
 *
 * Address forms (compact, cheap to compare and to use as Map keys):
 *   IPv4: unsigned 32-bit number  (10.40.0.1 -> 0x0a280001)
 *   IPv6: unsigned 128-bit bigint
 *
 * GSO super-packets (IFF_VNET_HDR) carry the whole super-packet length in the IP header (IPv4 tot_len,
 * IPv6 payload length), at most 65535, so the "total length <= bytes available" check holds for them too.
 * Bytes past the total length (padding) are allowed; callers that need the exact packet use totalLength.
 */
import type { DropReason } from "./drop.js";

export interface Ip4Header {
  readonly ok: true;
  readonly version: 4;
  /** IHL * 4 (20..60). */
  readonly headerLength: number;
  /** tot_len from the header. */
  readonly totalLength: number;
  /** IP protocol (6 TCP, 17 UDP, 1 ICMP...). */
  readonly protocol: number;
  readonly ttl: number;
  readonly src: number;
  readonly dst: number;
}

export interface Ip6Header {
  readonly ok: true;
  readonly version: 6;
  /** Fixed header only: 40 (extension headers are not walked). */
  readonly headerLength: 40;
  /** 40 + payload length. */
  readonly totalLength: number;
  /** Next header of the fixed header. */
  readonly protocol: number;
  /** Hop limit. */
  readonly ttl: number;
  readonly src: bigint;
  readonly dst: bigint;
}

export type IpHeader = Ip4Header | Ip6Header;

export interface PeekDrop {
  readonly ok: false;
  readonly reason: DropReason;
  readonly detail: string;
}

export type PeekResult = IpHeader | PeekDrop;

function drop(detail: string): PeekDrop {
  return Object.freeze({ ok: false, reason: "malformed", detail });
}

export const IP_DROPS = {
  empty: drop("no bytes where an IP header should start"),
  version: drop("IP version is neither 4 nor 6"),
  short4: drop("IPv4 header shorter than 20 bytes"),
  ihl: drop("IPv4 IHL below 5"),
  options: drop("IPv4 options run past the end of the buffer"),
  totlen4: drop("IPv4 total length smaller than its header"),
  trunc4: drop("IPv4 total length exceeds the bytes available"),
  short6: drop("IPv6 header shorter than 40 bytes"),
  trunc6: drop("IPv6 payload length exceeds the bytes available"),
} as const;

/** Peek at the IP header starting at `offset` (e.g. VNET_HDR_LEN for a packet read from the TUN). */
export function peekIp(pkt: Uint8Array, offset = 0): PeekResult {
  const avail = pkt.length - offset;
  if (!(offset >= 0) || avail < 1) return IP_DROPS.empty;
  const b0 = pkt[offset]!;
  const version = b0 >> 4;
  if (version === 4) {
    if (avail < 20) return IP_DROPS.short4;
    const ihl = (b0 & 0x0f) * 4;
    if (ihl < 20) return IP_DROPS.ihl;
    if (ihl > avail) return IP_DROPS.options;
    const tot = (pkt[offset + 2]! << 8) | pkt[offset + 3]!;
    if (tot < ihl) return IP_DROPS.totlen4;
    if (tot > avail) return IP_DROPS.trunc4;
    return {
      ok: true,
      version: 4,
      headerLength: ihl,
      totalLength: tot,
      protocol: pkt[offset + 9]!,
      ttl: pkt[offset + 8]!,
      src: readU32(pkt, offset + 12),
      dst: readU32(pkt, offset + 16),
    };
  }
  if (version === 6) {
    if (avail < 40) return IP_DROPS.short6;
    const tot = 40 + ((pkt[offset + 4]! << 8) | pkt[offset + 5]!);
    if (tot > avail) return IP_DROPS.trunc6;
    return {
      ok: true,
      version: 6,
      headerLength: 40,
      totalLength: tot,
      protocol: pkt[offset + 6]!,
      ttl: pkt[offset + 7]!,
      src: readU128(pkt, offset + 8),
      dst: readU128(pkt, offset + 24),
    };
  }
  return IP_DROPS.version;
}

/**
 * Hot-path shortcut: the IPv4 destination of a well-formed IPv4 packet at `offset`, or -1 when the bytes
 * are not one (then call peekIp for the reason). No allocation.
 */
export function ipv4Dst(pkt: Uint8Array, offset = 0): number {
  const avail = pkt.length - offset;
  if (!(offset >= 0) || avail < 20) return -1;
  const b0 = pkt[offset]!;
  const ihl = (b0 & 0x0f) * 4;
  if (b0 >> 4 !== 4 || ihl < 20 || ihl > avail) return -1;
  const tot = (pkt[offset + 2]! << 8) | pkt[offset + 3]!;
  if (tot < ihl || tot > avail) return -1;
  return readU32(pkt, offset + 16);
}

function readU32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}

function readU128(b: Uint8Array, o: number): bigint {
  const hi = (BigInt(readU32(b, o)) << 32n) | BigInt(readU32(b, o + 4));
  const lo = (BigInt(readU32(b, o + 8)) << 32n) | BigInt(readU32(b, o + 12));
  return (hi << 64n) | lo;
}

// ---- textual forms (control plane, config, tests; not the hot path) -------------------------------

const V4_RE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

/** "10.40.0.1" -> 0x0a280001; undefined for anything else (no leading zeros beyond "0", octets <= 255). */
export function parseIPv4(s: string): number | undefined {
  const m = V4_RE.exec(s);
  if (!m) return undefined;
  let n = 0;
  for (let i = 1; i <= 4; i++) {
    const part = m[i]!;
    if (part.length > 1 && part[0] === "0") return undefined;
    const v = Number(part);
    if (v > 255) return undefined;
    n = n * 256 + v;
  }
  return n;
}

export function formatIPv4(n: number): string {
  return `${(n >>> 24) & 255}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;
}

/** Full or "::"-compressed IPv6 (optionally with a dotted IPv4 tail) -> bigint; undefined if invalid. */
export function parseIPv6(s: string): bigint | undefined {
  if (s.length < 2 || s.length > 45) return undefined;
  let tail4: number | undefined;
  let text = s;
  const lastColon = text.lastIndexOf(":");
  if (text.includes(".")) {
    tail4 = parseIPv4(text.slice(lastColon + 1));
    if (tail4 === undefined) return undefined;
    text = text.slice(0, lastColon + 1) + "0:0";
  }
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const parse = (h: string): number[] | undefined => {
    if (h === "") return [];
    const out: number[] = [];
    for (const g of h.split(":")) {
      if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return undefined;
      out.push(parseInt(g, 16));
    }
    return out;
  };
  const head = parse(halves[0]!);
  const rest = halves.length === 2 ? parse(halves[1]!) : [];
  if (!head || !rest) return undefined;
  let groups: number[];
  if (halves.length === 2) {
    if (head.length + rest.length > 7) return undefined;
    groups = [...head, ...new Array<number>(8 - head.length - rest.length).fill(0), ...rest];
  } else {
    if (head.length !== 8) return undefined;
    groups = head;
  }
  let v = 0n;
  for (const g of groups) v = (v << 16n) | BigInt(g);
  if (tail4 !== undefined) v = (v & ~0xffffffffn) | BigInt(tail4);
  return v;
}

/** RFC 5952 form: lowercase, longest run (>= 2) of zero groups compressed to "::". */
export function formatIPv6(v: bigint): string {
  const g: number[] = [];
  for (let i = 7; i >= 0; i--) g.push(Number((v >> BigInt(i * 16)) & 0xffffn));
  let best = -1;
  let bestLen = 0;
  for (let i = 0; i < 8; ) {
    if (g[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && g[j] === 0) j++;
    if (j - i > bestLen && j - i >= 2) {
      best = i;
      bestLen = j - i;
    }
    i = j;
  }
  const hex = (a: number[]) => a.map((x) => x.toString(16)).join(":");
  if (best < 0) return hex(g);
  return `${hex(g.slice(0, best))}::${hex(g.slice(best + bestLen))}`;
}

export type Cidr = { family: 4; addr: number; len: number } | { family: 6; addr: bigint; len: number };

/** "10.40.0.0/16" or "fd00::/8". Host bits are masked off (10.40.1.5/16 -> 10.40.0.0/16). */
export function parseCidr(s: string): Cidr | undefined {
  const slash = s.indexOf("/");
  if (slash < 0) return undefined;
  const lenText = s.slice(slash + 1);
  if (!/^\d{1,3}$/.test(lenText)) return undefined;
  const len = Number(lenText);
  const host = s.slice(0, slash);
  if (host.includes(":")) {
    const a = parseIPv6(host);
    if (a === undefined || len > 128) return undefined;
    return { family: 6, addr: a & mask6(len), len };
  }
  const a = parseIPv4(host);
  if (a === undefined || len > 32) return undefined;
  return { family: 4, addr: (a & mask4(len)) >>> 0, len };
}

export function formatCidr(c: Cidr): string {
  return c.family === 4 ? `${formatIPv4(c.addr)}/${c.len}` : `${formatIPv6(c.addr)}/${c.len}`;
}

/** Netmask of an IPv4 prefix length as an unsigned number (mask4(0) = 0, mask4(32) = 0xffffffff). */
export function mask4(len: number): number {
  return len === 0 ? 0 : (0xffffffff << (32 - len)) >>> 0;
}

const ALL128 = (1n << 128n) - 1n;
export function mask6(len: number): bigint {
  return len === 0 ? 0n : (ALL128 << BigInt(128 - len)) & ALL128;
}
