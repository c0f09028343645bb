/**
 * MeshManager's relay -> WebRTC upgrade (make-before-break), two managers on in-memory transports with a
 * manual clock and an in-process signaling bus. The order of events is the point: the offerer's side of
 * the upgrade probe opens, it switches and retires the relayed link with a bye; that bye can reach the
 * answerer before the answerer's side of the probe has opened (signaling is faster than the answerer's
 * DTLS/SCTP under load). The answerer must then follow once its side opens — not drop the peer.
 */
import { describe, expect, it } from "vitest";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { silentLogger } from "../../src/log.js";
import { MeshManager } from "../../src/mesh/manager.js";
import { DEFAULT_TIMING } from "../../src/mesh/peer.js";
import { MemoryNetwork } from "../../src/testing/memory-transport.js";
import type { PeerInfo, SignalData } from "../../src/wire/signal.js";

const TOKEN = "mesh-upgrade-token-0123456789";
const flush = async (n = 20) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

function pair(sync: boolean) {
  let now = 1_000_000;
  const webrtc = new MemoryNetwork();
  const relay = new MemoryNetwork();
  webrtc.reachable = false;
  const ids = [generateIdentity(), generateIdentity()].sort((a, b) => (a.id < b.id ? -1 : 1)) as [Identity, Identity];
  const mgrs = new Map<string, MeshManager>();
  const info = (i: Identity): PeerInfo => ({ id: i.id, name: i.id.slice(0, 4), pub: i.publicKey, meta: {} });
  const make = (me: Identity) =>
    new MeshManager({
      identity: me,
      token: TOKEN,
      name: me.id.slice(0, 4),
      instance: "i",
      version: "test",
      transport: webrtc.transport(),
      relay: relay.transport(),
      signal: {
        up: true,
        send: (to: string, data: SignalData) => {
          const deliver = () => mgrs.get(to)?.onSignal(me.id, data);
          if (sync) deliver();
          else setImmediate(deliver);
          return true;
        },
      },
      iceServers: () => [],
      logger: silentLogger,
      now: () => now,
      timing: { ...DEFAULT_TIMING },
    });
  const [a, b] = [make(ids[0]), make(ids[1])];
  mgrs.set(ids[0].id, a);
  mgrs.set(ids[1].id, b);
  a.onWelcome([info(ids[1])]);
  b.onWelcome([info(ids[0])]);
  const advance = async (ms: number, step = 250) => {
    for (let t = 0; t < ms; t += step) {
      now += step;
      a.tick();
      b.tick();
      await flush(3);
    }
  };
  return { a, b, ids, webrtc, advance };
}

describe("relay -> WebRTC upgrade", () => {
  for (const sync of [false, true]) {
    it(`both ends end up on the direct link (signaling ${sync ? "faster than the answerer's open" : "after both opens"})`, async () => {
      const { a, b, ids, webrtc, advance } = pair(sync);
      await flush();
      // WebRTC cannot connect: after a connect timeout the offerer dials through the relay
      await advance(DEFAULT_TIMING.connectTimeoutMs + 2_000);
      const st = async (m: MeshManager, peer: string) => (await m.status()).find((p) => p.id === peer)!;
      expect(await st(a, ids[1].id)).toMatchObject({ state: "connected", link: "relay" });
      expect(await st(b, ids[0].id)).toMatchObject({ state: "connected", link: "relay" });
      // the direct path comes back: the next probe upgrades the link on both ends and nobody drops the peer
      let downs = 0;
      a.onPeerDown(() => downs++);
      b.onPeerDown(() => downs++);
      webrtc.reachable = true;
      await advance(15_000);
      expect(await st(a, ids[1].id)).toMatchObject({ state: "connected", link: "webrtc" });
      expect(await st(b, ids[0].id)).toMatchObject({ state: "connected", link: "webrtc" });
      expect(a.counters.upgrades).toBe(1);
      expect(b.counters.upgrades).toBe(1);
      expect(downs, "peer-down events during the upgrade").toBe(0);
      // and it stays up: heartbeats flow over the promoted link both ways
      await advance(DEFAULT_TIMING.deadAfterMs * 3);
      expect(await st(a, ids[1].id)).toMatchObject({ state: "connected", link: "webrtc" });
      expect(await st(b, ids[0].id)).toMatchObject({ state: "connected", link: "webrtc" });
      expect(downs).toBe(0);
      await a.stop();
      await b.stop();
    }, 30_000);
  }
});
