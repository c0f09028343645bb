/**
 * SignalHub: the signaling server's session logic, runtime-neutral (Node, workerd, Deno, Bun).
 *
 * It depends on ports only: a SignalSocket per connection (send, close, bufferedAmount), a clock
 * (now + timers), random bytes and the crypto port (core/crypto.ts: WebCrypto HMAC, SHA-256, Ed25519).
 * No `node:` import may appear under signaling/core/ (test/unit/deps.test.ts checks it).
 *
 * An adapter (signaling/server.ts for Node + `ws`, examples/cloudflare for a Durable Object, the Deno
 * and Bun entry points) asks `admission(ip)` before it accepts a connection, calls `hub.open(socket)`
 * when one is accepted, `session.receive(frame)` for each frame and `session.closed()` when it is gone.
 * After a Durable Object was evicted by hibernation, `hub.restore(socket, snapshot)` rebuilds a session
 * from the attachment the hub asked the adapter to keep (`socket.persist`).
 *
 * Per session:  challenged --hello--> verifying --ok--> member --close--> closed
 *                    |                   \--id held by another live instance--> probe --> member | closed(4009)
 *                    \--no hello in helloTimeoutMs / bad key / bad identity / protocol--> closed
 *
 * Presence: `welcome` carries the members known at admission (at most ~48 KiB of peers; the rest follow
 * at once as `presence` frames). Later joins and leaves are collected for a window (presenceBatchMs plus
 * 1 ms per 10 members, at most 1 s) and sent as `join` / `leave` frames when there are few (and few
 * members), else as `presence {join:[...], leave:[...]}` frames (a receiver applies the leaves first,
 * then the joins). Every peer entry is msgpack-encoded once
 * per session and reused in every welcome and batch (10,000 agents: one copy, no re-encoding).
 *
 * Limits (every one counted in stats()): sessions in total and per source IP (admission), hello timeout,
 * bad-frame budget, frame sizes (wire/signal.ts); a receiver with more than maxBufferedBytes queued is
 * closed as a slow consumer (1013); data-relay frames are dropped while the receiver has more than
 * relayMaxBufferedBytes queued, and each sender, each source IP and the whole server have a relay
 * budget (token buckets). Frames on a relay link's control channel (heartbeats, gossip, IPAM; the
 * channel byte is in the clear, see relayChannel) have a small budget of their own per sender and
 * server-wide, and CONTROL_RELAY_QUEUE_HEADROOM more queue at the receiver, so data that saturates a relay
 * link does not take its control messages down with it; over their own budget they compete with data.
 * Control drops are counted apart from data drops (relayControlDropped).
 *
 * Remote input never throws out of `receive`: undecodable frames are counted (per session and in
 * `stats()`), logged once per session, answered with `error {code,msg}`, and after MAX_BAD_FRAMES the
 * session is closed with PROTOCOL.
 */
import { Packr } from "msgpackr";
import { ProtocolError, WeftError } from "../../src/errors.js";
import { silentLogger, type Logger } from "../../src/log.js";
import { decodeEnvelope, isPlainObject, nodeId, PROTOCOL_VERSION } from "../../src/wire/codec.js";
import { CLOSE_CODES, MAX_BAD_FRAMES, MAX_RELAY_BYTES, MAX_SIGNAL_BYTES, decodeClientMsg, encodeSignal, type ClientMsg, type IceCandidateInit, type PeerInfo, type ServerMsg, type SignalData, type ViewerAnswerMsg, type WelcomeIceServer } from "../../src/wire/signal.js";
import { frameFields, toHex, webCryptoPort, webRandom, type SignalCrypto } from "./crypto.js";

/** 100 Mbit/s per agent. */
export const DEFAULT_RELAY_RATE = 12_500_000;
export const SERVER_VERSION = "weftnet-signal/0.2.0";
export const DEFAULT_HELLO_TIMEOUT_MS = 10_000;
export const DEFAULT_PROBE_TIMEOUT_MS = 3_000;
/** Context of the hello proofs (same string as src/identity.ts CTX_HELLO). */
export const CTX_HELLO = "weftnet/hello/v1";
/** Peer entries per welcome / presence frame stay under this many bytes (the client's frame limit is 80 KiB). */
export const PRESENCE_FRAME_BUDGET = 48 * 1024;
/** Control-channel relay frames are still forwarded to a receiver with this much more queued than data frames. */
export const CONTROL_RELAY_QUEUE_HEADROOM = 1024 * 1024;

/**
 * The channel of a relay frame, read from the relay link's clear header (agent/transport/relay.ts:
 * [1 version = 1][1 conn length n][n conn][1 channel 0 = control, 1 = packets]...; the header is AEAD
 * additional data, so the receiving agent rejects a frame whose channel byte was changed on the way).
 * Anything else (another version, too short) counts as data. A sender that labels its data "control"
 * gains the small control budget only, and its peer drops the frames (they do not decode as control).
 */
export function relayChannel(data: Uint8Array): "control" | "data" {
  if (data.byteLength < 2 || data[0] !== 1) return "data";
  const at = 2 + data[1]!;
  return data.byteLength > at && data[at] === 0 ? "control" : "data";
}

export interface SignalLimits {
  /** open sessions (WebSocket connections), registered or not; further connections are refused (503 / 1013) */
  maxSessions: number;
  /** open sessions from one source IP (429 / 1013) */
  maxSessionsPerIp: number;
  /** a session with more than this queued for sending is closed as a slow consumer (1013) */
  maxBufferedBytes: number;
  /** data-relay frames to a receiver with more than this queued are dropped (ERR_RELAY_CONGESTED) */
  relayMaxBufferedBytes: number;
  /** relay budget of one source IP, bytes/s (all its sessions together) */
  relayRatePerIp: number;
  /** relay budget of the whole server, bytes/s */
  relayRateGlobal: number;
  /** budget of one agent's control-channel relay frames, bytes/s (beside its data budget) */
  relayControlRate: number;
  /** budget of all control-channel relay frames of the server, bytes/s */
  relayControlRateGlobal: number;
}

export const DEFAULT_LIMITS: SignalLimits = {
  maxSessions: 20_000,
  maxSessionsPerIp: 256,
  maxBufferedBytes: 16 * 1024 * 1024,
  relayMaxBufferedBytes: 4 * 1024 * 1024,
  relayRatePerIp: 2 * DEFAULT_RELAY_RATE,
  relayRateGlobal: 10 * DEFAULT_RELAY_RATE,
  // heartbeats are ~100 bytes a second per link; gossip and IPAM messages come in bursts of a few KiB
  relayControlRate: 128 * 1024,
  relayControlRateGlobal: 16 * 1024 * 1024,
};

/** What the hub needs from a connection. */
export interface SignalSocket {
  send(bytes: Uint8Array): void;
  close(code: number, reason: string): void;
  /** the peer's IP as this server sees it */
  readonly remoteAddress: string;
  readonly remotePort?: number;
  /** bytes queued for sending and not yet written; absent = unknown (that runtime does not tell) */
  bufferedAmount?(): number;
  /**
   * Optional liveness check (the ws adapter sends a ping and waits for the pong). Used when a second
   * instance claims a node id: a live holder keeps it (4009 for the newcomer), a dead one is replaced.
   * Without it the holder counts as live.
   */
  probe?(timeoutMs: number): Promise<boolean>;
  /** keep this snapshot with the connection (Durable Object attachment); called when it changes */
  persist?(snapshot: SessionSnapshot): void;
}

/** What survives hibernation: enough to rebuild the session without talking to the agent. */
export interface SessionSnapshot {
  v: 1;
  nonce: Uint8Array;
  member?: MemberInfo;
}

export interface Clock {
  now(): number;
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(handle: unknown): void;
}

export const systemClock: Clock = {
  now: () => Date.now(),
  setTimer: (fn, ms) => {
    const h = setTimeout(fn, ms);
    (h as { unref?: () => void }).unref?.();
    return h;
  },
  clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

export interface SignalHubOptions {
  /** the key hello MACs are checked with (the cluster's join key) */
  joinKey: string;
  logger?: Logger;
  /** wall clock in ms (connectedAt, buckets); overrides clock.now */
  now?: () => number;
  clock?: Clock;
  crypto?: SignalCrypto;
  helloTimeoutMs?: number;
  probeTimeoutMs?: number;
  /** UDP port of our STUN responder announced in `welcome`; 0 = none */
  stunPort?: number;
  /** second STUN port announced in `welcome` (netcheck compares mappings); 0/absent = none */
  stunAltPort?: number;
  /**
   * Data relay of last resort: forward `relay` frames between agents. Default on, 100 Mbit/s per agent
   * (token bucket, burst of one second's worth); `enabled: false` refuses them (--no-relay).
   */
  relay?: { enabled?: boolean; rateBytesPerSec?: number };
  limits?: Partial<SignalLimits>;
  /** coalesce joins/leaves arriving within this many ms into `presence` frames; 0 = send each at once */
  presenceBatchMs?: number;
  /** per-node ICE servers for `welcome` (TURN REST credentials); absent = none */
  iceServersFor?: (nodeId: string) => WelcomeIceServer[];
  serverVersion?: string;
  /** nonce source, 32 bytes per call */
  random?: (n: number) => Uint8Array;
}

export interface MemberInfo {
  id: string;
  name: string;
  pub: Uint8Array;
  meta: Record<string, string>;
  instance: string;
  addr: string;
  connectedAt: number;
}

export type RelayDropReason = "disabled" | "rate" | "ip_rate" | "global_rate" | "congested" | "no_peer";

export interface HubStats {
  sessions: number;
  members: number;
  accepted: number;
  badFrames: number;
  badFramesByCode: Record<string, number>;
  badToken: number;
  badIdentity: number;
  duplicateId: number;
  replaced: number;
  helloTimeouts: number;
  protocolCloses: number;
  relayed: number;
  noPeer: number;
  /** connections refused by the session caps */
  refusedFull: number;
  refusedPerIp: number;
  /** sessions closed because they did not read what we sent */
  slowConsumers: number;
  /** data relay (last-resort path): frames and bytes forwarded, frames dropped (rate, disabled, no peer) */
  relayFrames: number;
  relayBytes: number;
  relayDropped: number;
  relayDroppedByReason: Partial<Record<RelayDropReason, number>>;
  /**
   * of those, frames of relay links' control channel (heartbeats, gossip, IPAM): forwarded (also counted
   * in relayFrames/relayBytes) and dropped (NOT counted in relayDropped, which is data frames only)
   */
  relayControlFrames: number;
  relayControlBytes: number;
  relayControlDropped: number;
  relayControlDroppedByReason: Partial<Record<RelayDropReason, number>>;
  /** topology-page viewers introduced to an agent (viewer-offer sent), answered, failed (no agent, timeout, refused) */
  viewerOffers: number;
  viewerAnswers: number;
  viewerFailures: number;
}

/** How long an agent has to answer a viewer-offer. */
export const VIEWER_ANSWER_TIMEOUT_MS = 10_000;
/** viewer-offers waiting for their answer, server-wide */
export const MAX_PENDING_VIEWERS = 64;

export interface ViewerIntroduction {
  node: { id: string; name: string };
  sdp: string;
  candidates: IceCandidateInit[];
}

type State = "challenged" | "verifying" | "member" | "closed";

/** Decoded client frame; `signal.data` stays the raw map so it is relayed verbatim. */
type Inbound = Extract<ClientMsg, { t: "hello" }> | { t: "signal"; to: string; data: Record<string, unknown> } | Extract<ClientMsg, { t: "relay" }> | ViewerAnswerMsg;

function decodeInbound(frame: Uint8Array): Inbound {
  const m = decodeEnvelope(frame, MAX_RELAY_BYTES);
  if (m.t !== "relay" && frame.byteLength > MAX_SIGNAL_BYTES) throw new ProtocolError("ERR_TOO_LARGE", `message of ${frame.byteLength} bytes exceeds the ${MAX_SIGNAL_BYTES}-byte limit`);
  switch (m.t) {
    case "relay":
      return decodeClientMsg(frame) as Extract<ClientMsg, { t: "relay" }>;
    case "hello":
      return decodeClientMsg(frame) as Extract<ClientMsg, { t: "hello" }>;
    case "viewer-answer":
      return decodeClientMsg(frame) as ViewerAnswerMsg;
    case "signal": {
      const to = nodeId(m, "to");
      if (!isPlainObject(m.data)) throw new ProtocolError("ERR_INVALID", "field data must be a map");
      return { t: "signal", to, data: m.data };
    }
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown client message type ${JSON.stringify(m.t)}`);
  }
}

export function formatAddr(ip: string, port: number | undefined): string {
  const host = ip.includes(":") ? `[${ip}]` : ip;
  return port === undefined ? host : `${host}:${port}`;
}

/** Token bucket in bytes; capacity = one second of rate. */
export class ByteBucket {
  private tokens = -1;
  private last = 0;
  take(n: number, now: number, rate: number): boolean {
    if (this.tokens < 0) {
      this.tokens = rate;
      this.last = now;
    }
    this.tokens = Math.min(rate, this.tokens + ((now - this.last) / 1000) * rate);
    this.last = now;
    if (n > this.tokens) return false;
    this.tokens -= n;
    return true;
  }
  /** give back what take() took when a later check refused the frame */
  refund(n: number): void {
    this.tokens += n;
  }
}

// ---- msgpack assembly of welcome / presence from cached peer entries --------------------------------

const packr = new Packr({ useRecords: false, moreTypes: false, variableMapSize: true });
const KEY_PEERS = Uint8Array.of(0xa5, 0x70, 0x65, 0x65, 0x72, 0x73); // fixstr "peers"
const KEY_JOIN = Uint8Array.of(0xa4, 0x6a, 0x6f, 0x69, 0x6e); // fixstr "join"
const KEY_LEAVE = Uint8Array.of(0xa5, 0x6c, 0x65, 0x61, 0x76, 0x65); // fixstr "leave"

function arrayHeader(n: number): Uint8Array {
  if (n < 16) return Uint8Array.of(0x90 | n);
  if (n < 0x10000) return Uint8Array.of(0xdc, n >> 8, n & 0xff);
  return Uint8Array.of(0xdd, (n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
}

function concat(parts: Uint8Array[]): Uint8Array {
  let n = 0;
  for (const p of parts) n += p.byteLength;
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.byteLength;
  }
  return out;
}

/**
 * A msgpack map `head` (fixmap, < 15 keys, encoded by packr) extended with array-valued keys whose items
 * are already-encoded msgpack values.
 */
function extendMap(head: Uint8Array, arrays: [key: Uint8Array, items: Uint8Array[]][]): Uint8Array {
  const n = head[0]! & 0x0f;
  if ((head[0]! & 0xf0) !== 0x80 || n + arrays.length > 15) throw new Error("extendMap needs a small fixmap");
  const parts: Uint8Array[] = [Uint8Array.of(0x80 | (n + arrays.length)), head.subarray(1)];
  for (const [key, items] of arrays) parts.push(key, arrayHeader(items.length), ...items);
  return concat(parts);
}

function encodePeer(m: MemberInfo): Uint8Array {
  return new Uint8Array(packr.pack({ id: m.id, name: m.name, pub: m.pub, meta: m.meta })); // a copy
}

/** Split encoded entries into chunks of at most PRESENCE_FRAME_BUDGET bytes (at least one entry each). */
function chunks(items: Uint8Array[], budget = PRESENCE_FRAME_BUDGET): Uint8Array[][] {
  const out: Uint8Array[][] = [];
  let cur: Uint8Array[] = [];
  let size = 0;
  for (const it of items) {
    if (cur.length > 0 && size + it.byteLength > budget) {
      out.push(cur);
      cur = [];
      size = 0;
    }
    cur.push(it);
    size += it.byteLength;
  }
  if (cur.length > 0) out.push(cur);
  return out;
}

function presenceFrames(joins: Uint8Array[], leaves: string[]): Uint8Array[] {
  const head = packr.pack({ v: PROTOCOL_VERSION, t: "presence" });
  const leaveItems = leaves.map((id) => new Uint8Array(packr.pack(id)));
  const frames: Uint8Array[] = [];
  // leaves first (a receiver applies leaves, then joins; keeping them in the first frame keeps that order)
  const joinChunks = chunks(joins);
  const leaveChunks = chunks(leaveItems);
  for (const lc of leaveChunks) frames.push(extendMap(head, [[KEY_JOIN, []], [KEY_LEAVE, lc]]));
  for (const jc of joinChunks) frames.push(extendMap(head, [[KEY_JOIN, jc], [KEY_LEAVE, []]]));
  return frames;
}

/**
 * Every member's encoded entry, kept in blocks of at most PRESENCE_FRAME_BUDGET bytes, each with its
 * `presence` frame encoded once and reused by every welcome until that block changes. A welcome at
 * 10,000 members is then ~30 cached frames instead of 10,000 entries gathered, chunked and copied
 * (bench:signal: that assembly was a quarter of the server's CPU at 10,000).
 */
class PeerDirectory {
  private readonly blocks: { items: Map<string, Uint8Array>; bytes: number; frame: Uint8Array | undefined }[] = [];
  private readonly where = new Map<string, PeerDirectory["blocks"][number]>();

  set(id: string, bytes: Uint8Array): void {
    this.delete(id);
    let b = this.blocks.find((x) => x.bytes + bytes.byteLength <= PRESENCE_FRAME_BUDGET);
    if (b === undefined) this.blocks.push((b = { items: new Map(), bytes: 0, frame: undefined }));
    b.items.set(id, bytes);
    b.bytes += bytes.byteLength;
    b.frame = undefined;
    this.where.set(id, b);
  }

  delete(id: string): void {
    const b = this.where.get(id);
    if (b === undefined) return;
    this.where.delete(id);
    b.bytes -= b.items.get(id)!.byteLength;
    b.items.delete(id);
    b.frame = undefined;
    if (b.items.size === 0) this.blocks.splice(this.blocks.indexOf(b), 1);
  }

  /** The first block's entries (to go inline in a welcome) and the other blocks' cached presence frames. */
  welcomeParts(): { first: Uint8Array[]; frames: Uint8Array[] } {
    const [b0, ...rest] = this.blocks;
    return { first: b0 ? [...b0.items.values()] : [], frames: rest.map((b) => (b.frame ??= presenceFrames([...b.items.values()], [])[0]!)) };
  }
}

interface PresenceEvent {
  seq: number;
  join?: SignalSession;
  leave?: string;
  /** the event's own join/leave frame, once encoded */
  bytes?: Uint8Array;
}

/** A presence flush to more members than this sends in slices of this many, yielding in between. */
const FLUSH_SLICE = 500;

/** Up to this many presence events in a window are sent as separate join/leave frames. */
const PRESENCE_SINGLE_MAX = 8;

function encodeEvent(e: PresenceEvent): Uint8Array {
  if (e.leave !== undefined) return encodeSignal({ t: "leave", id: e.leave });
  const head = packr.pack({ v: PROTOCOL_VERSION, t: "join" });
  const n = head[0]! & 0x0f;
  return concat([Uint8Array.of(0x80 | (n + 1)), head.subarray(1), Uint8Array.of(0xa4, 0x70, 0x65, 0x65, 0x72), e.join!.peerBytes!]); // + "peer": entry
}

export class SignalSession {
  state: State = "challenged";
  badFrames = 0;
  readonly relayBucket = new ByteBucket();
  readonly controlBucket = new ByteBucket();
  member: MemberInfo | undefined;
  /** encoded PeerInfo of this member (set on admission) */
  peerBytes: Uint8Array | undefined;
  /** presence sequence number at admission: what this session's welcome already covered */
  admittedSeq = 0;
  readonly addr: string;
  readonly ip: string;
  private lastComplaint = new Map<string, number>();
  private helloTimer: unknown;
  private loggedBadFrame = false;
  /** hub clock (ms) when the session opened, and when its hello arrived (a join's server-side time runs from there to its welcome) */
  readonly openedAt: number;
  helloAt = 0;

  constructor(
    private readonly hub: SignalHub,
    readonly socket: SignalSocket,
    readonly nonce: Uint8Array,
  ) {
    this.openedAt = hub.clockNow();
    this.ip = socket.remoteAddress;
    this.addr = formatAddr(socket.remoteAddress, socket.remotePort);
  }

  /** An `error` reply at most once a second per code (a flood of relay frames gets one answer). */
  complainOnce(code: string, msg: string, now: number, ref?: string): void {
    const last = this.lastComplaint.get(code);
    if (last !== undefined && now - last < 1000) return;
    this.lastComplaint.set(code, now);
    const e: ServerMsg = { t: "error", code, msg };
    if (ref !== undefined) e.ref = ref;
    this.send(e);
  }

  /** @internal */
  start(helloTimeoutMs: number, sendChallenge: boolean): void {
    if (sendChallenge) this.send({ t: "challenge", nonce: this.nonce, server: this.hub.serverVersion });
    if (this.state === "closed") return;
    this.helloTimer = this.hub.clock.setTimer(() => {
      this.helloTimer = undefined;
      if (this.state !== "challenged" && this.state !== "verifying") return;
      this.hub.stats_.helloTimeouts++;
      this.terminate(CLOSE_CODES.HELLO_TIMEOUT, `no valid hello within ${Math.round(helloTimeoutMs / 1000)} s`);
    }, helloTimeoutMs);
  }

  snapshot(): SessionSnapshot {
    return this.member ? { v: 1, nonce: this.nonce, member: this.member } : { v: 1, nonce: this.nonce };
  }

  /** @internal */
  persist(): void {
    try {
      this.socket.persist?.(this.snapshot());
    } catch (e) {
      this.hub.log.debug("persisting the session snapshot failed", { err: e, addr: this.addr });
    }
  }

  /** Feed one frame from the socket. Text frames arrive as strings and are rejected. Never throws. */
  receive(frame: Uint8Array | ArrayBuffer | string): void {
    if (this.state === "closed") return;
    try {
      if (typeof frame === "string") throw new ProtocolError("ERR_MALFORMED", "text frames are not accepted; send binary msgpack frames");
      const msg = decodeInbound(frame instanceof Uint8Array ? frame : new Uint8Array(frame));
      this.hub.handle(this, msg);
    } catch (e) {
      if (e instanceof ProtocolError) this.badFrame(e);
      else {
        // A bug of ours, not the peer's fault: report, drop the session, keep the server up.
        this.hub.log.error("signal session failed", { err: e, addr: this.addr, id: this.member?.id });
        this.terminate(1011, "internal error");
      }
    }
  }

  /** The adapter reports that the connection is gone (after our close or the peer's). */
  closed(): void {
    this.finish(true);
  }

  /** Close from our side. `announce` = broadcast `leave` if this session holds a membership. */
  terminate(code: number, reason: string, announce = true): void {
    if (this.state === "closed") return;
    this.finish(announce);
    try {
      this.socket.close(code, reason);
    } catch (e) {
      this.hub.log.debug("close failed", { err: e, addr: this.addr });
    }
  }

  send(msg: ServerMsg): void {
    if (this.state === "closed") return;
    this.sendBytes(encodeSignal(msg));
  }

  /** @internal  Send, unless the receiver has stopped reading (then it is closed as a slow consumer). */
  sendBytes(bytes: Uint8Array): void {
    if (this.state === "closed") return;
    const queued = this.buffered();
    if (queued > this.hub.limits.maxBufferedBytes) {
      this.hub.stats_.slowConsumers++;
      this.hub.log.warn("closing a signaling session that does not read (slow consumer)", { addr: this.addr, id: this.member?.id, queued });
      this.terminate(CLOSE_CODES.TRY_AGAIN, `slow consumer: ${Math.round(queued / 1048576)} MiB unread`);
      return;
    }
    try {
      this.socket.send(bytes);
    } catch (e) {
      this.hub.log.debug("send failed", { err: e, addr: this.addr });
    }
  }

  /** bytes queued towards this client (0 when the runtime does not tell) */
  buffered(): number {
    try {
      return this.socket.bufferedAmount?.() ?? 0;
    } catch {
      return 0;
    }
  }

  /** @internal */
  clearHelloTimer(): void {
    if (this.helloTimer !== undefined) this.hub.clock.clearTimer(this.helloTimer);
    this.helloTimer = undefined;
  }

  private finish(announce: boolean): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.clearHelloTimer();
    this.hub.detach(this, announce);
  }

  private badFrame(e: ProtocolError): void {
    this.badFrames++;
    this.hub.countBadFrame(e.code);
    if (!this.loggedBadFrame) {
      this.loggedBadFrame = true;
      this.hub.log.warn("bad frame from signaling client (further ones from this session are counted, not logged)", {
        addr: this.addr,
        id: this.member?.id,
        code: e.code,
        err: e.message,
      });
    }
    this.send({ t: "error", code: e.code, msg: e.message.slice(0, 1024) });
    if (this.badFrames >= MAX_BAD_FRAMES) {
      this.hub.stats_.protocolCloses++;
      this.terminate(CLOSE_CODES.PROTOCOL, `too many bad frames (${this.badFrames})`);
    }
  }
}

interface IpEntry {
  sessions: number;
  bucket: ByteBucket;
}

export class SignalHub {
  readonly log: Logger;
  readonly serverVersion: string;
  readonly clock: Clock;
  readonly limits: SignalLimits;
  stunPort: number;
  /** @internal counters; read them with stats() */
  readonly stats_: Omit<HubStats, "sessions" | "members" | "badFramesByCode" | "relayDroppedByReason" | "relayControlDroppedByReason"> = {
    accepted: 0,
    badFrames: 0,
    badToken: 0,
    badIdentity: 0,
    duplicateId: 0,
    replaced: 0,
    helloTimeouts: 0,
    protocolCloses: 0,
    relayed: 0,
    noPeer: 0,
    refusedFull: 0,
    refusedPerIp: 0,
    slowConsumers: 0,
    relayFrames: 0,
    relayBytes: 0,
    relayDropped: 0,
    relayControlFrames: 0,
    relayControlBytes: 0,
    relayControlDropped: 0,
    viewerOffers: 0,
    viewerAnswers: 0,
    viewerFailures: 0,
  };
  readonly relayEnabled: boolean;
  readonly relayRate: number;
  private readonly badByCode = new Map<string, number>();
  private readonly relayDrops = new Map<RelayDropReason, number>();
  private readonly controlDrops = new Map<RelayDropReason, number>();
  private readonly sessions = new Set<SignalSession>();
  private readonly members = new Map<string, SignalSession>();
  /** the members' encoded entries, in blocks with cached frames (welcomes) */
  private readonly directory = new PeerDirectory();
  /** a presence flush still sending to members in slices (see flushPresence) */
  private flushing = false;
  private sliceTimer: unknown;
  private readonly perIp = new Map<string, IpEntry>();
  private readonly globalRelay = new ByteBucket();
  private readonly globalControl = new ByteBucket();
  private readonly joinKey: string;
  private readonly now: () => number;
  private readonly crypto: SignalCrypto;
  private readonly helloTimeoutMs: number;
  private readonly probeTimeoutMs: number;
  private readonly presenceBatchMs: number;
  private readonly random: (n: number) => Uint8Array;
  private presenceSeq = 0;
  private pending: PresenceEvent[] = [];
  private flushTimer: unknown;
  private readonly viewerWaits = new Map<string, { session: SignalSession; done: (r: ViewerAnswerMsg | Error) => void }>();

  constructor(private readonly opts: SignalHubOptions) {
    if (typeof opts.joinKey !== "string" || opts.joinKey.length === 0) throw new WeftError("ERR_USAGE", "signaling hub needs a non-empty join key");
    this.joinKey = opts.joinKey;
    this.log = opts.logger ?? silentLogger;
    this.clock = opts.clock ?? systemClock;
    this.now = opts.now ?? (() => this.clock.now());
    this.crypto = opts.crypto ?? webCryptoPort();
    this.helloTimeoutMs = opts.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS;
    this.probeTimeoutMs = opts.probeTimeoutMs ?? DEFAULT_PROBE_TIMEOUT_MS;
    this.presenceBatchMs = opts.presenceBatchMs ?? 0;
    this.stunPort = opts.stunPort ?? 0;
    this.serverVersion = (opts.serverVersion ?? SERVER_VERSION).slice(0, 64);
    this.random = opts.random ?? webRandom;
    this.relayEnabled = opts.relay?.enabled ?? true;
    this.relayRate = opts.relay?.rateBytesPerSec ?? DEFAULT_RELAY_RATE;
    this.limits = { ...DEFAULT_LIMITS, ...(opts.limits ?? {}) };
  }

  /**
   * May a new connection from `ip` be accepted? Adapters ask before the WebSocket handshake so a
   * refused client costs an HTTP answer only (503 when full, 429 for one IP over its share).
   */
  admission(ip: string): { ok: true } | { ok: false; status: 429 | 503; reason: string } {
    if (this.sessions.size >= this.limits.maxSessions) return { ok: false, status: 503, reason: `server full: ${this.limits.maxSessions} sessions` };
    if ((this.perIp.get(ip)?.sessions ?? 0) >= this.limits.maxSessionsPerIp) return { ok: false, status: 429, reason: `too many sessions from ${ip} (limit ${this.limits.maxSessionsPerIp})` };
    return { ok: true };
  }

  /** A new connection: sends `challenge` and starts the hello timer. Over a cap it is closed (1013). */
  open(socket: SignalSocket): SignalSession {
    const s = new SignalSession(this, socket, this.random(32));
    const adm = this.admission(s.ip);
    if (!adm.ok) {
      if (adm.status === 503) this.stats_.refusedFull++;
      else this.stats_.refusedPerIp++;
      s.state = "closed";
      try {
        socket.close(CLOSE_CODES.TRY_AGAIN, adm.reason);
      } catch {
        /* gone already */
      }
      return s;
    }
    this.attach(s);
    s.persist();
    s.start(this.helloTimeoutMs, true);
    return s;
  }

  /** Count a refusal made by the adapter from admission() (so stats cover both paths). */
  countRefusal(status: 429 | 503): void {
    if (status === 503) this.stats_.refusedFull++;
    else this.stats_.refusedPerIp++;
  }

  /**
   * Rebuild a session after hibernation from its snapshot: a member is re-admitted silently (no
   * welcome, no join: everyone already knows it); a session still in its handshake keeps its nonce.
   */
  restore(socket: SignalSocket, snap: SessionSnapshot): SignalSession {
    const s = new SignalSession(this, socket, snap.nonce);
    this.attach(s);
    const m = snap.member;
    if (m !== undefined && !this.members.has(m.id)) {
      s.member = m;
      s.state = "member";
      s.peerBytes = encodePeer(m);
      s.admittedSeq = this.presenceSeq;
      this.members.set(m.id, s);
      this.directory.set(m.id, s.peerBytes);
    } else {
      // still in its handshake (or a stale duplicate): give it the rest of a hello timeout
      s.start(this.helloTimeoutMs, false);
    }
    return s;
  }

  /** Registered agents, oldest first. */
  list(): MemberInfo[] {
    return [...this.members.values()].map((s) => s.member!).sort((a, b) => a.connectedAt - b.connectedAt);
  }

  get size(): number {
    return this.members.size;
  }

  /** @internal */
  clockNow(): number {
    return this.now();
  }

  /**
   * Server-side join times (hello received -> welcome sent, ms, the last 20,000 joins): what the server
   * adds to an agent's join after its hello, without the network's or the client's own delays
   * (bench:signal compares the two).
   */
  joinTimes(): { n: number; p50: number; p99: number; max: number } {
    const xs = [...this.joinMs].sort((a, b) => a - b);
    const at = (p: number) => (xs.length ? xs[Math.min(xs.length - 1, Math.floor(p * xs.length))]! : 0);
    return { n: xs.length, p50: at(0.5), p99: at(0.99), max: xs.length ? xs[xs.length - 1]! : 0 };
  }
  private readonly joinMs: number[] = [];
  private joinMsAt = 0;

  stats(): HubStats {
    return {
      ...this.stats_,
      sessions: this.sessions.size,
      members: this.members.size,
      badFramesByCode: Object.fromEntries(this.badByCode),
      relayDroppedByReason: Object.fromEntries(this.relayDrops),
      relayControlDroppedByReason: Object.fromEntries(this.controlDrops),
    };
  }

  /** Close every session (shutdown). No leave broadcasts: everyone is going. */
  closeAll(code: number = CLOSE_CODES.SHUTDOWN, reason = "server shutting down"): void {
    if (this.flushTimer !== undefined) this.clock.clearTimer(this.flushTimer);
    this.flushTimer = undefined;
    if (this.sliceTimer !== undefined) this.clock.clearTimer(this.sliceTimer);
    this.sliceTimer = undefined;
    this.flushing = false;
    this.pending = [];
    for (const s of [...this.sessions]) s.terminate(code, reason, false);
  }

  // ---- internals called by SignalSession ---------------------------------------------------------

  private attach(s: SignalSession): void {
    this.sessions.add(s);
    let e = this.perIp.get(s.ip);
    if (e === undefined) {
      e = { sessions: 0, bucket: new ByteBucket() };
      this.perIp.set(s.ip, e);
    }
    e.sessions++;
  }

  /** @internal */
  countBadFrame(code: string): void {
    this.stats_.badFrames++;
    this.badByCode.set(code, (this.badByCode.get(code) ?? 0) + 1);
  }

  /**
   * Introduce a topology-page browser (the server's /ui) to one agent: send its WebRTC offer as
   * `viewer-offer` and resolve with the agent's answer. Viewers are never members: they have no session
   * here, appear in no presence, and prove their credential to the agent on the WebRTC link itself (the
   * caller, core/app.ts, only checked they hold one before bothering an agent).
   *   target     a node id or name (else any agent that takes viewers, chosen at random)
   *   needMeta   only agents whose hello meta has this key with this value (e.g. the invite key they pin)
   * Throws WeftError ERR_NO_PEER (no such agent), ERR_BUSY, ERR_TIMEOUT, ERR_VIEWER (the agent said no).
   */
  introduceViewer(sdp: string, opts: { target?: string; needMeta?: [string, string] } = {}): Promise<ViewerIntroduction> {
    const fail = (code: string, msg: string) => {
      this.stats_.viewerFailures++;
      return Promise.reject(new WeftError(code, msg));
    };
    const ok = (m: MemberInfo) => m.meta.ui !== undefined && (opts.needMeta === undefined || m.meta[opts.needMeta[0]] === opts.needMeta[1]);
    let candidates = [...this.members.values()].filter((x) => x.state === "member" && ok(x.member!));
    if (opts.target) candidates = candidates.filter((x) => x.member!.id === opts.target || x.member!.name === opts.target);
    if (candidates.length === 0) {
      const why = opts.needMeta ? "that accepts this server's viewer invites (agents pin its key with --ui-invite-key)" : "that takes topology-page viewers";
      return fail("ERR_NO_PEER", opts.target ? `no connected agent ${JSON.stringify(opts.target)} ${why}` : `no connected agent ${why}`);
    }
    if (this.viewerWaits.size >= MAX_PENDING_VIEWERS) return fail("ERR_BUSY", "too many viewers joining at once; try again");
    const r = this.random(12);
    const target = candidates[r[0]! % candidates.length]!;
    const ref = toHex(r);
    return new Promise<ViewerIntroduction>((resolve, reject) => {
      const timer = this.clock.setTimer(() => done(new WeftError("ERR_TIMEOUT", `${target.member!.name} did not answer within ${VIEWER_ANSWER_TIMEOUT_MS / 1000} s`)), VIEWER_ANSWER_TIMEOUT_MS);
      const done = (a: ViewerAnswerMsg | Error) => {
        if (!this.viewerWaits.delete(ref)) return;
        this.clock.clearTimer(timer);
        if (a instanceof Error || a.sdp === undefined) {
          this.stats_.viewerFailures++;
          reject(a instanceof Error ? a : new WeftError("ERR_VIEWER", `${target.member!.name} refused the viewer: ${a.error ?? "no answer"}`));
          return;
        }
        this.stats_.viewerAnswers++;
        resolve({ node: { id: target.member!.id, name: target.member!.name }, sdp: a.sdp, candidates: a.candidates ?? [] });
      };
      this.viewerWaits.set(ref, { session: target, done });
      this.stats_.viewerOffers++;
      target.send({ t: "viewer-offer", ref, sdp });
    });
  }

  private viewerAnswer(s: SignalSession, msg: ViewerAnswerMsg): void {
    const w = this.viewerWaits.get(msg.ref);
    if (w === undefined || w.session !== s) throw new ProtocolError("ERR_INVALID", "viewer-answer for no viewer-offer of ours");
    w.done(msg);
  }

  /** @internal */
  detach(s: SignalSession, announce: boolean): void {
    if (!this.sessions.delete(s)) return;
    for (const w of [...this.viewerWaits.values()]) if (w.session === s) w.done(new WeftError("ERR_NO_PEER", "the agent disconnected before it answered"));
    const e = this.perIp.get(s.ip);
    if (e !== undefined && --e.sessions <= 0) this.perIp.delete(s.ip);
    const m = s.member;
    if (m === undefined || this.members.get(m.id) !== s) return; // never registered, or already replaced
    this.members.delete(m.id);
    this.directory.delete(m.id);
    this.log.info("agent left", { id: m.id, name: m.name, addr: m.addr });
    if (announce) this.announce({ seq: ++this.presenceSeq, leave: m.id });
  }

  /** @internal */
  handle(s: SignalSession, msg: Inbound): void {
    switch (s.state) {
      case "challenged":
        if (msg.t !== "hello") {
          this.stats_.protocolCloses++;
          s.terminate(CLOSE_CODES.PROTOCOL, `expected hello first, got ${msg.t}`);
          return;
        }
        this.hello(s, msg);
        return;
      case "verifying":
        // The agent waits for `welcome` before it signals; anything else now is out of order.
        throw new ProtocolError("ERR_INVALID", `${msg.t} before welcome`);
      case "member":
        if (msg.t === "hello") throw new ProtocolError("ERR_INVALID", "already registered: hello is accepted once per connection");
        if (msg.t === "relay") this.relayData(s, msg);
        else if (msg.t === "viewer-answer") this.viewerAnswer(s, msg);
        else this.relay(s, msg);
        return;
      case "closed":
        return;
    }
  }

  private hello(s: SignalSession, h: Extract<ClientMsg, { t: "hello" }>): void {
    s.state = "verifying";
    s.helloAt = this.now();
    const signed = frameFields(CTX_HELLO, s.nonce, h.id, h.instance);
    const checks = [this.crypto.verifyHmac(this.joinKey, signed, h.mac), this.crypto.sha256(h.pub), this.crypto.verifyEd25519(h.pub, signed, h.sig)] as const;
    if (checks.some((c) => c instanceof Promise)) {
      Promise.all(checks).then(
        ([macOk, digest, sigOk]) => this.afterVerify(s, h, macOk, digest, sigOk),
        (e: unknown) => {
          this.log.error("hello verification failed", { err: e, addr: s.addr });
          s.terminate(1011, "internal error");
        },
      );
    } else this.afterVerify(s, h, checks[0] as boolean, checks[1] as Uint8Array, checks[2] as boolean);
  }

  private afterVerify(s: SignalSession, h: Extract<ClientMsg, { t: "hello" }>, macOk: boolean, digest: Uint8Array, sigOk: boolean): void {
    if (s.state !== "verifying") return; // closed meanwhile
    s.clearHelloTimer();
    if (!macOk) {
      this.stats_.badToken++;
      this.log.warn("agent refused: bad cluster token", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_TOKEN, "bad token: the hello proof does not match this server's cluster token");
      return;
    }
    if (h.pub.byteLength !== 32 || toHex(digest).slice(0, 16) !== h.id) {
      this.stats_.badIdentity++;
      this.log.warn("agent refused: node id is not derived from its public key", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_IDENTITY, "bad identity: node id is not derived from the public key");
      return;
    }
    if (!sigOk) {
      this.stats_.badIdentity++;
      this.log.warn("agent refused: hello signature does not verify", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_IDENTITY, "bad identity: hello signature does not verify");
      return;
    }
    s.member = { id: h.id, name: h.name, pub: h.pub, meta: h.meta, instance: h.instance, addr: s.addr, connectedAt: this.now() };
    this.claim(s, 0);
  }

  /** Take the node id, resolving a clash with a current holder. */
  private claim(s: SignalSession, round: number): void {
    if (s.state === "closed") return;
    const m = s.member!;
    const holder = this.members.get(m.id);
    if (holder === undefined || holder.state === "closed") return this.admit(s, undefined);
    if (holder.member!.instance === m.instance) {
      // The same agent process reconnecting (its old connection may not have noticed yet).
      return this.admit(s, holder);
    }
    if (round >= 3 || holder.socket.probe === undefined) return this.refuseDuplicate(s, holder);
    s.state = "verifying";
    let probe: Promise<boolean>;
    try {
      probe = holder.socket.probe(this.probeTimeoutMs);
    } catch {
      probe = Promise.resolve(false);
    }
    probe.then(
      (alive) => this.afterProbe(s, holder, alive, round),
      () => this.afterProbe(s, holder, false, round),
    );
  }

  private afterProbe(s: SignalSession, holder: SignalSession, alive: boolean, round: number): void {
    if (s.state === "closed") return;
    const m = s.member!;
    if (this.members.get(m.id) !== holder) return this.claim(s, round + 1); // the holder changed meanwhile
    if (alive) return this.refuseDuplicate(s, holder);
    // The holder is a dead connection of an earlier agent process (e.g. the host rebooted): drop it.
    this.log.info("replacing an unresponsive session of the same node id", { id: m.id, old: holder.addr, new: s.addr });
    this.stats_.replaced++;
    holder.terminate(CLOSE_CODES.REPLACED, "replaced by a new instance of this node; this connection did not answer a ping");
    this.admit(s, undefined);
  }

  private refuseDuplicate(s: SignalSession, holder: SignalSession): void {
    const m = s.member!;
    this.stats_.duplicateId++;
    this.log.warn("agent refused: node id already in use by another live agent (same identity key on two hosts?)", {
      id: m.id,
      name: m.name,
      addr: s.addr,
      holderName: holder.member!.name,
      holderAddr: holder.addr,
    });
    s.member = undefined;
    s.terminate(
      CLOSE_CODES.DUPLICATE_ID,
      // close reasons are capped at 123 bytes: the explanation first, the details after
      `duplicate id: two agents share one identity key (copied state dir?); ${m.id} is live at ${holder.addr}`,
    );
  }

  private admit(s: SignalSession, replacing: SignalSession | undefined): void {
    const m = s.member!;
    s.state = "member";
    s.peerBytes = encodePeer(m);
    this.members.set(m.id, s);
    this.stats_.accepted++;
    if (replacing !== undefined) {
      this.stats_.replaced++;
      // members already points at s, so the old session's detach neither unregisters nor broadcasts.
      replacing.terminate(CLOSE_CODES.REPLACED, "replaced by a newer connection of the same agent");
    }
    s.persist();
    this.directory.delete(m.id); // a replaced session's entry: a welcome lists the others
    this.sendWelcome(s);
    this.directory.set(m.id, s.peerBytes);
    const old = replacing?.member;
    const changed = old === undefined || old.name !== m.name || JSON.stringify(old.meta) !== JSON.stringify(m.meta);
    s.admittedSeq = this.presenceSeq;
    if (changed) this.announce({ seq: ++this.presenceSeq, join: s });
    this.log.info(replacing ? "agent reconnected" : "agent joined", { id: m.id, name: m.name, addr: m.addr, members: this.members.size });
  }

  /** welcome with the first PRESENCE_FRAME_BUDGET bytes of peers, then `presence` frames with the rest */
  private sendWelcome(s: SignalSession): void {
    const m = s.member!;
    const w: Record<string, unknown> = { v: PROTOCOL_VERSION, t: "welcome", you: { id: m.id, addr: m.addr }, stunPort: this.stunPort };
    if (this.opts.stunAltPort) w.stunAltPort = this.opts.stunAltPort;
    const ice = this.opts.iceServersFor?.(m.id);
    if (ice && ice.length) w.iceServers = ice;
    const { first, frames } = this.directory.welcomeParts();
    s.sendBytes(extendMap(packr.pack(w), [[KEY_PEERS, first]]));
    for (const f of frames) s.sendBytes(f);
    const ms = this.now() - (s.helloAt || s.openedAt);
    if (this.joinMs.length < 20_000) this.joinMs.push(ms);
    else this.joinMs[this.joinMsAt++ % 20_000] = ms;
  }

  /** Queue a presence event; sent at once (batch window 0) or with the others of its window. */
  private announce(ev: PresenceEvent): void {
    this.pending.push(ev);
    if (this.presenceBatchMs <= 0) return this.flushPresence();
    this.armFlush();
  }

  private armFlush(): void {
    if (this.flushTimer === undefined) {
      // Every flush is one frame per member: the window grows with the membership (10,000 agents: 1 s),
      // which bounds sends per second however fast agents come and go. Welcomes are never delayed.
      const windowMs = Math.min(1_000, this.presenceBatchMs + Math.floor(this.members.size / 10));
      this.flushTimer = this.clock.setTimer(() => {
        this.flushTimer = undefined;
        this.flushPresence();
      }, windowMs);
    }
  }

  /** @internal  Send the pending joins/leaves to every member that does not know them yet. */
  flushPresence(): void {
    // One flush at a time: a receiver must get this window's events after the previous window's.
    if (this.flushing) return;
    const events = this.pending;
    this.pending = [];
    if (events.length === 0) return;
    // What each receiver should hear depends only on the events after its admission: receivers admitted
    // before the window share one encoding; the few admitted inside it get their own.
    const firstSeq = events[0]!.seq;
    const cache = new Map<number, Uint8Array[]>();
    const framesFrom = (fromSeq: number, self: SignalSession): Uint8Array[] => {
      const evs = events.filter((e) => e.seq > fromSeq && e.join !== self);
      const key = evs.length === events.length ? -1 : fromSeq;
      const selfInWindow = events.some((e) => e.join === self && e.seq > fromSeq);
      const cacheable = !selfInWindow;
      if (cacheable && cache.has(key)) return cache.get(key)!;
      const frames = this.encodeEvents(evs);
      if (cacheable) cache.set(key, frames);
      return frames;
    };
    let all: Uint8Array[] | undefined;
    const sendTo = (o: SignalSession) => {
      // admitted before the window (and not by a join in it, which has seq admittedSeq + 1): every event
      if (o.admittedSeq < firstSeq - 1) {
        for (const f of (all ??= this.encodeEvents(events))) o.sendBytes(f);
        return;
      }
      const from = o.admittedSeq >= firstSeq ? o.admittedSeq : firstSeq - 1;
      for (const f of framesFrom(from, o)) o.sendBytes(f);
    };
    if (this.members.size <= FLUSH_SLICE) {
      for (const o of this.members.values()) sendTo(o);
      return;
    }
    // Thousands of receivers: send in slices and let the event loop in between, so hellos and welcomes
    // are not stuck behind one flush's 10,000 socket writes (bench:signal's join p99 at 10,000). Members
    // admitted meanwhile are not in the list: their welcome already covers these events; members gone
    // meanwhile are skipped (a closed session sends nothing). The next window waits for this one.
    const receivers = [...this.members.values()];
    this.flushing = true;
    let i = 0;
    const step = () => {
      this.sliceTimer = undefined;
      if (!this.flushing) return; // closeAll
      for (const end = Math.min(receivers.length, i + FLUSH_SLICE); i < end; i++) sendTo(receivers[i]!);
      if (i < receivers.length) {
        this.sliceTimer = this.clock.setTimer(step, 0);
        return;
      }
      this.flushing = false;
      if (this.pending.length > 0) {
        if (this.presenceBatchMs <= 0) this.flushPresence();
        else this.armFlush();
      }
    };
    step();
  }

  private encodeEvents(evs: PresenceEvent[]): Uint8Array[] {
    // A few events go out one by one, in order, as classic join/leave frames; more are coalesced.
    if (evs.length <= PRESENCE_SINGLE_MAX && (evs.length === 1 || this.members.size < 256)) return evs.map((e) => (e.bytes ??= encodeEvent(e)));
    // Net effect in order: a leave cancels an earlier join of the same id in this window.
    const joins = new Map<string, Uint8Array>();
    const leaves = new Set<string>();
    for (const e of evs) {
      if (e.leave !== undefined) {
        if (joins.delete(e.leave)) {
          leaves.add(e.leave); // some receivers saw it in their welcome
        } else leaves.add(e.leave);
      } else {
        const m = e.join!.member!;
        joins.set(m.id, e.join!.peerBytes!);
      }
    }
    return presenceFrames([...joins.values()], [...leaves]);
  }

  private relay(s: SignalSession, msg: Extract<Inbound, { t: "signal" }>): void {
    const from = s.member!.id;
    const target = msg.to === from ? undefined : this.members.get(msg.to);
    if (target === undefined) {
      this.stats_.noPeer++;
      s.send({ t: "error", code: "ERR_NO_PEER", msg: `no agent ${msg.to} is connected to this server`, ref: msg.to });
      return;
    }
    const out = encodeSignal({ t: "signal", from, data: msg.data as unknown as SignalData });
    if (out.byteLength > MAX_SIGNAL_BYTES) {
      // Only reachable with an input within a few bytes of the limit ("from" is longer than "to").
      throw new ProtocolError("ERR_TOO_LARGE", `relayed signal would exceed ${MAX_SIGNAL_BYTES} bytes`);
    }
    this.stats_.relayed++;
    target.sendBytes(out);
  }

  private dropRelay(s: SignalSession, control: boolean, reason: RelayDropReason, code: string, msg: string, ref?: string): void {
    if (control) {
      this.stats_.relayControlDropped++;
      this.controlDrops.set(reason, (this.controlDrops.get(reason) ?? 0) + 1);
    } else {
      this.stats_.relayDropped++;
      this.relayDrops.set(reason, (this.relayDrops.get(reason) ?? 0) + 1);
    }
    s.complainOnce(code, msg, this.now(), ref);
  }

  /** Last-resort data path: forward opaque (end-to-end sealed) bytes, within every budget. */
  private relayData(s: SignalSession, msg: Extract<Inbound, { t: "relay" }>): void {
    const from = s.member!.id;
    const n = msg.data.byteLength;
    const now = this.now();
    const control = relayChannel(msg.data) === "control";
    if (!this.relayEnabled) return this.dropRelay(s, control, "disabled", "ERR_RELAY_DISABLED", "this signaling server does not relay data (started with --no-relay)");
    const target = msg.to === from ? undefined : this.members.get(msg.to);
    if (target === undefined) return this.dropRelay(s, control, "no_peer", "ERR_NO_PEER", `no agent ${msg.to} is connected to this server`, msg.to);
    const queued = target.buffered();
    // control frames: their own (small) budget first, with more room at the receiver; over it, the data budget
    const ownBudget = control && queued <= this.limits.relayMaxBufferedBytes + CONTROL_RELAY_QUEUE_HEADROOM && this.takeControl(s, n, now);
    if (!ownBudget) {
      const refused = this.takeData(s, n, now, queued);
      if (refused !== undefined) return this.dropRelay(s, control, ...refused);
    }
    this.stats_.relayFrames++;
    this.stats_.relayBytes += n;
    if (control) {
      this.stats_.relayControlFrames++;
      this.stats_.relayControlBytes += n;
    }
    target.sendBytes(encodeSignal({ t: "relay", from, data: msg.data }));
  }

  private takeControl(s: SignalSession, n: number, now: number): boolean {
    if (!s.controlBucket.take(n, now, this.limits.relayControlRate)) return false;
    if (this.globalControl.take(n, now, this.limits.relayControlRateGlobal)) return true;
    s.controlBucket.refund(n);
    return false;
  }

  /** Take n bytes of the data budgets (sender, its IP, the server); the drop's reason, code and text when refused. */
  private takeData(s: SignalSession, n: number, now: number, queued: number): [RelayDropReason, string, string] | undefined {
    if (queued > this.limits.relayMaxBufferedBytes) {
      return ["congested", "ERR_RELAY_CONGESTED", `the receiver has more than ${Math.round(this.limits.relayMaxBufferedBytes / 1048576)} MiB unread; relay frames dropped`];
    }
    if (!s.relayBucket.take(n, now, this.relayRate)) {
      return ["rate", "ERR_RELAY_RATE", `relay rate limit of ${Math.round((this.relayRate * 8) / 1e6)} Mbit/s exceeded; frames dropped`];
    }
    const ipBucket = this.perIp.get(s.ip)?.bucket;
    if (ipBucket !== undefined && !ipBucket.take(n, now, this.limits.relayRatePerIp)) {
      s.relayBucket.refund(n);
      return ["ip_rate", "ERR_RELAY_RATE", `relay budget of your address (${Math.round((this.limits.relayRatePerIp * 8) / 1e6)} Mbit/s) exceeded; frames dropped`];
    }
    if (!this.globalRelay.take(n, now, this.limits.relayRateGlobal)) {
      s.relayBucket.refund(n);
      ipBucket?.refund(n);
      return ["global_rate", "ERR_RELAY_RATE", `this server's relay budget (${Math.round((this.limits.relayRateGlobal * 8) / 1e6)} Mbit/s) is exhausted; frames dropped`];
    }
    return undefined;
  }
}

export function peerInfo(m: MemberInfo): PeerInfo {
  return { id: m.id, name: m.name, pub: m.pub, meta: m.meta };
}
