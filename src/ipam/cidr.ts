/**
 * IPv4 CIDR maths for IPAM. Addresses are unsigned 32-bit integers held in a JS number (0 .. 2^32-1).
 * Pure functions; bad input throws CidrError (code "ERR_CIDR").
 */
import { WeftError } from "../errors.js";

export class CidrError extends WeftError {
  static override readonly name = "CidrError";
  constructor(message: string) {
    super("ERR_CIDR", message);
  }
}

export interface Cidr {
  /** network address (host bits zero) */
  readonly base: number;
  /** prefix length 0..32 */
  readonly prefix: number;
}

const OCTET_RE = /^(0|[1-9][0-9]{0,2})$/;

/** "10.40.0.1" -> 0x0a280001. Strict dotted quad: no leading zeros, no whitespace. */
export function parseIp(s: string): number {
  const parts = s.split(".");
  if (parts.length !== 4) throw new CidrError(`not an IPv4 address: ${JSON.stringify(s)}`);
  let n = 0;
  for (const p of parts) {
    if (!OCTET_RE.test(p)) throw new CidrError(`not an IPv4 address: ${JSON.stringify(s)}`);
    const o = Number(p);
    if (o > 255) throw new CidrError(`octet out of range in ${JSON.stringify(s)}`);
    n = n * 256 + o;
  }
  return n;
}

export function formatIp(n: number): string {
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) throw new CidrError(`not a 32-bit address: ${n}`);
  return `${Math.floor(n / 2 ** 24)}.${Math.floor(n / 2 ** 16) % 256}.${Math.floor(n / 2 ** 8) % 256}.${n % 256}`;
}

/** Number of addresses in a prefix (2^(32-prefix)). */
export function sizeOf(prefix: number): number {
  return 2 ** (32 - prefix);
}

/** "10.40.0.0/16" -> {base, prefix}. Rejects host bits set ("10.40.0.1/16") so ranges are unambiguous. */
export function parseCidr(s: string): Cidr {
  const slash = s.indexOf("/");
  if (slash < 0) throw new CidrError(`not a CIDR (missing /prefix): ${JSON.stringify(s)}`);
  const base = parseIp(s.slice(0, slash));
  const ps = s.slice(slash + 1);
  if (!/^(0|[1-9][0-9]?)$/.test(ps) || Number(ps) > 32) throw new CidrError(`bad prefix length in ${JSON.stringify(s)}`);
  const prefix = Number(ps);
  if (base % sizeOf(prefix) !== 0) throw new CidrError(`${s} has host bits set (not aligned to /${prefix})`);
  return { base, prefix };
}

export function formatCidr(c: Cidr): string {
  return `${formatIp(c.base)}/${c.prefix}`;
}

export function cidrSize(c: Cidr): number {
  return sizeOf(c.prefix);
}

/** Last address (broadcast) of the CIDR. */
export function lastIp(c: Cidr): number {
  return c.base + sizeOf(c.prefix) - 1;
}

export function containsIp(c: Cidr, ip: number): boolean {
  return ip >= c.base && ip <= lastIp(c);
}

/** True if `inner` lies entirely inside `outer`. */
export function containsCidr(outer: Cidr, inner: Cidr): boolean {
  return inner.prefix >= outer.prefix && containsIp(outer, inner.base);
}

export function overlaps(a: Cidr, b: Cidr): boolean {
  return a.base <= lastIp(b) && b.base <= lastIp(a);
}

export function equalCidr(a: Cidr, b: Cidr): boolean {
  return a.base === b.base && a.prefix === b.prefix;
}

/** Number of aligned /blockPrefix blocks in `range`. */
export function blockCount(range: Cidr, blockPrefix: number): number {
  if (!Number.isInteger(blockPrefix) || blockPrefix < range.prefix || blockPrefix > 32) {
    throw new CidrError(`block size /${blockPrefix} does not fit in /${range.prefix}`);
  }
  return 2 ** (blockPrefix - range.prefix);
}

/** The i-th aligned block of `range` (0-based). */
export function blockAt(range: Cidr, blockPrefix: number, i: number): Cidr {
  const n = blockCount(range, blockPrefix);
  if (!Number.isInteger(i) || i < 0 || i >= n) throw new CidrError(`block index ${i} out of 0..${n - 1}`);
  return { base: range.base + i * sizeOf(blockPrefix), prefix: blockPrefix };
}

/** Index of the block that contains `ip`, or -1 if `ip` is outside the range. */
export function blockIndexOf(range: Cidr, blockPrefix: number, ip: number): number {
  if (!containsIp(range, ip)) return -1;
  return Math.floor((ip - range.base) / sizeOf(blockPrefix));
}

/** All aligned blocks of `range`, in address order. */
export function enumerateBlocks(range: Cidr, blockPrefix: number): Cidr[] {
  const n = blockCount(range, blockPrefix);
  const out: Cidr[] = [];
  for (let i = 0; i < n; i++) out.push(blockAt(range, blockPrefix, i));
  return out;
}

/**
 * Host addresses of a block that pods may get: the network (first) and broadcast (last) address are
 * skipped, and so is the first host address, which is the node's gateway for that block on its pod
 * bridge (agent/os/netconf.ts). Every block can be a bridge subnet on its own. Blocks smaller than /29
 * are refused by the configuration (--block-size is 16..30; /30 leaves one pod address).
 * Returns [first, last] inclusive.
 */
export function usableRange(block: Cidr): [number, number] {
  if (block.prefix >= 31) return [block.base, lastIp(block)];
  return [block.base + 2, lastIp(block) - 1];
}

/** The gateway address of a block: its first host address (reserved, never given to a pod). */
export function gatewayOf(block: Cidr): number {
  return block.base + 1;
}
