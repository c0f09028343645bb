// The identity proof over the link, in the mesh manager: two managers on in-memory links whose
// "negotiated certificate" we control. Honest: the link opens and carries traffic. A man in the middle
// (one side negotiated another certificate than the peer's): refused, counted, nothing delivered.
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { silentLogger } from "../../src/log.js";
import { MeshManager } from "../../src/mesh/manager.js";
import type { Fingerprint, Transport } from "../../src/mesh/transport.js";
import { MemoryNetwork } from "../../src/testing/memory-transport.js";
import type { PeerInfo, SignalData } from "../../src/wire/signal.js";

const MITM: Fingerprint = { algorithm: "sha-256", value: Array(32).fill("EE").join(":") };

/** The memory transport, with links that report a negotiated remote certificate (`seen(peerTransport)`). */
function dtlsLike(t: Transport, seen: () => Fingerprint): Transport {
  return {
    name: "dtls-like",
    fingerprint: t.fingerprint,
    createLink: (o) => Object.assign(t.createLink(o), { remoteFingerprint: seen }),
    close: () => t.close(),
  };
}

function pair(mitmAtB: boolean) {
  const net = new MemoryNetwork();
  const [ia, ib] = [generateIdentity(), generateIdentity()] as [Identity, Identity];
  const ta = net.transport();
  const tb = net.transport();
  const mgr: Record<string, MeshManager> = {};
  const packets: Record<string, Uint8Array[]> = { a: [], b: [] };
  const mk = (name: "a" | "b", idn: Identity, t: Transport, other: () => string) =>
    new MeshManager({
      identity: idn,
      token: "tok",
      name,
      instance: name,
      version: "t",
      transport: t,
      signal: { up: true, send: (to: string, data: SignalData) => (queueMicrotask(() => mgr[to]?.onSignal(idn.id, structuredClone(data))), true) },
      iceServers: () => [],
      logger: silentLogger,
      now: () => Date.now(),
    });
  // A sees B's real certificate; B sees either A's or a middleman's.
  mgr[ia.id] = mk("a", ia, dtlsLike(ta, () => tb.fingerprint), () => ib.id);
  mgr[ib.id] = mk("b", ib, dtlsLike(tb, () => (mitmAtB ? MITM : ta.fingerprint)), () => ia.id);
  const a = mgr[ia.id]!;
  const b = mgr[ib.id]!;
  a.onPacket((_f, d) => packets.a!.push(d));
  b.onPacket((_f, d) => packets.b!.push(d));
  const info = (i: Identity, n: string): PeerInfo => ({ id: i.id, name: n, pub: i.publicKey, meta: {} });
  a.onWelcome([info(ib, "b")]);
  b.onWelcome([info(ia, "a")]);
  return { a, b, ia, ib, packets };
}

const settle = async (f: () => void, ms = 300) => {
  const t0 = Date.now();
  while (Date.now() - t0 < ms) {
    f();
    await new Promise((r) => setTimeout(r, 10));
  }
};

describe("identity proof over the link (mesh manager)", () => {
  it("honest: the link opens only through the proof and then carries traffic", async () => {
    const { a, b, ia, ib, packets } = pair(false);
    for (let t0 = Date.now(); !(a.isConnected(ib.id) && b.isConnected(ia.id)) && Date.now() - t0 < 5000; ) await settle(() => (a.tick(), b.tick()), 50);
    expect(a.isConnected(ib.id) && b.isConnected(ia.id)).toBe(true);
    expect(a.sendPacket(ib.id, new Uint8Array([1, 2, 3]))).toBe("ok");
    for (let t0 = Date.now(); packets.b!.length === 0 && Date.now() - t0 < 2000; ) await settle(() => {}, 20);
    expect(packets.b).toHaveLength(1);
    expect(a.counters.authFailures + b.counters.authFailures).toBe(0);
    await a.stop();
    await b.stop();
  });

  it("a man in the middle (B negotiated another certificate than A's): refused, counted, nothing delivered", async () => {
    const { a, b, ia, ib, packets } = pair(true);
    await settle(() => (a.tick(), b.tick()), 500);
    expect(b.isConnected(ia.id)).toBe(false);
    expect(a.isConnected(ib.id)).toBe(false);
    // whichever side checks first refuses (A sees that B's proof names a certificate A never had)
    expect(a.counters.authFailures + b.counters.authFailures).toBeGreaterThan(0);
    // whatever A managed to send on its side of the link never reached B's mesh
    a.sendPacket(ib.id, new Uint8Array([9]));
    await settle(() => {}, 50);
    expect(packets.b).toHaveLength(0);
    const errs = [(await a.status())[0]!.lastError, (await b.status())[0]!.lastError].join(" ");
    expect(errs).toMatch(/proof over the link/);
    await a.stop();
    await b.stop();
  });
});
