/**
 * Prefix table: longest-prefix match from a destination address to a value (a node id on the data path).
 *
 * Structure: one hash map per prefix length in use (network -> value) and the list of lengths in use,
 * longest first. A lookup masks the address with each length in turn and stops at the first hit, so it
 * costs one Map.get per DISTINCT prefix length present (a cluster has a handful: the block size, maybe
 * /32 host routes and a default) instead of a trie walk of up to 32/128 steps. Inserts and removes are
 * O(1) plus a re-sort of the (<= 33 / 129) lengths when a length appears or disappears.
 * Compared with wireguard-go's allowedips (a path-compressed binary trie) this is simpler and as fast for
 * the few-lengths case; like allowedips it is checked against a slow reference model (a flat list scanned
 * for the longest matching prefix) with random inserts, removes and lookups (test/unit/packet-prefix-table.test.ts).
 *
 * IPv4 keys are the masked address as a signed 32-bit int; IPv6 keys are bigints.
 */
import { formatCidr, mask6, parseCidr, type Cidr, type IpHeader } from "./ip.js";

const MASK4: number[] = Array.from({ length: 33 }, (_, len) => (len === 0 ? 0 : (0xffffffff << (32 - len)) | 0));
const MASK6: bigint[] = Array.from({ length: 129 }, (_, len) => mask6(len));

export interface PrefixEntry<V> {
  readonly cidr: string;
  readonly value: V;
}

export class PrefixTable<V = string> {
  private readonly v4 = new Map<number, Map<number, V>>();
  private v4Lens: number[] = [];
  private readonly v6 = new Map<number, Map<bigint, V>>();
  private v6Lens: number[] = [];
  private count = 0;

  get size(): number {
    return this.count;
  }

  /** Add or replace the route for `cidr` ("10.40.1.0/24", "fd00::/64" or a parsed Cidr). Host bits are masked. */
  insert(cidr: string | Cidr, value: V): void {
    const c = toCidr(cidr);
    if (c.family === 4) {
      let m = this.v4.get(c.len);
      if (!m) {
        m = new Map();
        this.v4.set(c.len, m);
        this.v4Lens = sortedDesc(this.v4.keys());
      }
      const k = (c.addr & MASK4[c.len]!) | 0;
      if (!m.has(k)) this.count++;
      m.set(k, value);
    } else {
      let m = this.v6.get(c.len);
      if (!m) {
        m = new Map();
        this.v6.set(c.len, m);
        this.v6Lens = sortedDesc(this.v6.keys());
      }
      const k = c.addr & MASK6[c.len]!;
      if (!m.has(k)) this.count++;
      m.set(k, value);
    }
  }

  /** Remove the route for exactly this prefix. Returns whether one existed. */
  remove(cidr: string | Cidr): boolean {
    const c = toCidr(cidr);
    if (c.family === 4) {
      const m = this.v4.get(c.len);
      if (!m || !m.delete((c.addr & MASK4[c.len]!) | 0)) return false;
      if (m.size === 0) {
        this.v4.delete(c.len);
        this.v4Lens = sortedDesc(this.v4.keys());
      }
    } else {
      const m = this.v6.get(c.len);
      if (!m || !m.delete(c.addr & MASK6[c.len]!)) return false;
      if (m.size === 0) {
        this.v6.delete(c.len);
        this.v6Lens = sortedDesc(this.v6.keys());
      }
    }
    this.count--;
    return true;
  }

  /** Remove every route whose value is `value` (a node left). Returns how many. */
  removeValue(value: V): number {
    const doomed = this.entries().filter((e) => Object.is(e.value, value));
    for (const e of doomed) this.remove(e.cidr);
    return doomed.length;
  }

  /** Atomically swap the whole table for `entries` (later duplicates win). */
  replaceAll(entries: Iterable<readonly [string | Cidr, V]>): void {
    const next = new PrefixTable<V>();
    for (const [c, v] of entries) next.insert(c, v);
    this.v4.clear();
    this.v6.clear();
    for (const [k, m] of next.v4) this.v4.set(k, m);
    for (const [k, m] of next.v6) this.v6.set(k, m);
    this.v4Lens = next.v4Lens;
    this.v6Lens = next.v6Lens;
    this.count = next.count;
  }

  clear(): void {
    this.replaceAll([]);
  }

  /** Longest-prefix match for an IPv4 address (unsigned or signed 32-bit form). */
  lookup4(addr: number): V | undefined {
    const lens = this.v4Lens;
    for (let i = 0; i < lens.length; i++) {
      const len = lens[i]!;
      const v = this.v4.get(len)!.get((addr & MASK4[len]!) | 0);
      if (v !== undefined) return v;
    }
    return undefined;
  }

  lookup6(addr: bigint): V | undefined {
    for (const len of this.v6Lens) {
      const v = this.v6.get(len)!.get(addr & MASK6[len]!);
      if (v !== undefined) return v;
    }
    return undefined;
  }

  /** Route a peeked packet by its destination. */
  lookupHeader(h: IpHeader): V | undefined {
    return h.version === 4 ? this.lookup4(h.dst) : this.lookup6(h.dst);
  }

  /** The exact-prefix entry, if any (no LPM). */
  get(cidr: string | Cidr): V | undefined {
    const c = toCidr(cidr);
    return c.family === 4 ? this.v4.get(c.len)?.get((c.addr & MASK4[c.len]!) | 0) : this.v6.get(c.len)?.get(c.addr & MASK6[c.len]!);
  }

  /** All routes, longest prefixes first (IPv4 then IPv6), in canonical CIDR text. */
  entries(): PrefixEntry<V>[] {
    const out: PrefixEntry<V>[] = [];
    for (const len of this.v4Lens) {
      for (const [k, value] of this.v4.get(len)!) out.push({ cidr: formatCidr({ family: 4, addr: k >>> 0, len }), value });
    }
    for (const len of this.v6Lens) {
      for (const [k, value] of this.v6.get(len)!) out.push({ cidr: formatCidr({ family: 6, addr: k, len }), value });
    }
    return out;
  }
}

function toCidr(c: string | Cidr): Cidr {
  if (typeof c !== "string") {
    const max = c.family === 4 ? 32 : 128;
    if (!Number.isInteger(c.len) || c.len < 0 || c.len > max) throw new RangeError(`prefix length ${c.len} out of range 0..${max}`);
    return c;
  }
  const p = parseCidr(c);
  if (!p) throw new RangeError(`not a CIDR: ${JSON.stringify(c)}`);
  return p;
}

function sortedDesc(keys: Iterable<number>): number[] {
  return [...keys].sort((a, b) => b - a);
}
