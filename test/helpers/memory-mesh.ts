// MeshManagers on the in-memory transport with a manual clock and a fake signaling hub that forwards
// signals between them asynchronously, like the server (test/unit/mesh-manager.test.ts, router.test.ts).
import { generateIdentity, type Identity } from "../../src/identity.js";
import { silentLogger } from "../../src/log.js";
import { MeshManager } from "../../src/mesh/manager.js";
import type { Transport } from "../../src/mesh/transport.js";
import { MemoryNetwork } from "../../src/testing/memory-transport.js";
import type { PeerInfo, SignalData } from "../../src/wire/signal.js";

/** Let `n` rounds of setImmediate callbacks (signals, memory-link deliveries) run. */
export const flush = async (n = 6) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

export function cluster(n: number, opts: { relay?: boolean; wrap?: (t: Transport, i: number) => Transport } = {}) {
  const clock = { now: 1_000_000 };
  const webrtc = new MemoryNetwork();
  const relay = new MemoryNetwork();
  const ids: Identity[] = Array.from({ length: n }, () => generateIdentity()).sort((a, b) => a.id.localeCompare(b.id));
  const managers = new Map<string, MeshManager>();
  const signals: { from: string; to: string; data: SignalData }[] = [];
  const info = (idn: Identity, i: number): PeerInfo => ({ id: idn.id, name: `n${i}`, pub: idn.publicKey, meta: {} });
  ids.forEach((idn, i) => {
    const m = new MeshManager({
      identity: idn,
      token: "test-token-of-the-cluster",
      name: `n${i}`,
      instance: `i${i}`,
      version: "test",
      transport: opts.wrap ? opts.wrap(webrtc.transport(), i) : webrtc.transport(),
      ...(opts.relay ? { relay: relay.transport() as Transport } : {}),
      signal: {
        up: true,
        send: (to, data) => {
          signals.push({ from: idn.id, to, data });
          setImmediate(() => managers.get(to)?.onSignal(idn.id, data));
          return true;
        },
      },
      iceServers: () => [],
      logger: silentLogger,
      now: () => clock.now,
      random: () => 0.5,
      timing: { connectTimeoutMs: 2_000 },
    });
    managers.set(idn.id, m);
  });
  const all = [...managers.values()];
  const welcome = () => ids.forEach((idn) => managers.get(idn.id)!.onWelcome(ids.map(info)));
  /** advance the clock in steps of `stepMs`, ticking every manager, until `done()` or `maxMs` */
  const run = async (done: () => boolean, maxMs = 60_000, stepMs = 200) => {
    for (let t = 0; t <= maxMs; t += stepMs) {
      if (done()) return;
      clock.now += stepMs;
      for (const m of all) m.tick();
      await flush();
    }
    throw new Error(`not done after ${maxMs} ms of fake time`);
  };
  return { clock, webrtc, relay, ids, managers, all, welcome, run, signals };
}
