import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { formatCidr, mask4, mask6, parseIPv4, parseIPv6, type Cidr } from "../../src/packet/ip.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";

/** Slow reference model: a flat list; lookup scans everything for the longest matching prefix. */
class ReferenceTable {
  private list: { c: Cidr; v: string }[] = [];
  insert(c: Cidr, v: string): void {
    this.remove(c);
    this.list.push({ c: norm(c), v });
  }
  remove(c: Cidr): boolean {
    const n = norm(c);
    const before = this.list.length;
    this.list = this.list.filter((e) => !(e.c.family === n.family && e.c.len === n.len && e.c.addr === n.addr));
    return this.list.length !== before;
  }
  lookup4(a: number): string | undefined {
    let best: { c: Cidr; v: string } | undefined;
    for (const e of this.list) {
      if (e.c.family !== 4) continue;
      if (((a & mask4(e.c.len)) >>> 0) === e.c.addr && (!best || e.c.len > best.c.len)) best = e;
    }
    return best?.v;
  }
  lookup6(a: bigint): string | undefined {
    let best: { c: Cidr; v: string } | undefined;
    for (const e of this.list) {
      if (e.c.family !== 6) continue;
      if ((a & mask6(e.c.len)) === e.c.addr && (!best || e.c.len > best.c.len)) best = e;
    }
    return best?.v;
  }
  get size(): number {
    return this.list.length;
  }
}

function norm(c: Cidr): Cidr {
  return c.family === 4 ? { family: 4, addr: (c.addr & mask4(c.len)) >>> 0, len: c.len } : { family: 6, addr: c.addr & mask6(c.len), len: c.len };
}

// Addresses drawn from a small space (10.40.x.y plus a few outliers) so prefixes overlap and lookups hit.
const addr4 = fc.oneof(
  fc.tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 255 })).map(([x, y]) => (0x0a280000 | (x << 8) | y) >>> 0),
  fc.integer({ min: 0, max: 0xffffffff }),
);
const cidr4: fc.Arbitrary<Cidr> = fc.tuple(addr4, fc.oneof(fc.integer({ min: 0, max: 32 }), fc.constantFrom(16, 24, 26, 32))).map(([addr, len]) => ({ family: 4, addr, len }));
const addr6 = fc.tuple(fc.constantFrom(0xfd00n, 0xfd01n, 0x2001n), fc.bigInt({ min: 0n, max: (1n << 112n) - 1n })).map(([p, r]) => (p << 112n) | r);
const cidr6: fc.Arbitrary<Cidr> = fc.tuple(addr6, fc.integer({ min: 0, max: 128 })).map(([addr, len]) => ({ family: 6, addr, len }));
const node = fc.constantFrom("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "dddddddddddddddd");

type Op =
  | { k: "insert"; c: Cidr; v: string }
  | { k: "remove"; c: Cidr }
  | { k: "lookup4"; a: number }
  | { k: "lookup6"; a: bigint }
  | { k: "replaceAll"; entries: [Cidr, string][] };

const op: fc.Arbitrary<Op> = fc.oneof(
  { arbitrary: fc.record({ k: fc.constant("insert" as const), c: fc.oneof(cidr4, cidr6), v: node }), weight: 4 },
  { arbitrary: fc.record({ k: fc.constant("remove" as const), c: fc.oneof(cidr4, cidr6) }), weight: 2 },
  { arbitrary: fc.record({ k: fc.constant("lookup4" as const), a: addr4 }), weight: 4 },
  { arbitrary: fc.record({ k: fc.constant("lookup6" as const), a: addr6 }), weight: 2 },
  { arbitrary: fc.record({ k: fc.constant("replaceAll" as const), entries: fc.array(fc.tuple(fc.oneof(cidr4, cidr6), node), { maxLength: 8 }) }), weight: 1 },
);

describe("PrefixTable", () => {
  it("agrees with the reference model over random inserts, removes, replaces and lookups", () => {
    fc.assert(
      fc.property(fc.array(op, { maxLength: 120 }), fc.array(addr4, { maxLength: 30 }), (ops, probes) => {
        const t = new PrefixTable<string>();
        let ref = new ReferenceTable();
        // removing a prefix inserted earlier in the run is the interesting case: replay inserted cidrs as removes
        const inserted: Cidr[] = [];
        for (const o of ops) {
          switch (o.k) {
            case "insert":
              t.insert(o.c, o.v);
              ref.insert(o.c, o.v);
              inserted.push(o.c);
              break;
            case "remove": {
              const c = inserted.length > 0 && o.c.len % 2 === 0 ? inserted[o.c.len % inserted.length]! : o.c;
              expect(t.remove(c)).toBe(ref.remove(c));
              break;
            }
            case "lookup4":
              expect(t.lookup4(o.a)).toBe(ref.lookup4(o.a));
              break;
            case "lookup6":
              expect(t.lookup6(o.a)).toBe(ref.lookup6(o.a));
              break;
            case "replaceAll":
              t.replaceAll(o.entries);
              ref = new ReferenceTable();
              for (const [c, v] of o.entries) ref.insert(c, v);
              break;
          }
          expect(t.size).toBe(ref.size);
        }
        for (const a of probes) expect(t.lookup4(a)).toBe(ref.lookup4(a));
        for (const c of inserted) {
          expect(t.lookup4(c.family === 4 ? (c.addr as number) : 0)).toBe(ref.lookup4(c.family === 4 ? (c.addr as number) : 0));
          if (c.family === 6) expect(t.lookup6(c.addr)).toBe(ref.lookup6(c.addr));
        }
        // entries() lists exactly the live routes, in canonical form
        const listed = t.entries();
        expect(listed.length).toBe(ref.size);
        for (const e of listed) expect(t.get(e.cidr)).toBe(e.value);
      }),
      { numRuns: 400 },
    );
  });

  it("longest prefix wins; default route; host bits masked; removeValue", () => {
    const t = new PrefixTable();
    t.insert("10.40.0.0/16", "a");
    t.insert("10.40.1.0/24", "b");
    t.insert("10.40.1.7/32", "c");
    t.insert("0.0.0.0/0", "gw");
    t.insert("fd00::/8", "v6");
    const ip = (s: string) => parseIPv4(s)!;
    expect(t.lookup4(ip("10.40.1.7"))).toBe("c");
    expect(t.lookup4(ip("10.40.1.8"))).toBe("b");
    expect(t.lookup4(ip("10.40.200.1"))).toBe("a");
    expect(t.lookup4(ip("8.8.8.8"))).toBe("gw");
    expect(t.lookup4(ip("255.255.255.255"))).toBe("gw");
    expect(t.lookup6(parseIPv6("fd12::1")!)).toBe("v6");
    expect(t.lookup6(parseIPv6("2001::1")!)).toBeUndefined();
    t.insert("10.40.1.99/24", "b2"); // same prefix as 10.40.1.0/24: replaces it
    expect(t.lookup4(ip("10.40.1.8"))).toBe("b2");
    expect(t.size).toBe(5);
    expect(t.removeValue("gw")).toBe(1);
    expect(t.lookup4(ip("8.8.8.8"))).toBeUndefined();
    expect(t.entries().map((e) => e.cidr)).toEqual(["10.40.1.7/32", "10.40.1.0/24", "10.40.0.0/16", "fd00::/8"]);
    expect(formatCidr({ family: 4, addr: ip("10.40.0.0"), len: 16 })).toBe("10.40.0.0/16");
    expect(() => t.insert("10.0.0.0/40", "x")).toThrow(RangeError);
    t.clear();
    expect(t.size).toBe(0);
    expect(t.lookup4(ip("10.40.1.7"))).toBeUndefined();
  });
});
