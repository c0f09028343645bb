/**
 * MeshManager: owns one PeerFsm per known peer and drives TransportLinks from their actions.
 * Inputs: presence and forwarded signals (from the signaling client), link events (from the transport),
 * `tick()` (from a timer in the agent). Time comes from the injected clock; no timers live here.
 */
import { nanoid } from "nanoid";
import { AuthError, ProtocolError, WeftError } from "../errors.js";
import type { Identity } from "../identity.js";
import type { Logger } from "../log.js";
import { decodeControl, encodeControl, type ControlMsg } from "../wire/control.js";
import type { PeerInfo, SignalData } from "../wire/signal.js";
import { checkSdpFingerprints, proveLink, proveSdp, verifyLink, verifySdp } from "./auth.js";
import { CTX_BYE, deriveNodeId, signRecord, verifyRecord } from "../identity.js";
import { Upgrade, type UpgradeAction, type UpgradeEvent } from "./upgrade.js";
import { DEFAULT_TIMING, PeerFsm, type PeerAction, type PeerEvent, type PeerState, type PeerTiming } from "./peer.js";
import { AFTER_ICE_CONNECTED, fingerprintString, type Fingerprint, type ChannelName, type LinkSignal, type LinkStats, type SendResult, type Transport, type TransportLink } from "./transport.js";

/** A peer that sends this many undecodable control messages in a row is disconnected. */
export const MAX_BAD_CONTROL = 50;
/**
 * After this many WebRTC attempts in a row that never opened, the offerer dials through the relay (and
 * keeps trying WebRTC in the background). One: a failed attempt already waited a full connect timeout.
 */
export const RELAY_AFTER_FAILURES = 1;
/**
 * Attempts that failed after ICE had connected (a DTLS or SCTP failure: UDP works, e.g. werift's DTLS client
 * failing on a duplicate HelloVerifyRequest on a loaded box) are retried over WebRTC; only this many in a
 * row fall back to the relay.
 */
export const RELAY_AFTER_DTLS_FAILURES = 3;
/**
 * Signals from a node whose presence has not arrived yet are kept this long, at most UNANNOUNCED_MAX_SIGNALS
 * per sender and UNANNOUNCED_MAX_SENDERS senders: the signaling server batches joins (20 ms and more) but
 * forwards signals at once, so a newcomer's offer routinely overtakes its join. Replayed when the join comes.
 */
export const UNANNOUNCED_TTL_MS = 5_000;
export const UNANNOUNCED_MAX_SIGNALS = 32;
export const UNANNOUNCED_MAX_SENDERS = 64;
/** ... and at most this many bytes of them in all (a hostile server cannot make us hold more). */
export const UNANNOUNCED_MAX_BYTES = 1024 * 1024;
/** Added to a relay link's RTT in topology gossip, so routing prefers a path via another agent. */
export const RELAY_RTT_PENALTY_MS = 50;
/** While on the relay, retry WebRTC in the background (upgrade.ts, backoff.ts probeDelay). */
export { PROBE_FIRST_MS, PROBE_MAX_MS } from "./upgrade.js";

export type LinkKind = "webrtc" | "relay";

export interface SignalPort {
  readonly up: boolean;
  send(to: string, data: SignalData): boolean;
}

export interface MeshOptions {
  identity: Identity;
  token: string;
  name: string;
  instance: string;
  version: string;
  transport: Transport;
  /** last-resort transport through the signaling server (agent/transport/relay.ts); absent = no relay */
  relay?: Transport;
  signal: SignalPort;
  iceServers: () => { urls: string | string[]; username?: string; credential?: string }[];
  logger: Logger;
  /** wall clock, ms (topology and hello timestamps, deadlines) */
  now: () => number;
  /** monotonic clock, fractional ms, for `ping` round trips; default `now` */
  monotonic?: () => number;
  /** uniform [0, 1), for backoff jitter; default Math.random */
  random?: () => number;
  /** resolves after `ms` (stop() gives its byes that long to leave); absent: no wait */
  delay?: (ms: number) => Promise<void>;
  timing?: Partial<PeerTiming>;
}

export interface PeerStatus {
  id: string;
  name: string;
  state: PeerState;
  path: "direct" | "relay" | "none";
  /** the kind of the current link, and why the better kind is not in use */
  link: LinkKind | null;
  webrtcFailures: number;
  lastWebrtcError: string | null;
  rttMs: number | null;
  srttMs: number | null;
  bytesIn: number;
  bytesOut: number;
  uptimeMs: number | null;
  offerer: boolean;
  attempts: number;
  lastError: string | null;
  /** ms since anything was last heard from the peer (null: never); gone peers are forgotten after goneTtlMs */
  lastSeenAgoMs: number | null;
  selected: LinkStats["selected"] | null;
  /** Path MTU the link sends with (native transport, once confirmed). */
  pathMtu: number | null;
  /** How pathMtu was found (LinkPmtuHow: confirmed, route-limit, black-hole, peer, default; werift: fixed). */
  pmtuHow: LinkStats["pmtuHow"] | null;
  meta: Record<string, string>;
  version: string | null;
}

interface Entry {
  fsm: PeerFsm;
  info: PeerInfo;
  link: TransportLink | undefined;
  linkConn: string | undefined;
  pendingOffer: string | undefined;
  hello: Extract<ControlMsg, { t: "hello" }> | undefined;
  badControl: number;
  badLogged: boolean;
  /** Candidates that arrived before the offer they belong to (trickle can overtake it): replayed on accept. */
  early: Map<string, LinkSignal[]>;
  linkKind: LinkKind;
  linkOpened: boolean;
  pendingTr: LinkKind;
  webrtcFailures: number;
  /** WebRTC attempts in a row that failed after ICE connected (RELAY_AFTER_DTLS_FAILURES) */
  dtlsFailures: number;
  lastWebrtcError: string | undefined;
  /** a WebRTC attempt running next to a connected relay link (make-before-break upgrade) */
  /** the relay -> WebRTC upgrade (upgrade.ts) and its attempt's link (for upgrade.conn) */
  upgrade: Upgrade;
  probeLink: TransportLink | undefined;
  /** conn ids of offers already accepted from this peer -> their DTLS fingerprint (bounded): replays are ignored */
  seenOffers: Map<string, string>;
  /** per conn: the link-level identity proof (DTLS links carry nothing until the peer's checks) */
  proofs: Map<string, { open: (() => void) | undefined; theirs: Uint8Array | undefined; remote: Fingerprint | undefined; done: boolean }>;
}

export interface MeshCounters {
  badSignal: number;
  badControl: number;
  authFailures: number;
  unknownSender: number;
  linksOpened: number;
  relayLinks: number;
  upgrades: number;
  linksClosed: number;
  dials: number;
  connectTimeouts: number;
  /** signals refused for links that are up: unsigned/forged bye, answers for an open link, replayed or stale offers (a hostile signaling server) */
  ignoredSignals: number;
  /** messages dropped on a link whose peer has not yet proven its identity over it */
  unproven: number;
}

type AppHandler = (from: string, body: unknown) => void;

export class MeshManager {
  private readonly peers = new Map<string, Entry>();
  /** signals that overtook their sender's presence (see UNANNOUNCED_TTL_MS), in arrival order */
  private readonly unannounced = new Map<string, { at: number; bytes: number; list: SignalData[] }>();
  private unannouncedBytes = 0;
  private readonly timing: PeerTiming;
  /** pings waiting for their pong; tick() rejects those past their deadline */
  private readonly pings = new Map<number, { peer: string; resolve: (rtt: number) => void; reject: (e: Error) => void; sentAt: number; deadline: number; timeoutMs: number }>();
  private readonly monotonic: () => number;
  private readonly random: () => number;
  private pingSeq = 1_000_000;
  private readonly appHandlers = new Map<string, AppHandler>();
  private readonly upListeners: ((id: string) => void)[] = [];
  private readonly downListeners: ((id: string) => void)[] = [];
  private readonly drainListeners: ((id: string, ch: ChannelName) => void)[] = [];
  private packetHandler: ((from: string, data: Uint8Array) => void) | undefined;
  private stopped = false;
  /** the signaling server refused to relay (--no-relay): stop dialing relay links */
  relayRefused = false;
  readonly counters: MeshCounters = { badSignal: 0, badControl: 0, authFailures: 0, unknownSender: 0, linksOpened: 0, relayLinks: 0, upgrades: 0, linksClosed: 0, dials: 0, connectTimeouts: 0, ignoredSignals: 0, unproven: 0 };

  constructor(private readonly o: MeshOptions) {
    this.timing = { ...DEFAULT_TIMING, ...o.timing };
    this.monotonic = o.monotonic ?? o.now;
    this.random = o.random ?? Math.random;
  }

  get selfId(): string {
    return this.o.identity.id;
  }

  /** This node's key (the router signs its topology records with it). */
  get identity(): Identity {
    return this.o.identity;
  }

  // ---- inputs from signaling -------------------------------------------------------------------

  onWelcome(peers: PeerInfo[]): void {
    if (this.stopped) return;
    const listed = new Set<string>();
    for (const p of peers) {
      if (p.id === this.selfId) continue;
      listed.add(p.id);
      this.ensure(p);
      this.feed(p.id, { type: "present" });
      this.replayUnannounced(p.id);
    }
    for (const id of [...this.peers.keys()]) if (!listed.has(id)) this.feed(id, { type: "absent" });
  }

  onJoin(p: PeerInfo): void {
    if (this.stopped) return;
    if (p.id === this.selfId) return;
    this.ensure(p);
    this.feed(p.id, { type: "present" });
    this.replayUnannounced(p.id);
  }

  onLeave(id: string): void {
    if (this.stopped) return;
    if (this.peers.has(id)) this.feed(id, { type: "absent" });
  }

  onSignal(from: string, data: SignalData): void {
    if (this.stopped) return; // a late signal must not make a link on a transport being closed
    const e = this.peers.get(from);
    if (!e) {
      this.keepUnannounced(from, data);
      return;
    }
    switch (data.kind) {
      case "offer":
      case "answer": {
        // Signaling passes through an untrusted server: nothing it sends may change a link that is up.
        if (data.kind === "answer" && this.isUp(e, data.conn)) {
          this.ignored(e, "answer for a link that is already open");
          return;
        }
        if (data.kind === "offer" && e.seenOffers.has(data.conn)) {
          this.ignored(e, "replayed offer");
          return;
        }
        try {
          verifySdp({ token: this.o.token, selfId: this.selfId, from, fromPub: e.info.pub, conn: data.conn, sdp: data.sdp, proof: data });
        } catch (err) {
          this.counters.authFailures++;
          const reason = `authentication failed: ${(err as Error).message}`;
          this.o.logger.warn("peer failed authentication; link refused", { peer: from, peerName: e.info.name, reason });
          this.feed(from, { type: "auth-failed", conn: data.kind === "answer" ? data.conn : undefined, reason });
          return;
        }
        if (data.kind === "offer") {
          // A genuine offer from the peer's current run (same DTLS certificate) while our link with it is
          // up: a replay of an older attempt (the signature has no freshness). A peer whose side of the
          // link died sends a signed bye first, which closes ours; a restarted peer has a new certificate.
          const fp = fingerprintString(checkSdpFingerprints(data.sdp));
          const liveFp = e.linkConn !== undefined ? e.seenOffers.get(e.linkConn) : undefined;
          if (!data.probe && e.fsm.state === "connected" && e.linkOpened && liveFp === fp) {
            this.ignored(e, "offer from the same run while the link is up (replay)");
            return;
          }
          e.seenOffers.set(data.conn, fp);
          if (e.seenOffers.size > 32) e.seenOffers.delete(e.seenOffers.keys().next().value!);
          if (data.probe && e.fsm.state === "connected" && !e.fsm.offerer) {
            this.runUpgrade(e, { type: "offer", conn: data.conn }, data.sdp);
            break;
          }
          e.pendingOffer = data.sdp;
          e.pendingTr = data.tr === "relay" ? "relay" : "webrtc";
          this.feed(from, { type: "offer", conn: data.conn });
        } else if (e.link && e.linkConn === data.conn) {
          this.linkSignal(e, { kind: "answer", sdp: data.sdp });
        } else if (e.probeLink && e.upgrade.current(data.conn)) {
          this.signalTo(e.probeLink, e, { kind: "answer", sdp: data.sdp });
        }
        break;
      }
      case "candidate":
        if (this.isUp(e, data.conn)) {
          this.ignored(e, "candidate for a link that is already open");
          return;
        }
        if (e.link && e.linkConn === data.conn) this.linkSignal(e, { kind: "candidate", candidate: data.candidate });
        else if (e.probeLink && e.upgrade.current(data.conn)) this.signalTo(e.probeLink, e, { kind: "candidate", candidate: data.candidate });
        else if (!e.fsm.offerer) {
          // An offer for this conn may still be on its way: keep a few candidates, bounded.
          let q = e.early.get(data.conn);
          if (!q) {
            if (e.early.size >= 4) e.early.delete(e.early.keys().next().value!);
            q = [];
            e.early.set(data.conn, q);
          }
          if (q.length < 64) q.push({ kind: "candidate", candidate: data.candidate });
        }
        break;
      case "bye":
        // Signed by the peer (sendBye) or ignored for a link that is up: the server must not tear links down.
        if (this.isUp(e, data.conn) && !(data.sig && verifyRecord(from, { pub: e.info.pub, sig: data.sig }, CTX_BYE, this.selfId, data.conn))) {
          this.ignored(e, "unsigned or forged bye for a link that is up");
          return;
        }
        if (e.upgrade.current(data.conn)) {
          this.runUpgrade(e, { type: "bye", conn: data.conn });
        } else if (e.link && e.linkConn === data.conn) {
          // The offerer moved to the upgraded link and retired this one: follow it (make-before-break).
          // Its bye can overtake our side of the attempt opening: then follow when it opens (upgrade.ts).
          this.runUpgrade(e, { type: "old-link-bye" });
        }
        break;
    }
  }

  /**
   * A signal from a node we have no presence for: most likely its join is still in the server's batch
   * window. Keep it (bounded, for UNANNOUNCED_TTL_MS) and replay it when the presence comes; without this
   * a newcomer's first offer is lost and its attempt waits out the whole connect timeout.
   */
  private keepUnannounced(from: string, data: SignalData): void {
    this.counters.unknownSender++;
    const now = this.o.now();
    this.expireUnannounced(now);
    const size = 64 + (data.kind === "offer" || data.kind === "answer" ? data.sdp.length : data.kind === "candidate" ? (data.candidate?.candidate.length ?? 0) : 0);
    let q = this.unannounced.get(from);
    if (!q) {
      if (this.unannounced.size >= UNANNOUNCED_MAX_SENDERS) this.dropUnannounced(this.unannounced.keys().next().value!);
      q = { at: now, bytes: 0, list: [] };
      this.unannounced.set(from, q);
    }
    if (q.list.length < UNANNOUNCED_MAX_SIGNALS && this.unannouncedBytes + size <= UNANNOUNCED_MAX_BYTES) {
      q.list.push(data);
      q.bytes += size;
      this.unannouncedBytes += size;
    }
    this.o.logger.debug("signal from a node we have no presence for yet; kept until its join arrives", { from, kind: data.kind, kept: q.list.length });
  }

  private expireUnannounced(now: number): void {
    for (const [id, q] of this.unannounced) if (now - q.at > UNANNOUNCED_TTL_MS) this.dropUnannounced(id);
  }

  private dropUnannounced(id: string): void {
    const q = this.unannounced.get(id);
    if (!q) return;
    this.unannouncedBytes -= q.bytes;
    this.unannounced.delete(id);
  }

  private replayUnannounced(id: string): void {
    const q = this.unannounced.get(id);
    if (!q) return;
    this.dropUnannounced(id);
    if (this.o.now() - q.at > UNANNOUNCED_TTL_MS) return;
    this.o.logger.debug("replaying signals that arrived before the sender's presence", { from: id, signals: q.list.length });
    for (const d of q.list) this.onSignal(id, d);
  }

  // ---- timer -------------------------------------------------------------------------------------

  tick(): void {
    if (this.stopped) return;
    if (this.unannounced.size) this.expireUnannounced(this.o.now());
    for (const id of [...this.peers.keys()]) this.feed(id, { type: "tick", canDial: this.o.signal.up });
    const now = this.o.now();
    for (const e of [...this.peers.values()]) {
      const connected = e.fsm.state === "connected";
      this.runUpgrade(e, { type: "tick", offerer: e.fsm.offerer && connected, onRelay: connected && e.linkKind === "relay", canDial: this.o.signal.up });
    }
    for (const [seq, p] of this.pings) {
      if (now < p.deadline) continue;
      this.pings.delete(seq);
      p.reject(new WeftError("ERR_TIMEOUT", `no answer from ${p.peer} within ${p.timeoutMs} ms`));
    }
  }

  // ---- outputs / API -------------------------------------------------------------------------------

  onApp(ch: string, h: AppHandler): void {
    this.appHandlers.set(ch, h);
  }
  onPacket(h: (from: string, data: Uint8Array) => void): void {
    this.packetHandler = h;
  }
  onPeerUp(f: (id: string) => void): void {
    this.upListeners.push(f);
  }
  onPeerDown(f: (id: string) => void): void {
    this.downListeners.push(f);
  }

  sendApp(peer: string, ch: string, body: unknown): boolean {
    return this.sendControl(peer, { t: "app", ch, body });
  }
  /** Queue a data-plane frame on the peer's packets channel; "closed" when the peer is not connected. */
  sendPacket(peer: string, data: Uint8Array): SendResult {
    const e = this.peers.get(peer);
    if (!e?.link || e.fsm.state !== "connected") return "closed";
    return e.link.send("packets", data);
  }
  /**
   * A direct UDP path to `peer` works now (the agent's bulk link came up with it): a relayed link tries
   * WebRTC at the next tick instead of at the end of its probe backoff (upgrade.ts `path-works`).
   */
  directPathWorks(peer: string): void {
    const e = this.peers.get(peer);
    if (!e || this.stopped) return;
    this.runUpgrade(e, { type: "path-works" });
  }
  /** Bytes queued on the peer's packets channel (the Forwarder's high-water check). */
  queued(peer: string): number {
    const e = this.peers.get(peer);
    if (!e?.link || e.fsm.state !== "connected") return 0;
    return e.link.bufferedAmount("packets");
  }

  private emitDrain(e: Entry, ch: ChannelName): void {
    for (const f of this.drainListeners) f(e.info.id, ch);
  }
  onDrain(f: (peer: string, channel: ChannelName) => void): void {
    this.drainListeners.push(f);
  }
  link(peer: string): TransportLink | undefined {
    const e = this.peers.get(peer);
    return e?.fsm.state === "connected" ? e.link : undefined;
  }
  isConnected(peer: string): boolean {
    return this.peers.get(peer)?.fsm.state === "connected";
  }
  connectedPeers(): string[] {
    return [...this.peers.values()].filter((e) => e.fsm.state === "connected").map((e) => e.info.id);
  }
  /** Live direct links with their windowed-minimum RTT (for topology gossip and routing weights). */
  linkRtts(): { peer: string; rttMs?: number }[] {
    const out: { peer: string; rttMs?: number }[] = [];
    for (const e of this.peers.values()) {
      if (e.fsm.state !== "connected") continue;
      const rtt = e.fsm.pathRttMs;
      const penalty = e.linkKind === "relay" ? RELAY_RTT_PENALTY_MS : 0;
      out.push(rtt === undefined ? (penalty ? { peer: e.info.id, rttMs: penalty } : { peer: e.info.id }) : { peer: e.info.id, rttMs: Math.max(0.01, rtt) + penalty });
    }
    return out;
  }
  /** Every node we know exists (present at the signaling server or linked to us), excluding gone ones. */
  knownPeers(): string[] {
    return [...this.peers.values()].filter((e) => e.fsm.present || e.fsm.state === "connected").map((e) => e.info.id);
  }
  peerName(id: string): string | undefined {
    return this.peers.get(id)?.info.name;
  }
  /** The peer's identity key as the signaling server introduced it (checked against its id there). */
  peerPublicKey(id: string): Uint8Array | undefined {
    return this.peers.get(id)?.info.pub;
  }
  resolvePeer(idOrName: string): string | undefined {
    if (this.peers.has(idOrName)) return idOrName;
    const byName = [...this.peers.values()].filter((e) => e.info.name === idOrName);
    if (byName.length === 1) return byName[0]!.info.id;
    const byPrefix = [...this.peers.keys()].filter((id) => id.startsWith(idOrName));
    return byPrefix.length === 1 ? byPrefix[0] : undefined;
  }

  /** Round trip over the control channel. Rejects if the peer is not connected or does not answer. */
  ping(peer: string, timeoutMs = 3000): Promise<number> {
    const e = this.peers.get(peer);
    if (!e || e.fsm.state !== "connected") return Promise.reject(new WeftError("ERR_NOT_CONNECTED", `peer ${peer} is not connected`));
    const seq = ++this.pingSeq;
    return new Promise((resolve, reject) => {
      this.pings.set(seq, { peer, resolve, reject, sentAt: this.monotonic(), deadline: this.o.now() + timeoutMs, timeoutMs });
      const e = this.peers.get(peer);
      const sent = e?.link && e.fsm.state === "connected" ? e.link.send("control", encodeControl({ t: "ping", seq, ts: this.o.now() })) : "closed";
      if (sent !== "ok") {
        this.pings.delete(seq);
        // "full": the control channel is backed up (e.g. a large gossip burst); try again shortly
        if (sent === "full") reject(new WeftError("ERR_BUSY", `control channel to ${peer} is full (a gossip burst in flight); try again`));
        else reject(new WeftError("ERR_NOT_CONNECTED", `cannot send to ${peer} (${sent})`));
      }
    });
  }

  async status(): Promise<PeerStatus[]> {
    const now = this.o.now();
    const out: PeerStatus[] = [];
    for (const e of this.peers.values()) {
      let stats: LinkStats | undefined;
      if (e.link && e.fsm.state === "connected") {
        try {
          stats = await e.link.stats();
        } catch {
          stats = undefined;
        }
      }
      const f = e.fsm;
      out.push({
        id: e.info.id,
        name: e.info.name,
        state: f.state,
        path: f.state === "connected" ? (e.linkKind === "relay" ? "relay" : "direct") : "none",
        link: f.state === "connected" ? e.linkKind : null,
        webrtcFailures: e.webrtcFailures,
        lastWebrtcError: e.lastWebrtcError ?? null,
        rttMs: f.state === "connected" && f.rttMs !== undefined ? round(f.rttMs) : null,
        srttMs: f.state === "connected" && f.srttMs !== undefined ? round(f.srttMs) : null,
        bytesIn: stats?.bytesReceived ?? 0,
        bytesOut: stats?.bytesSent ?? 0,
        uptimeMs: f.connectedAt !== undefined ? now - f.connectedAt : null,
        offerer: f.offerer,
        attempts: f.attempts,
        lastError: f.lastError ?? null,
        lastSeenAgoMs: f.lastHeardAt !== undefined ? now - f.lastHeardAt : null,
        selected: stats?.selected ?? null,
        pathMtu: stats?.pathMtu ?? null,
        pmtuHow: stats?.pmtuHow ?? null,
        meta: e.info.meta,
        version: e.hello?.version ?? null,
      });
    }
    out.sort((a, b) => a.name.localeCompare(b.name) || a.id.localeCompare(b.id));
    return out;
  }

  /** Graceful: tell every connected peer we leave, then close all links. */
  async stop(reason = "agent stopping"): Promise<void> {
    this.stopped = true;
    for (const e of this.peers.values()) {
      if (e.fsm.state === "connected") this.sendControl(e.info.id, { t: "bye", reason });
    }
    // Give the bye a moment to leave the SCTP queue before tearing the links down.
    await this.o.delay?.(50);
    for (const e of this.peers.values()) {
      e.link?.close();
      e.link = undefined;
      e.probeLink?.close();
      e.probeLink = undefined;
    }
    for (const p of this.pings.values()) p.reject(new WeftError("ERR_STOPPED", "agent stopping"));
    this.pings.clear();
  }

  // ---- internals -----------------------------------------------------------------------------------

  private ensure(p: PeerInfo): Entry {
    let e = this.peers.get(p.id);
    let derived: string | undefined;
    try {
      derived = deriveNodeId(p.pub);
    } catch {
      derived = undefined;
    }
    if (derived !== p.id && e) {
      // Presence comes from the untrusted server: a key that does not derive the id never replaces a good one.
      this.counters.badSignal++;
      return e;
    }
    if (!e) {
      const fsm = new PeerFsm(this.selfId, p.id, this.timing, () => nanoid(12));
      e = { fsm, info: p, link: undefined, linkConn: undefined, pendingOffer: undefined, hello: undefined, badControl: 0, badLogged: false, early: new Map(), linkKind: "webrtc", linkOpened: false, pendingTr: "webrtc", webrtcFailures: 0, dtlsFailures: 0, lastWebrtcError: undefined, upgrade: new Upgrade({ connectTimeoutMs: this.timing.connectTimeoutMs, newConn: () => nanoid(12), random: this.random, lastUpAt: () => fsm.lastUpAt }), probeLink: undefined, seenOffers: new Map(), proofs: new Map() };
      this.peers.set(p.id, e);
    } else {
      e.info = p;
    }
    return e;
  }

  private feed(id: string, ev: PeerEvent): void {
    const e = this.peers.get(id);
    if (!e) return;
    const before = e.fsm.state;
    const actions = e.fsm.handle(ev, this.o.now());
    for (const a of actions) this.perform(e, a);
    const after = e.fsm.state;
    if (before !== after) {
      this.o.logger.debug("peer state", { peer: id, peerName: e.info.name, from: before, to: after, reason: e.fsm.lastError });
      if (after === "connected") {
        this.o.logger.info("peer connected", { peer: id, peerName: e.info.name, link: e.linkKind });
        for (const f of this.upListeners) f(id);
      } else if (before === "connected") {
        this.o.logger.info("peer disconnected", { peer: id, peerName: e.info.name, reason: e.fsm.lastError });
        for (const f of this.downListeners) f(id);
      }
    }
  }

  private perform(e: Entry, a: PeerAction): void {
    const id = e.info.id;
    switch (a.type) {
      case "dial":
      case "accept": {
        this.dropLink(e);
        let kind: LinkKind = "webrtc";
        if (a.type === "dial") {
          this.counters.dials++;
          if (this.o.relay && !this.relayRefused && (e.webrtcFailures >= RELAY_AFTER_FAILURES || e.dtlsFailures >= RELAY_AFTER_DTLS_FAILURES)) kind = "relay";
        } else {
          kind = e.pendingTr;
          if (kind === "relay" && !this.o.relay) {
            this.o.logger.warn("peer offered a relay link but this agent has no relay transport", { peer: id });
            break;
          }
          if (kind === "relay") e.lastWebrtcError ??= "the peer could not connect over WebRTC (ICE) and dialed through the relay";
        }
        const conn = a.conn;
        this.o.logger.debug(a.type === "dial" ? "dialing" : "accepting an offer", { peer: id, conn, kind });
        const link = this.makeLink(e, conn, a.type === "dial", kind);
        e.link = link;
        e.linkConn = conn;
        e.linkKind = kind;
        e.linkOpened = false;
        if (kind === "relay") this.counters.relayLinks++;
        if (a.type === "dial") {
          link.start().catch((err) => this.o.logger.warn("could not create offer", { peer: id, err }));
        } else {
          const sdp = e.pendingOffer;
          e.pendingOffer = undefined;
          if (sdp) this.linkSignal(e, { kind: "offer", sdp });
          for (const c of e.early.get(conn) ?? []) this.linkSignal(e, c);
          e.early.clear();
        }
        break;
      }
      case "close":
        if (/did not open/.test(a.reason)) this.counters.connectTimeouts++;
        if (e.linkConn === a.conn) {
          this.noteFailure(e, a.reason);
          this.sendBye(id, a.conn);
          this.dropLink(e);
        }
        break;
      case "ping":
        this.sendControl(id, { t: "ping", seq: a.seq, ts: this.o.now(), ack: a.ack });
        break;
      case "hello":
        this.sendControl(id, { t: "hello", name: this.o.name, instance: this.o.instance, version: this.o.version, startedAt: this.o.now() });
        break;
      case "remove":
        this.dropLink(e);
        this.peers.delete(id);
        break;
    }
  }

  private makeLink(e: Entry, conn: string, initiator: boolean, kind: LinkKind): TransportLink {
    const id = e.info.id;
    const transport = kind === "relay" ? this.o.relay! : this.o.transport;
    // eslint-disable-next-line prefer-const
    let link: TransportLink;
    link = transport.createLink({
      initiator,
      peer: id,
      conn,
      iceServers: this.o.iceServers(),
      handlers: {
        onSignal: (sig) => this.onLinkSignal(e, conn, sig, kind),
        onOpen: () => {
          // A DTLS link carries nothing until the peer proved over the link itself that it is the node we
          // signalled with: a signature over the two certificates actually negotiated and the conn id.
          if (link.remoteFingerprint) this.beginLinkProof(e, conn, link, () => this.linkOpen(e, conn, kind));
          else this.linkOpen(e, conn, kind);
        },
        onMessage: (ch, data) => this.onLinkMessage(e, conn, ch, data),
        onDrain: (ch) => {
          if (e.linkConn === conn) this.emitDrain(e, ch);
        },
        onClose: (reason) => {
          this.counters.linksClosed++;
          if (e.upgrade.current(conn)) {
            this.runUpgrade(e, { type: "closed", conn, reason });
            return;
          }
          if (e.linkConn === conn) {
            // The link died under us (ICE failed, remote vanished): tell the peer through signaling,
            // so its side of this attempt ends now instead of at its connect timeout.
            this.noteFailure(e, reason);
            e.link = undefined;
            e.linkConn = undefined;
            if (!this.stopped) this.sendBye(id, conn);
          }
          e.proofs.delete(conn);
          this.feed(id, { type: "closed", conn, reason });
        },
      },
    });
    return link;
  }

  /** The link (or upgrade probe) `conn` is open and, where the transport allows, proven: use it. */
  private linkOpen(e: Entry, conn: string, kind: LinkKind): void {
    this.counters.linksOpened++;
    if (e.upgrade.current(conn)) {
      this.runUpgrade(e, { type: "opened", conn, offerer: e.fsm.offerer });
      return;
    }
    if (e.linkConn === conn) {
      e.linkOpened = true;
      if (kind === "webrtc") {
        e.webrtcFailures = 0;
        e.dtlsFailures = 0;
        e.lastWebrtcError = undefined;
      } else this.runUpgrade(e, { type: "relay-open" });
    }
    this.feed(e.info.id, { type: "open", conn });
  }

  /**
   * DTLS is up on `conn`: send our proof over the link and hold the link until the peer's proof checks
   * (it may already have arrived). See mesh/auth.ts proveLink.
   */
  private beginLinkProof(e: Entry, conn: string, link: TransportLink, open: () => void): void {
    const remote = link.remoteFingerprint?.();
    const st = e.proofs.get(conn) ?? { open: undefined, theirs: undefined, remote: undefined, done: false };
    e.proofs.set(conn, st);
    if (!remote) {
      this.linkProofFailed(e, conn, "the DTLS handshake gave no remote certificate");
      return;
    }
    st.remote = remote;
    st.open = open;
    const sent = link.send("control", encodeControl({ t: "auth", sig: proveLink(this.o.identity, e.info.id, conn, this.o.transport.fingerprint, remote) }));
    this.o.logger.debug("link proof sent", { peer: e.info.id, conn, sent, theirsWaiting: !!st.theirs });
    if (st.theirs) this.checkLinkProof(e, conn, st.theirs);
  }

  private checkLinkProof(e: Entry, conn: string, sig: Uint8Array): void {
    const st = e.proofs.get(conn);
    if (!st || st.done) return;
    if (!st.remote || !st.open) {
      st.theirs = sig; // before our own open event: checked then
      return;
    }
    if (!verifyLink({ from: e.info.id, fromPub: e.info.pub, selfId: this.selfId, conn, ours: this.o.transport.fingerprint, theirs: st.remote, sig })) {
      this.linkProofFailed(e, conn, "the peer's proof over the link does not match the DTLS certificates negotiated (a man in the middle, or not the node we signalled with)");
      return;
    }
    st.done = true;
    this.o.logger.debug("link proof checked", { peer: e.info.id, conn });
    const open = st.open;
    st.open = undefined;
    open();
  }

  private linkProofFailed(e: Entry, conn: string, why: string): void {
    this.counters.authFailures++;
    const reason = `authentication failed: ${why}`;
    this.o.logger.warn("link refused: identity proof over the link failed", { peer: e.info.id, peerName: e.info.name, reason });
    e.proofs.delete(conn);
    if (e.upgrade.current(conn)) this.runUpgrade(e, { type: "refused", conn, reason });
    else this.feed(e.info.id, { type: "auth-failed", conn, reason });
  }

  /** A WebRTC attempt that never opened counts towards falling back to the relay. */
  private noteFailure(e: Entry, reason: string): void {
    if (e.linkKind === "webrtc" && !e.linkOpened) {
      if (reason.includes(AFTER_ICE_CONNECTED)) e.dtlsFailures++;
      else e.webrtcFailures++;
      e.lastWebrtcError = reason;
    }
  }

  /** Feed the peer's upgrade state machine and perform what it asks (`offerSdp`: the probe offer to accept). */
  private runUpgrade(e: Entry, ev: UpgradeEvent, offerSdp?: string): void {
    for (const a of e.upgrade.handle(ev, this.o.now())) this.performUpgrade(e, a, offerSdp);
  }

  private performUpgrade(e: Entry, a: UpgradeAction, offerSdp: string | undefined): void {
    const id = e.info.id;
    switch (a.type) {
      case "start": {
        const link = (e.probeLink = this.makeLink(e, a.conn, true, "webrtc"));
        this.o.logger.debug("trying to upgrade a relayed link to WebRTC", { peer: id, attempt: e.upgrade.attempts + 1 });
        link.start().catch((err) => this.o.logger.warn("could not create upgrade offer", { peer: id, err }));
        break;
      }
      case "accept": {
        const link = (e.probeLink = this.makeLink(e, a.conn, false, "webrtc"));
        if (offerSdp !== undefined) this.signalTo(link, e, { kind: "offer", sdp: offerSdp });
        for (const c of e.early.get(a.conn) ?? []) this.signalTo(link, e, c);
        e.early.delete(a.conn);
        break;
      }
      case "end": {
        const link = e.probeLink;
        e.probeLink = undefined;
        if (a.tellPeer && !this.stopped) this.sendBye(id, a.conn);
        link?.close();
        e.lastWebrtcError = a.reason;
        break;
      }
      case "promote":
        this.promote(e, a.conn);
        break;
      case "close-old":
        e.link?.close();
        break;
    }
  }

  /** Make-before-break: the open attempt becomes the link; the old one is retired. */
  private promote(e: Entry, conn: string): void {
    const link = e.probeLink;
    if (!link) return;
    const old = e.link;
    const oldConn = e.linkConn;
    e.probeLink = undefined;
    e.link = link;
    e.linkConn = conn;
    e.linkKind = "webrtc";
    e.linkOpened = true;
    e.webrtcFailures = 0;
    e.dtlsFailures = 0;
    e.lastWebrtcError = undefined;
    this.runUpgrade(e, { type: "promoted" });
    this.counters.upgrades++;
    this.feed(e.info.id, { type: "swap", conn });
    this.o.logger.info("path upgraded: relay -> direct WebRTC", { peer: e.info.id, peerName: e.info.name });
    if (oldConn !== undefined && e.fsm.offerer && !this.stopped) this.sendBye(e.info.id, oldConn);
    old?.close();
    // Frames the Forwarder holds for the old link wait for a drain the old link will never send.
    this.emitDrain(e, "packets");
  }

  /** Does this conn's link prove identities over the link (DTLS transports)? */
  private needsProof(e: Entry, conn: string): boolean {
    const link = e.linkConn === conn ? e.link : e.upgrade.current(conn) ? e.probeLink : undefined;
    return !!link?.remoteFingerprint;
  }

  private newProof(e: Entry, conn: string) {
    const st = { open: undefined, theirs: undefined, remote: undefined, done: false };
    e.proofs.set(conn, st);
    return st;
  }

  /** A bye through signaling, signed with our key (the receiver ignores unsigned ones for links that are up). */
  private sendBye(to: string, conn: string): void {
    this.o.signal.send(to, { kind: "bye", conn, sig: signRecord(this.o.identity, CTX_BYE, to, conn).sig });
  }

  /** Is `conn` this peer's open link or open upgrade probe? */
  private isUp(e: Entry, conn: string): boolean {
    return (e.linkConn === conn && e.linkOpened && e.link !== undefined) || (e.upgrade.state === "open" && e.upgrade.conn === conn);
  }

  private ignored(e: Entry, why: string): void {
    this.counters.ignoredSignals++;
    this.o.logger.debug("ignored a signal that would change a link that is up", { peer: e.info.id, why });
  }

  private signalTo(link: TransportLink, e: Entry, sig: LinkSignal): void {
    link.handleSignal(sig).catch((err) => this.o.logger.warn("could not apply remote signal", { peer: e.info.id, kind: sig.kind, err }));
  }

  private dropLink(e: Entry): void {
    this.runUpgrade(e, { type: "link-replaced" });
    const link = e.link;
    e.link = undefined;
    e.linkConn = undefined;
    link?.close();
  }

  private linkSignal(e: Entry, sig: LinkSignal): void {
    e.link?.handleSignal(sig).catch((err) => this.o.logger.warn("could not apply remote signal", { peer: e.info.id, kind: sig.kind, err }));
  }

  private onLinkSignal(e: Entry, conn: string, sig: LinkSignal, kind: LinkKind): void {
    const probe = e.upgrade.current(conn);
    if (e.linkConn !== conn && !probe) return;
    const to = e.info.id;
    if (sig.kind === "candidate") {
      this.o.signal.send(to, { kind: "candidate", conn, candidate: sig.candidate });
      return;
    }
    try {
      const proof = proveSdp(this.o.identity, this.o.token, to, conn, sig.sdp);
      this.o.signal.send(to, { kind: sig.kind, conn, sdp: sig.sdp, sig: proof.sig, mac: proof.mac, ...(kind === "relay" ? { tr: "relay" as const } : {}), ...(probe ? { probe: true } : {}) });
    } catch (err) {
      this.o.logger.error("cannot sign local SDP", { peer: to, err });
    }
  }

  private sendControl(peer: string, msg: ControlMsg): boolean {
    const e = this.peers.get(peer);
    if (!e?.link || e.fsm.state !== "connected") return false;
    return e.link.send("control", encodeControl(msg)) === "ok";
  }

  private onLinkMessage(e: Entry, conn: string, ch: ChannelName, data: Uint8Array): void {
    // The probe carries traffic too: the peer may already have switched to it.
    if (e.linkConn !== conn && !e.upgrade.current(conn)) return;
    const id = e.info.id;
    const proof = e.proofs.get(conn) ?? (this.needsProof(e, conn) ? this.newProof(e, conn) : undefined);
    if (proof && !proof.done) {
      // Until the peer proved itself over this link only its proof gets through.
      let m: ControlMsg | undefined;
      if (ch === "control") {
        try {
          m = decodeControl(data);
        } catch {
          m = undefined;
        }
      }
      if (m?.t === "auth") this.checkLinkProof(e, conn, m.sig);
      else this.counters.unproven++;
      return;
    }
    if (ch === "packets") {
      this.packetHandler?.(id, data);
      return;
    }
    let msg: ControlMsg;
    try {
      msg = decodeControl(data);
    } catch (err) {
      this.counters.badControl++;
      e.badControl++;
      if (!e.badLogged) {
        e.badLogged = true;
        this.o.logger.warn("dropping malformed control message from peer", { peer: id, peerName: e.info.name, err, code: (err as ProtocolError).code });
      }
      if (e.badControl >= MAX_BAD_CONTROL) {
        this.o.logger.warn("disconnecting peer after repeated malformed control messages", { peer: id, count: e.badControl });
        this.feed(id, { type: "auth-failed", conn, reason: `disconnected after ${e.badControl} malformed control messages` });
      }
      return;
    }
    e.badControl = 0;
    this.feed(id, msg.t === "ping" || msg.t === "pong" ? { type: "heard", ...(msg.ack !== undefined ? { ack: msg.ack } : {}) } : { type: "heard" });
    switch (msg.t) {
      case "hello":
        e.hello = msg;
        break;
      case "ping":
        // Heartbeat pings carry `ack`; RPC pings (ping() below, their own seq space) carry none and are not acked.
        if (msg.ack !== undefined) this.feed(id, { type: "ping-in", seq: msg.seq });
        this.sendControl(id, { t: "pong", seq: msg.seq, ts: msg.ts, ack: e.fsm.heardSeq });
        break;
      case "pong": {
        const p = this.pings.get(msg.seq);
        if (p && p.peer === id) {
          this.pings.delete(msg.seq);
          p.resolve(this.monotonic() - p.sentAt);
        } else {
          this.feed(id, { type: "pong", seq: msg.seq, sentAt: msg.ts });
        }
        break;
      }
      case "bye":
        this.feed(id, { type: "bye", reason: msg.reason });
        break;
      case "app": {
        const h = this.appHandlers.get(msg.ch);
        if (h) {
          try {
            h(id, msg.body);
          } catch (err) {
            this.counters.badControl++;
            this.o.logger.warn("app handler rejected a control message", { peer: id, ch: msg.ch, err });
          }
        }
        break;
      }
    }
  }
}

function round(x: number): number {
  return Math.round(x * 100) / 100;
}

export { AuthError };
