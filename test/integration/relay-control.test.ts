/**
 * A relay link saturated with data keeps its control channel. The signaling server gives the control
 * channel of relay links (heartbeats, gossip, IPAM; the channel byte is in the clear, as AEAD additional
 * data) a small budget of its own (signaling/core/hub.ts relayChannel), so a sender whose data budget is
 * spent still gets its heartbeats through and the link does not close for silence. Before, the hub
 * dropped relay frames regardless of channel: with the data budget spent, heartbeats were lost with the
 * data and the link went down after the dead interval.
 *
 * Two real agents (werift on loopback, real signaling server in this process) whose WebRTC signals are
 * dropped, so their link is the server's relay; a's data budget on the server is 2 kB/s and a offers
 * ~100 times that in tiny packets (smaller than a heartbeat, so that data leaves no gap in the budget a
 * heartbeat could use) for 3 dead intervals.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { createWeriftTransport } from "../../agent/transport/werift.js";
import { loadOrCreateIdentity } from "../../agent/state.js";
import { startSignalServer } from "../../signaling/server.js";
import { Cluster, TEST_TIMING, testLogger, tmpDir, waitFor, withBlocked } from "../helpers/cluster.js";

const TOKEN = "relay-control-Qm4Tz8Wc2Hv6Lp0Rk9Xs3Nb7Jd5Fg1Y";
// 2 kB/s: between two bursts of 1-byte packets (~44-byte relay frames, every 5-10 ms) the data budget
// refills ~20 bytes, never the ~80 a heartbeat's frame needs, so with one budget heartbeats starve
const DATA_RATE = 2_000;
const DEAD_AFTER_MS = 3000;

describe("relay link saturated with data", () => {
  let cluster: Cluster;
  let a: Agent;
  let b: Agent;

  beforeAll(async () => {
    const server = await startSignalServer({ listen: { host: "127.0.0.1", port: 0 }, token: TOKEN, stunPort: "ephemeral", logger: testLogger(), relay: { rateBytesPerSec: DATA_RATE } });
    cluster = new Cluster(server, TOKEN);
    const dirs = [tmpDir("weft-relayctl-a-"), tmpDir("weft-relayctl-b-")] as const;
    cluster.dirs.push(...dirs);
    const ids = dirs.map((d) => loadOrCreateIdentity(d).identity.id);
    // WebRTC never opens between them (signals dropped): after the first attempt times out, the relay
    // (dead after 3 s, not the test timing's 2 s: on a loaded box a 2 s stall alone could drop the link)
    const timing = { ...TEST_TIMING, connectTimeoutMs: 3000, deadAfterMs: DEAD_AFTER_MS };
    const start = async (name: string, i: 0 | 1) =>
      cluster.agent(name, { stateDir: dirs[i], timing, transport: withBlocked(await createWeriftTransport({ logger: testLogger(), loopbackOnly: true }), new Set([ids[1 - i]!])) });
    a = await start("a", 0);
    b = await start("b", 1);
    const onRelay = async (x: Agent, y: Agent) => x.mesh.isConnected(y.id) && (await x.mesh.status()).find((p) => p.id === y.id)?.path === "relay";
    await waitFor(async () => (await onRelay(a, b)) && (await onRelay(b, a)), 60_000, "a and b linked through the signaling server's relay");
  }, 90_000);

  afterAll(async () => {
    await cluster?.cleanup();
  }, 30_000);

  it("still delivers heartbeats on their own budget: the link does not close for silence", async () => {
    const downs: string[] = [];
    a.mesh.onPeerDown((id) => downs.push(`a lost ${id === b.id ? "b" : id}`));
    b.mesh.onPeerDown((id) => downs.push(`b lost ${id === a.id ? "a" : id}`));
    const hub = cluster.server.hub;
    const st0 = hub.stats();
    const linkUptime = async (x: Agent, y: Agent) => (await x.mesh.status()).find((p) => p.id === y.id)?.uptimeMs ?? 0;
    const up0 = await linkUptime(b, a);
    const runMs = 3 * DEAD_AFTER_MS;
    const packet = new Uint8Array(1);
    let offered = 0;
    const t0 = Date.now();
    await new Promise<void>((resolve) => {
      const iv = setInterval(() => {
        for (let i = 0; i < 20; i++) if (a.mesh.sendPacket(b.id, packet) === "ok") offered++;
        if (Date.now() - t0 >= runMs) {
          clearInterval(iv);
          resolve();
        }
      }, 5);
    });
    const elapsed = Date.now() - t0;
    const st = hub.stats();
    const dataDropped = (st.relayDroppedByReason.rate ?? 0) - (st0.relayDroppedByReason.rate ?? 0);
    const controlFrames = st.relayControlFrames - st0.relayControlFrames;
    const diag = { elapsed, offered, dataDropped, dataForwarded: st.relayFrames - st0.relayFrames - controlFrames, controlFrames, controlDropped: st.relayControlDroppedByReason, downs };
    // the data was refused by a's budget most of the time: the link was saturated
    expect(dataDropped, JSON.stringify(diag)).toBeGreaterThan(offered / 2);
    // heartbeats (every 250 ms both ways) and their acks went through on the control budget
    expect(controlFrames, JSON.stringify(diag)).toBeGreaterThanOrEqual(elapsed / TEST_TIMING.heartbeatMs);
    expect(st.relayControlDropped - st0.relayControlDropped, JSON.stringify(diag)).toBe(0);
    // and the link never went down: no peer-down event, same link (its uptime kept counting), still the relay
    expect(downs).toEqual([]);
    expect(a.mesh.isConnected(b.id) && b.mesh.isConnected(a.id)).toBe(true);
    expect(await linkUptime(b, a)).toBeGreaterThanOrEqual(up0 + elapsed - 100);
    expect((await a.mesh.status()).find((p) => p.id === b.id)?.path).toBe("relay");
  }, 60_000);
});
