/**
 * Prometheus metrics for the agent (`--metrics-listen HOST:PORT`, off by default): a plain HTTP server
 * that answers GET /metrics in the text exposition format (prom-client renders it).
 *
 * Every agent has its own prom-client Registry (never the global one), so several agents in one process
 * (tests, the demo) do not collide. Values are computed at scrape time: a scrape first takes one
 * snapshot of the agent (status(), ipamStatus(), data-plane counters: one await for the link stats),
 * then the metrics' collect() callbacks copy from that snapshot. Nothing runs between scrapes.
 *
 *   weftnet_info{id,name,version,transport}           1
 *   weftnet_signal_connected                          1 while registered with the signaling server
 *   weftnet_peers{path,state}                         peers by path (direct|turn|via|relay|none) and link state
 *   weftnet_peer_rtt_seconds{peer,name}               smoothed heartbeat RTT of connected peers
 *   weftnet_peer_bytes_total{peer,name,direction}     pod traffic to/from each node (forwarder, by end
 *   weftnet_peer_packets_total{peer,name,direction}     node) with the data plane; link bytes without it
 *   weftnet_link_bytes_total{peer,name,direction}     bytes on the peer connection (DTLS/SCTP payload
 *                                                     counters of the transport; reset on reconnect)
 *   weftnet_drops_total{stage,reason}                 data-path drops: stage forwarder|tun, typed reason
 *   weftnet_tun_packets_total{direction}, weftnet_tun_bytes_total{direction}, weftnet_forwarded_frames_total
 *   weftnet_ipam_blocks{state}                        owned (this node) | peer (a reachable node) |
 *                                                     unreachable (owner not reachable) | free (no owner)
 *   weftnet_ipam_addresses{state}                     allocated | free, in this node's blocks
 *   weftnet_ipam_pending_requests                     block requests this node waits on (0 or 1)
 *   weftnet_ipam_proposals                            open writes collecting promises (claims, grants)
 *   weftnet_ipam_events_total{name}                  IPAM counters (conflicts, claims, grants, ...)
 *   weftnet_mesh_events_total{name}                  mesh counters (badControl, authFailures, dials, ...)
 *   weftnet_relayed_bytes_total{path}                 server: through the signaling server's relay; transit: forwarded for others
 *   weftnet_peers_by_link{link}                       connected peers by what carries their pod traffic: bulk|webrtc|turn|relay|via
 *   weftnet_bulk_datagrams_total{direction}, weftnet_bulk_bytes_total{direction}
 *                                                     bulk link (direct UDP) traffic, all peers
 *   weftnet_bulk_drops_total{reason}                  bulk datagrams dropped: bad-auth, replay, unknown-index, ...
 *   weftnet_bulk_transitions_total{to}                bulk link up/down changes (down = fell back to WebRTC)
 *   weftnet_answer_waits_total{outcome}               waits on the CPU for the answer to an exchange the bulk link
 *                                                     started: answered | window (no answer in time) | refused (budget)
 *   weftnet_answer_wait_seconds_total                 CPU time those waits took
 *   weftnet_peer_path_mtu_bytes{peer,name,link_type}  each link's path MTU (webrtc|turn: searched/confirmed mtu; bulk: pathMax)
 *   weftnet_pmtu_searches_total{link_type,outcome}    path MTU searches (webrtc, bulk): confirmed | searched | local-limit
 *   weftnet_pmtu_probes_total{link_type,result}       their probes: sent | acked | lost (sizes)
 *   weftnet_pmtu_black_holes_total{link_type}         a confirmed size stopped getting through (bulk: confirmation probes)
 *   weftnet_pmtu_probe_drops_total{link_type,reason}  probe traffic dropped, typed (malformed, unsolicited-ack, stale-ack, ...)
 *   weftnet_pmtu_pair_changes_total{link_type}        a WebRTC link failed because ICE switched to a pair whose route carries less
 */
import { createServer, type Server } from "node:http";
import { Counter, Gauge, Registry } from "prom-client";
import { WeftError } from "../src/errors.js";
import { DROP_REASONS } from "../src/packet/drop.js";
import type { Logger } from "../src/log.js";
import type { AgentStatus, AgentView, IpamView } from "./status.js";
import type { PmtuCounters } from "../src/mesh/transport.js";

export const PEER_PATHS = ["direct", "turn", "via", "relay", "none"] as const;
export const PEER_STATES = ["waiting", "connecting", "connected", "backoff", "auth-failed", "gone"] as const;


interface Snapshot {
  status: AgentStatus;
  ipam: IpamView | null;
}

/** Parse HOST:PORT ([v6]:PORT for IPv6); port 0 binds any free port. */
export function parseListen(s: string): { host: string; port: number } {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(s.trim());
  const port = m ? Number(m[3]) : NaN;
  if (!m || !(port >= 0 && port <= 65535)) throw new WeftError("ERR_USAGE", `--metrics-listen ${JSON.stringify(s)} must be HOST:PORT (e.g. 127.0.0.1:9465, 0.0.0.0:9465, [::1]:9465)`);
  return { host: (m[1] ?? m[2])!, port };
}

function pathOf(p: string): (typeof PEER_PATHS)[number] {
  if (p.startsWith("via")) return "via";
  if (p === "direct" || p === "turn" || p === "relay") return p;
  return "none";
}

/** The agent's registry: metric definitions whose collect() read `source()`'s latest snapshot. */
export function createAgentRegistry(agent: AgentView): { registry: Registry; scrape(): Promise<string> } {
  const registry = new Registry();
  let snap: Snapshot | undefined;
  const registers = [registry];
  const peerName = (id: string) => agent.peerName(id) ?? id;

  new Gauge({
    name: "weftnet_info",
    help: "Agent identity and build (value 1).",
    labelNames: ["id", "name", "version", "transport"],
    registers,
    collect() {
      this.reset();
      if (snap) this.set({ id: snap.status.node.id, name: snap.status.node.name, version: snap.status.node.version, transport: snap.status.node.transport }, 1);
    },
  });
  new Gauge({
    name: "weftnet_signal_connected",
    help: "1 while the agent is registered with the signaling server.",
    registers,
    collect() {
      this.set(snap?.status.node.signal.connected ? 1 : 0);
    },
  });
  new Gauge({
    name: "weftnet_peers",
    help: "Known peers by path (direct, via another agent, relay, none) and link state.",
    labelNames: ["path", "state"],
    registers,
    collect() {
      this.reset();
      const n = new Map<string, number>();
      for (const p of snap?.status.peers ?? []) {
        const k = `${pathOf(p.path)}\0${p.state}`;
        n.set(k, (n.get(k) ?? 0) + 1);
      }
      for (const path of PEER_PATHS) for (const state of PEER_STATES) this.set({ path, state }, n.get(`${path}\0${state}`) ?? 0);
    },
  });
  new Gauge({
    name: "weftnet_peer_rtt_seconds",
    help: "Smoothed heartbeat round-trip time to each connected peer.",
    labelNames: ["peer", "name"],
    registers,
    collect() {
      this.reset();
      for (const p of snap?.status.peers ?? []) {
        const ms = p.srttMs ?? p.rttMs;
        if (p.state === "connected" && ms !== null) this.set({ peer: p.id, name: p.name }, ms / 1000);
      }
    },
  });

  // Per-peer traffic: the forwarder's per-node pod traffic when the data plane runs, link bytes otherwise.
  new Counter({
    name: "weftnet_peer_bytes_total",
    help: "Bytes to (out) and from (in) each node: pod traffic framed by the data plane, or the link's bytes when the agent runs without a data plane (--no-tun).",
    labelNames: ["peer", "name", "direction"],
    registers,
    collect() {
      this.reset();
      if (!snap) return;
      const dp = snap.status.dataplane;
      if (dp) {
        for (const [id, s] of Object.entries(dp.forwarder.perPeer)) {
          this.inc({ peer: id, name: peerName(id), direction: "in" }, s.rxBytes);
          this.inc({ peer: id, name: peerName(id), direction: "out" }, s.txBytes);
        }
      } else {
        for (const p of snap.status.peers) {
          if (p.state !== "connected") continue;
          this.inc({ peer: p.id, name: p.name, direction: "in" }, p.bytesIn);
          this.inc({ peer: p.id, name: p.name, direction: "out" }, p.bytesOut);
        }
      }
    },
  });
  new Counter({
    name: "weftnet_peer_packets_total",
    help: "Pod packets to (out) and from (in) each node through the data plane (absent without a data plane).",
    labelNames: ["peer", "name", "direction"],
    registers,
    collect() {
      this.reset();
      for (const [id, s] of Object.entries(snap?.status.dataplane?.forwarder.perPeer ?? {})) {
        this.inc({ peer: id, name: peerName(id), direction: "in" }, s.rxPackets);
        this.inc({ peer: id, name: peerName(id), direction: "out" }, s.txPackets);
      }
    },
  });
  new Counter({
    name: "weftnet_link_bytes_total",
    help: "Bytes sent (out) and received (in) on the peer connection to each connected peer, control and packets channels (restarts at 0 when the link is re-established).",
    labelNames: ["peer", "name", "direction"],
    registers,
    collect() {
      this.reset();
      for (const p of snap?.status.peers ?? []) {
        if (p.state !== "connected") continue;
        this.inc({ peer: p.id, name: p.name, direction: "in" }, p.bytesIn);
        this.inc({ peer: p.id, name: p.name, direction: "out" }, p.bytesOut);
      }
    },
  });
  new Counter({
    name: "weftnet_drops_total",
    help: "Packets or frames dropped on the data path, by stage (forwarder, tun) and typed reason (src/packet/drop.ts).",
    labelNames: ["stage", "reason"],
    registers,
    collect() {
      this.reset();
      const drops = agent.drops();
      if (!snap || !drops) return;
      const fw = drops.forwarder.snapshot(true);
      const tun = drops.tun.snapshot(true);
      for (const reason of DROP_REASONS) {
        this.inc({ stage: "forwarder", reason }, fw[reason] ?? 0);
        this.inc({ stage: "tun", reason }, tun[reason] ?? 0);
      }
    },
  });
  // TUN traffic by direction, packets and bytes.
  for (const [unit, rx, tx] of [
    ["packets", "rxPackets", "txPackets"],
    ["bytes", "rxBytes", "txBytes"],
  ] as const) {
    new Counter({
      name: `weftnet_tun_${unit}_total`,
      help: `${unit === "packets" ? "Packets" : "Bytes"} read from (rx) and written to (tx) the TUN device.`,
      labelNames: ["direction"],
      registers,
      collect() {
        this.reset();
        const t = snap?.status.dataplane?.tun;
        if (!t) return;
        this.inc({ direction: "rx" }, t[rx]);
        this.inc({ direction: "tx" }, t[tx]);
      },
    });
  }
  // Per link type (webrtc / turn / relay / bulk / via): pod traffic, and each link's path MTU.
  new Counter({
    name: "weftnet_link_type_bytes_total",
    help: "Pod traffic bytes to (out) and from (in) other nodes, by the type of the link that carries it now (webrtc, turn, relay, bulk, via).",
    labelNames: ["link_type", "direction"],
    registers,
    collect() {
      this.reset();
      const types = new Map((snap?.status.peers ?? []).map((p) => [p.id, p.linkType ?? "none"]));
      for (const [id, s] of Object.entries(snap?.status.dataplane?.forwarder.perPeer ?? {})) {
        const t = types.get(id) ?? "none";
        this.inc({ link_type: t, direction: "in" }, s.rxBytes);
        this.inc({ link_type: t, direction: "out" }, s.txBytes);
      }
    },
  });
  new Gauge({
    name: "weftnet_peer_path_mtu_bytes",
    help: "Path MTU of each link to each connected peer, by the link's type: webrtc/turn (libdatachannel's mtu, confirmed by its full-size probe or found by the search, docs/loss.md; absent for werift's fixed chunks) and bulk (the largest datagram its search confirmed).",
    labelNames: ["peer", "name", "link_type"],
    registers,
    collect() {
      this.reset();
      for (const p of snap?.status.peers ?? []) {
        if (p.state !== "connected") continue;
        if (typeof p.pathMtu === "number") this.set({ peer: p.id, name: p.name, link_type: p.path === "turn" ? "turn" : "webrtc" }, p.pathMtu);
        if (p.bulk?.state === "up" && typeof p.bulk.pathMax === "number") this.set({ peer: p.id, name: p.name, link_type: "bulk" }, p.bulk.pathMax);
      }
    },
  });
  /** Path MTU counters by link type: the WebRTC transport's (status.pmtu) and the bulk link's (status.bulk.pmtu). */
  const pmtuByLink = (): [string, PmtuCounters][] => {
    const out: [string, PmtuCounters][] = [];
    if (snap?.status.pmtu) out.push(["webrtc", snap.status.pmtu]);
    if (snap?.status.bulk?.pmtu) out.push(["bulk", snap.status.bulk.pmtu]);
    return out;
  };
  new Counter({
    name: "weftnet_pmtu_searches_total",
    help: "Path MTU searches that ended (src/mesh/pmtu.ts), by link type (webrtc, bulk) and outcome: confirmed (the largest size: the built MTU / the largest datagram a pod packet needs), searched (a smaller size found by probing), local-limit (the kernel's route MTU toward the peer; nothing probed above it).",
    labelNames: ["link_type", "outcome"],
    registers,
    collect() {
      this.reset();
      for (const [link_type, c] of pmtuByLink()) for (const [outcome, n] of Object.entries(c.searches)) this.inc({ link_type, outcome }, n);
    },
  });
  new Counter({
    name: "weftnet_pmtu_probes_total",
    help: "Path MTU probes by link type: sent, acked, and sizes lost (every try of a size unanswered).",
    labelNames: ["link_type", "result"],
    registers,
    collect() {
      this.reset();
      for (const [link_type, c] of pmtuByLink()) {
        this.inc({ link_type, result: "sent" }, c.probes);
        this.inc({ link_type, result: "acked" }, c.acked);
        this.inc({ link_type, result: "lost" }, c.lost);
      }
    },
  });
  new Counter({
    name: "weftnet_pmtu_black_holes_total",
    help: "A confirmed path MTU stopped getting through while smaller datagrams passed (the bulk link's periodic confirmation probe): the link fell back and searched again.",
    labelNames: ["link_type"],
    registers,
    collect() {
      this.reset();
      for (const [link_type, c] of pmtuByLink()) this.inc({ link_type }, c.blackHoles ?? 0);
    },
  });
  new Counter({
    name: "weftnet_pmtu_pair_changes_total",
    help: "WebRTC links that failed after their path MTU check because ICE then selected a candidate pair whose local route (over TURN: toward the TURN server, less ChannelData's 4 bytes) carries less than the link's MTU; the next link is built for it.",
    labelNames: ["link_type"],
    registers,
    collect() {
      this.reset();
      for (const [link_type, c] of pmtuByLink()) this.inc({ link_type }, c.pairChanges ?? 0);
    },
  });
  new Counter({
    name: "weftnet_pmtu_probe_drops_total",
    help: "Path MTU probe traffic dropped, by link type and reason: malformed, unsolicited-ack (no probe of ours), stale-ack (a timed-out size), ack-not-in-flight, ack-after-done.",
    labelNames: ["link_type", "reason"],
    registers,
    collect() {
      this.reset();
      for (const [link_type, c] of pmtuByLink()) for (const [reason, n] of Object.entries(c.drops)) this.inc({ link_type, reason }, n);
    },
  });
  new Counter({
    name: "weftnet_segmentation_total",
    help: "Software segmentation towards lossy links (docs/loss.md): super-packets segmented, segments produced, inner TCP retransmissions seen, times a next hop switched to segmented.",
    labelNames: ["event"],
    registers,
    collect() {
      this.reset();
      const g = snap?.status.dataplane?.segmentation;
      if (!g) return;
      this.inc({ event: "segmented" }, g.segmented);
      this.inc({ event: "segments" }, g.segments);
      this.inc({ event: "retransmits" }, g.retransmits);
      this.inc({ event: "activations" }, g.activations);
    },
  });
  new Counter({
    name: "weftnet_gro_total",
    help: "Userspace GRO before the TUN write: super-packets built and segments merged into them.",
    labelNames: ["event"],
    registers,
    collect() {
      this.reset();
      const g = snap?.status.dataplane?.gro;
      if (!g) return;
      this.inc({ event: "built" }, g.built);
      this.inc({ event: "merged" }, g.merged);
    },
  });
  new Counter({
    name: "weftnet_forwarded_frames_total",
    help: "Transit frames this agent forwarded for other nodes (routing via this node).",
    registers,
    collect() {
      this.reset();
      this.inc(snap?.status.dataplane?.forwarder.fwdFrames ?? 0);
    },
  });

  new Gauge({
    name: "weftnet_ipam_blocks",
    help: "Blocks of the cluster range: owned by this node, by a reachable peer, by an unreachable node, or free.",
    labelNames: ["state"],
    registers,
    collect() {
      this.reset();
      const c = { owned: 0, peer: 0, unreachable: 0, free: 0 };
      for (const b of snap?.ipam?.blocks ?? []) {
        if (!b.owner) c.free++;
        else if (b.mine) c.owned++;
        else if (b.reachable) c.peer++;
        else c.unreachable++;
      }
      for (const [state, v] of Object.entries(c)) this.set({ state }, v);
    },
  });
  new Gauge({
    name: "weftnet_ipam_addresses",
    help: "Pod addresses in this node's blocks: allocated and free.",
    labelNames: ["state"],
    registers,
    collect() {
      this.reset();
      const st = snap?.ipam;
      let free = 0;
      for (const b of st?.blocks ?? []) if (b.mine && b.free !== null) free += b.free;
      this.set({ state: "allocated" }, st?.allocations.length ?? 0);
      this.set({ state: "free" }, free);
    },
  });
  new Gauge({
    name: "weftnet_ipam_pending_requests",
    help: "Block requests this node has sent and is waiting on.",
    registers,
    collect() {
      this.set(snap?.ipam?.pending ? 1 : 0);
    },
  });
  new Gauge({
    name: "weftnet_ipam_proposals",
    help: "IPAM writes this node proposed that are still collecting promises (claims of silent nodes, grants).",
    registers,
    collect() {
      this.set(snap?.ipam?.proposals.length ?? 0);
    },
  });
  new Counter({
    name: "weftnet_ipam_events_total",
    help: "IPAM event counters (malformed messages, conflicts, claims, grants, revocations...).",
    labelNames: ["name"],
    registers,
    collect() {
      this.reset();
      for (const [name, v] of Object.entries(snap?.ipam?.counters ?? {})) this.inc({ name }, v);
    },
  });
  new Counter({
    name: "weftnet_mesh_events_total",
    help: "Mesh counters: bad signal/control messages, auth failures, unknown senders, links opened/closed, dials, connect timeouts, bad gossip.",
    labelNames: ["name"],
    registers,
    collect() {
      this.reset();
      for (const [name, v] of Object.entries(snap?.status.counters ?? {})) this.inc({ name }, v);
    },
  });
  new Counter({
    name: "weftnet_relayed_bytes_total",
    help: "Relayed bytes: path=server, sealed frames to and from the signaling server's relay; path=transit, frames this agent forwarded for other nodes (multi-hop).",
    labelNames: ["path"],
    registers,
    collect() {
      this.reset();
      const c = snap?.status.counters;
      this.inc({ path: "server" }, (c?.relayBytesIn ?? 0) + (c?.relayBytesOut ?? 0));
      this.inc({ path: "transit" }, snap?.status.dataplane?.forwarder.fwdBytes ?? 0);
    },
  });

  // Per link type: which link carries each peer's pod traffic, and the bulk link's own counters.
  new Gauge({
    name: "weftnet_peers_by_link",
    help: "Connected peers by the link that carries their pod traffic: bulk (direct UDP), webrtc, turn, relay (signaling server), via (another agent).",
    labelNames: ["link"],
    registers,
    collect() {
      this.reset();
      const n: Record<string, number> = { bulk: 0, webrtc: 0, turn: 0, relay: 0, via: 0 };
      for (const p of snap?.status.peers ?? []) if (p.linkType) n[p.linkType] = (n[p.linkType] ?? 0) + 1;
      for (const [link, v] of Object.entries(n)) this.set({ link }, v);
    },
  });
  const bulkSum = (f: (b: NonNullable<AgentStatus["peers"][number]["bulk"]>) => number) => (snap?.status.peers ?? []).reduce((a, p) => a + (p.bulk ? f(p.bulk) : 0), 0);
  new Counter({
    name: "weftnet_bulk_datagrams_total",
    help: "Datagrams sent (out) and received (in) on bulk links (keepalives included).",
    labelNames: ["direction"],
    registers,
    collect() {
      this.reset();
      this.inc({ direction: "out" }, bulkSum((b) => b.txDatagrams));
      this.inc({ direction: "in" }, bulkSum((b) => b.rxDatagrams));
    },
  });
  new Counter({
    name: "weftnet_bulk_bytes_total",
    help: "Bytes of sealed datagrams sent (out) and received (in) on bulk links.",
    labelNames: ["direction"],
    registers,
    collect() {
      this.reset();
      this.inc({ direction: "out" }, bulkSum((b) => b.txBytes));
      this.inc({ direction: "in" }, bulkSum((b) => b.rxBytes));
    },
  });
  new Counter({
    name: "weftnet_bulk_drops_total",
    help: "Bulk link datagrams dropped, by typed reason (bad-auth, replay, unknown-index, stale-key, short, bad-type, bad-inner).",
    labelNames: ["reason"],
    registers,
    collect() {
      this.reset();
      const n: Record<string, number> = {};
      for (const p of snap?.status.peers ?? []) for (const [k, v] of Object.entries(p.bulk?.drops ?? {})) n[k] = (n[k] ?? 0) + v;
      for (const [reason, v] of Object.entries(n)) this.inc({ reason }, v);
    },
  });
  new Counter({
    name: "weftnet_bulk_transitions_total",
    help: "Bulk link state changes: to=up (pod traffic moved to UDP), to=down (fell back to WebRTC).",
    labelNames: ["to"],
    registers,
    collect() {
      this.reset();
      this.inc({ to: "up" }, bulkSum((b) => b.ups));
      this.inc({ to: "down" }, bulkSum((b) => b.downs));
    },
  });

  new Counter({
    name: "weftnet_answer_waits_total",
    help: "Waits on the CPU for the answer to an exchange the bulk link started (instead of a cold wake-up): answered, window (no answer in time), refused (CPU budget spent).",
    labelNames: ["outcome"],
    registers,
    collect() {
      this.reset();
      const w = snap?.status.bulk?.answerWait;
      if (!w) return;
      this.inc({ outcome: "answered" }, w.answered);
      this.inc({ outcome: "window" }, w.waits - w.answered);
      this.inc({ outcome: "refused" }, w.refused);
    },
  });
  new Counter({
    name: "weftnet_answer_wait_seconds_total",
    help: "CPU time spent waiting for answers (weftnet_answer_waits_total).",
    registers,
    collect() {
      this.reset();
      const w = snap?.status.bulk?.answerWait;
      if (w) this.inc(w.spunMs / 1000);
    },
  });

  return {
    registry,
    async scrape() {
      const status = await agent.status();
      let ipam: IpamView | null = null;
      try {
        ipam = agent.ipamStatus();
      } catch {
        ipam = null;
      }
      snap = { status, ipam };
      try {
        return await registry.metrics();
      } finally {
        snap = undefined;
      }
    },
  };
}

export interface MetricsServer {
  /** bound address (the real port when 0 was asked for) */
  readonly address: { host: string; port: number };
  /** http://host:port/metrics */
  readonly url: string;
  close(): Promise<void>;
}

/** Serve GET /metrics on HOST:PORT. Anything else is 404; a failed scrape is 500 (logged). */
export async function startAgentMetrics(agent: AgentView, listen: string, log: Logger): Promise<MetricsServer> {
  const { host, port } = parseListen(listen);
  const { registry, scrape } = createAgentRegistry(agent);
  // Scrapes are serialised: each one owns the snapshot while the collect callbacks run.
  let chain: Promise<unknown> = Promise.resolve();
  const server: Server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0];
    if (path !== "/metrics" || (req.method !== "GET" && req.method !== "HEAD")) {
      res.writeHead(404, { "content-type": "text/plain" }).end("weftnet agent: only GET /metrics here\n");
      return;
    }
    const run = chain.then(scrape, scrape);
    chain = run.catch(() => {});
    run.then(
      (body) => {
        res.writeHead(200, { "content-type": registry.contentType });
        res.end(req.method === "HEAD" ? undefined : body);
      },
      (err) => {
        log.error("metrics scrape failed", { err });
        res.writeHead(500, { "content-type": "text/plain" }).end("scrape failed\n");
      },
    );
  });
  try {
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  } catch (e) {
    throw new WeftError("ERR_LISTEN", `cannot serve metrics on tcp ${host}:${port}: ${(e as Error).message}`, { cause: e });
  }
  server.on("error", (err) => log.error("metrics server error", { err }));
  const a = server.address();
  const bound = { host, port: typeof a === "object" && a !== null ? a.port : port };
  let closed: Promise<void> | undefined;
  return {
    address: bound,
    url: `http://${host.includes(":") ? `[${host}]` : host}:${bound.port}/metrics`,
    close: () =>
      (closed ??= new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      })),
  };
}
