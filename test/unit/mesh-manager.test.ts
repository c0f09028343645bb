// MeshManager on the in-memory transport with a manual clock: no sockets, no timers of its own. A fake
// signaling hub forwards signals between managers (asynchronously, like the server). Covers linking,
// control RPC (ping) and its timeout on the injected clock, typed packet sends, and the relay -> WebRTC
// upgrade state machine end to end (WebRTC blocked -> relay link -> WebRTC back -> promoted).
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { silentLogger } from "../../src/log.js";
import { MeshManager, PROBE_FIRST_MS } from "../../src/mesh/manager.js";
import { Upgrade } from "../../src/mesh/upgrade.js";
import { AFTER_ICE_CONNECTED, type ChannelName, type Transport } from "../../src/mesh/transport.js";
import { decodeControl } from "../../src/wire/control.js";
import { MemoryNetwork, type MemoryLink } from "../../src/testing/memory-transport.js";
import { cluster, flush } from "../helpers/memory-mesh.js";
import type { PeerInfo, SignalData } from "../../src/wire/signal.js";



/** Two managers linked over the relay because WebRTC cannot open (UDP blocked). */
async function relayedPair() {
  const c = cluster(2, { relay: true });
  c.webrtc.reachable = false;
  c.welcome();
  const [a, b] = c.ids;
  const ma = c.managers.get(a!.id)!;
  const mb = c.managers.get(b!.id)!;
  await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id));
  return { c, a: a!, b: b!, ma, mb };
}
describe("MeshManager (memory transport, manual clock)", () => {
  it("links every pair, answers pings on the injected clock, and times a ping out by tick", async () => {
    const c = cluster(3);
    c.welcome();
    await c.run(() => c.all.every((m) => m.connectedPeers().length === 2));
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const rtt = ma.ping(b!.id, 1000);
    await flush();
    await expect(rtt).resolves.toBe(0); // the monotonic clock defaults to `now`, which did not move
    // Make b deaf: its memory link stops accepting deliveries (state not open); the ping is lost.
    const remote = (ma.link(b!.id) as MemoryLink).peer!;
    remote.state = "connecting";
    const lost = ma.ping(b!.id, 1000);
    const failed = expect(lost).rejects.toThrow(/no answer/);
    c.clock.now += 1200;
    ma.tick();
    await failed;
  });

  it("sendPacket: typed results; frames arrive at the peer's packet handler", async () => {
    const c = cluster(2);
    c.welcome();
    await c.run(() => c.all.every((m) => m.connectedPeers().length === 1));
    const [a, b] = c.ids;
    const got: [string, number[]][] = [];
    c.managers.get(b!.id)!.onPacket((from, d) => got.push([from, [...d]]));
    const ma = c.managers.get(a!.id)!;
    expect(ma.sendPacket(b!.id, new Uint8Array([1, 2, 3]))).toBe("ok");
    expect(ma.sendPacket("ffffffffffffffff", new Uint8Array([1]))).toBe("closed");
    expect(ma.queued(b!.id)).toBe(3); // sent, not delivered yet
    await flush();
    expect(got).toEqual([[a!.id, [1, 2, 3]]]);
    expect(ma.queued(b!.id)).toBe(0);
  });

  it("falls back to the relay when WebRTC cannot open, then upgrades make-before-break when it can", async () => {
    const { c, a, b, ma, mb } = await relayedPair();
    let st = (await ma.status())[0]!;
    expect(st.link).toBe("relay");
    expect(st.webrtcFailures).toBeGreaterThanOrEqual(1);
    const packets: number[] = [];
    mb.onPacket((_f, d) => packets.push(d[0]!));
    expect(ma.sendPacket(b!.id, new Uint8Array([7]))).toBe("ok");
    // The first background attempt is due PROBE_FIRST_MS after the relay opened; WebRTC works again.
    c.webrtc.reachable = true;
    const drains: string[] = [];
    ma.onDrain((p, ch) => drains.push(`${p}:${ch}`));
    await c.run(() => ma.counters.upgrades === 1 && mb.counters.upgrades === 1, PROBE_FIRST_MS * 4);
    st = (await ma.status())[0]!;
    expect(st.link).toBe("webrtc");
    expect(st.state).toBe("connected");
    expect(drains).toContain(`${b!.id}:packets`); // what the Forwarder held for the relay link may go now
    expect(ma.sendPacket(b!.id, new Uint8Array([8]))).toBe("ok");
    await flush();
    expect(packets).toEqual([7, 8]);
    expect(ma.counters.linksClosed).toBeGreaterThanOrEqual(1); // the relay link was retired after the switch
  });
});

describe("MeshManager: relay -> WebRTC when a direct path is known to work", () => {
  it("directPathWorks (the bulk link came up) makes the next upgrade attempt due at once, once per failed attempt", async () => {
    const { c, a, b, ma, mb } = await relayedPair();
    // The first background attempt fails (UDP still blocked): the next waits PROBE_FIRST_MS * 2 +-25%.
    await c.run(() => ma.counters.linksOpened === 1 && ma.counters.linksClosed >= 1, PROBE_FIRST_MS * 2);
    const failedAt = c.clock.now;
    c.webrtc.reachable = true;
    ma.directPathWorks(b!.id);
    mb.directPathWorks(a!.id);
    await c.run(() => ma.counters.upgrades === 1 && mb.counters.upgrades === 1, PROBE_FIRST_MS * 4);
    // connect timeout 2 s in this cluster: the attempt started at once, far before the backoff's 7.5 s
    // (without the hint: 5 s here, the probe backoff)
    expect(c.clock.now - failedAt).toBeLessThanOrEqual(1_000);
    expect((await ma.status())[0]!.link).toBe("webrtc");
  });

  it("the hint moves the next attempt forward at most once per failed attempt; without a new hint the backoff applies", () => {
    const u = new Upgrade({ connectTimeoutMs: 2_000, newConn: () => "c", random: () => 0.5 });
    u.handle({ type: "relay-open" }, 0);
    u.handle({ type: "path-works" }, 100);
    expect(u.handle({ type: "tick", offerer: true, onRelay: true, canDial: true }, 100)).toEqual([{ type: "start", conn: "c" }]);
    u.handle({ type: "closed", conn: "c", reason: "ICE failed" }, 200); // attempt 1 failed: next at +10 s
    u.handle({ type: "path-works" }, 300);
    expect(u.handle({ type: "tick", offerer: true, onRelay: true, canDial: true }, 300)).toEqual([{ type: "start", conn: "c" }]);
    u.handle({ type: "closed", conn: "c", reason: "ICE failed" }, 400);
    u.handle({ type: "path-works" }, 500);
    u.handle({ type: "path-works" }, 600); // same failed-attempt count: no second hint
    expect(u.handle({ type: "tick", offerer: true, onRelay: true, canDial: true }, 600)).toEqual([{ type: "start", conn: "c" }]);
    u.handle({ type: "closed", conn: "c", reason: "ICE failed" }, 700);
    expect(u.handle({ type: "tick", offerer: true, onRelay: true, canDial: true }, 800)).toEqual([]);
  });
});

describe("MeshManager: stopping", () => {
  it("ignores presence and signals that arrive after stop() (no link is made on a transport being closed)", async () => {
    const c = cluster(2);
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const mb = c.managers.get(b!.id)!;
    const info = (idn: Identity, i: number): PeerInfo => ({ id: idn.id, name: `n${i}`, pub: idn.publicKey, meta: {} });
    mb.onWelcome([info(a!, 0), info(b!, 1)]); // b knows a; a does not know b yet
    await ma.stop();
    const dials = ma.counters.dials;
    ma.onWelcome([info(a!, 0), info(b!, 1)]); // a is the offerer (lower id): it would dial at once
    ma.onJoin(info(b!, 1));
    ma.onSignal(b!.id, { kind: "candidate", conn: "late", candidate: "x", mid: "0" } as unknown as SignalData);
    ma.onLeave(b!.id);
    await c.run(() => false, 3_000).catch(() => undefined);
    expect(ma.counters.dials).toBe(dials);
    expect(ma.connectedPeers()).toEqual([]);
    expect(await ma.status()).toEqual([]);
  });
});

describe("MeshManager: first attempts", () => {
  it("keeps a signal that overtook its sender's presence and replays it when the join arrives", async () => {
    // The signaling server batches joins but forwards signals at once: a newcomer's offer can reach an
    // existing member before the newcomer's join does. It must not be lost (the attempt would wait out
    // the whole connect timeout and start on the relay).
    const c = cluster(2, { relay: true });
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const mb = c.managers.get(b!.id)!;
    const info = (idn: Identity, i: number): PeerInfo => ({ id: idn.id, name: `n${i}`, pub: idn.publicKey, meta: {} });
    mb.onWelcome([info(b!, 1)]); // b is alone so far
    ma.onWelcome([info(a!, 0), info(b!, 1)]); // a (the offerer: lower id) learns of b and dials at once
    await flush();
    expect(mb.counters.unknownSender).toBeGreaterThan(0); // the offer (and candidates) arrived first
    expect(mb.isConnected(a!.id)).toBe(false);
    mb.onJoin(info(a!, 0)); // the batched join arrives
    await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id), 1_000);
    expect(ma.counters.dials).toBe(1);
    expect((await ma.status())[0]!.link).toBe("webrtc");
  });

  it("an attempt that failed after ICE connected (DTLS) is retried over WebRTC, not moved to the relay", async () => {
    let failed = 0;
    const c = cluster(2, {
      relay: true,
      // the offerer's first link fails the way a DTLS handshake failure is reported
      wrap: (t, i) =>
        i !== 0
          ? t
          : {
              ...t,
              name: t.name,
              fingerprint: t.fingerprint,
              close: () => t.close(),
              createLink: (o) => {
                const l = t.createLink(o) as MemoryLink;
                if (failed++ === 0) {
                  const start = l.start.bind(l);
                  l.start = async () => {
                    await start();
                    setImmediate(() => l.close(`connection failed ${AFTER_ICE_CONNECTED} (DTLS/SCTP)`));
                  };
                }
                return l;
              },
            },
    });
    c.welcome();
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    await c.run(() => ma.isConnected(b!.id) && c.managers.get(b!.id)!.isConnected(a!.id));
    expect(ma.counters.dials).toBe(2);
    expect(ma.counters.relayLinks).toBe(0);
    expect((await ma.status())[0]!.link).toBe("webrtc");
  });
});

describe("half-open links (memory transport, manual clock)", () => {
  /** Node `i`'s links pass what `drop(channel, data)` lets through; dropped sends still say "ok" (lost on the way). */
  const lossy = (i: number, drop: (ch: ChannelName, data: Uint8Array) => boolean) => (t: Transport, j: number) =>
    j !== i
      ? t
      : {
          ...t,
          name: t.name,
          fingerprint: t.fingerprint,
          close: () => t.close(),
          createLink: (o: Parameters<Transport["createLink"]>[0]) => {
            const l = t.createLink(o) as MemoryLink;
            const send = l.send.bind(l);
            l.send = (ch, data) => (drop(ch, data) ? (l.state === "open" ? "ok" : "closed") : send(ch, data));
            return l;
          },
        };

  it("one direction lost: both sides close within the heartbeat timeout, and the link re-forms after the heal", async () => {
    let cut = false;
    const c = cluster(2, { wrap: lossy(0, () => cut) });
    c.welcome();
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const mb = c.managers.get(b!.id)!;
    await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id));
    await c.run(() => false, 3_000).catch(() => {}); // a few heartbeats both ways
    // a's messages are lost from now on; b's still reach a (a hears b, b hears nothing).
    cut = true;
    const t0 = c.clock.now;
    const closedAt: Record<string, number> = {};
    await c.run(() => {
      if (!ma.isConnected(b!.id)) closedAt.a ??= c.clock.now - t0;
      if (!mb.isConnected(a!.id)) closedAt.b ??= c.clock.now - t0;
      return closedAt.a !== undefined && closedAt.b !== undefined;
    }, 20_000);
    // Both within deadAfterMs (5 s) and a tick; a, which still heard b, by the one-way rule (before it,
    // a kept the link until b gave up, up to 2 x deadAfterMs later).
    expect(closedAt.a).toBeLessThanOrEqual(5_000 + 400);
    expect(closedAt.b).toBeLessThanOrEqual(5_000 + 400);
    const sa = (await ma.status()).find((p) => p.id === b!.id)!;
    expect(sa.lastError).toMatch(/one-way link/);
    cut = false;
    await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id), 30_000);
    // and it stays up
    await c.run(() => false, 12_000).catch(() => {});
    expect(ma.isConnected(b!.id) && mb.isConnected(a!.id)).toBe(true);
  });

  it("lossy control (all of b's pongs and most pings lost, as a congested relay drops frames) keeps the link: acks ride b's pings", async () => {
    let n = 0;
    const c = cluster(2, {
      wrap: lossy(1, (ch, data) => {
        if (ch !== "control") return false;
        const m = decodeControl(data);
        return m.t === "pong" || (m.t === "ping" && n++ % 3 !== 0);
      }),
    });
    c.welcome();
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const mb = c.managers.get(b!.id)!;
    await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id));
    const up = ma.counters.linksOpened;
    await c.run(() => false, 30_000).catch(() => {});
    expect(ma.isConnected(b!.id) && mb.isConnected(a!.id)).toBe(true);
    expect(ma.counters.linksOpened).toBe(up);
  });

  it("RPC pings (weftnet ping, their own seq space) are not acked as heartbeats and do not trip the rule", async () => {
    const c = cluster(2);
    c.welcome();
    const [a, b] = c.ids;
    const ma = c.managers.get(a!.id)!;
    const mb = c.managers.get(b!.id)!;
    await c.run(() => ma.isConnected(b!.id) && mb.isConnected(a!.id));
    const rtt = ma.ping(b!.id, 1000);
    const back = mb.ping(a!.id, 1000);
    await flush();
    await expect(rtt).resolves.toBeGreaterThanOrEqual(0);
    await expect(back).resolves.toBeGreaterThanOrEqual(0);
    await c.run(() => false, 15_000).catch(() => {});
    expect(ma.isConnected(b!.id) && mb.isConnected(a!.id)).toBe(true);
    expect((await ma.status())[0]!.lastError).toBeNull();
  });
});

describe("IpamDriver over MeshManagers (memory transport, manual clock)", () => {
  it("the lowest node founds the IPAM; every node gets its own block and allocates from it, persisted", async () => {
    const { IpamDriver } = await import("../../agent/ipam.js");
    const { mkdtempSync, rmSync, existsSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const c = cluster(3);
    const dirs = c.ids.map(() => mkdtempSync(join(tmpdir(), "weft-ipam-unit-")));
    try {
      const ipams = c.ids.map((idn, i) => {
        const m = c.managers.get(idn.id)!;
        const mayFound = () => m.knownPeers().every((p) => p > idn.id && m.isConnected(p));
        return new IpamDriver({ id: idn.id, mayFound, range: "10.40.0.0/16", blockPrefix: 26, reclaimAfterMs: 600_000, resyncMs: 1000, claimSettleMs: 500, bootstrapWaitMs: 500 }, dirs[i]!, m, silentLogger, () => c.clock.now);
      });
      c.welcome(); // IPAM listens to peer-up events: created before the mesh links
      const tickAll = c.all.map((_, i) => () => ipams[i]!.tick());
      const results: (string | Error | undefined)[] = ipams.map(() => undefined);
      ipams.forEach((ip, i) =>
        ip.allocate(`pod/p${i}`, 600_000).then(
          (a) => (results[i] = a.ip),
          (e: Error) => (results[i] = e),
        ),
      );
      for (let t = 0; t < 3000 && results.some((r) => r === undefined); t++) {
        c.clock.now += 200;
        for (const m of c.all) m.tick();
        for (const f of tickAll) f();
        await flush();
        await new Promise((r) => setTimeout(r, 2)); // allocate() retries on a real 200 ms timer
      }
      expect(results.map((r) => (typeof r === "string" ? "ok" : String(r)))).toEqual(["ok", "ok", "ok"]);
      expect(new Set(results).size).toBe(3);
      const blocks = ipams.map((ip) => ip.localBlocks());
      expect(new Set(blocks.flat()).size).toBe(blocks.flat().length); // no block owned twice
      ipams.forEach((ip, i) => expect(ip.activeBlocks().length).toBe(1));
      for (const d of dirs) expect(existsSync(join(d, "ipam.json"))).toBe(true);
    } finally {
      for (const d of dirs) rmSync(d, { recursive: true, force: true });
    }
  }, 60_000);
});
