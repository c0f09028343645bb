/**
 * Real signaling server + real agents (werift over loopback) in one process.
 */
import { joinKeyOf } from "../../src/identity.js";
import { cpSync, rmSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import WebSocket, { WebSocketServer } from "ws";
import type { Agent } from "../../agent/agent.js";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath } from "../../agent/state.js";
import { decodeServerMsg, encodeSignal } from "../../src/wire/signal.js";
import { Cluster, fullMesh, startServer, tmpDir, waitFor } from "../helpers/cluster.js";

const TOKEN = "integration-token-0123456789";

describe("five agents on loopback", () => {
  let c: Cluster;
  let agents: Agent[];

  beforeAll(async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    agents = [];
    for (const n of ["a1", "a2", "a3", "a4", "a5"]) agents.push(await c.agent(n));
  }, 60_000);
  afterAll(async () => c?.cleanup());

  it("form a full mesh with RTTs, status over the local API, and ping", async () => {
    await waitFor(() => fullMesh(agents), 30_000, "full mesh of 5");
    const [a1, a2] = agents as [Agent, Agent];
    // Routing picks the lowest windowed-minimum RTT: right after the mesh forms, a link whose only samples
    // are inflated by its handshake can lose to a two-hop path for a heartbeat or two ("via a3").
    // On a loaded box early samples stay inflated for a while: take the first status that shows them all direct.
    type St = { node: { id: string; name: string }; peers: { id: string; name: string; state: string; path: string; rttMs: number | null }[] };
    let st!: St;
    await waitFor(async () => {
      st = await apiRequest<St>(apiSocketPath(a1.cfg.stateDir), "GET", "/v1/status");
      return st.peers.length === 4 && st.peers.every((p) => p.path === "direct");
    }, 30_000, "every peer of a1 routed direct");
    expect(st.node).toMatchObject({ id: a1.id, name: "a1" });
    expect(st.peers).toHaveLength(4);
    for (const p of st.peers) expect(p).toMatchObject({ state: "connected", path: "direct" });
    await waitFor(async () => (await a1.status()).peers.every((p) => p.rttMs !== null), 5000, "heartbeat RTTs");
    const r = await a1.ping("a2");
    expect(r.id).toBe(a2.id);
    expect(r.rttMs).toBeGreaterThan(0);
    await expect(a1.ping("nobody")).rejects.toMatchObject({ code: "ERR_NO_PEER" });
    // the signaling server lists everybody (token required)
    const nodes = (await (await fetch(`${c.server.url.replace(/^ws/, "http")}/v1/nodes`, { headers: { authorization: `Bearer ${joinKeyOf(TOKEN)}` } })).json()) as { nodes: { id: string }[] };
    expect(nodes.nodes.map((n) => n.id).sort()).toEqual(agents.map((a) => a.id).sort());
  });

  it("survive garbage on the control channel: counted, dropped, link stays up", async () => {
    const [a1, a2] = agents as [Agent, Agent];
    const link = a1.mesh.link(a2.id)!;
    const before = a2.mesh.counters.badControl;
    expect(link.send("control", new Uint8Array([0xc1, 0xff, 0x00]))).toBe("ok"); // 0xc1 is never valid msgpack
    expect(link.send("control", new Uint8Array(Buffer.from("\x81\xa1t\xa4nope")))).toBe("ok"); // {t:"nope"} no version
    await waitFor(() => a2.mesh.counters.badControl >= before + 2, 5000, "bad control counted");
    expect(a2.mesh.connectedPeers()).toContain(a1.id);
    expect((await a2.ping(a1.id)).rttMs).toBeGreaterThan(0);
  });

  it("keep their links while the signaling server restarts, then re-register", async () => {
    const closedBefore = agents.map((a) => a.mesh.counters.linksClosed);
    const uptimes = await Promise.all(agents.map(async (a) => (await a.status()).peers.map((p) => p.uptimeMs ?? -1)));
    const port = c.server.port;
    await c.server.close();
    await waitFor(() => agents.every((a) => !a.signal.up), 5000, "agents notice the server is gone");
    await new Promise((r) => setTimeout(r, 1500)); // several heartbeats with no server at all
    expect(fullMesh(agents)).toBe(true);
    expect((await agents[0]!.ping(agents[4]!.id)).rttMs).toBeGreaterThan(0);
    c.server = await startServer(TOKEN, port);
    await waitFor(() => agents.every((a) => a.signal.up), 15_000, "agents re-register");
    expect(fullMesh(agents)).toBe(true);
    expect(agents.map((a) => a.mesh.counters.linksClosed)).toEqual(closedBefore);
    const after = await Promise.all(agents.map(async (a) => (await a.status()).peers.map((p) => p.uptimeMs ?? -1)));
    after.forEach((ups, i) => ups.forEach((u, j) => expect(u).toBeGreaterThan(uptimes[i]![j]!)));
  }, 30_000);

  it("refuse a second agent with the same identity key, the first keeps running", async () => {
    const dup = tmpDir("weft-dup-");
    try {
      cpSync(agents[1]!.cfg.stateDir + "/identity.pem", dup + "/identity.pem");
      const clone = await c.agent("clone", { stateDir: dup });
      await expect(clone.whenRegistered(5000)).rejects.toMatchObject({ code: "ERR_DUPLICATE_ID", message: expect.stringMatching(/identity/) });
      await clone.stop();
      expect(agents[1]!.signal.up).toBe(true);
      expect(fullMesh(agents)).toBe(true);
    } finally {
      rmSync(dup, { recursive: true, force: true });
    }
  });

  it("refuse a wrong token with a clear reason and register nothing", async () => {
    const bad = await c.agent("intruder", { token: "wrong-token" });
    await expect(bad.whenRegistered(5000)).rejects.toMatchObject({ code: "ERR_BAD_TOKEN", message: expect.stringMatching(/token/) });
    await bad.stop();
    const nodes = (await (await fetch(`${c.server.url.replace(/^ws/, "http")}/v1/nodes`, { headers: { authorization: `Bearer ${joinKeyOf(TOKEN)}` } })).json()) as { nodes: { name: string }[] };
    expect(nodes.nodes.map((n) => n.name)).not.toContain("intruder");
    for (const a of agents) expect((await a.status()).peers.map((p) => p.name)).not.toContain("intruder");
  });

  it("mark a stopped agent gone, promptly", async () => {
    const a5 = agents[4]!;
    await a5.stop();
    const ms = await waitFor(async () => {
      const sts = await Promise.all(agents.slice(0, 4).map((a) => a.status()));
      return sts.every((s) => s.peers.find((p) => p.id === a5.id)?.state === "gone");
    }, 5000, "peers mark a5 gone");
    expect(ms).toBeLessThan(5000);
    expect(fullMesh(agents.slice(0, 4))).toBe(true);
  });

  it("detect a killed agent by missing heartbeats", async () => {
    const a4 = agents[3]!;
    // Simulate a crash: no bye, sockets simply stop answering.
    (a4 as unknown as { tickTimer: NodeJS.Timeout }).tickTimer && clearInterval((a4 as unknown as { tickTimer: NodeJS.Timeout }).tickTimer);
    await a4.transport.close();
    a4.signal.stop();
    await waitFor(async () => {
      const sts = await Promise.all(agents.slice(0, 3).map((a) => a.status()));
      return sts.every((s) => s.peers.find((p) => p.id === a4.id)?.state !== "connected");
    }, 6000, "peers notice a4 died");
  });
});

describe("a signaling server in the middle", () => {
  let c: Cluster;
  let proxy: WebSocketServer;
  afterEach(async () => {
    await c?.cleanup();
    await new Promise((r) => proxy?.close(r));
  });

  /**
   * A signaling "server" in the middle: relays agent -> server as is, and hands every server -> agent
   * message to `fromServer`, which decides what the agent gets. Returns its ws:// URL.
   */
  async function startProxy(fromServer: (m: Buffer, client: WebSocket) => void): Promise<string> {
    proxy = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((r) => proxy.once("listening", r));
    proxy.on("connection", (client) => {
      const upstream = new WebSocket(c.server.signalUrl);
      const pending: Buffer[] = [];
      upstream.on("open", () => pending.splice(0).forEach((m) => upstream.send(m)));
      client.on("message", (m: Buffer) => (upstream.readyState === WebSocket.OPEN ? upstream.send(m) : pending.push(m)));
      upstream.on("message", (m: Buffer) => fromServer(m, client));
      client.on("close", () => upstream.close());
      upstream.on("close", (code, reason) => client.close(code, reason));
    });
    return `ws://127.0.0.1:${(proxy.address() as AddressInfo).port}`;
  }

  it("that swaps an offer's DTLS fingerprint is detected and the link refused", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    // A man-in-the-middle signaling server: relays everything, but rewrites offers' fingerprints.
    let swapped = 0;
    const url = await startProxy((m, client) => {
      const msg = decodeServerMsg(m);
      if (msg.t === "signal" && msg.data.kind === "offer") {
        msg.data.sdp = msg.data.sdp.replace(/a=fingerprint:(\S+) (\S+)/, (_x, alg) => `a=fingerprint:${alg} ${Array(32).fill("EE").join(":")}`);
        swapped++;
        client.send(encodeSignal(msg));
      } else client.send(m);
    });
    const x = await c.agent("x", { signal: url });
    const y = await c.agent("y", { signal: url });
    const answerer = x.id < y.id ? y : x;
    const offerer = answerer === x ? y : x;
    await waitFor(async () => (await answerer.status()).peers.some((p) => p.state === "auth-failed"), 10_000, "auth failure reported");
    const st = await answerer.status();
    expect(st.peers[0]).toMatchObject({ id: offerer.id, state: "auth-failed", lastError: expect.stringMatching(/man in the middle/) });
    expect(st.counters.authFailures).toBeGreaterThan(0);
    expect(swapped).toBeGreaterThan(0);
    expect(answerer.mesh.connectedPeers()).toEqual([]);
    expect(offerer.mesh.connectedPeers()).toEqual([]);
  });

  it("that sends garbage to an agent: counted and dropped, the agent keeps working", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    const url = await startProxy((m, client) => {
      client.send(m);
      if (decodeServerMsg(m).t === "welcome") {
        client.send(Buffer.from([0xc1, 0x00, 0xff])); // not msgpack
        client.send("a text frame");
        client.send(encodeSignal({ t: "leave", id: "not-a-node-id" } as never)); // bad field
        client.send(Buffer.alloc(100 * 1024)); // over the 80 KiB limit (below the socket cap)
      }
    });
    const x = await c.agent("gx", { signal: url });
    const y = await c.agent("gy");
    await waitFor(async () => (await x.status()).counters.badSignalFrames >= 3, 10_000, "garbage counted");
    await waitFor(() => fullMesh([x, y]), 20_000, "mesh despite garbage");
    expect(x.signal.up).toBe(true);
    expect((await x.ping(y.id)).rttMs).toBeGreaterThan(0);
  });
});

