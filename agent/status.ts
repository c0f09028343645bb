/**
 * What the local API serves and the metrics exporter reads: the status shapes (GET /v1/status, /v1/routes,
 * /v1/ipam), `AgentView`, the narrow read-only view api.ts and metrics.ts depend on instead of the Agent
 * class (which imports them), and the status assembly: how a peer's path, a route and an IPAM block are
 * described (pure functions over the mesh, router, bulk link and IPAM state; Agent.status() composes them).
 */
import type { AnswerWaitStats } from "./os/fd-reader.js";
import type { IpamStatus } from "../src/ipam/index.js";
import type { MeshCounters, PeerStatus } from "../src/mesh/manager.js";
import type { RouteEntry } from "../src/mesh/paths.js";
import type { PmtuCounters } from "../src/mesh/transport.js";
import type { DropCounters } from "../src/packet/drop.js";
import type { DataPlane } from "./dataplane.js";
import type { RouteDecision } from "./os/advertise.js";
import type { BulkPeerStatus, BulkService } from "./transport/bulk.js";
import type { StunStatus } from "./stun-server.js";

/** An overlap between our advertised routes and another node's (reported; see RoutePolicy.checkConflicts). */
export interface RouteConflict {
  route: string;
  other: string;
  node: string;
  nodeName: string;
  kept: boolean;
}

export interface RouteStatus {
  dst: string;
  name: string;
  nextHop: string;
  nextHopName: string;
  via: string;
  costMs: number;
  path: string[];
}

export type PeerPath = "direct" | "turn" | "relay" | `via ${string}` | "none";
/** What carries pod traffic to a peer: the bulk UDP link, WebRTC (direct ICE), TURN, the server relay, or another agent. */
export type LinkType = "bulk" | "webrtc" | "turn" | "relay" | "via";

export interface AgentStatus {
  node: { id: string; name: string; cluster: string | null; instance: string; version: string; uptimeMs: number; transport: string; fingerprint: string; signal: { url: string; connected: boolean; addr: string | null; stun?: { host: string; port: number; altPort: number } } };
  peers: PeerView[];
  /** answerWait: the event loop's waits on the CPU for answers to exchanges the bulk link started (agent/os/fd-reader.ts) */
  bulk: { port: number; candidates: string[]; crypto: string; gso: boolean; gro: boolean; coalesced: { merged: number; built: number }; counters: BulkService["counters"]; pmtu: PmtuCounters; answerWait?: AnswerWaitStats } | null;
  /** `routes`: every route other nodes advertise, installed or why not (--accept-routes, reserved, underlay, conflict) */
  dataplane: (ReturnType<DataPlane["stats"]> & { routes: RouteDecision[] }) | null;
  /** this agent's STUN responder (--stun-port) and the STUN servers it uses, with their source */
  stun?: StunStatus;
  routes: { advertised: string[]; inForce: string[]; snat: boolean; conflicts: RouteConflict[] };
  /** the WebRTC transport's path MTU searches (native; null for werift, which never searches); the bulk link's: bulk.pmtu */
  pmtu: PmtuCounters | null;
  /** why the WebRTC transport's links do not search their path MTU (werift), else null */
  pmtuFixed?: string | null;
  counters: MeshCounters & { relayBytesIn: number; relayBytesOut: number; relayBadFrames: number; badSignalFrames: number; badGossip: number; rejectedTopologyRecords: number; forgedTopologyRecords: number };
}

/**
 * `viaLink`: for a peer routed via another agent, what carries our traffic to that next hop (its
 * linkType: bulk, webrtc, turn or relay; null when we have no live link to it any more); else null.
 */
export type PeerView = Omit<PeerStatus, "path"> & { path: PeerPath; via: string | null; viaLink: Exclude<LinkType, "via"> | null; linkType: LinkType | null; linkWhy: string; bulk: BulkPeerStatus | null };

export type IpamView = IpamStatus & { blocks: (IpamStatus["blocks"][number] & { ownerName: string | null; reachable: boolean })[] };

/** What the local API and the metrics exporter read. */
export interface AgentView {
  status(): Promise<AgentStatus>;
  routes(): RouteStatus[];
  ipamStatus(): IpamView;
  peerName(id: string): string | undefined;
  /** the data plane's drop counters (forwarder and TUN), when it runs */
  drops(): { forwarder: DropCounters; tun: DropCounters } | null;
}

/**
 * A peer as status shows it: which path its traffic takes (direct, turn, relay, via NODE), what carries it
 * (bulk, webrtc, turn, relay, via) and why the better link is not in use.
 */
export function describePeer(p: PeerStatus, route: RouteEntry | undefined, peerName: (id: string) => string | undefined, bulk: { enabled: boolean; status: BulkPeerStatus | null }): PeerView {
  const via = route && route.via !== "direct" ? route.via : null;
  const path: PeerPath = via ? `via ${peerName(via) ?? via}` : p.state === "connected" ? linkPath(p) : route ? "direct" : "none";
  const turn = path === "turn";
  const b = bulk.status;
  const bulkUp = b?.state === "up";
  const linkType: LinkType | null = via ? "via" : p.state !== "connected" ? null : bulkUp ? "bulk" : p.path === "relay" ? "relay" : turn ? "turn" : "webrtc";
  const linkWhy =
    linkType === null
      ? ""
      : linkType === "bulk"
        ? `direct UDP to ${b!.endpoint}, path MTU ${b!.pathMax ?? "?"} (${b!.pmtu?.how ?? "?"})`
        : linkType === "via"
          ? `no direct link; routed ${path} (lowest measured RTT)`
          : !bulk.enabled
            ? "bulk link disabled here (--no-bulk)"
            : `bulk link ${b ? `${b.state}: ${b.reason}` : "not negotiated yet"}`;
  return { ...p, path, via, viaLink: null, linkType, linkWhy, bulk: b };
}

/**
 * Every peer as status shows it (describePeer), and for a peer routed via another agent the link type of
 * that hop: path `via n2`, viaLink `bulk`, linkWhy `no direct link; routed via n2 (bulk), lowest measured RTT`.
 */
export function describePeers(peers: readonly PeerStatus[], route: (id: string) => RouteEntry | undefined, peerName: (id: string) => string | undefined, bulk: { enabled: boolean; status: (id: string) => BulkPeerStatus | null }): PeerView[] {
  const views = peers.map((p) => describePeer(p, route(p.id), peerName, { enabled: bulk.enabled, status: bulk.status(p.id) }));
  const byId = new Map(views.map((v) => [v.id, v]));
  return views.map((v) => {
    if (v.via === null) return v;
    const t = byId.get(v.via)?.linkType ?? null;
    const viaLink = t === null || t === "via" ? null : t;
    return { ...v, viaLink, linkWhy: `no direct link; routed ${v.path} (${viaLink ?? "no link to it now"}), lowest measured RTT` };
  });
}

/** The path of a connected peer's own link: through the signaling server's relay, a TURN server, or direct. */
export function linkPath(p: PeerStatus): "direct" | "turn" | "relay" {
  if (p.path === "relay") return "relay";
  // A WebRTC link whose selected candidate pair goes through a TURN server is reported as "turn".
  if (p.link === "webrtc" && (p.selected?.localType === "relay" || p.selected?.remoteType === "relay")) return "turn";
  return "direct";
}

export function routeStatus(entries: readonly RouteEntry[], peerName: (id: string) => string | undefined): RouteStatus[] {
  const name = (id: string) => peerName(id) ?? id;
  return entries.map((e) => ({ dst: e.dst, name: name(e.dst), nextHop: e.nextHop, nextHopName: name(e.nextHop), via: e.via === "direct" ? "direct" : `via ${name(e.via)}`, costMs: e.cost, path: [...e.path] }));
}

/** IPAM status with owner names and whether each owner is reachable from here (asked once per owner, not per block). */
export function ipamView(st: IpamStatus, selfId: string, selfName: string, peerName: (id: string) => string | undefined, reachable: (id: string) => boolean): IpamView {
  const name = (id: string) => (id === selfId ? selfName : (peerName(id) ?? null));
  const reach = new Map<string, boolean>();
  return {
    ...st,
    // a founder or heir owns ~1000 blocks, and reachable() (a next-hop lookup) is not free
    blocks: st.blocks.map((b) => {
      let r = reach.get(b.owner);
      if (r === undefined) reach.set(b.owner, (r = b.owner === selfId || reachable(b.owner)));
      return { ...b, ownerName: name(b.owner), reachable: r };
    }),
  };
}
