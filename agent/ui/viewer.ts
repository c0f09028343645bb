/**
 * Browser viewers of the live topology page (agent/ui/assets, served by `weftnet agent --ui-listen`).
 *
 * A browser tab joins as a WebRTC peer of the agents, with its own Ed25519 identity, but it is NOT a mesh
 * member: its links never reach the MeshManager, so it owns no blocks, carries no pod traffic (anything on
 * its "packets" channel is dropped and counted) and cannot inject gossip or routes (its "control" channel
 * speaks only the small JSON protocol below, and only after it proved the cluster credential).
 *
 * Introduction: the first link is set up over HTTP (POST /ui/v1/offer to the agent that served the page);
 * links to every other agent go through an open viewer link and the mesh's control channel ("viewer" app
 * messages: the introducing agent forwards the browser's offer to the target agent and its answer back).
 * The signaling server is not involved, so the page keeps working while it is down.
 *
 * Viewer protocol, JSON objects in binary messages on the "control" channel (id 0, negotiated):
 *   agent -> browser  {t:"challenge", v:1, nonce, node:{id, name}}
 *   browser -> agent  {t:"auth", id, pub, sig, mac} | {t:"auth", id, pub, sig, invite}
 *       pub  hex of the raw 32-byte Ed25519 public key; id = hex(sha256(pub))[0..16] (like nodes)
 *       sig  Ed25519 over frame("weftnet/viewer-auth/v1", nonce, agentId)          (holds the key)
 *       mac  HMAC-SHA256(peerKey, frame("weftnet/viewer-auth/v1", nonce, agentId, id, pub)) (knows the
 *            cluster token: the peer key is HKDF("peer") of the token, see src/identity.ts; the signaling
 *            server holds only the join key, so it cannot make itself a viewer)
 *       invite  a viewer invite signed by the signaling server's invite key (src/wire/invite.ts), taken
 *            only when this agent pins that key (`--ui-invite-key`), before its expiry, and never one
 *            claiming more than 24 h. A server whose invites an operator accepts can thereby make itself
 *            a viewer: see README "Topology page" for what a viewer sees. Nothing else.
 *   agent -> browser  {t:"welcome"} | {t:"refused", reason} (then the link is closed)
 *   agent -> browser  {t:"state", ...}                    every second: this node, its peers, routes, IPAM
 *   browser -> agent  {t:"ping", seq, ts}                 -> {t:"pong", seq, ts}  (RTT measured by the browser)
 *   browser -> agent  {t:"ping-node", seq, target}        -> {t:"ping-result", seq, ok, rttMs, path, route, error}
 *   browser -> agent  {t:"connect", seq, target, sdp}     -> {t:"answer", seq, target, sdp, candidates} | {t:"error", seq, error}
 */
import { randomBytes } from "node:crypto";
import { WeftError } from "../../src/errors.js";
import { checkTokenMac, deriveNodeId, verifyFields } from "../../src/identity.js";
import { parseInvite } from "../../src/wire/invite.js";
import { inviteProblem } from "./invite.js";
import type { Logger } from "../../src/log.js";
import type { LinkSignal, Transport, TransportLink } from "../../src/mesh/transport.js";
import type { IceCandidateInit } from "../../src/wire/signal.js";
import type { Agent } from "../agent.js";
import { SAFE_LINK_MTU } from "../transport/link-base.js";

export const VIEWER_CTX = "weftnet/viewer-auth/v1";
const APP_CH = "viewer";
const MAX_VIEWERS = 16;
const MAX_MSG = 64 * 1024;
const AUTH_TIMEOUT_MS = 10_000;
const GATHER_MS = 1500;

export interface ViewerAnswer {
  sdp: string;
  candidates: IceCandidateInit[];
  node: { id: string; name: string };
}

type ViewerAgent = Pick<Agent, "id" | "name" | "status" | "ipamStatus" | "routes" | "ping" | "mesh" | "transport">;

interface Viewer {
  key: string;
  link: TransportLink;
  nonce: string;
  authed: boolean;
  viewerId: string | null;
  /** admitted with an invite (its `n`), not the cluster token */
  invited: boolean;
  bad: number;
  timer: NodeJS.Timeout;
}

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const unhex = (s: unknown, len: number): Uint8Array | null => (typeof s === "string" && s.length === len * 2 && /^[0-9a-f]+$/i.test(s) ? new Uint8Array(Buffer.from(s, "hex")) : null);

export class ViewerHub {
  private readonly viewers = new Map<string, Viewer>();
  private seq = 0;
  private snapshot: unknown = null;
  private ticker: NodeJS.Timeout;
  private readonly pendingForward = new Map<string, (r: { sdp: string; candidates: IceCandidateInit[] } | { error: string }) => void>();
  readonly counters = { accepted: 0, refused: 0, droppedPackets: 0, badMessages: 0, forwarded: 0 };

  constructor(
    private readonly agent: ViewerAgent,
    private readonly peerKey: string,
    private readonly log: Logger,
    private readonly iceServers: () => { urls: string | string[]; username?: string; credential?: string }[] = () => [],
    /** the signaling server's invite public key, pinned by the operator (--ui-invite-key); absent = no invites */
    private readonly invitePub?: Uint8Array,
  ) {
    agent.mesh.onApp(APP_CH, (from, body) => void this.onApp(from, body));
    this.ticker = setInterval(() => this.broadcast().catch((err) => this.log.warn("cannot build the viewers' state", { err })), 1000);
    this.ticker.unref();
  }

  get size(): number {
    return this.viewers.size;
  }

  close(): void {
    clearInterval(this.ticker);
    for (const v of this.viewers.values()) this.drop(v, "agent stopping");
  }

  /** Accept a browser's offer (from HTTP or forwarded over the mesh): a link answered by this agent. */
  async accept(sdp: string): Promise<ViewerAnswer> {
    if (typeof sdp !== "string" || sdp.length > MAX_MSG || !sdp.startsWith("v=0")) throw new WeftError("ERR_USAGE", "the offer must be an SDP string");
    if (this.viewers.size >= MAX_VIEWERS) throw new WeftError("ERR_BUSY", `this agent already serves ${MAX_VIEWERS} viewers`);
    const key = `v${++this.seq}`;
    const candidates: IceCandidateInit[] = [];
    let answer: string | undefined;
    let gathered: () => void = () => {};
    const done = new Promise<void>((r) => (gathered = r));
    const transport: Transport = this.agent.transport;
    const v: Viewer = {
      key,
      link: undefined as unknown as TransportLink,
      nonce: hex(randomBytes(32)),
      authed: false,
      viewerId: null,
      invited: false,
      bad: 0,
      timer: setTimeout(() => {
        if (!v.authed) this.drop(v, "no valid auth in time");
      }, AUTH_TIMEOUT_MS),
    };
    v.timer.unref();
    v.link = transport.createLink({
      initiator: false,
      peer: `viewer-${key}`,
      conn: key,
      iceServers: this.iceServers(),
      // a viewer (a browser page) does not answer path MTU probes: no check, small messages only
      maxMtu: SAFE_LINK_MTU,
      handlers: {
        onSignal: (s: LinkSignal) => {
          if (s.kind === "answer") answer = s.sdp;
          else if (s.kind === "candidate") {
            if (s.candidate === null) gathered();
            else candidates.push(s.candidate);
          }
        },
        onOpen: () => this.send(v, { t: "challenge", v: 1, nonce: v.nonce, node: { id: this.agent.id, name: this.agent.name } }),
        onMessage: (ch, data) => {
          // (path MTU probes on `packets` are answered by the link itself and never get here)
          if (ch === "packets") {
            this.counters.droppedPackets++;
            return;
          }
          void this.onMessage(v, data);
        },
        onClose: (reason) => {
          clearTimeout(v.timer);
          if (this.viewers.get(key) === v) {
            this.viewers.delete(key);
            if (v.authed) this.log.info("viewer left", { viewer: v.viewerId, reason });
          }
        },
      },
    });
    this.viewers.set(key, v);
    try {
      await v.link.handleSignal({ kind: "offer", sdp });
    } catch (e) {
      this.drop(v, "bad offer");
      throw new WeftError("ERR_USAGE", `cannot use this offer: ${(e as Error).message}`);
    }
    await Promise.race([done, new Promise((r) => setTimeout(r, GATHER_MS))]);
    if (answer === undefined) {
      this.drop(v, "no answer");
      throw new WeftError("ERR_INTERNAL", "the WebRTC stack produced no answer");
    }
    return { sdp: answer, candidates, node: { id: this.agent.id, name: this.agent.name } };
  }

  private drop(v: Viewer, reason: string): void {
    clearTimeout(v.timer);
    this.viewers.delete(v.key);
    v.link.close();
    this.log.debug("viewer link closed", { viewer: v.viewerId, reason });
  }

  private send(v: Viewer, msg: unknown): void {
    v.link.send("control", Buffer.from(JSON.stringify(msg)));
  }

  private async onMessage(v: Viewer, data: Uint8Array): Promise<void> {
    let m: Record<string, unknown>;
    try {
      if (data.byteLength > MAX_MSG) throw new Error("too large");
      const x = JSON.parse(Buffer.from(data).toString("utf8")) as unknown;
      if (!x || typeof x !== "object" || Array.isArray(x)) throw new Error("not an object");
      m = x as Record<string, unknown>;
    } catch {
      this.counters.badMessages++;
      if (++v.bad > 10) this.drop(v, "too many bad messages");
      return;
    }
    if (!v.authed) {
      if (m.t !== "auth") return;
      const pub = unhex(m.pub, 32);
      const sig = unhex(m.sig, 64);
      const mac = unhex(m.mac, 32);
      const id = typeof m.id === "string" ? m.id : "";
      const holdsKey = !!pub && !!sig && deriveNodeId(pub) === id && verifyFields(pub, sig, VIEWER_CTX, v.nonce, this.agent.id);
      let problem: string | undefined;
      if (!holdsKey) problem = "bad signature";
      else if (m.invite !== undefined) problem = inviteProblem(m.invite, this.invitePub);
      else if (!mac || !checkTokenMac(this.peerKey, mac, VIEWER_CTX, v.nonce, this.agent.id, id, m.pub as string)) problem = "wrong cluster credential";
      if (problem !== undefined) {
        this.counters.refused++;
        const what = m.invite !== undefined ? "refused a viewer invite" : "refused a viewer: wrong cluster credential or bad signature";
        this.log.warn(what, { viewer: id || null, why: problem });
        this.send(v, { t: "refused", reason: m.invite !== undefined ? `invite refused: ${problem}` : "wrong cluster credential (or a bad signature)" });
        setTimeout(() => this.drop(v, "refused"), 300).unref();
        return;
      }
      v.authed = true;
      v.viewerId = id;
      v.invited = m.invite !== undefined;
      clearTimeout(v.timer);
      if (v.invited) {
        // an invite's viewer leaves when the invite expires (a new invite: a new join)
        v.timer = setTimeout(() => this.drop(v, "invite expired"), Math.max(0, parseInvite(m.invite).exp - Date.now()));
        v.timer.unref();
      }
      this.counters.accepted++;
      this.log.info("viewer joined", { viewer: id, with: v.invited ? "invite" : "cluster token" });
      this.send(v, { t: "welcome" });
      if (this.snapshot) this.send(v, this.snapshot);
      else this.broadcast().catch((err) => this.log.warn("cannot build the viewers' state", { err }));
      return;
    }
    const seq = typeof m.seq === "number" ? m.seq : 0;
    switch (m.t) {
      case "ping":
        this.send(v, { t: "pong", seq, ts: m.ts });
        break;
      case "ping-node": {
        const target = typeof m.target === "string" ? m.target.slice(0, 128) : "";
        const route = this.agent.routes().find((r) => r.dst === target || r.name === target);
        try {
          const r = await this.agent.ping(target, 3000);
          this.send(v, { t: "ping-result", seq, ok: true, target: r.id, name: r.name, rttMs: r.rttMs, path: r.path, route: route?.path ?? null });
        } catch (e) {
          this.send(v, { t: "ping-result", seq, ok: false, target, error: (e as Error).message, route: route?.path ?? null });
        }
        break;
      }
      case "connect": {
        const target = typeof m.target === "string" ? m.target : "";
        const sdp = typeof m.sdp === "string" ? m.sdp : "";
        if (target === this.agent.id) {
          this.send(v, { t: "error", seq, error: "already connected to this agent" });
          break;
        }
        const fwd = `${this.agent.id}:${v.key}:${seq}:${++this.seq}`;
        const r = await new Promise<{ sdp: string; candidates: IceCandidateInit[] } | { error: string }>((resolve) => {
          const timer = setTimeout(() => {
            this.pendingForward.delete(fwd);
            resolve({ error: `no answer from ${target} through the mesh` });
          }, 8000);
          this.pendingForward.set(fwd, (x) => {
            clearTimeout(timer);
            this.pendingForward.delete(fwd);
            resolve(x);
          });
          if (!this.agent.mesh.sendApp(target, APP_CH, { t: "offer", fwd, sdp })) {
            clearTimeout(timer);
            this.pendingForward.delete(fwd);
            resolve({ error: `${target} is not a connected peer of ${this.agent.name}` });
          }
        });
        this.counters.forwarded++;
        this.send(v, "error" in r ? { t: "error", seq, target, error: r.error } : { t: "answer", seq, target, sdp: r.sdp, candidates: r.candidates });
        break;
      }
      default:
        this.counters.badMessages++;
    }
  }

  /** Mesh side of "connect": another agent forwards a browser's offer to us, or our answer comes back. */
  private async onApp(from: string, body: unknown): Promise<void> {
    if (!body || typeof body !== "object") return;
    const b = body as { t?: unknown; fwd?: unknown; sdp?: unknown; candidates?: unknown; error?: unknown };
    if (typeof b.fwd !== "string" || b.fwd.length > 200) return;
    if (b.t === "offer" && typeof b.sdp === "string") {
      try {
        const a = await this.accept(b.sdp);
        this.agent.mesh.sendApp(from, APP_CH, { t: "answer", fwd: b.fwd, sdp: a.sdp, candidates: a.candidates });
      } catch (e) {
        this.agent.mesh.sendApp(from, APP_CH, { t: "answer", fwd: b.fwd, error: (e as Error).message });
      }
    } else if (b.t === "answer") {
      const f = this.pendingForward.get(b.fwd);
      if (!f || !b.fwd.startsWith(`${this.agent.id}:`)) return;
      if (typeof b.error === "string") f({ error: b.error });
      else if (typeof b.sdp === "string") f({ sdp: b.sdp, candidates: Array.isArray(b.candidates) ? (b.candidates as IceCandidateInit[]).slice(0, 64) : [] });
    }
  }

  /** One snapshot per second for every authenticated viewer (computed once, only when someone watches). */
  private async broadcast(): Promise<void> {
    const watching = [...this.viewers.values()].filter((v) => v.authed);
    if (watching.length === 0) return;
    const st = await this.agent.status();
    const ipam = this.agent.ipamStatus();
    const owners = new Map<string, { name: string | null; blocks: string[] }>();
    for (const b of ipam.blocks) {
      if (!b.owner) continue;
      const o = owners.get(b.owner) ?? { name: b.ownerName, blocks: [] };
      o.blocks.push(b.cidr);
      owners.set(b.owner, o);
    }
    const { aggregateCidrs } = await import("../../src/ipam/aggregate.js");
    this.snapshot = {
      t: "state",
      at: Date.now(),
      node: { id: st.node.id, name: st.node.name, version: st.node.version, transport: st.node.transport, uptimeMs: st.node.uptimeMs, signal: { url: st.node.signal.url, connected: st.node.signal.connected } },
      peers: st.peers.map((p) => ({
        id: p.id,
        name: p.name,
        state: p.state,
        path: p.path,
        linkType: (p as { linkType?: string | null }).linkType ?? null,
        linkWhy: (p as { linkWhy?: string }).linkWhy ?? "",
        lastWebrtcError: p.lastWebrtcError,
        lastError: p.lastError,
        rttMs: p.rttMs,
        bytesIn: p.bytesIn,
        bytesOut: p.bytesOut,
        pathMtu: p.pathMtu,
        pmtuHow: p.pmtuHow,
        selected: p.selected,
      })),
      routes: this.agent.routes().map((r) => ({ dst: r.dst, name: r.name, via: r.via, costMs: r.costMs, path: r.path })),
      ipam: {
        range: ipam.range,
        owners: [...owners].map(([id, o]) => ({ id, name: o.name, blocks: o.blocks.length, cidrs: aggregateCidrs(o.blocks) })),
        pods: ipam.allocations.length,
      },
      viewers: watching.length,
    };
    for (const v of watching) this.send(v, this.snapshot);
  }
}
