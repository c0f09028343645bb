/**
 * Agents as the cluster's STUN servers (issue 13 item 4). A signaling server on Cloudflare Workers (or
 * any host without UDP) offers no STUN, so an agent without one of its own gathers only host candidates.
 * `weftnet agent --stun-port N` runs the signaling server's STUN responder (signaling/stun.ts: RFC 5389
 * Binding, malformed datagrams counted and dropped, per-source and total rate limits, answers no larger
 * than ~2x the request) on UDP port N and advertises "IP:N" in the agent's signed topology record
 * (src/mesh/topology.ts `stun`), so every agent learns it through the mesh.
 *
 * Which address is advertised: --stun-advertise IP[,IP] when given, else the address the signaling
 * server saw this agent connect from (its `welcome`): for a cloud VM with a public address that is the
 * address its home peers reach. Nothing is advertised before the first welcome (or without one).
 *
 * Who uses it (stunPlan): an agent with STUN of its own — the signaling server's responder, a stun: URL
 * from --ice-server or from the server's welcome — keeps using only that. An agent with none uses up to
 * two advertised agent STUN servers (lowest node ids first, IPv4 first, one per agent while there are
 * several agents) for the ICE gathering of links it opens from then on, for the bulk link's public
 * mapping, and `weftnet netcheck` probes them and names the agent.
 */
import { startStunServer, type StunLimits, type StunServer, type StunStats } from "../signaling/stun.js";
import { canonicalStunAddress, type TopologyRecord } from "../src/mesh/topology.js";
import type { Logger } from "../src/log.js";
import { UsageError } from "../src/errors.js";

type IceServer = { urls: string | string[]; username?: string; credential?: string };

/** Where a STUN server came from: --ice-server / --stun, the signaling server (its responder or its welcome), or another agent. */
export type StunSource = "flag" | "signaling server" | `agent ${string}`;

export interface StunUse {
  /** HOST:PORT ([IPv6]:PORT) */
  server: string;
  source: StunSource;
  /** the advertising agent's node id (source "agent ...") */
  node?: string;
}

export interface StunStatus {
  /** this agent's own responder (--stun-port), with what it advertises and its counters */
  serving: { port: number; advertised: string[]; stats: StunStats } | null;
  /** the STUN servers this agent gathers with, in order, and where each came from */
  using: StunUse[];
}

/** Most agent STUN servers an agent without its own uses at once (two tell cone from symmetric NAT). */
export const MAX_AGENT_STUN = 2;

/** "IP" or "IP,IP" from --stun-advertise: canonical IP literals (no port: the port is --stun-port's). */
export function parseStunAdvertise(v: string | undefined): string[] | undefined {
  if (v === undefined) return undefined;
  const out: string[] = [];
  for (const raw of v.split(",").map((s) => s.trim()).filter(Boolean)) {
    const ip = raw.replace(/^\[|\]$/g, "");
    const c = canonicalStunAddress(ip.includes(":") ? `[${ip}]:1` : `${ip}:1`);
    if (c === undefined) throw new UsageError(`weftnet agent: --stun-advertise ${JSON.stringify(raw)} is not an IP address`);
    out.push(c.replace(/:1$/, "").replace(/^\[|\]$/g, ""));
  }
  if (out.length === 0 || out.length > 4) throw new UsageError("weftnet agent: --stun-advertise takes 1 to 4 addresses");
  return out;
}

/** The host part of a "IP:PORT" / "[IPv6]:PORT" address the signaling server reported, when it is a usable literal. */
function reflexiveHost(addr: string | null): string | undefined {
  if (!addr) return undefined;
  const m = /^\[([^\]]+)\]:\d+$/.exec(addr) ?? /^([^:]+):\d+$/.exec(addr);
  let host = m ? m[1]! : addr;
  host = host.replace(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i, "$1");
  if (host === "0.0.0.0" || host === "::") return undefined;
  const c = canonicalStunAddress(host.includes(":") ? `[${host}]:1` : `${host}:1`);
  return c?.replace(/:1$/, "").replace(/^\[|\]$/g, "");
}

export class AgentStun {
  private constructor(
    private readonly server: StunServer,
    private readonly advertise: string[] | undefined,
  ) {}

  static async start(opts: { port: number; host?: string; advertise?: string[]; logger: Logger; limits?: Partial<StunLimits> }): Promise<AgentStun> {
    const server = await startStunServer({ host: opts.host ?? "0.0.0.0", port: opts.port, logger: opts.logger, ...(opts.limits ? { limits: opts.limits } : {}) });
    opts.logger.info("serving STUN", { port: server.port, advertise: opts.advertise ?? "the address the signaling server sees" });
    return new AgentStun(server, opts.advertise);
  }

  get port(): number {
    return this.server.port;
  }

  /** What goes into our topology record: "IP:PORT" for each advertised address (sorted, canonical). */
  advertised(reflexive: string | null): string[] {
    const hosts = this.advertise ?? [reflexiveHost(reflexive)].filter((h): h is string => h !== undefined);
    const out = new Set<string>();
    for (const h of hosts) {
      const a = canonicalStunAddress(h.includes(":") ? `[${h}]:${this.server.port}` : `${h}:${this.server.port}`);
      if (a) out.add(a);
    }
    return [...out].sort().slice(0, 4);
  }

  answeredFrom(address: string): number {
    return this.server.answeredFrom(address);
  }

  status(reflexive: string | null): NonNullable<StunStatus["serving"]> {
    return { port: this.server.port, advertised: this.advertised(reflexive), stats: this.server.stats() };
  }

  close(): Promise<void> {
    return this.server.close();
  }
}

const urlsOf = (s: IceServer): string[] => (Array.isArray(s.urls) ? s.urls : [s.urls]);

/** The stun:/stuns: URLs among ICE servers as HOST:PORT (default port 3478). TURN entries are not counted. */
export function stunOfIce(servers: readonly IceServer[], source: StunSource): StunUse[] {
  const out: StunUse[] = [];
  for (const s of servers) {
    for (const u of urlsOf(s)) {
      const m = /^stuns?:(?:\/\/)?(\[[0-9a-fA-F:.]+\]|[^:?/\s]+)(?::(\d+))?/i.exec(u.trim());
      if (m) out.push({ server: `${m[1]}:${m[2] ?? 3478}`, source });
    }
  }
  return out;
}

/** Advertised agent STUN servers from the topology (not our own), at most `max`, one per agent first. */
export function agentStun(records: readonly TopologyRecord[], self: string, nameOf: (id: string) => string | undefined, max = MAX_AGENT_STUN): StunUse[] {
  const per: StunUse[][] = [];
  for (const r of [...records].sort((a, b) => (a.node < b.node ? -1 : a.node > b.node ? 1 : 0))) {
    if (r.node === self || !r.stun || r.stun.length === 0) continue;
    const v4first = [...r.stun].sort((a, b) => Number(a.startsWith("[")) - Number(b.startsWith("[")));
    per.push(v4first.map((server) => ({ server, source: `agent ${nameOf(r.node) ?? r.node}` as const, node: r.node })));
  }
  const out: StunUse[] = [];
  // round robin: the first address of each agent, then the second...
  for (let i = 0; out.length < max && per.some((l) => l.length > i); i++) for (const l of per) if (l[i] && out.length < max) out.push(l[i]!);
  return out;
}

/** Our own STUN servers when there are any, else the agents' (see the header). */
export function stunPlan(own: readonly StunUse[], records: readonly TopologyRecord[], self: string, nameOf: (id: string) => string | undefined): StunUse[] {
  return own.length > 0 ? [...own] : agentStun(records, self, nameOf);
}

/** An agent's own STUN servers: the signaling server's responder (and its alt port), stun: URLs from --ice-server and from the server's welcome. */
export function ownStun(o: { useServerStun: boolean; serverHost: string; stunPort: number; stunAltPort: number; flagIce: readonly IceServer[]; serverIce: readonly IceServer[] }): StunUse[] {
  const out: StunUse[] = [];
  if (o.useServerStun && o.stunPort > 0) {
    const h = o.serverHost.includes(":") && !o.serverHost.startsWith("[") ? `[${o.serverHost}]` : o.serverHost;
    out.push({ server: `${h}:${o.stunPort}`, source: "signaling server" });
    if (o.stunAltPort > 0) out.push({ server: `${h}:${o.stunAltPort}`, source: "signaling server" });
  }
  return out.concat(stunOfIce(o.flagIce, "flag"), stunOfIce(o.serverIce, "signaling server"));
}
