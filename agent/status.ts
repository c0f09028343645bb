/**
 * What the local API serves and the metrics exporter reads: the status shapes (GET /v1/status, /v1/routes,
 * /v1/ipam) and `AgentView`, the narrow read-only view api.ts and metrics.ts depend on instead of the Agent
 * class (which imports them).
 */
import type { IpamStatus } from "../src/ipam/index.js";
import type { MeshCounters, PeerStatus } from "../src/mesh/manager.js";
import type { DropCounters } from "../src/packet/drop.js";
import type { DataPlane } from "./dataplane.js";
import type { BulkPeerStatus, BulkService } from "./transport/bulk.js";
import type { StunStatus } from "./stun-server.js";

/** An overlap between our advertised routes and another node's (reported; see Agent.checkRouteConflicts). */
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
  peers: (Omit<PeerStatus, "path"> & { path: PeerPath; via: string | null; linkType: LinkType | null; linkWhy: string; bulk: BulkPeerStatus | null })[];
  bulk: { port: number; candidates: string[]; crypto: string; gso: boolean; gro: boolean; coalesced: { merged: number; built: number }; counters: BulkService["counters"] } | null;
  dataplane: ReturnType<DataPlane["stats"]> | null;
  /** this agent's STUN responder (--stun-port) and the STUN servers it uses, with their source */
  stun?: StunStatus;
  routes: { advertised: string[]; inForce: string[]; snat: boolean; conflicts: RouteConflict[] };
  counters: MeshCounters & { relayBytesIn: number; relayBytesOut: number; relayBadFrames: number; badSignalFrames: number; badGossip: number; rejectedTopologyRecords: number; forgedTopologyRecords: number };
}

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
