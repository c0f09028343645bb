import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { ProtocolError } from "../../src/errors.js";
import { decodeIpamMessage, encodeIpamMessage, epochId, type IpamMessage } from "../../src/ipam/index.js";
import { decodeEnvelope, encodeMessage } from "../../src/wire/codec.js";

const id = fc.string({ unit: fc.constantFrom(..."0123456789abcdef"), minLength: 16, maxLength: 16 });
const eid = fc.tuple(id, fc.integer({ min: 0, max: 2 ** 40 })).map(([f, at]) => epochId(f, at));
const msg = fc.oneof(
  fc.record({
    t: fc.constant("hello" as const),
    epoch: fc.option(fc.tuple(id, fc.integer({ min: 0, max: 2 ** 40 })).map(([founder, at]) => ({ id: epochId(founder, at), founder, at, range: "10.40.0.0/16", bp: 26 })), { nil: null }),
    beat: fc.nat(),
    beats: fc.array(fc.tuple(id, fc.nat())),
    free: fc.integer({ min: 0, max: 1024 }),
    digest: fc.integer({ min: 0, max: 0xffffffff }),
    promised: fc.array(fc.tuple(fc.integer({ min: 0, max: 1023 }), fc.integer({ min: 1, max: 1000 }))),
  }),
  fc.record({ t: fc.constant("state" as const), epoch: eid, entries: fc.array(fc.tuple(fc.integer({ min: 0, max: 1023 }), id, fc.nat(), fc.constantFrom("t" as const, "p" as const, "c" as const, "f" as const, "o" as const))) }),
  fc.record({ t: fc.constantFrom("req" as const, "nak" as const), epoch: eid }),
  fc.record({
    t: fc.constant("members" as const),
    epoch: eid,
    records: fc.array(
      fc.oneof(
        fc.tuple(id, fc.constant("m" as const), fc.constant(null)),
        fc.tuple(id, fc.constant("x" as const), fc.constant(null)),
        fc.tuple(id, fc.constant("x" as const), fc.tuple(fc.constantFrom("leave" as const, "gone" as const), id, fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.uint8Array({ minLength: 64, maxLength: 64 }))),
        fc.tuple(id, fc.constant("m" as const), fc.tuple(fc.nat(1023), fc.integer({ min: 1, max: 99 }), id, id, fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.uint8Array({ minLength: 64, maxLength: 64 }), fc.array(fc.tuple(id, fc.uint8Array({ minLength: 32, maxLength: 32 }), fc.uint8Array({ minLength: 64, maxLength: 64 }), fc.integer({ min: 1, max: 64 })), { maxLength: 3 }))),
      ),
      { maxLength: 8 },
    ),
  }),
  fc.record({ t: fc.constant("prop" as const), epoch: eid, kind: fc.constantFrom("t" as const, "c" as const, "p" as const), owner: id, to: id, until: fc.nat(), blocks: fc.array(fc.tuple(fc.nat(1023), fc.integer({ min: 1, max: 99 }))) }),
  fc.record({ t: fc.constant("prom" as const), epoch: eid, blocks: fc.array(fc.tuple(fc.nat(1023), fc.integer({ min: 1, max: 99 }))) }),
);

describe("ipam wire", () => {
  it("round-trips through msgpack", () => {
    fc.assert(
      fc.property(msg, (m) => {
        const wire = decodeEnvelope(encodeMessage(encodeIpamMessage(m)), 1 << 20);
        // (bytes come back as Buffers: compare their contents)
        const plain = (x: unknown): unknown => (x instanceof Uint8Array ? [...x] : Array.isArray(x) ? x.map(plain) : x && typeof x === "object" ? Object.fromEntries(Object.entries(x).map(([k, v]) => [k, plain(v)])) : x);
        expect(plain(decodeIpamMessage(wire))).toEqual(plain(m as IpamMessage));
      }),
      { numRuns: 300 },
    );
  });

  it("rejects malformed bodies with ProtocolError only", () => {
    fc.assert(
      fc.property(fc.anything(), (x) => {
        try {
          decodeIpamMessage(x);
        } catch (e) {
          expect(e).toBeInstanceOf(ProtocolError);
        }
      }),
      { numRuns: 500 },
    );
    const good = encodeIpamMessage({ t: "state", epoch: epochId("0123456789abcdef", 5), entries: [[0, "0123456789abcdef", 1, "t"]] });
    const cases: unknown[] = [
      null,
      [],
      { ...good, v: 0 },
      { ...good, v: 2 },
      { ...good, t: "nope" },
      { ...good, epoch: "x" },
      { ...good, entries: [[0, "0123456789ABCDEF", 1, "t"]] },
      { ...good, entries: [[-1, "0123456789abcdef", 1, "t"]] },
      { ...good, entries: [[0, "0123456789abcdef", 1.5, "t"]] },
      { ...good, entries: [[0, "0123456789abcdef", 1, "x"]] },
      { ...good, entries: [[0, "0123456789abcdef", 1]] },
      // member records (newer than kind "o": an agent from before refuses the whole message type)
      { v: 1, t: "members", epoch: epochId("0123456789abcdef", 5), records: [["0123456789abcdef", "y", null]] },
      { v: 1, t: "members", epoch: epochId("0123456789abcdef", 5), records: [["0123456789abcdef", "x", ["quit", "0123456789abcdef", new Uint8Array(32), new Uint8Array(64)]]] },
      { v: 1, t: "members", epoch: epochId("0123456789abcdef", 5), records: [["0123456789abcdef", "x", ["gone", "0123456789abcdef", new Uint8Array(31), new Uint8Array(64)]]] },
      { v: 1, t: "members", epoch: epochId("0123456789abcdef", 5), records: [["0123456789abcdef", "m", [-1, 1, "0123456789abcdef", "0123456789abcdef", new Uint8Array(32), new Uint8Array(64)]]] },
      { v: 1, t: "members", epoch: epochId("0123456789abcdef", 5), records: Array.from({ length: 65 }, () => ["0123456789abcdef", "m", null]) },
      { v: 1, t: "hello", epoch: { id: "0123456789abcdef.1", founder: "0123456789abcdef", at: 2, range: "10.40.0.0/16", bp: 26 }, beat: 1, beats: [], free: 0, digest: 0 },
      { v: 1, t: "hello", epoch: null, beat: -1, beats: [], free: 0, digest: 0 },
    ];
    for (const c of cases) expect(() => decodeIpamMessage(c), JSON.stringify(c)).toThrow(ProtocolError);
    expect(decodeIpamMessage({ ...good, extra: 1 })).toMatchObject({ t: "state" });
  });
});
