import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { nodeAead } from "../../src/bulk/crypto.js";
import { BulkPeer, HANDSHAKE_BURST, HANDSHAKE_REFILL_MS, KEEPALIVE, PMTU_BASE, PMTU_CONFIRM_MS, PMTU_RAISE_MS, type BulkAction, type BulkPeerOptions, type BulkTiming } from "../../src/bulk/session.js";
import { emptyPmtuCounters } from "../../src/mesh/transport.js";
import { MAX_INNER_FRAME, parseCandidate, type Endpoint } from "../../src/bulk/wire.js";
import { generateIdentity, signFields, verifyFields, type Identity } from "../../src/identity.js";

const CTX = "weftnet/bulk/test";

function pair(timing: Partial<BulkTiming> = {}, extra: Partial<BulkPeerOptions> = {}) {
  let a = generateIdentity();
  let b = generateIdentity();
  if (a.id > b.id) [a, b] = [b, a]; // a initiates (lower id)
  const mk = (self: Identity, peer: Identity, cand: string) =>
    new BulkPeer({
      selfId: self.id,
      peerId: peer.id,
      aead: nodeAead(),
      auth: { sign: (...f) => signFields(self, CTX, ...f), verifyPeer: (sig, ...f) => verifyFields(peer.publicKey, sig, CTX, ...f) },
      random: () => randomBytes(4).readUInt32LE(0),
      timing,
      cands: [cand],
      ...extra,
    });
  const A = mk(a, b, "10.0.0.1:5000");
  const B = mk(b, a, "10.0.0.2:6000");
  return { A, B, epA: parseCandidate("10.0.0.1:5000")!, epB: parseCandidate("10.0.0.2:6000")! };
}

/** A tiny network: control messages delivered in order, datagrams delivered unless `blocked`. */
function net(A: BulkPeer, B: BulkPeer, epA: Endpoint, epB: Endpoint) {
  const st = { now: 1000, blocked: false, maxSize: Infinity, frames: [] as { to: "A" | "B"; data: Uint8Array }[], events: [] as string[], sizes: { A: [] as number[], B: [] as number[] } };
  const run = (who: "A" | "B", acts: BulkAction[]): void => {
    const other = who === "A" ? B : A;
    const otherName = who === "A" ? "B" : "A";
    const self = who === "A" ? A : B;
    for (const x of acts) {
      if (x.type === "control") run(otherName, other.handle({ type: "control", body: structuredClone(x.body) }, st.now));
      else if (x.type === "send") {
        st.sizes[who].push(x.data.length);
        if (!st.blocked && x.data.length <= st.maxSize) {
          const r = other.open(x.data, who === "A" ? epA : epB, st.now);
          if (r instanceof Uint8Array) st.frames.push({ to: otherName, data: r });
          // probe acks go back the same way
          const acks = other.pendingSends.splice(0);
          run(otherName, acks.map((a) => ({ type: "send" as const, to: a.to, data: a.data })));
        }
      } else if (x.type === "up" || x.type === "down") st.events.push(`${who}:${x.type}`);
    }
  };
  const tick = (ms: number) => {
    for (let t = 0; t < ms; t += 100) {
      st.now += 100;
      run("A", A.handle({ type: "tick" }, st.now));
      run("B", B.handle({ type: "tick" }, st.now));
    }
  };
  return { st, run, tick };
}

describe("bulk session", () => {
  it("handshakes over the control channel, punches, comes up on both sides, and carries sealed frames", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    expect(A.initiator).toBe(true);
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.run("B", B.handle({ type: "start" }, n.st.now));
    n.tick(600);
    expect(A.state).toBe("up");
    expect(B.state).toBe("up");
    expect(n.st.events.sort()).toEqual(["A:up", "B:up"]);
    const frame = randomBytes(1400);
    frame[0] = 0x10;
    const out = new Uint8Array(1500);
    const seal = (f: Uint8Array) => {
      out.set(f, 16);
      return A.seal(out, 0, f.length);
    };
    const len = seal(frame);
    expect(len).toBe(1400 + BulkPeer.OVERHEAD);
    const got = B.open(out.subarray(0, len), epA, n.st.now);
    expect(Buffer.from(got as Uint8Array).equals(frame)).toBe(true);
    // a replay of the same datagram is dropped and counted
    expect(B.open(out.subarray(0, len), epA, n.st.now)).toBe("replay");
    // tampered: fails authentication, counted, nothing changes
    const bad = Uint8Array.from(out.subarray(0, len));
    bad[40] = bad[40]! ^ 1;
    expect(B.open(bad, epA, n.st.now)).toBe("bad-auth");
    bad[4] = bad[4]! ^ 0xff;
    expect(B.open(bad, epA, n.st.now)).toBe("unknown-index");
    expect(B.open(bad.subarray(0, 20), epA, n.st.now)).toBe("short");
    bad[0] = 9;
    expect(B.open(bad, epA, n.st.now)).toBe("bad-type");
    expect(B.drops).toMatchObject({ replay: 1, "bad-auth": 1, "unknown-index": 1, short: 1, "bad-type": 1 });
    // still works after the garbage
    const len2 = seal(frame);
    expect(B.open(out.subarray(0, len2), epA, n.st.now)).toBeInstanceOf(Uint8Array);
    expect(B.rttMs).toBeGreaterThanOrEqual(0);
  });

  it("a whole frame sealed end to end (0x11) opens unchanged; hostile inner frames are typed drops and change nothing", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(600);
    expect(A.up && B.up).toBe(true);
    const out = new Uint8Array(MAX_INNER_FRAME + 200);
    const send = (inner: Uint8Array) => {
      out.set(inner, 16);
      return B.open(out.subarray(0, A.seal(out, 0, inner.length)), epA, n.st.now);
    };
    const sealedFrame = (len: number, first = 0x11) => {
      const f = randomBytes(len);
      f[0] = first;
      return f;
    };
    // an honest sealed frame: header + counter + records + tag, handed on byte for byte
    const good = sealedFrame(18 + 8 + 4 + 10 + 60 + 16);
    expect(Buffer.from(send(good) as Uint8Array).equals(good)).toBe(true);
    const rx0 = B.counters.rxDatagrams;
    // hostile (authenticated by the peer's key, so only the inner message is wrong)
    expect(send(sealedFrame(18 + 8 + 16))).toBe("truncated"); // no record inside the seal
    expect(send(sealedFrame(10))).toBe("truncated"); // not even a frame header
    expect(send(sealedFrame(18 + 4 + 11 - 1, 0x10))).toBe("truncated"); // plain frame without a whole minimal record
    expect(send(sealedFrame(MAX_INNER_FRAME + 1))).toBe("oversize");
    expect(send(sealedFrame(MAX_INNER_FRAME + 1, 0x10))).toBe("oversize");
    for (const bad of [0x13, 0x15, 0x19, 0x12]) expect(send(sealedFrame(200, bad))).toBe("bad-flags");
    for (const bad of [0x21, 0xf1, 0x03, 0x7f]) expect(send(sealedFrame(200, bad))).toBe("bad-inner");
    expect(B.drops).toMatchObject({ truncated: 3, oversize: 2, "bad-flags": 4, "bad-inner": 4 });
    expect(B.counters.rxDatagrams - rx0).toBe(13);
    // the link is intact: still up, the largest honest frame and a plain one still open
    n.tick(300);
    expect(A.up && B.up).toBe(true);
    const big = sealedFrame(MAX_INNER_FRAME);
    expect(Buffer.from(send(big) as Uint8Array).equals(big)).toBe(true);
    const plain = sealedFrame(18 + 4 + 11, 0x10);
    expect(Buffer.from(send(plain) as Uint8Array).equals(plain)).toBe(true);
  });

  it("goes down within the dead interval when the path goes silent, and back up when it recovers", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(600);
    expect(A.up && B.up).toBe(true);
    n.st.blocked = true;
    n.tick(1000);
    expect(A.state).toBe("punching");
    expect(B.state).toBe("punching");
    expect(A.reason).toMatch(/silent/);
    n.st.blocked = false;
    n.tick(800);
    expect(A.up && B.up).toBe(true);
    expect(n.st.events).toEqual(expect.arrayContaining(["A:down", "B:down"]));
  });

  it("one-way path: the side whose datagrams do not arrive never claims the link", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    // Only B -> A works.
    const origOpen = B.open.bind(B);
    B.open = () => "bad-auth";
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(2000);
    expect(A.up).toBe(false);
    expect(B.up).toBe(false);
    B.open = origOpen;
    n.tick(800);
    expect(A.up && B.up).toBe(true);
  });

  it("path MTU black hole below the floor: keepalives pass, probes do not -> never up, and the reason says so", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    n.st.maxSize = 300; // not even the search's floor passes
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(8000);
    expect(A.up || B.up).toBe(false);
    expect(A.reason).toMatch(/path MTU/);
    n.st.maxSize = 1500; // the path heals: the search starts over within seconds, the link comes up
    n.tick(8000);
    expect(A.up && B.up).toBe(true);
    // (a search that was under way when it healed may have lost sizes the path now carries: the raise timer fixes it)
    n.tick(PMTU_RAISE_MS);
    expect(A.pathMax).toBe(1464);
    expect(B.pathMax).toBe(1464);
  });

  it("path MTU search: finds the largest datagram the path carries (a search, not fixed steps), within 16 bytes", () => {
    for (const limit of [1300, 1001, 700]) {
      const { A, B, epA, epB } = pair();
      const n = net(A, B, epA, epB);
      n.st.maxSize = limit;
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(8000);
      expect(A.up && B.up).toBe(true);
      expect(A.pathMax!).toBeLessThanOrEqual(limit);
      expect(A.pathMax!).toBeGreaterThan(limit - 16);
      expect(B.pathMax!).toBeGreaterThan(limit - 16);
      expect(A.pmtuHow).toBe("searched");
    }
  });

  it("a stall of our own (late ticks) is not taken for a silent path", () => {
    const { A, B, epA, epB } = pair();
    const n = net(A, B, epA, epB);
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(600);
    expect(A.up).toBe(true);
    n.st.now += 1500; // the event loop was blocked for 1.5 s: nothing was read or sent
    expect(A.handle({ type: "tick" }, n.st.now).some((x) => x.type === "down")).toBe(false);
    n.tick(700); // timely ticks again: keepalives flow, still up
    expect(A.up && B.up).toBe(true);
  });

  it("rotates keys by bytes and by time; datagrams sealed with the previous key still open", () => {
    const { A, B, epA, epB } = pair({ rekeyAfterBytes: 50_000, rekeyAfterMs: 30_000 });
    const n = net(A, B, epA, epB);
    n.run("A", A.handle({ type: "start" }, n.st.now));
    n.tick(600);
    const frame = new Uint8Array(1000).fill(0x11);
    const out = new Uint8Array(1100);
    const old = new Uint8Array(1100);
    const sealIn = (who: BulkPeer, buf: Uint8Array) => {
      buf.set(frame, 16);
      return who.seal(buf, 0, frame.length);
    };
    const oldLen = sealIn(A, old); // in flight across the rotation
    for (let i = 0; i < 60; i++) expect(B.open(out.subarray(0, sealIn(A, out)), epA, n.st.now)).toBeInstanceOf(Uint8Array);
    n.tick(200); // A sees the byte limit and handshakes again
    expect(A.counters.rotations).toBe(1);
    // B promotes the new key on the first datagram sealed with it
    expect(B.open(out.subarray(0, sealIn(A, out)), epA, n.st.now)).toBeInstanceOf(Uint8Array);
    expect(B.counters.rotations).toBe(1);
    expect(B.open(old.subarray(0, oldLen), epA, n.st.now)).toBeInstanceOf(Uint8Array);
    // by time: a B -> A stream keeps working across the time-based rotation
    for (let s = 0; s < 70; s++) {
      n.tick(1000);
      const l = sealIn(B, out);
      expect(A.open(out.subarray(0, l), epB, n.st.now)).toBeInstanceOf(Uint8Array);
    }
    expect(A.counters.rotations).toBeGreaterThanOrEqual(3);
    expect(A.up && B.up).toBe(true);
  });

  it("either role stops when the peer has no bulk link (answers off to init and to the responder's announcement)", () => {
    const { A, B } = pair();
    const off = { t: "off", v: 1, reason: "bulk link disabled on this node (--no-bulk)" };
    const ai = A.handle({ type: "start" }, 0);
    expect(ai.some((x) => x.type === "control" && x.body.t === "init")).toBe(true);
    const bi = B.handle({ type: "start" }, 0);
    expect(bi.some((x) => x.type === "control" && x.body.t === "cands")).toBe(true);
    A.handle({ type: "control", body: off }, 0);
    B.handle({ type: "control", body: off }, 0);
    expect([A.state, B.state]).toEqual(["off", "off"]);
    expect(A.reason).toMatch(/--no-bulk/);
    expect(A.handle({ type: "tick" }, 10_000)).toEqual([]);
  });

  it("refuses a handshake not signed by the peer's identity, and malformed control bodies", () => {
    const { A, B, epA, epB } = pair();
    const acts = A.handle({ type: "start" }, 0);
    const init = acts.find((a) => a.type === "control")!;
    const body = structuredClone((init as { body: Record<string, unknown> }).body);
    (body.sig as Uint8Array)[0]! ^= 1;
    expect(B.handle({ type: "control", body }, 0).filter((a) => a.type === "control")).toEqual([]);
    for (const junk of [null, 5, "x", [], { t: "init" }, { v: 1, t: "init", hs: -1 }, { v: 1, t: "nope" }, { v: 1, t: "cands", cands: ["999.1.1.1:1"] }]) B.handle({ type: "control", body: junk }, 0);
    expect(B.counters.badControl).toBe(9);
    expect(B.state).toBe("idle");
    void epA;
    void epB;
    void KEEPALIVE;
  });

  it("a peer flooding handshake messages gets a bounded number processed; the rest are dropped before any crypto and counted", () => {
    const { A, B } = pair();
    const init = A.handle({ type: "start" }, 0).find((a) => a.type === "control") as { body: unknown };
    let answered = 0;
    const flood = (n: number, now: number) => {
      for (let i = 0; i < n; i++) answered += B.handle({ type: "control", body: structuredClone(init.body) }, now).filter((a) => a.type === "control").length;
    };
    flood(200, 0);
    expect(answered).toBe(HANDSHAKE_BURST);
    expect(B.counters.handshakes).toBe(HANDSHAKE_BURST);
    expect(B.drops["handshake-rate"]).toBe(200 - HANDSHAKE_BURST);
    // one more per refill interval, never more than the burst however long the peer waited
    flood(10, HANDSHAKE_REFILL_MS);
    expect(answered).toBe(HANDSHAKE_BURST + 1);
    flood(50, 60_000);
    expect(answered).toBe(2 * HANDSHAKE_BURST + 1);
    // the honest initiator still completes a handshake with the latest answer
    const resp = B.handle({ type: "control", body: structuredClone(A.handle({ type: "tick" }, 70_000).find((a) => a.type === "control")?.body ?? init.body) }, 70_000);
    expect(resp.some((a) => a.type === "control")).toBe(true);
  });

  describe("path MTU (src/mesh/pmtu.ts driven by the session: sealed probes, DF, acks)", () => {
    // a 4000-byte pod MTU: the largest datagram 4060; the path carries 1972-byte datagrams (2000-byte IPv4)
    const big = (limit?: number) => {
      const counters = emptyPmtuCounters();
      const lim = { v: limit };
      const { A, B, epA, epB } = pair({}, { maxDatagram: 4060, localLimit: () => lim.v, pmtuCounters: counters });
      const n = net(A, B, epA, epB);
      const sizes = n.st.sizes.A;
      return { A, B, n, counters, lim, sizes };
    };

    it("up at the safe size one probe round trip after the path forms, then pathMax rises as the search goes on (silent black hole)", () => {
      const { A, B, n, counters, sizes } = big();
      n.st.maxSize = 1972;
      n.run("A", A.handle({ type: "start" }, n.st.now));
      for (let i = 0; i < 100 && !A.up; i++) n.tick(100);
      const firstUp = A.pathMax;
      expect(A.up).toBe(true);
      expect(firstUp).toBe(PMTU_BASE);
      expect(A.pmtuHow).toBe("searching");
      n.tick(6000);
      expect(A.pmtuHow).toBe("searched");
      expect(A.pathMax!).toBeLessThanOrEqual(1972);
      expect(1972 - A.pathMax!).toBeLessThan(16);
      expect(1972 - B.pathMax!).toBeLessThan(16);
      expect(counters.searches.searched).toBe(2); // A's and B's (the counters are shared, as in a BulkService)
      expect(A.describe(n.st.now).pmtu.lost).toBeLessThanOrEqual(3);
      expect(counters.acked).toBeGreaterThan(3);
      expect(sizes).toContain(4060); // the full size was tried (and lost) once per try
    });

    it("the local route limit caps the search: the limit is probed exactly, nothing above it leaves (local-limit)", () => {
      const { A, n, counters, sizes } = big(1972);
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(3000);
      expect(A.pathMax).toBe(1972);
      expect(A.pmtuHow).toBe("local-limit");
      expect(Math.max(...sizes)).toBe(1972);
      expect(counters.searches["local-limit"]).toBe(2);
      expect(counters.lost).toBe(0);
    });

    it("a black hole mid-life: the confirmation probe of pathMax is lost while keepalives pass -> fallback and a new search below it", () => {
      const { A, n, counters } = big();
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(2000);
      expect(A.pathMax).toBe(4060);
      expect(A.pmtuHow).toBe("confirmed");
      n.st.maxSize = 1972; // e.g. a route change onto a smaller link that sends no ICMP
      n.tick(PMTU_CONFIRM_MS + 1000);
      expect(A.up).toBe(true); // keepalives still pass: the link stays up
      expect(counters.blackHoles).toBe(2); // both directions (shared counters)
      n.tick(5000);
      expect(A.pathMax!).toBeLessThanOrEqual(1972);
      expect(1972 - A.pathMax!).toBeLessThan(16);
      expect(A.describe(n.st.now).pmtu).toMatchObject({ how: "searched", blackHoles: 1 });
      // and it stays there: later confirmations pass
      n.tick(3 * PMTU_CONFIRM_MS);
      expect(counters.blackHoles).toBe(2);
    });

    /** A sends `size`-byte data datagrams to B (dropped above the path's maxSize), as the agent's hot path does. */
    const traffic = (A: BulkPeer, B: BulkPeer, n: ReturnType<typeof net>, size: number) => {
      const d = new Uint8Array(size);
      d[16] = 0x10; // a data frame (its records are not checked by open)
      const len = A.seal(d, 0, size - BulkPeer.OVERHEAD);
      n.st.sizes.A.push(len);
      if (len <= n.st.maxSize) B.open(d.subarray(0, len), parseCandidate("10.0.0.1:5000")!, n.st.now);
    };

    it("a black hole under traffic: the keepalives' received-size report shows the large datagrams missing -> the confirmation probe goes at once (quick check)", () => {
      const { A, B, n, counters } = big();
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(2000);
      expect(A.pathMax).toBe(4060);
      // full-size traffic that arrives: reported, no early probe
      const probesBefore = counters.probes;
      for (let i = 0; i < 10; i++) {
        traffic(A, B, n, 4060);
        n.tick(100);
      }
      expect(A.describe(n.st.now).pmtu.quickChecks).toBe(0);
      expect(counters.probes).toBe(probesBefore);
      // the path shrinks silently under the traffic, well before the next periodic confirmation: detected within
      // ~2 s (was: at that confirmation, up to 5 s later, + 2 s of waiting for its acks)
      n.st.maxSize = 1972;
      const t0 = n.st.now;
      let t1 = Infinity;
      for (let i = 0; i < 40 && t1 === Infinity; i++) {
        traffic(A, B, n, 4060);
        n.tick(100);
        if (A.describe(n.st.now).pmtu.blackHoles > 0) t1 = n.st.now;
      }
      expect(A.describe(n.st.now).pmtu.quickChecks).toBe(1);
      expect(t1 - t0).toBeLessThanOrEqual(2000); // fake clock: 1600 ms (stale reports 2 intervals, 4 keepalive intervals, 2 probe tries of 250 ms)
      n.tick(5000);
      expect(1972 - A.pathMax!).toBeLessThan(16);
      expect(A.up).toBe(true);
    });

    it("no quick check on an idle link, nor from a peer whose keepalives carry no report (older agents)", () => {
      const { A, B, n } = big();
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(2000);
      n.st.maxSize = 1972;
      const probes = A.describe(n.st.now).pmtu.probes;
      n.tick(PMTU_CONFIRM_MS - 2500); // idle: nothing goes out before the periodic confirmation
      expect(A.describe(n.st.now).pmtu.probes).toBe(probes);
      expect(A.describe(n.st.now).pmtu.quickChecks).toBe(0);
      // an older peer: 26-byte keepalives, no report -> no quick check however much goes unreported
      const o = big();
      o.n.run("A", o.A.handle({ type: "start" }, o.n.st.now));
      o.n.tick(2000);
      (o.A as unknown as { peerReportsRx: boolean }).peerReportsRx = false; // what a 26-byte keepalive leaves
      o.n.st.maxSize = 1972;
      for (let i = 0; i < 10; i++) {
        traffic(o.A, o.B, o.n, 4060);
        o.n.tick(100);
        (o.A as unknown as { peerReportsRx: boolean }).peerReportsRx = false;
      }
      expect(o.A.describe(o.n.st.now).pmtu.quickChecks).toBe(0);
      void B;
    });

    it("EMSGSIZE from the kernel (its limit fell, e.g. an ICMP 'fragmentation needed'): pathMax drops to the limit at once", () => {
      const { A, n, lim } = big();
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(2000);
      expect(A.pathMax).toBe(4060);
      lim.v = 1472;
      n.run("A", A.handle({ type: "too-big" }, n.st.now));
      expect(A.pathMax).toBe(1472);
      n.tick(2000);
      expect(A.pathMax).toBe(1472);
      expect(A.describe(n.st.now).pmtu).toMatchObject({ how: "local-limit", tooBig: 1 });
      // the raise timer searches upwards again (the limit still caps it)
      n.tick(PMTU_RAISE_MS + 1000);
      expect(A.pathMax).toBe(1472);
    });

    it("acks of no probe of ours are typed drops and change nothing", () => {
      const { A, B, n, counters } = big();
      n.run("A", A.handle({ type: "start" }, n.st.now));
      n.tick(2000);
      const inner = new Uint8Array(7);
      inner[0] = 2; // probe ack
      new DataView(inner.buffer).setUint32(1, 12345, true);
      new DataView(inner.buffer).setUint16(5, 9000, true);
      const d = new Uint8Array(7 + 32);
      d.set(inner, 16);
      const len = B.seal(d, 0, 7);
      expect(A.open(d.subarray(0, len), parseCandidate("10.0.0.2:6000")!, n.st.now)).toBe(KEEPALIVE);
      expect(A.pathMax).toBe(4060);
      expect(counters.drops["unsolicited-ack"]).toBe(1);
    });
  });
});
