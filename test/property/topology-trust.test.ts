// Property: no sequence of gossip messages from a node without X's key changes anything X owns in the
// topology (X's record at an honest receiver, and the receiver's own record and counter), while X's genuine
// records keep getting through. The attacker has its own valid identity and the token (it is an insider),
// sees every record X ever sent (replays, bit flips, re-signing with its own key) and chooses seqs freely.
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { decodeTopologyMessage, encodeTopologyMessages, recordKey, signTopologyRecord, Topology, type TopologyRecord } from "../../src/mesh/topology.js";

const X = generateIdentity();
const Y = generateIdentity();
const M = generateIdentity(); // the attacker
const T0 = 1_800_000_000_000;

/** Through the real codec, as it would arrive on the control channel. */
function wire(recs: TopologyRecord[]): TopologyRecord[] {
  return encodeTopologyMessages(recs).flatMap((b) => decodeTopologyMessage(structuredClone(b)));
}

type Step =
  | { k: "honest" } // X originates a new version, delivered
  | { k: "forge"; target: "X" | "Y"; seq: "huge" | "plus1" | "same" | "lower" | "jump"; how: "attacker-key" | "x-pub-bad-sig" | "flip-old" | "random"; prefix: number }
  | { k: "replay"; idx: number }
  | { k: "own"; seq: number }; // the attacker's own (valid) record

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  fc.constant<Step>({ k: "honest" }),
  fc.record({
    k: fc.constant("forge" as const),
    target: fc.constantFrom("X" as const, "Y" as const),
    seq: fc.constantFrom("huge" as const, "plus1" as const, "same" as const, "lower" as const, "jump" as const),
    how: fc.constantFrom("attacker-key" as const, "x-pub-bad-sig" as const, "flip-old" as const, "random" as const),
    prefix: fc.integer({ min: 0, max: 255 }),
  }),
  fc.record({ k: fc.constant("replay" as const), idx: fc.nat() }),
  fc.record({ k: fc.constant("own" as const), seq: fc.integer({ min: 1, max: 1000 }) }),
);

function forge(s: Extract<Step, { k: "forge" }>, victim: Identity, held: TopologyRecord | undefined, sent: TopologyRecord[], now: number): TopologyRecord {
  const base = held?.seq ?? now;
  const seq = s.seq === "huge" ? Number.MAX_SAFE_INTEGER : s.seq === "plus1" ? base + 1 : s.seq === "same" ? base : s.seq === "lower" ? Math.max(1, base - 5) : base + 1000;
  // The classic takeover: X seems linked only to the attacker and owns the attacker's prefix of choice.
  const plain: TopologyRecord = { node: victim.id, seq, links: [{ peer: M.id, rttMs: 0.1 }], prefixes: [`10.40.${s.prefix}.0/24`], updatedAt: now };
  switch (s.how) {
    case "attacker-key": {
      const m = signTopologyRecord(M, { ...plain, node: M.id });
      return { ...plain, pub: m.pub!, sig: m.sig! };
    }
    case "x-pub-bad-sig": {
      const m = signTopologyRecord(M, { ...plain, node: M.id });
      return { ...plain, pub: victim.publicKey, sig: m.sig! };
    }
    case "flip-old": {
      const old = sent.at(-1);
      if (!old) return { ...plain, pub: victim.publicKey, sig: new Uint8Array(64) };
      return { ...plain, pub: old.pub!, sig: old.sig! }; // X's genuine signature over other content
    }
    case "random":
      return { ...plain, pub: victim.publicKey, sig: new Uint8Array(64).map((_, i) => (i * 37 + s.prefix) & 255) };
  }
}

describe("topology trust (property)", () => {
  it("no message from a node without X's key changes X's record or the receiver's own; X's records get through", () => {
    fc.assert(
      fc.property(fc.array(stepArb, { minLength: 1, maxLength: 40 }), (steps) => {
        let now = T0;
        const x = new Topology(X.id, { identity: X });
        const y = new Topology(Y.id, { identity: Y });
        const m = new Topology(M.id, { identity: M });
        y.setLocal([{ peer: X.id, rttMs: 1 }], ["10.40.1.0/24"], now);
        const yOwn = () => recordKey(y.get(Y.id)!);
        const sent: TopologyRecord[] = [];
        let newest: TopologyRecord | undefined;
        let ownBefore = yOwn();
        let seqBefore = y.seq;
        let forged = 0;
        let rejected = 0;
        for (const s of steps) {
          now += 1000;
          if (s.k === "honest") {
            const r = x.setLocal([{ peer: Y.id, rttMs: 1 + sent.length }], ["10.40.2.0/24"], now) ?? x.refresh(now, true)!;
            sent.push(r);
            newest = r;
            const res = y.mergeDetailed(wire([r]), now);
            expect(res.rejected).toEqual([]);
          } else if (s.k === "own") {
            const r = m.setLocal([{ peer: Y.id, rttMs: s.seq }], [], now) ?? m.refresh(now, true)!;
            expect(y.mergeDetailed(wire([r]), now).rejected).toEqual([]);
          } else if (s.k === "replay") {
            if (sent.length) y.mergeDetailed(wire([sent[s.idx % sent.length]!]), now);
          } else {
            const victim = s.target === "X" ? X : Y;
            const r = forge(s, victim, y.get(victim.id), sent, now);
            const res = y.mergeDetailed(wire([r]), now);
            forged++;
            rejected += res.rejected.length;
            expect(res.delta).toEqual([]);
            expect(res.originated).toBeUndefined();
          }
          // X's record at Y is exactly X's newest genuine one; Y's own record and counter untouched by others.
          if (newest) expect(recordKey(y.get(X.id)!)).toBe(recordKey(newest));
          else expect(y.get(X.id)).toBeUndefined();
          expect(yOwn()).toBe(ownBefore);
          expect(y.seq).toBe(seqBefore);
          ownBefore = yOwn();
          seqBefore = y.seq;
        }
        // Every forgery that would have changed state was refused and reported (stale ones are ignored).
        expect(rejected).toBeLessThanOrEqual(forged);
      }),
      { numRuns: 150 },
    );
  });

  it("X's own seq may step forward only by the bound; within it X's record wins", () => {
    const now = T0;
    const y = new Topology(Y.id, { identity: Y, maxSeqStepMs: 10_000 });
    const ok = signTopologyRecord(X, { node: X.id, seq: now + 5_000, links: [], prefixes: [] });
    expect(y.mergeDetailed([ok], now).delta).toHaveLength(1);
    const far = signTopologyRecord(X, { node: X.id, seq: now + 5_000 + 10_001, links: [], prefixes: [] });
    const res = y.mergeDetailed([far], now);
    expect(res.rejected.map((e) => e.code)).toEqual(["ERR_SEQ_JUMP"]);
    const max = signTopologyRecord(X, { node: X.id, seq: Number.MAX_SAFE_INTEGER, links: [], prefixes: [] });
    expect(y.mergeDetailed([max], now).rejected.map((e) => e.code)).toEqual(["ERR_SEQ_JUMP"]);
    expect(y.get(X.id)!.seq).toBe(now + 5_000);
  });

  it("refuses unsigned records and forged records for ourselves (no counter bump), with typed reasons", () => {
    const now = T0;
    const y = new Topology(Y.id, { identity: Y });
    y.setLocal([], ["10.40.1.0/24"], now);
    const seq = y.seq;
    const unsigned: TopologyRecord = { node: X.id, seq: now, links: [], prefixes: ["10.40.1.0/24"] };
    expect(y.mergeDetailed([unsigned], now).rejected.map((e) => e.code)).toEqual(["ERR_UNSIGNED"]);
    const m = signTopologyRecord(M, { node: M.id, seq: now + 1000, links: [], prefixes: [] });
    const selfForged: TopologyRecord = { node: Y.id, seq: now + 1000, links: [], prefixes: [], pub: M.publicKey, sig: m.sig! };
    const r = y.mergeDetailed([selfForged], now);
    expect(r.rejected.map((e) => e.code)).toEqual(["ERR_BAD_SIGNATURE"]);
    expect(r.originated).toBeUndefined();
    expect(y.seq).toBe(seq);
    // ...while a genuine older incarnation of ourselves still makes us jump past it.
    const older = signTopologyRecord(Y, { node: Y.id, seq: seq + 50, links: [], prefixes: [] });
    expect(y.mergeDetailed([older], now).originated?.seq).toBeGreaterThan(seq + 50);
  });
});
