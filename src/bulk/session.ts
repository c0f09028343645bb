/**
 * One peer's bulk link, sans-I/O: the handshake state machine, the keypairs, sealing and opening of
 * datagrams (the hot path), keepalives, and the decision whether the UDP path is up. The agent
 * (agent/transport/bulk.ts) owns the socket, the timers and the control channel, and feeds events in.
 *
 * States (`state`):
 *   idle        nothing yet (the responder waits for the initiator's init)
 *   handshake   the initiator sent init and waits for resp (resent every handshakeRetryMs)
 *   punching    keys agreed; keepalives go to every candidate of the peer until a two-way path exists
 *   up          an authenticated datagram from the peer within deadMs, AND the peer's latest keepalive
 *               (also within deadMs) says it hears us: pod traffic may use the link
 *   off         the peer said bulk is off (or stop()): nothing is sent any more
 *   From up, silence for deadMs (no authenticated datagram, or the peer stops hearing us) goes back to
 *   punching with `reason` saying why: the agent moves traffic back to WebRTC at once.
 *
 * Keypairs (WireGuard's current/previous/next): the initiator installs a new keypair as `current` when
 * resp arrives; the responder installs it as `next` (as `current` when it has none) and promotes it when
 * the first datagram sealed with it arrives, so it never sends with a key the initiator does not hold yet.
 * `previous` keeps opening datagrams still in flight. Rotation: the initiator starts a new handshake when
 * the current keypair is older than rekeyAfterMs or has sealed rekeyAfterBytes; the responder asks for one
 * (`rekey`) on the same conditions for its own sending. A keypair older than rejectAfterMs is never used.
 *
 * Every datagram that does not open is dropped with a typed reason and counted (`drops`); nothing about
 * the session changes (the replay window moves only for datagrams that authenticated).
 */
import { ProtocolError } from "../errors.js";
import type { Aead, AeadAlgorithm, AeadKey } from "./crypto.js";
import { deriveKeys, newEphemeral, type EphemeralKey } from "./crypto.js";
import { ReplayWindow } from "./replay.js";
import { PmtuSearch, type PmtuOutcome, type PmtuStep } from "../mesh/pmtu.js";
import { emptyPmtuCounters, type PmtuCounters } from "../mesh/transport.js";
import { FRAME_VERSION } from "../packet/frame.js";
import { FLAG_SEALED } from "../packet/seal.js";
import {
  BULK_WIRE_VERSION,
  HEADER_LEN,
  INNER_KEEPALIVE,
  INNER_PROBE,
  INNER_PROBE_ACK,
  KEEPALIVE_LEN,
  KEEPALIVE_RX_LEN,
  MAX_CANDIDATES,
  MAX_INNER_FRAME,
  MIN_INNER_FRAME,
  MIN_SEALED_INNER_FRAME,
  SEAL_OVERHEAD,
  TAG_LEN,
  TYPE_DATA,
  decodeBulkControl,
  formatEndpoint,
  parseCandidate,
  type BulkControl,
  type Endpoint,
} from "./wire.js";

export interface BulkTiming {
  keepaliveMs: number;
  deadMs: number;
  handshakeRetryMs: number;
  rekeyAfterMs: number;
  rejectAfterMs: number;
  rekeyAfterBytes: number;
  /** while punching without an answer for this long, spray candidates only every slowPunchMs */
  slowPunchAfterMs: number;
  slowPunchMs: number;
}

export const DEFAULT_BULK_TIMING: BulkTiming = {
  keepaliveMs: 150,
  deadMs: 650,
  handshakeRetryMs: 3000,
  rekeyAfterMs: 120_000,
  rejectAfterMs: 180_000,
  rekeyAfterBytes: 16 * 2 ** 30,
  slowPunchAfterMs: 10_000,
  slowPunchMs: 2000,
};

/** Counter values a keypair may seal before it must be rotated (far below 2^53 and the GCM limits). */
export const REJECT_AFTER_MESSAGES = 2 ** 48;

/**
 * Why a datagram from the peer was dropped. The last four are authenticated datagrams whose inner message
 * is not one we send (wire.ts): `bad-inner` an unknown first byte or a malformed keepalive/probe,
 * `bad-flags` a frame with flag bits other than FLAG_SEALED, `truncated` a frame shorter than its header and
 * one record (and, sealed, the seal's counter and tag), `oversize` longer than MAX_INNER_FRAME.
 */
export const BULK_DROP_REASONS = ["short", "bad-type", "unknown-index", "stale-key", "bad-auth", "replay", "bad-inner", "handshake-rate", "bad-flags", "truncated", "oversize"] as const;

/**
 * Handshake messages (init, resp) a peer may make us process: a bucket of HANDSHAKE_BURST refilled with one
 * every HANDSHAKE_REFILL_MS. Each costs a signature check, an X25519 key pair, HKDF and a signature (~0.2 ms);
 * an honest peer sends one per handshakeRetryMs (3 s) while waiting and one per rotation (2 min), so a peer
 * flooding them is capped at ~5 per second of our CPU; the rest are dropped before any crypto and counted
 * (`handshake-rate`). Only connected mesh peers reach this at all (the control channel is authenticated);
 * UDP datagrams never start a handshake, so a spoofed sender costs at most one index lookup (and one AEAD
 * attempt when it guesses a live receiver index) per datagram.
 */
export const HANDSHAKE_BURST = 5;
export const HANDSHAKE_REFILL_MS = 200;
export type BulkDropReason = (typeof BULK_DROP_REASONS)[number];

export type BulkState = "idle" | "handshake" | "punching" | "up" | "off";

export type BulkEvent =
  | { type: "start" }
  | { type: "cands"; cands: string[] }
  | { type: "control"; body: unknown }
  | { type: "tick" }
  /** the kernel refused a datagram to the peer with EMSGSIZE (above its route MTU / a path MTU learnt from ICMP) */
  | { type: "too-big" }
  | { type: "stop"; reason: string };

export type BulkAction =
  | { type: "control"; body: BulkControl }
  | { type: "send"; to: Endpoint; data: Uint8Array }
  | { type: "index"; add: number[]; del: number[] }
  | { type: "up" }
  | { type: "down"; reason: string };

/** Signing with this node's identity and checking the peer's (both bound by the caller). */
export interface BulkAuthPort {
  sign(...fields: (string | Uint8Array)[]): Uint8Array;
  verifyPeer(sig: Uint8Array, ...fields: (string | Uint8Array)[]): boolean;
}

export interface BulkPeerOptions {
  selfId: string;
  peerId: string;
  aead: Aead;
  algorithm?: AeadAlgorithm;
  auth: BulkAuthPort;
  /** random u32 (receiver indices, handshake ids) */
  random: () => number;
  timing?: Partial<BulkTiming>;
  /** this node's candidates, "a.b.c.d:port" */
  cands: string[];
  /**
   * The largest datagram (UDP payload) this link would send: a full-size pod packet with frame, virtio and
   * seal overhead (default 1464: a 1400-byte packet). The path MTU search (see pathMax) starts there.
   */
  maxDatagram?: number;
  /**
   * The largest datagram the local kernel sends toward `to` with Don't Fragment (route MTU, lowered by ICMP it
   * has cached, less IP and UDP headers); undefined when unknown. Read before every probe: the search never
   * probes above it (such a datagram fails in sendto with EMSGSIZE).
   */
  localLimit?: (to: Endpoint) => number | undefined;
  /** Counters this peer's searches add to (shared by all peers of a BulkService; weftnet_pmtu_* link_type=bulk). */
  pmtuCounters?: PmtuCounters;
  /**
   * Black-hole checks while up (default "on": the periodic confirmation probe and the quick check); "periodic"
   * without the quick check; "off" neither (benchmarks and A/B measurements: WEFTNET_BULK_PMTU_CHECKS).
   */
  pmtuChecks?: "on" | "periodic" | "off";
}

interface Keypair {
  send: AeadKey;
  recv: AeadKey;
  localIdx: number;
  remoteIdx: number;
  createdAt: number;
  counter: number;
  sentBytes: number;
  replay: ReplayWindow;
}

/** Per-peer path MTU status (status JSON, `weftnet status`). */
export interface BulkPmtuStatus {
  /** how pathMax was found: confirmed (maxDatagram acked), searched, local-limit (the route MTU), searching, none */
  how: BulkPmtuHow;
  /** the largest datagram a full-size pod packet needs (the search's top) */
  maxDatagram: number;
  foundAgoMs: number | null;
  searches: number;
  probes: number;
  acked: number;
  lost: number;
  blackHoles: number;
  /** datagrams the kernel refused (EMSGSIZE) */
  tooBig: number;
  unsolicitedAcks: number;
  /** confirmation probes sent early: larger datagrams went out that the peer's keepalives did not report (quick check) */
  quickChecks: number;
}

export type OpenResult = Uint8Array | BulkDropReason | typeof KEEPALIVE;
/** open() consumed a keepalive (nothing to deliver). */
export const KEEPALIVE = 0;

const PUNCHING = "no keepalive both ways yet (UDP blocked, or a NAT that maps per destination)";
/** Smallest datagram the path MTU search assumes (an IPv4 path carries at least 576-byte packets). */
export const PMTU_FLOOR = 548;
/**
 * The safe size (RFC 8899 BASE_PLPMTU): probed first, so the link carries traffic at it one round trip after
 * the path forms, while the search for the largest size goes on.
 */
export const PMTU_BASE = 1200;
/** A probe unanswered after this long (at least; 4 probe round trips on slow paths), twice, counts as lost. */
const PMTU_PROBE_TIMEOUT_MS = 250;
/**
 * Black-hole check: while up, a probe of exactly pathMax goes out this often; lost twice (1 s each) while keepalives
 * still pass, the path no longer carries it (a route change, a smaller link, a middlebox): pathMax falls back
 * and the search runs again. Costs one datagram of pathMax bytes (and a small ack) per interval.
 */
export const PMTU_CONFIRM_MS = 5000;
/** A confirmation probe waits this long for its ack (twice): the link keeps working meanwhile, so no hurry. */
const PMTU_CONFIRM_WAIT_MS = 1000;
/**
 * Quick check (a black hole under traffic, without probing idle links): each keepalive reports the largest
 * datagram its sender received from us in its last two keepalive intervals. When we sent datagrams above
 * PMTU_BASE and no report within PMTU_QUICK_KEEPALIVES keepalive intervals + 2 round trips says one that large
 * arrived, the confirmation probe of pathMax goes out at once (each try waiting PMTU_PROBE_TIMEOUT_MS or 4 round
 * trips) instead of at the next PMTU_CONFIRM_MS. A false alarm (the one large datagram lost at random) costs one
 * probe; at most one quick check per PMTU_QUICK_GAP_MS.
 */
const PMTU_QUICK_KEEPALIVES = 4;
const PMTU_QUICK_GAP_MS = 1000;
/** Search upwards again after this long below maxDatagram (RFC 8899 PMTU_RAISE_TIMER: a path may get better). */
export const PMTU_RAISE_MS = 10 * 60_000;

/** How the peer's current pathMax was found: a search outcome, or still searching (pathMax: the largest acked). */
export type BulkPmtuHow = PmtuOutcome | "searching" | "none";

/** Why a search runs: the first on a new path, a raise attempt, a confirmation (black-hole check), the kernel refused a datagram (EMSGSIZE). */
type SearchKind = "initial" | "raise" | "confirm" | "quick" | "black-hole" | "too-big";

const CAND_KEY = (e: Endpoint) => e.addr * 65536 + e.port;

export class BulkPeer {
  readonly initiator: boolean;
  private readonly t: BulkTiming;
  private readonly algorithm: AeadAlgorithm;
  private _state: BulkState = "idle";
  /** why the link is not up (or "" when up) */
  reason = "waiting for the handshake";
  private cands: string[];
  private peerCands: Endpoint[] = [];
  private current: Keypair | undefined;
  private previous: Keypair | undefined;
  private next: Keypair | undefined;
  private pending: { hs: number; idx: number; eph: EphemeralKey; sentAt: number } | undefined;
  private rekeyAskedAt = -Infinity;
  private announcedAt = -Infinity;
  private peerWantsRekey = false;
  /** where authenticated datagrams come from (WireGuard's roaming) */
  endpoint: Endpoint | undefined;
  private lastHeard = -Infinity;
  /** the last keepalive from the peer */
  private keepaliveHeard = -Infinity;
  /**
   * Path MTU (datagram sizes = UDP payload; src/mesh/pmtu.ts's search, limitMode "clamp"): `pathMax` is the
   * largest datagram the link sends (the largest size the search has seen acked; undefined: none yet, the link
   * is not up). See onTick/pmtuStart.
   */
  pathMax: number | undefined;
  private search: { s: PmtuSearch; kind: SearchKind; id: number } | undefined;
  pmtuHow: BulkPmtuHow = "none";
  private pmtuFoundAt = -Infinity;
  private confirmAt = Infinity;
  private raiseAt = Infinity;
  private nothingPassedAt = -Infinity;
  /** this peer's figures (status); the service-wide counters are `o.pmtuCounters` */
  readonly pmtuStats = { searches: 0, probes: 0, acked: 0, lost: 0, blackHoles: 0, tooBig: 0, unsolicitedAcks: 0, quickChecks: 0 };
  /** receiver: the largest authenticated datagram from the peer in this and the previous keepalive interval */
  private rxMaxNow = 0;
  private rxMaxPrev = 0;
  /** sender: the largest datagram sealed since the last tick (probes excluded) */
  private txMax = 0;
  /** the peer's keepalives report what they received (agents of this version on) */
  private peerReportsRx = false;
  /** quick check: since when datagrams above PMTU_BASE went out that no report has covered yet, and the largest */
  private unreportedSince = Infinity;
  private unreportedMax = 0;
  private quickAt = -Infinity;
  private readonly pmtuCounters: PmtuCounters;
  /** probes and probe acks to send (the hot path queues them; the agent drains them after open(); handle() returns them as actions) */
  readonly pendingSends: { to: Endpoint; data: Uint8Array }[] = [];
  private peerHearsAt = -Infinity;
  readonly maxDatagram: number;
  private punchStartedAt = 0;
  private lastTick = -Infinity;
  private graceUntil = -Infinity;
  private lastKeepalive = -Infinity;
  private hsTokens = HANDSHAKE_BURST;
  private hsRefillAt = -Infinity;
  private peerTs = 0;
  private peerTsAt = 0;
  rttMs: number | undefined;
  readonly drops: Record<BulkDropReason, number> = Object.fromEntries(BULK_DROP_REASONS.map((r) => [r, 0])) as Record<BulkDropReason, number>;
  readonly counters = { handshakes: 0, rotations: 0, ups: 0, downs: 0, badControl: 0, txDatagrams: 0, rxDatagrams: 0, txBytes: 0, rxBytes: 0, keepalivesOut: 0, keepalivesIn: 0 };
  private readonly out: BulkAction[] = [];

  constructor(private readonly o: BulkPeerOptions) {
    this.initiator = o.selfId < o.peerId;
    this.t = { ...DEFAULT_BULK_TIMING, ...o.timing };
    this.algorithm = o.algorithm ?? "aes-256-gcm";
    this.cands = o.cands.slice(0, MAX_CANDIDATES);
    this.maxDatagram = Math.max(PMTU_FLOOR, o.maxDatagram ?? 1464);
    this.pmtuCounters = o.pmtuCounters ?? emptyPmtuCounters();
  }

  get state(): BulkState {
    return this._state;
  }

  /** May pod traffic use the link right now? */
  get up(): boolean {
    return this._state === "up";
  }

  /** Age of the current sending keypair (status). */
  keyAgeMs(now: number): number | undefined {
    return this.current ? now - this.current.createdAt : undefined;
  }

  handle(ev: BulkEvent, now: number): BulkAction[] {
    this.out.length = 0;
    if (this._state === "off" && ev.type !== "stop") return [];
    switch (ev.type) {
      case "start":
        if (this.initiator && !this.pending && !this.current) this.sendInit(now);
        // The responder announces itself (a peer without a bulk link answers `off`, see refuseBulk).
        else if (!this.initiator && !this.current) this.announce(now);
        break;
      case "cands":
        this.cands = ev.cands.slice(0, MAX_CANDIDATES);
        if (this.current || this.next) this.out.push({ type: "control", body: { t: "cands", v: BULK_WIRE_VERSION, cands: this.cands } });
        break;
      case "control":
        this.onControl(ev.body, now);
        break;
      case "tick":
        this.onTick(now);
        break;
      case "too-big":
        this.onTooBig(now);
        break;
      case "stop":
        this.shutdown(ev.reason);
        break;
    }
    for (const x of this.pendingSends.splice(0)) this.out.push({ type: "send", to: x.to, data: x.data });
    return this.out.splice(0);
  }

  // ---- handshake ----------------------------------------------------------------------------------------

  private ids(): { initiator: string; responder: string } {
    return this.initiator ? { initiator: this.o.selfId, responder: this.o.peerId } : { initiator: this.o.peerId, responder: this.o.selfId };
  }

  private announce(now: number): void {
    this.announcedAt = now;
    this.out.push({ type: "control", body: { t: "cands", v: BULK_WIRE_VERSION, cands: this.cands } });
  }

  private sendInit(now: number): void {
    const eph = newEphemeral();
    const hs = this.o.random();
    const idx = this.freshIndex();
    this.pending = { hs, idx, eph, sentAt: now };
    const { initiator, responder } = this.ids();
    const sig = this.o.auth.sign("init", initiator, responder, String(hs), String(idx), eph.pub, this.cands.join(","));
    if (this._state === "idle") this._state = "handshake";
    this.counters.handshakes++;
    this.out.push({ type: "control", body: { t: "init", v: BULK_WIRE_VERSION, hs, idx, eph: eph.pub, cands: this.cands, sig } });
  }

  private freshIndex(): number {
    for (;;) {
      const i = this.o.random() >>> 0;
      if (i !== this.current?.localIdx && i !== this.previous?.localIdx && i !== this.next?.localIdx && i !== this.pending?.idx) return i;
    }
  }

  /** Token bucket of handshake messages (see HANDSHAKE_BURST). */
  private handshakeAllowed(now: number): boolean {
    if (this.hsRefillAt === -Infinity) this.hsRefillAt = now;
    const add = Math.floor((now - this.hsRefillAt) / HANDSHAKE_REFILL_MS);
    if (add > 0) {
      this.hsTokens = Math.min(HANDSHAKE_BURST, this.hsTokens + add);
      this.hsRefillAt = this.hsTokens === HANDSHAKE_BURST ? now : this.hsRefillAt + add * HANDSHAKE_REFILL_MS;
    }
    if (this.hsTokens <= 0) return false;
    this.hsTokens--;
    return true;
  }

  private onControl(body: unknown, now: number): void {
    let m: BulkControl;
    try {
      m = decodeBulkControl(body);
    } catch (e) {
      this.counters.badControl++;
      if (e instanceof ProtocolError) return;
      throw e;
    }
    if ((m.t === "init" || m.t === "resp") && !this.handshakeAllowed(now)) {
      this.dropped("handshake-rate");
      return;
    }
    switch (m.t) {
      case "init": {
        if (this.initiator) {
          this.counters.badControl++; // both think they initiate: impossible with distinct ids
          return;
        }
        const { initiator, responder } = this.ids();
        if (!this.o.auth.verifyPeer(m.sig, "init", initiator, responder, String(m.hs), String(m.idx), m.eph, m.cands.join(","))) {
          this.counters.badControl++;
          return;
        }
        const eph = newEphemeral();
        let keys;
        try {
          keys = deriveKeys(this.algorithm, eph, m.eph, { initiator, responder, hs: m.hs, ePubI: m.eph, ePubR: eph.pub });
        } catch {
          this.counters.badControl++;
          return;
        }
        this.setPeerCands(m.cands);
        const idx = this.freshIndex();
        const kp = this.keypair(keys.r2i, keys.i2r, idx, m.idx, now);
        const sig = this.o.auth.sign("resp", initiator, responder, String(m.hs), String(m.idx), m.eph, String(idx), eph.pub, this.cands.join(","));
        this.out.push({ type: "control", body: { t: "resp", v: BULK_WIRE_VERSION, hs: m.hs, idx, eph: eph.pub, cands: this.cands, sig } });
        this.counters.handshakes++;
        const del: number[] = [];
        if (this.next) del.push(this.next.localIdx);
        if (this.current && now - this.current.createdAt < this.t.rejectAfterMs) {
          this.next = kp;
        } else {
          if (this.current) del.push(this.current.localIdx);
          this.current = kp;
          this.next = undefined;
          this.startPunching(now, this._state === "up" ? undefined : PUNCHING);
        }
        this.out.push({ type: "index", add: [idx], del });
        return;
      }
      case "resp": {
        const p = this.pending;
        if (!this.initiator || !p || m.hs !== p.hs) {
          this.counters.badControl++;
          return;
        }
        const { initiator, responder } = this.ids();
        if (!this.o.auth.verifyPeer(m.sig, "resp", initiator, responder, String(m.hs), String(p.idx), p.eph.pub, String(m.idx), m.eph, m.cands.join(","))) {
          this.counters.badControl++;
          return;
        }
        let keys;
        try {
          keys = deriveKeys(this.algorithm, p.eph, m.eph, { initiator, responder, hs: m.hs, ePubI: p.eph.pub, ePubR: m.eph });
        } catch {
          this.counters.badControl++;
          return;
        }
        this.pending = undefined;
        this.peerWantsRekey = false;
        this.setPeerCands(m.cands);
        const kp = this.keypair(keys.i2r, keys.r2i, p.idx, m.idx, now);
        const del: number[] = [];
        if (this.previous) del.push(this.previous.localIdx);
        if (this.current) this.counters.rotations++;
        this.previous = this.current;
        this.current = kp;
        this.out.push({ type: "index", add: [p.idx], del });
        if (this._state !== "up") this.startPunching(now, PUNCHING);
        // Confirm the new key to the responder at once (it promotes `next` on the first datagram).
        this.keepalive(now, this.endpoint && now - this.lastHeard < this.t.deadMs ? [this.endpoint] : this.peerCands);
        return;
      }
      case "cands":
        this.setPeerCands(m.cands);
        return;
      case "rekey":
        if (this.initiator) this.peerWantsRekey = true;
        return;
      case "off":
        this.shutdown(`the peer turned the bulk link off${m.reason ? `: ${m.reason}` : ""}`);
        return;
    }
  }

  private keypair(send: AeadKey, recv: AeadKey, localIdx: number, remoteIdx: number, now: number): Keypair {
    return { send, recv, localIdx, remoteIdx, createdAt: now, counter: 0, sentBytes: 0, replay: new ReplayWindow() };
  }

  private setPeerCands(list: string[]): void {
    const seen = new Set<number>();
    this.peerCands = [];
    for (const c of list) {
      const e = parseCandidate(c);
      if (!e || seen.has(CAND_KEY(e))) continue;
      seen.add(CAND_KEY(e));
      this.peerCands.push(e);
    }
  }

  private startPunching(now: number, reason: string | undefined): void {
    if (this._state !== "up") {
      this._state = "punching";
      if (reason) this.reason = reason;
      this.punchStartedAt = now;
    }
  }

  private shutdown(reason: string): void {
    const wasUp = this._state === "up";
    const del = [this.current, this.previous, this.next].filter((k): k is Keypair => !!k).map((k) => k.localIdx);
    this.current = this.previous = this.next = undefined;
    this.pending = undefined;
    this._state = "off";
    this.reason = reason;
    if (del.length) this.out.push({ type: "index", add: [], del });
    if (wasUp) {
      this.counters.downs++;
      this.out.push({ type: "down", reason });
    }
  }

  // ---- timers -------------------------------------------------------------------------------------------

  private onTick(now: number): void {
    const t = this.t;
    // Handshake retry / rotation (initiator), rotation request (responder).
    if (this.initiator) {
      if (this.pending) {
        if (now - this.pending.sentAt >= t.handshakeRetryMs) this.sendInit(now);
      } else if (this._state === "idle" || !this.current || now - this.current.createdAt >= t.rekeyAfterMs || this.current.sentBytes >= t.rekeyAfterBytes || this.current.counter >= REJECT_AFTER_MESSAGES / 2 || this.peerWantsRekey) {
        this.sendInit(now);
      }
    } else if (!this.current && this._state === "idle" && this.announcedAt > -Infinity && now - this.announcedAt >= t.handshakeRetryMs) {
      this.announce(now); // no init yet: say again that we are here (the first may have crossed a link change)
    } else if (this.current && (now - this.current.createdAt >= t.rekeyAfterMs + t.handshakeRetryMs || this.current.sentBytes >= t.rekeyAfterBytes) && now - this.rekeyAskedAt >= t.handshakeRetryMs) {
      this.rekeyAskedAt = now;
      this.out.push({ type: "control", body: { t: "rekey", v: BULK_WIRE_VERSION } });
    }
    if (this.previous && now - this.previous.createdAt >= t.rejectAfterMs) {
      this.out.push({ type: "index", add: [], del: [this.previous.localIdx] });
      this.previous = undefined;
    }
    if (!this.current) return;
    if (now - this.current.createdAt >= t.rejectAfterMs) {
      // No fresh keys in time (the handshake keeps failing): the old key must not be used any more.
      const del = [this.current.localIdx];
      this.current = undefined;
      this.out.push({ type: "index", add: [], del });
      this.goDown(now, "keys expired: the handshake to rotate them did not complete");
      this._state = this.initiator ? "handshake" : "idle";
      return;
    }
    // Path liveness. After a stall of our own (the event loop was blocked: ticks came late), datagrams may
    // wait unread in the socket: judge silence only from a tick that follows a timely one.
    // (and give the peer's keepalives, which it could not send while it stalled too, time to arrive).
    if (now - this.lastTick > t.deadMs / 2) this.graceUntil = now + t.deadMs;
    this.lastTick = now;
    const stalled = now < this.graceUntil;
    const heard = now - this.lastHeard < t.deadMs;
    const hearsUs = now - this.peerHearsAt < t.deadMs;
    if (this._state === "up" && !(heard && hearsUs) && !stalled) {
      this.goDown(now, !heard ? `silent: no datagram from the peer for ${t.deadMs} ms` : "one-way: the peer does not hear our datagrams");
    } else if (this._state === "punching" && heard && hearsUs && this.pathMax === undefined) {
      if (!this.search && now - this.nothingPassedAt >= 5000) this.pmtuStart(now, "initial");
      else if (this.search) this.pmtuTick(now);
      if (this.pathMax === undefined && this.nothingPassedAt > -Infinity) this.reason = `path MTU: not even ${PMTU_FLOOR}-byte datagrams reach the peer`;
      else if (this.pathMax === undefined) this.reason = "path MTU: waiting for the first probe's ack";
    }
    if (this._state === "punching" && heard && hearsUs && this.pathMax !== undefined) {
      this._state = "up";
      this.reason = "";
      this.counters.ups++;
      this.out.push({ type: "up" });
    }
    const sent = this.txMax;
    this.txMax = 0;
    if (this._state === "up" && !stalled) {
      // (not right after a stall of our own: acks may wait unread in the socket)
      if (this.search) this.pmtuTick(now);
      else if (this.quickDue(now, sent)) this.pmtuStart(now, "quick");
      else if (now >= this.confirmAt && this.o.pmtuChecks !== "off") this.pmtuStart(now, "confirm");
      else if (now >= this.raiseAt) this.pmtuStart(now, "raise");
    }
    // Keepalives: to the endpoint on a live path, to every candidate while punching (slower after a while).
    const live = this.endpoint !== undefined && heard;
    const interval = live || now - this.punchStartedAt < t.slowPunchAfterMs ? t.keepaliveMs : t.slowPunchMs;
    if (now - this.lastKeepalive >= interval) {
      const targets = live ? [this.endpoint!] : this.punchTargets();
      this.keepalive(now, targets);
    }
  }

  private punchTargets(): Endpoint[] {
    const e = this.endpoint;
    if (!e || this.peerCands.some((c) => c.addr === e.addr && c.port === e.port)) return this.peerCands;
    return [e, ...this.peerCands];
  }

  private goDown(now: number, reason: string): void {
    this.pmtuForget();
    if (this._state === "up") {
      this.counters.downs++;
      this.out.push({ type: "down", reason });
    }
    this._state = "punching";
    this.reason = reason;
    this.punchStartedAt = now;
  }

  private keepalive(now: number, targets: Endpoint[]): void {
    const kp = this.current;
    if (!kp || targets.length === 0) return;
    this.lastKeepalive = now;
    const innerLen = KEEPALIVE_RX_LEN;
    const inner = new Uint8Array(innerLen);
    const dv = new DataView(inner.buffer);
    inner[0] = INNER_KEEPALIVE;
    inner[1] = now - this.keepaliveHeard < this.t.deadMs ? 1 : 0;
    dv.setFloat64(2, now, true);
    dv.setFloat64(10, this.peerTs, true);
    dv.setFloat64(18, this.peerTsAt ? now - this.peerTsAt : 0, true);
    dv.setUint16(26, Math.min(0xffff, Math.max(this.rxMaxNow, this.rxMaxPrev)), true);
    this.rxMaxPrev = this.rxMaxNow;
    this.rxMaxNow = 0;
    for (const to of targets) {
      const data = new Uint8Array(innerLen + SEAL_OVERHEAD);
      data.set(inner, HEADER_LEN);
      const n = this.seal(data, 0, innerLen);
      if (n < 0) return;
      this.counters.keepalivesOut++;
      this.out.push({ type: "send", to, data });
    }
  }

  // ---- path MTU search -----------------------------------------------------------------------------------
  //
  // src/mesh/pmtu.ts decides (stop-and-wait, ascending), this driver sends: a probe is one sealed datagram of
  // exactly the size tried (INNER_PROBE, zero padding), the socket sets Don't Fragment (agent/os/udp.ts), the
  // peer acks it with a small INNER_PROBE_ACK naming the search's id and the size. Searches:
  //   initial     when the path forms: PMTU_BASE first (the link comes up once it is acked), then maxDatagram,
  //               then coarse/fine steps; pathMax follows the largest acked size as the search goes on;
  //   confirm     every PMTU_CONFIRM_MS while up: one probe of pathMax. Lost (twice) while keepalives pass: a
  //               black hole; pathMax is forgotten (traffic takes WebRTC for a round trip) and a search like
  //               the initial one runs, never above the lost size;
  //   raise       every PMTU_RAISE_MS below maxDatagram: from pathMax (known good) upwards;
  //   too-big     the kernel refused a datagram (EMSGSIZE: route MTU, or ICMP "fragmentation needed" it
  //               learnt): pathMax drops to the local limit at once and the search verifies what lies below.
  // Every search reads the local limit (the kernel's path MTU toward the endpoint) before each probe.

  /**
   * Quick check (PMTU_QUICK_KEEPALIVES): `sent` is the largest datagram sealed since the last tick. True when
   * datagrams above PMTU_BASE went out long enough ago that the peer's report should have covered them, and
   * none did (the confirmation probe then goes out now).
   */
  private quickDue(now: number, sent: number): boolean {
    if (!this.peerReportsRx || this.pathMax === undefined || (this.o.pmtuChecks ?? "on") !== "on") return false;
    if (sent > PMTU_BASE) {
      if (this.unreportedSince === Infinity) this.unreportedSince = now;
      if (sent > this.unreportedMax) this.unreportedMax = sent;
    }
    if (this.unreportedSince === Infinity || now - this.quickAt < PMTU_QUICK_GAP_MS) return false;
    if (now - this.unreportedSince < PMTU_QUICK_KEEPALIVES * this.t.keepaliveMs + 2 * (this.rttMs ?? 0)) return false;
    this.quickAt = now;
    this.unreportedSince = Infinity;
    this.unreportedMax = 0;
    this.pmtuStats.quickChecks++;
    return true;
  }

  /** A keepalive's report: the largest datagram the peer received from us lately. */
  private onRxReport(size: number): void {
    this.peerReportsRx = true;
    if (size >= this.unreportedMax) {
      this.unreportedSince = Infinity;
      this.unreportedMax = 0;
    }
  }

  private pmtuStart(now: number, kind: SearchKind): void {
    const to = this.endpoint;
    if (!to || !this.current) return;
    let s: PmtuSearch;
    const limit = this.o.localLimit ? () => this.o.localLimit!(to) : undefined;
    const common = { tries: 2, minWaitMs: PMTU_PROBE_TIMEOUT_MS, limitMode: "clamp" as const, ...(limit ? { localLimit: limit } : {}) };
    if (kind === "confirm" || kind === "quick") {
      // one size: pathMax (lo = pathMax - 1 only makes "lost" end the search as "searched"); a quick check has
      // evidence already (large datagrams went unreported), so its tries wait like a search's
      s = new PmtuSearch({ ...common, lo: this.pathMax! - 1, hi: this.pathMax!, fine: 4 * this.maxDatagram, minWaitMs: kind === "quick" ? PMTU_PROBE_TIMEOUT_MS : PMTU_CONFIRM_WAIT_MS });
    } else if (kind === "raise") {
      s = new PmtuSearch({ ...common, lo: this.pathMax!, hi: this.maxDatagram });
    } else {
      // after a black hole: the lost size once more first (a false alarm then costs nothing), never above it
      const hi = kind === "black-hole" ? this.pmtuLostAt : this.maxDatagram;
      s = new PmtuSearch({ ...common, lo: PMTU_FLOOR, hi, first: PMTU_BASE });
    }
    this.search = { s, kind, id: this.o.random() >>> 0 };
    this.confirmAt = this.raiseAt = Infinity;
    if (kind !== "confirm" && kind !== "quick") {
      this.pmtuStats.searches++;
      this.pmtuHow = "searching";
    }
    this.pmtuApply(s.handle({ kind: "start" }, now), now);
  }

  /** The size a confirmation lost (the black-hole search stays below it). */
  private pmtuLostAt = 0;

  private pmtuTick(now: number): void {
    const sr = this.search!;
    const lostBefore = sr.s.stats.lost;
    const step = sr.s.handle({ kind: "tick" }, now);
    const lost = sr.s.stats.lost - lostBefore;
    if (lost > 0) {
      this.pmtuStats.lost += lost;
      this.pmtuCounters.lost += lost;
    }
    this.pmtuApply(step, now);
  }

  /** Carry out a search step: send a probe, or take the answer. */
  private pmtuApply(step: PmtuStep, now: number): void {
    const sr = this.search;
    if (!sr) return;
    if (step.probe !== undefined) {
      this.sendProbe(step.probe, sr.id);
      return;
    }
    if (!step.done) return;
    this.search = undefined;
    const { mtu, outcome } = step.done;
    const s = sr.s;
    if (sr.kind === "confirm" || sr.kind === "quick") {
      if (outcome === "local-limit") {
        // the kernel's limit toward the peer fell below pathMax (a route change, ICMP): as on EMSGSIZE
        this.limitFell(now);
        return;
      }
      if (outcome === "confirmed") {
        this.confirmAt = now + PMTU_CONFIRM_MS;
        this.raiseAt = this.pathMax! < this.maxDatagram ? this.pmtuFoundAt + PMTU_RAISE_MS : Infinity;
        return;
      }
      // pathMax-sized datagrams stopped reaching the peer while small ones do: a black hole.
      this.pmtuStats.blackHoles++;
      this.pmtuCounters.blackHoles++;
      this.pmtuLostAt = this.pathMax!;
      this.pathMax = undefined;
      this.pmtuStart(now, "black-hole");
      return;
    }
    this.pmtuCounters.searches[outcome]++;
    if (s.stats.acked === 0 && s.stats.probes > 0 && sr.kind !== "raise") {
      // Not even the smallest size was acked (or the link went quiet): try again in a while.
      this.pathMax = undefined;
      this.pmtuHow = "none";
      this.nothingPassedAt = now;
      return;
    }
    this.pathMax = mtu;
    this.pmtuHow = outcome;
    this.pmtuFoundAt = now;
    this.confirmAt = now + PMTU_CONFIRM_MS;
    this.raiseAt = mtu < this.maxDatagram ? now + PMTU_RAISE_MS : Infinity;
  }

  /** The path went down or changed: nothing known holds. */
  private pmtuForget(): void {
    this.search = undefined;
    this.pathMax = undefined;
    this.pmtuHow = "none";
    this.confirmAt = this.raiseAt = Infinity;
    this.nothingPassedAt = -Infinity;
    this.unreportedSince = Infinity;
    this.unreportedMax = 0;
  }

  /** EMSGSIZE on a send (counted by the agent per datagram): the local limit may be below pathMax now. */
  private onTooBig(now: number): void {
    this.pmtuStats.tooBig++;
    this.limitFell(now);
  }

  /** pathMax drops to the local limit at once; a search verifies what the path behind it carries. */
  private limitFell(now: number): void {
    const to = this.endpoint;
    if (this._state !== "up" || !to || this.pathMax === undefined) return;
    const limit = this.o.localLimit?.(to);
    if (limit === undefined || limit >= this.pathMax) {
      if (!this.search) this.confirmAt = now + PMTU_CONFIRM_MS;
      return;
    }
    this.pathMax = Math.max(PMTU_FLOOR, limit & ~3);
    if (this.search?.kind !== "too-big") {
      this.search = undefined;
      this.pmtuStart(now, "too-big");
    }
  }

  private sendProbe(size: number, id: number): void {
    const to = this.endpoint;
    if (!to) return;
    const data = new Uint8Array(size);
    const inner = data.subarray(HEADER_LEN, size - SEAL_OVERHEAD + HEADER_LEN);
    inner[0] = INNER_PROBE;
    new DataView(inner.buffer, inner.byteOffset).setUint32(1, id, true);
    const txMax = this.txMax; // probes are not traffic the quick check watches (a raise's probe may well be lost)
    const n = this.seal(data, 0, size - SEAL_OVERHEAD);
    this.txMax = txMax;
    if (n < 0) return;
    this.pmtuStats.probes++;
    this.pmtuCounters.probes++;
    this.pendingSends.push({ to, data });
  }

  /** The peer acknowledged a probe (`id`: which search; `size`: the datagram's length as it arrived). */
  private onProbeAck(id: number, size: number, now: number): void {
    const sr = this.search;
    if (!sr || sr.id !== id) {
      this.pmtuStats.unsolicitedAcks++;
      this.pmtuCounters.drops["unsolicited-ack"] = (this.pmtuCounters.drops["unsolicited-ack"] ?? 0) + 1;
      return;
    }
    const before = sr.s.stats.acked;
    const drops = { ...sr.s.stats.drops };
    const step = sr.s.handle({ kind: "ack", size }, now);
    if (sr.s.stats.acked > before) {
      this.pmtuStats.acked++;
      this.pmtuCounters.acked++;
      // Traffic may use every size acked so far (a raise never lowers, a confirmation never changes pathMax).
      if (sr.kind !== "confirm" && sr.kind !== "quick" && (this.pathMax === undefined || size > this.pathMax)) this.pathMax = size;
    }
    for (const [k, v] of Object.entries(sr.s.stats.drops)) if (v > drops[k as keyof typeof drops]) this.pmtuCounters.drops[k] = (this.pmtuCounters.drops[k] ?? 0) + v - drops[k as keyof typeof drops];
    this.pmtuApply(step, now);
  }

  // ---- hot path -----------------------------------------------------------------------------------------

  /** Room `seal` needs beyond the plaintext. */
  static readonly OVERHEAD = SEAL_OVERHEAD;

  /**
   * Seal one inner message in place: it is buf[off+16, off+16+len) (HEADER_LEN bytes of room before it for
   * the header, TAG_LEN after it for the tag). Returns the datagram length (len + 32), or -1 when there is
   * no usable sending key.
   */
  seal(buf: Uint8Array, off: number, len: number): number {
    const kp = this.current;
    if (!kp || kp.counter >= REJECT_AFTER_MESSAGES) return -1;
    const counter = kp.counter++;
    buf[off] = TYPE_DATA;
    buf[off + 1] = 0;
    buf[off + 2] = 0;
    buf[off + 3] = 0;
    const ri = kp.remoteIdx;
    buf[off + 4] = ri & 255;
    buf[off + 5] = (ri >>> 8) & 255;
    buf[off + 6] = (ri >>> 16) & 255;
    buf[off + 7] = ri >>> 24;
    let lo = counter >>> 0;
    let hi = Math.floor(counter / 0x1_0000_0000);
    for (let i = 0; i < 4; i++, lo >>>= 8) buf[off + 8 + i] = lo & 255;
    for (let i = 0; i < 4; i++, hi >>>= 8) buf[off + 12 + i] = hi & 255;
    const n = this.o.aead.seal(kp.send, counter, buf, off, len);
    kp.sentBytes += n;
    this.counters.txDatagrams++;
    this.counters.txBytes += n + HEADER_LEN;
    if (n + HEADER_LEN > this.txMax) this.txMax = n + HEADER_LEN;
    return n + HEADER_LEN;
  }

  /** The keypair a datagram names (its receiver index), if it is one of ours. */
  static receiverIndex(d: Uint8Array): number {
    return (d[4]! | (d[5]! << 8) | (d[6]! << 16) | (d[7]! << 24)) >>> 0;
  }

  /**
   * Open one datagram that came from `from`. Returns the inner frame, KEEPALIVE, or a drop reason (counted).
   */
  open(d: Uint8Array, from: Endpoint, now: number): OpenResult {
    if (d.byteLength < SEAL_OVERHEAD + 1) return this.dropped("short");
    if (d[0] !== TYPE_DATA) return this.dropped("bad-type");
    const idx = BulkPeer.receiverIndex(d);
    const kp = this.current?.localIdx === idx ? this.current : this.next?.localIdx === idx ? this.next : this.previous?.localIdx === idx ? this.previous : undefined;
    if (!kp) return this.dropped("unknown-index");
    if (now - kp.createdAt >= this.t.rejectAfterMs) return this.dropped("stale-key");
    const lo = (d[8]! | (d[9]! << 8) | (d[10]! << 16) | (d[11]! << 24)) >>> 0;
    const hi = (d[12]! | (d[13]! << 8) | (d[14]! << 16) | (d[15]! << 24)) >>> 0;
    if (hi >= 0x10000) return this.dropped("replay"); // beyond REJECT_AFTER_MESSAGES: never sent by a peer of ours
    const counter = hi * 0x1_0000_0000 + lo;
    const inner = this.o.aead.open(kp.recv, counter, d);
    if (!inner) return this.dropped("bad-auth");
    if (!kp.replay.validate(counter, REJECT_AFTER_MESSAGES)) return this.dropped("replay");
    if (kp === this.next) {
      // The initiator uses the new keypair: so do we.
      const del = this.previous ? [this.previous.localIdx] : [];
      this.previous = this.current;
      this.current = kp;
      this.next = undefined;
      this.counters.rotations++;
      if (del.length) this.pendingIndexDel.push(...del);
    }
    this.lastHeard = now;
    if (!this.endpoint || this.endpoint.addr !== from.addr || this.endpoint.port !== from.port) this.endpoint = { addr: from.addr, port: from.port };
    this.counters.rxDatagrams++;
    this.counters.rxBytes += d.byteLength;
    if (d.byteLength > this.rxMaxNow) this.rxMaxNow = d.byteLength;
    if (inner.byteLength === 0) return this.dropped("bad-inner");
    if (inner[0] === INNER_PROBE) {
      // Answer with a small ack naming the probe and its size (the datagram's length).
      if (inner.byteLength < 5) return this.dropped("bad-inner");
      const id = (inner[1]! | (inner[2]! << 8) | (inner[3]! << 16) | (inner[4]! << 24)) >>> 0;
      const ack = new Uint8Array(HEADER_LEN + 7 + TAG_LEN);
      ack[HEADER_LEN] = INNER_PROBE_ACK;
      const dv = new DataView(ack.buffer);
      dv.setUint32(HEADER_LEN + 1, id, true);
      dv.setUint16(HEADER_LEN + 5, d.byteLength, true);
      if (this.seal(ack, 0, 7) > 0) this.pendingSends.push({ to: { addr: from.addr, port: from.port }, data: ack });
      return KEEPALIVE;
    }
    if (inner[0] === INNER_PROBE_ACK) {
      if (inner.byteLength < 7) return this.dropped("bad-inner");
      const id = (inner[1]! | (inner[2]! << 8) | (inner[3]! << 16) | (inner[4]! << 24)) >>> 0;
      this.onProbeAck(id, inner[5]! | (inner[6]! << 8), now);
      return KEEPALIVE;
    }
    if (inner[0] === INNER_KEEPALIVE) {
      if (inner.byteLength < KEEPALIVE_LEN) return this.dropped("bad-inner");
      this.counters.keepalivesIn++;
      this.keepaliveHeard = now;
      const dv = new DataView(inner.buffer, inner.byteOffset, inner.byteLength);
      if (inner[1]! & 1) this.peerHearsAt = now;
      this.peerTs = dv.getFloat64(2, true);
      this.peerTsAt = now;
      const echo = dv.getFloat64(10, true);
      const held = dv.getFloat64(18, true);
      if (inner.byteLength >= KEEPALIVE_RX_LEN) this.onRxReport(dv.getUint16(26, true));
      if (echo > 0 && echo <= now && held >= 0) {
        const rtt = now - echo - held;
        if (rtt >= 0 && rtt < 60_000) this.rttMs = this.rttMs === undefined ? rtt : this.rttMs * 0.75 + rtt * 0.25;
      }
      return KEEPALIVE;
    }
    // A data-plane frame: one packet record (0x10) or one whole frame sealed end to end (0x11), see wire.ts.
    const vf = inner[0]!;
    if (vf >> 4 !== FRAME_VERSION) return this.dropped("bad-inner");
    if ((vf & 0x0f & ~FLAG_SEALED) !== 0) return this.dropped("bad-flags");
    if (inner.byteLength < ((vf & FLAG_SEALED) !== 0 ? MIN_SEALED_INNER_FRAME : MIN_INNER_FRAME)) return this.dropped("truncated");
    if (inner.byteLength > MAX_INNER_FRAME) return this.dropped("oversize");
    return inner;
  }

  /** Receiver indices retired on the hot path (promotion of `next`); the agent drains them. */
  readonly pendingIndexDel: number[] = [];

  private dropped(r: BulkDropReason): BulkDropReason {
    this.drops[r]++;
    return r;
  }

  /** For status: the candidates we know for the peer and our endpoint view. */
  describe(now: number): { state: BulkState; reason: string; endpoint: string | null; peerCands: string[]; rttMs: number | null; keyAgeMs: number | null; pathMax: number | null; pmtu: BulkPmtuStatus } {
    return {
      pathMax: this.pathMax ?? null,
      pmtu: {
        how: this.pmtuHow,
        maxDatagram: this.maxDatagram,
        foundAgoMs: this.pmtuFoundAt > -Infinity ? Math.round(now - this.pmtuFoundAt) : null,
        ...this.pmtuStats,
      },
      state: this._state,
      reason: this.reason,
      endpoint: this.endpoint ? formatEndpoint(this.endpoint) : null,
      peerCands: this.peerCands.map(formatEndpoint),
      rttMs: this.rttMs === undefined ? null : Math.round(this.rttMs * 1000) / 1000,
      keyAgeMs: this.current ? now - this.current.createdAt : null,
    };
  }
}

export { TAG_LEN };
