/**
 * Metrics: a real signaling server and two real agents (werift over loopback, no data plane) with
 * --metrics-listen on a free port. Both endpoints are scraped over HTTP and the exposition is parsed by
 * a real parser (parse-prometheus-text-format, prom2json-compatible) and, where Debian's prometheus
 * package is installed (.ci/run installs it), linted by `promtool check metrics`, the reference
 * implementation of the format. Counters must move when traffic flows.
 *
 * The data-plane metrics (per-node pod bytes/packets, drops by stage and reason) need a TUN device; the
 * last test drives them through a real DataPlane on memory ports (no root) behind a stub agent.
 */
import { joinKeyOf } from "../../src/identity.js";
import { spawnSync } from "node:child_process";
import { createSocket } from "node:dgram";
import { randomBytes } from "node:crypto";
import parsePrometheusTextFormat, { type MetricFamily } from "parse-prometheus-text-format";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import type { Agent } from "../../agent/agent.js";
import type { AgentStatus, AgentView, IpamView } from "../../agent/status.js";
import { DataPlane } from "../../agent/dataplane.js";
import { createAgentRegistry, parseListen } from "../../agent/metrics.js";
import { silentLogger } from "../../src/log.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { MemoryDevice, RecordingNetwork } from "../../src/testing/memory-device.js";
import { SIGNAL_PATH } from "../../src/wire/signal.js";
import { Cluster, fullMesh, startServer, waitFor } from "../helpers/cluster.js";

const TOKEN = "metrics-token-0123456789abcdef";

const promtool = spawnSync("promtool", ["--version"]).status === 0;

type Labels = Record<string, string>;

function parse(text: string): Map<string, MetricFamily> {
  const fams = parsePrometheusTextFormat(text);
  const m = new Map<string, MetricFamily>();
  for (const f of fams) {
    expect(m.has(f.name), `family ${f.name} appears once`).toBe(false);
    m.set(f.name, f);
  }
  return m;
}

/** The value of the one sample of `name` whose labels include `labels`; undefined when none. */
function sample(fams: Map<string, MetricFamily>, name: string, labels: Labels = {}): number | undefined {
  const f = fams.get(name);
  if (!f) return undefined;
  const hits = f.metrics.filter((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  expect(hits.length, `${name}${JSON.stringify(labels)} matches at most one sample`).toBeLessThanOrEqual(1);
  return hits[0] ? Number(hits[0].value) : undefined;
}

function lint(text: string): void {
  if (!promtool) return;
  const r = spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" });
  expect(`${r.stdout}${r.stderr}`.trim(), "promtool check metrics reports no problem").toBe("");
  expect(r.status).toBe(0);
}

async function scrape(url: string, init?: RequestInit): Promise<{ status: number; type: string | null; text: string }> {
  const res = await fetch(url, init);
  return { status: res.status, type: res.headers.get("content-type"), text: await res.text() };
}

function stunBindingRequest(): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt16BE(0x0001, 0); // Binding request
  b.writeUInt16BE(0, 2); // no attributes
  b.writeUInt32BE(0x2112a442, 4); // magic cookie
  randomBytes(12).copy(b, 8);
  return b;
}

async function udpSend(port: number, msgs: Buffer[]): Promise<void> {
  const s = createSocket("udp4");
  for (const m of msgs) await new Promise<void>((res, rej) => s.send(m, port, "127.0.0.1", (e) => (e ? rej(e) : res())));
  await new Promise<void>((r) => s.close(() => r()));
}

describe("metrics", () => {
  let c: Cluster;
  let a1: Agent;
  let a2: Agent;
  let serverMetrics: string;

  beforeAll(async () => {
    if (!promtool) console.warn("promtool not installed (apt-get install prometheus): the exposition is checked by parse-prometheus-text-format only");
    c = new Cluster(await startServer(TOKEN), TOKEN);
    a1 = await c.agent("m1", { metricsListen: "127.0.0.1:0" });
    a2 = await c.agent("m2", { metricsListen: "127.0.0.1:0" });
    serverMetrics = `${c.server.url.replace(/^ws/, "http")}/metrics`;
    await waitFor(() => fullMesh([a1, a2]), 30_000, "mesh of 2");
    await waitFor(async () => (await a1.status()).peers.every((p) => p.srttMs !== null), 10_000, "heartbeat RTTs");
  }, 60_000);
  afterAll(async () => c?.cleanup());

  it("agents bind --metrics-listen and expose the address; other paths are 404", async () => {
    expect(parseListen("127.0.0.1:0")).toEqual({ host: "127.0.0.1", port: 0 });
    expect(parseListen("[::1]:9465")).toEqual({ host: "::1", port: 9465 });
    expect(() => parseListen("9465")).toThrow(/HOST:PORT/);
    for (const a of [a1, a2]) {
      expect(a.metrics?.address.host).toBe("127.0.0.1");
      expect(a.metrics?.address.port).toBeGreaterThan(0);
    }
    expect(a1.metrics!.address.port).not.toBe(a2.metrics!.address.port);
    expect((await scrape(a1.metrics!.url.replace(/\/metrics$/, "/"))).status).toBe(404);
    expect((await scrape(a1.metrics!.url, { method: "POST" })).status).toBe(404);
  });

  it("agent exposition parses and describes peers, RTT, link bytes, IPAM and mesh counters", async () => {
    const r = await scrape(a1.metrics!.url);
    expect(r.status).toBe(200);
    expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
    lint(r.text);
    const m = parse(r.text);
    for (const [name, type] of Object.entries({
      weftnet_info: "GAUGE",
      weftnet_signal_connected: "GAUGE",
      weftnet_peers: "GAUGE",
      weftnet_peer_rtt_seconds: "GAUGE",
      weftnet_peer_bytes_total: "COUNTER",
      weftnet_link_bytes_total: "COUNTER",
      weftnet_ipam_blocks: "GAUGE",
      weftnet_ipam_addresses: "GAUGE",
      weftnet_ipam_pending_requests: "GAUGE",
      weftnet_mesh_events_total: "COUNTER",
      weftnet_relayed_bytes_total: "COUNTER",
      weftnet_peers_by_link: "GAUGE",
      weftnet_bulk_datagrams_total: "COUNTER",
      weftnet_bulk_drops_total: "COUNTER",
    })) {
      expect(m.get(name)?.type, name).toBe(type);
      expect(m.get(name)?.help.length, `${name} has help`).toBeGreaterThan(10);
    }
    expect(sample(m, "weftnet_info", { id: a1.id, name: "m1" })).toBe(1);
    expect(sample(m, "weftnet_signal_connected")).toBe(1);
    // one peer, directly connected; every other (path, state) is present and 0
    expect(sample(m, "weftnet_peers", { path: "direct", state: "connected" })).toBe(1);
    expect(m.get("weftnet_peers")!.metrics).toHaveLength(5 * 6);
    expect(m.get("weftnet_peers")!.metrics.reduce((s, x) => s + Number(x.value), 0)).toBe(1);
    expect(sample(m, "weftnet_peers", { path: "relay", state: "connected" })).toBe(0);
    expect(sample(m, "weftnet_peers_by_link", { link: "webrtc" })).toBe(1); // no bulk link in this test
    expect(sample(m, "weftnet_peers_by_link", { link: "bulk" })).toBe(0);
    const rtt = sample(m, "weftnet_peer_rtt_seconds", { peer: a2.id, name: "m2" })!;
    expect(rtt).toBeGreaterThan(0);
    expect(rtt).toBeLessThan(1);
    expect(sample(m, "weftnet_peer_bytes_total", { peer: a2.id, direction: "out" })).toBeGreaterThan(0);
    expect(sample(m, "weftnet_peer_bytes_total", { peer: a2.id, direction: "in" })).toBeGreaterThan(0);
    // without a data plane the peer bytes are the link's bytes; packets and drops need the data plane
    expect(m.has("weftnet_peer_packets_total") ? m.get("weftnet_peer_packets_total")!.metrics : []).toHaveLength(0);
    expect(m.has("weftnet_drops_total") ? m.get("weftnet_drops_total")!.metrics : []).toHaveLength(0);
    // IPAM: the cluster range is /16 with /26 blocks: 1024 blocks in all, whatever their state
    const blocks = ["owned", "peer", "unreachable", "free"].map((state) => sample(m, "weftnet_ipam_blocks", { state }) ?? NaN);
    const ipam = a1.ipamStatus();
    expect(blocks.reduce((a, b) => a + b, 0)).toBe(ipam.blocks.length);
    expect(blocks[0]).toBe(ipam.blocks.filter((b) => b.mine).length);
    expect(blocks[2]).toBe(0);
    expect(sample(m, "weftnet_ipam_addresses", { state: "allocated" })).toBe(ipam.allocations.length);
    expect(sample(m, "weftnet_ipam_pending_requests")).toBe(ipam.pending ? 1 : 0);
    for (const name of ["badControl", "authFailures", "linksOpened", "dials", "badSignalFrames", "badGossip"]) expect(sample(m, "weftnet_mesh_events_total", { name }), name).toBeGreaterThanOrEqual(0);
    expect(sample(m, "weftnet_mesh_events_total", { name: "linksOpened" })).toBeGreaterThanOrEqual(1);
    expect(sample(m, "weftnet_relayed_bytes_total", { path: "server" })).toBe(0); // direct links only in this test
    expect(sample(m, "weftnet_relayed_bytes_total", { path: "transit" })).toBe(0);
  });

  it("IPAM gauges follow an allocation", async () => {
    const before = parse((await scrape(a2.metrics!.url)).text);
    const addr = await a2.allocate("pod/metrics-test", 20_000);
    const after = parse((await scrape(a2.metrics!.url)).text);
    expect(sample(after, "weftnet_ipam_addresses", { state: "allocated" })).toBe(sample(before, "weftnet_ipam_addresses", { state: "allocated" })! + 1);
    expect(sample(after, "weftnet_ipam_blocks", { state: "owned" })).toBeGreaterThanOrEqual(1);
    expect(sample(after, "weftnet_ipam_addresses", { state: "free" })).toBeGreaterThan(0);
    expect(addr.ip).toMatch(/^10\.40\./);
    a2.release("pod/metrics-test");
    const released = parse((await scrape(a2.metrics!.url)).text);
    expect(sample(released, "weftnet_ipam_addresses", { state: "allocated" })).toBe(sample(before, "weftnet_ipam_addresses", { state: "allocated" }));
  });

  it("counters move when traffic flows between the agents", async () => {
    const read = async (a: Agent, peer: Agent) => {
      const m = parse((await scrape(a.metrics!.url)).text);
      return {
        out: sample(m, "weftnet_peer_bytes_total", { peer: peer.id, direction: "out" }) ?? 0,
        in: sample(m, "weftnet_peer_bytes_total", { peer: peer.id, direction: "in" }) ?? 0,
        linkOut: sample(m, "weftnet_link_bytes_total", { peer: peer.id, direction: "out" }) ?? 0,
        badControl: sample(m, "weftnet_mesh_events_total", { name: "badControl" }) ?? 0,
      };
    };
    const s1 = await read(a1, a2);
    const s2 = await read(a2, a1);
    // 64 KiB on the packets channel a1 -> a2 (a2 has no data plane: it drops them, the link counts them)
    const payload = new Uint8Array(1024).fill(0x5a);
    let sent = 0;
    for (let i = 0; i < 64; i++) if (a1.mesh.sendPacket(a2.id, payload) === "ok") sent++;
    expect(sent).toBeGreaterThan(32);
    // ...and garbage on the control channel, which a2 counts as bad control
    expect(a1.mesh.link(a2.id)!.send("control", new Uint8Array([0xc1, 0xff, 0x00]))).toBe("ok");
    await waitFor(async () => (await read(a2, a1)).in >= s2.in + sent * 1024, 10_000, "a2 counts the bytes in");
    const e1 = await read(a1, a2);
    expect(e1.out).toBeGreaterThanOrEqual(s1.out + sent * 1024);
    expect(e1.linkOut).toBe(e1.out);
    await waitFor(async () => (await read(a2, a1)).badControl >= s2.badControl + 1, 5_000, "bad control counted in the metrics");
    // pings move the bytes too (heartbeats do as well: the counters never stand still on a live link)
    const p1 = await read(a1, a2);
    for (let i = 0; i < 5; i++) await a1.ping(a2.id);
    expect((await read(a1, a2)).out).toBeGreaterThan(p1.out);
  });

  it("a metrics port that is taken fails the agent's start with ERR_LISTEN", async () => {
    await expect(c.agent("m3", { metricsListen: `127.0.0.1:${a1.metrics!.address.port}` })).rejects.toMatchObject({ code: "ERR_LISTEN" });
    await expect(c.agent("m4", { metricsListen: "no-port" })).rejects.toMatchObject({ code: "ERR_USAGE" });
  });

  it("signaling /metrics needs the token (401 without or with a wrong one)", async () => {
    const none = await scrape(serverMetrics);
    expect(none.status).toBe(401);
    expect(none.text).not.toContain("weftnet_");
    expect((await scrape(serverMetrics, { headers: { authorization: "Bearer wrong-token" } })).status).toBe(401);
    expect((await scrape(serverMetrics, { headers: { authorization: TOKEN } })).status).toBe(401);
  });

  it("signaling exposition parses: agents, relayed messages, bad frames by code, refusals, STUN", async () => {
    const get = async () => {
      const r = await scrape(serverMetrics, { headers: { authorization: `Bearer ${joinKeyOf(TOKEN)}` } });
      expect(r.status).toBe(200);
      expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
      lint(r.text);
      return parse(r.text);
    };
    const m0 = await get();
    expect(m0.get("weftnet_signal_agents")?.type).toBe("GAUGE");
    expect(sample(m0, "weftnet_signal_agents")).toBe(2);
    expect(sample(m0, "weftnet_signal_accepted_total")).toBeGreaterThanOrEqual(2);
    expect(sample(m0, "weftnet_signal_relayed_messages_total")).toBeGreaterThan(0); // the offer/answer/candidates
    for (const reason of ["bad_token", "bad_identity", "duplicate_id", "hello_timeout", "protocol"]) expect(sample(m0, "weftnet_signal_refusals_total", { reason }), reason).toBeGreaterThanOrEqual(0);
    expect(sample(m0, "weftnet_signal_relayed_bytes_total")).toBe(0);
    const stun0 = sample(m0, "weftnet_signal_stun_requests_total")!;
    expect(stun0).toBeGreaterThanOrEqual(0);

    // STUN: two Binding requests and one datagram that is not STUN
    await udpSend(c.server.stunPort, [stunBindingRequest(), stunBindingRequest(), Buffer.from("hello, not stun")]);
    // a WebSocket client that sends garbage instead of a hello
    const ws = new WebSocket(c.server.url + SIGNAL_PATH);
    await new Promise<void>((res, rej) => {
      ws.once("open", () => res());
      ws.once("error", rej);
    });
    ws.send(Buffer.from([0xc1, 0x00, 0x01]));
    await waitFor(async () => {
      const m = await get();
      return sample(m, "weftnet_signal_stun_requests_total")! >= stun0 + 2 && (m.get("weftnet_signal_bad_frames_total")?.metrics.length ?? 0) > 0;
    }, 5_000, "STUN requests and a bad frame counted");
    const m1 = await get();
    expect(sample(m1, "weftnet_signal_stun_responses_total")).toBeGreaterThanOrEqual(stun0 + 2);
    expect(m1.get("weftnet_signal_stun_dropped_total")!.metrics.reduce((s, x) => s + Number(x.value), 0)).toBeGreaterThanOrEqual(1);
    expect(m1.get("weftnet_signal_bad_frames_total")!.metrics.reduce((s, x) => s + Number(x.value), 0)).toBeGreaterThanOrEqual(1);
    expect(sample(m1, "weftnet_signal_sessions")).toBeGreaterThanOrEqual(3);
    ws.terminate();
  });
});

describe("data-plane metrics (a real DataPlane on memory ports, stub agent)", () => {
  it("per-node pod bytes and packets, drops by stage and reason", async () => {
    const SELF = "aaaaaaaaaaaaaaaa";
    const PEER = "bbbbbbbbbbbbbbbb";
    const owners = new PrefixTable<string>();
    owners.insert("10.40.0.64/26", PEER);
    const device = new MemoryDevice("weft0");
    const dp = new DataPlane({
      selfId: SELF,
      device,
      network: new RecordingNetwork(),
      mesh: { sendPacket: () => "ok", queued: () => 0, linkBudget: () => undefined, onPacket: () => {}, onDrain: () => {}, onPeerDown: () => {} },
      routes: { owners, nextHop: (n) => (n === PEER ? PEER : undefined) },
      desired: () => ({ node: { clusterRanges: ["10.40.0.0/16"], localBlocks: [] }, gateway: { tun: "weft0", clusterRanges: ["10.40.0.0/16"], routes: [], snat: false } }),
      logger: silentLogger,
      bridge: "weft-br0",
      mtu: 1400,
    });
    await dp.start();
    const fw = dp.forwarder;
    const ipv4 = (dst: number[], len = 120) => {
      const p = new Uint8Array(VNET_HDR_LEN + len);
      const ip = p.subarray(VNET_HDR_LEN);
      ip[0] = 0x45;
      ip[2] = len >> 8;
      ip[3] = len & 0xff;
      ip[8] = 64;
      ip[9] = 17;
      ip.set([10, 40, 0, 2], 12);
      ip.set(dst, 16);
      return p;
    };
    device.inject([ipv4([10, 40, 0, 70]), ipv4([10, 40, 0, 71]), ipv4([10, 41, 0, 1])]); // 2 routed, 1 no-route
    device.drops.drop("queue-full", 3);
    // the exporter reads an AgentView only (agent/status.ts), not the Agent
    const stub: AgentView = {
      peerName: (id: string) => (id === PEER ? "peer-b" : undefined),
      drops: () => ({ forwarder: dp.forwarder.drops, tun: dp.device.drops }),
      status: async () => ({ node: { id: SELF, name: "self", version: "0", transport: "stub", signal: { connected: true } }, peers: [], counters: {}, dataplane: { ...dp.stats(), routes: [] } }) as unknown as AgentStatus,
      routes: () => [],
      ipamStatus: () => ({ blocks: [], allocations: [], pending: null, proposals: [], counters: {} }) as unknown as IpamView,
    };
    const text = await createAgentRegistry(stub).scrape();
    lint(text);
    const m = parse(text);
    expect(sample(m, "weftnet_peer_packets_total", { peer: PEER, name: "peer-b", direction: "out" })).toBe(2);
    expect(sample(m, "weftnet_peer_bytes_total", { peer: PEER, direction: "out" })).toBe(fw.stats.txBytes);
    expect(fw.stats.txBytes).toBeGreaterThan(240);
    expect(sample(m, "weftnet_drops_total", { stage: "forwarder", reason: "no-route" })).toBe(1);
    expect(sample(m, "weftnet_drops_total", { stage: "tun", reason: "queue-full" })).toBe(3);
    expect(sample(m, "weftnet_drops_total", { stage: "forwarder", reason: "ttl-expired" })).toBe(0);
    expect(sample(m, "weftnet_tun_packets_total", { direction: "rx" })).toBe(3);
    expect(sample(m, "weftnet_forwarded_frames_total")).toBe(0);
    await dp.stop();
  });
});
