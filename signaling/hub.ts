/**
 * SignalHub: the signaling server's session logic, independent of any socket library.
 *
 * An adapter (signaling/server.ts for `ws`, a test for anything else) calls `hub.open(socket)` when a
 * connection is accepted, `session.receive(frame)` for each frame and `session.closed()` when the
 * connection is gone. The hub talks back only through the SignalSocket port it was given.
 *
 * Per session:  challenged --hello ok--> member --close--> closed
 *                    |   \--hello, id held by another live instance--> verifying --> member | closed(4009)
 *                    \--no hello in helloTimeoutMs / bad token / bad identity / protocol--> closed
 *
 * The hub keeps presence only (who is connected, from where); nothing is persisted. After a server
 * restart every agent reconnects and re-registers, which rebuilds all of it.
 *
 * Remote input never throws out of `receive`: undecodable frames are counted (per session and in
 * `stats()`), logged once per session, answered with `error {code,msg}`, and after MAX_BAD_FRAMES the
 * session is closed with PROTOCOL.
 */
import { randomBytes } from "node:crypto";
import { ProtocolError, WeftError } from "../src/errors.js";
import { CTX_HELLO, checkTokenMac, deriveNodeId, joinKeyOf, verifyFields } from "../src/identity.js";
import { silentLogger, type Logger } from "../src/log.js";
import { decodeEnvelope, isPlainObject, nodeId } from "../src/wire/codec.js";
import { CLOSE_CODES, MAX_BAD_FRAMES, MAX_RELAY_BYTES, MAX_SIGNAL_BYTES, decodeClientMsg, encodeSignal, type ClientMsg, type PeerInfo, type ServerMsg, type SignalData, type WelcomeIceServer } from "../src/wire/signal.js";

/** 100 Mbit/s per agent. */
export const DEFAULT_RELAY_RATE = 12_500_000;

export const SERVER_VERSION = "weftnet-signal/0.1.0";
export const DEFAULT_HELLO_TIMEOUT_MS = 10_000;
export const DEFAULT_PROBE_TIMEOUT_MS = 3_000;

/** What the hub needs from a connection. */
export interface SignalSocket {
  send(bytes: Uint8Array): void;
  close(code: number, reason: string): void;
  /** the peer's IP as this server sees it */
  readonly remoteAddress: string;
  readonly remotePort?: number;
  /**
   * Optional liveness check (the ws adapter sends a ping and waits for the pong). Used when a second
   * instance claims a node id: a live holder keeps it (4009 for the newcomer), a dead one is replaced.
   * Without it the holder counts as live.
   */
  probe?(timeoutMs: number): Promise<boolean>;
}

export interface SignalHubOptions {
  /**
   * The join key (identity.ts splitToken): checks the agents' hello MAC. The server never needs the cluster
   * token; `token` is accepted for convenience and reduced to its join key at once.
   */
  joinKey?: string;
  token?: string;
  logger?: Logger;
  /** wall clock in ms (connectedAt) */
  now?: () => number;
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
  /** data relay (last-resort path): frames and bytes forwarded, frames dropped (rate, disabled, no peer) */
  relayFrames: number;
  relayBytes: number;
  relayDropped: number;
}

type State = "challenged" | "verifying" | "member" | "closed";

/** Decoded client frame; `signal.data` stays the raw map so it is relayed verbatim. */
type Inbound = Extract<ClientMsg, { t: "hello" }> | { t: "signal"; to: string; data: Record<string, unknown> } | Extract<ClientMsg, { t: "relay" }>;

function decodeInbound(frame: Uint8Array): Inbound {
  const m = decodeEnvelope(frame, MAX_RELAY_BYTES);
  if (m.t !== "relay" && frame.byteLength > MAX_SIGNAL_BYTES) throw new ProtocolError("ERR_TOO_LARGE", `message of ${frame.byteLength} bytes exceeds the ${MAX_SIGNAL_BYTES}-byte limit`);
  switch (m.t) {
    case "relay":
      return decodeClientMsg(frame) as Extract<ClientMsg, { t: "relay" }>;
    case "hello":
      return decodeClientMsg(frame) as Extract<ClientMsg, { t: "hello" }>;
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
}

export class SignalSession {
  state: State = "challenged";
  badFrames = 0;
  readonly relayBucket = new ByteBucket();
  private lastComplaint = new Map<string, number>();

  /** An `error` reply at most once a second per code (a flood of relay frames gets one answer). */
  complainOnce(code: string, msg: string, now: number, ref?: string): void {
    const last = this.lastComplaint.get(code);
    if (last !== undefined && now - last < 1000) return;
    this.lastComplaint.set(code, now);
    const e: ServerMsg = { t: "error", code, msg };
    if (ref !== undefined) e.ref = ref;
    this.send(e);
  }
  member: MemberInfo | undefined;
  readonly addr: string;
  private helloTimer: ReturnType<typeof setTimeout> | undefined;
  private loggedBadFrame = false;

  constructor(
    private readonly hub: SignalHub,
    readonly socket: SignalSocket,
    readonly nonce: Uint8Array,
  ) {
    this.addr = formatAddr(socket.remoteAddress, socket.remotePort);
  }

  /** @internal */
  start(helloTimeoutMs: number): void {
    this.send({ t: "challenge", nonce: this.nonce, server: this.hub.serverVersion });
    if (this.state === "closed") return;
    this.helloTimer = setTimeout(() => {
      if (this.state !== "challenged" && this.state !== "verifying") return;
      this.hub.stats_.helloTimeouts++;
      this.terminate(CLOSE_CODES.HELLO_TIMEOUT, `no valid hello within ${Math.round(helloTimeoutMs / 1000)} s`);
    }, helloTimeoutMs);
    this.helloTimer.unref?.();
  }

  /** Feed one frame from the socket. Text frames arrive as strings and are rejected. Never throws. */
  receive(frame: Uint8Array | string): void {
    if (this.state === "closed") return;
    try {
      if (typeof frame === "string") throw new ProtocolError("ERR_MALFORMED", "text frames are not accepted; send binary msgpack frames");
      const msg = decodeInbound(frame);
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

  /** @internal */
  sendBytes(bytes: Uint8Array): void {
    if (this.state === "closed") return;
    try {
      this.socket.send(bytes);
    } catch (e) {
      this.hub.log.debug("send failed", { err: e, addr: this.addr });
    }
  }

  /** @internal */
  clearHelloTimer(): void {
    if (this.helloTimer !== undefined) clearTimeout(this.helloTimer);
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

export class SignalHub {
  readonly log: Logger;
  readonly serverVersion: string;
  stunPort: number;
  /** @internal counters; read them with stats() */
  readonly stats_: Omit<HubStats, "sessions" | "members" | "badFramesByCode"> = {
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
    relayFrames: 0,
    relayBytes: 0,
    relayDropped: 0,
  };
  readonly relayEnabled: boolean;
  readonly relayRate: number;
  private readonly badByCode = new Map<string, number>();
  private readonly sessions = new Set<SignalSession>();
  private readonly members = new Map<string, SignalSession>();
  private readonly joinKey: string;
  private readonly now: () => number;
  private readonly helloTimeoutMs: number;
  private readonly probeTimeoutMs: number;
  private readonly random: (n: number) => Uint8Array;

  constructor(private readonly opts: SignalHubOptions) {
    this.joinKey = serverJoinKey(opts);
    this.log = opts.logger ?? silentLogger;
    this.now = opts.now ?? Date.now;
    this.helloTimeoutMs = opts.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS;
    this.probeTimeoutMs = opts.probeTimeoutMs ?? DEFAULT_PROBE_TIMEOUT_MS;
    this.stunPort = opts.stunPort ?? 0;
    this.serverVersion = (opts.serverVersion ?? SERVER_VERSION).slice(0, 64);
    this.random = opts.random ?? ((n) => new Uint8Array(randomBytes(n)));
    this.relayEnabled = opts.relay?.enabled ?? true;
    this.relayRate = opts.relay?.rateBytesPerSec ?? DEFAULT_RELAY_RATE;
  }

  /** A new connection: sends `challenge` and starts the hello timer. */
  open(socket: SignalSocket): SignalSession {
    const s = new SignalSession(this, socket, this.random(32));
    this.sessions.add(s);
    s.start(this.helloTimeoutMs);
    return s;
  }

  /** Registered agents, oldest first. */
  list(): MemberInfo[] {
    return [...this.members.values()].map((s) => s.member!).sort((a, b) => a.connectedAt - b.connectedAt);
  }

  get size(): number {
    return this.members.size;
  }

  stats(): HubStats {
    return { ...this.stats_, sessions: this.sessions.size, members: this.members.size, badFramesByCode: Object.fromEntries(this.badByCode) };
  }

  /** Close every session (shutdown). No leave broadcasts: everyone is going. */
  closeAll(code: number = CLOSE_CODES.SHUTDOWN, reason = "server shutting down"): void {
    for (const s of [...this.sessions]) s.terminate(code, reason, false);
  }

  // ---- internals called by SignalSession ---------------------------------------------------------

  /** @internal */
  countBadFrame(code: string): void {
    this.stats_.badFrames++;
    this.badByCode.set(code, (this.badByCode.get(code) ?? 0) + 1);
  }

  /** @internal */
  detach(s: SignalSession, announce: boolean): void {
    this.sessions.delete(s);
    const m = s.member;
    if (m === undefined || this.members.get(m.id) !== s) return; // never registered, or already replaced
    this.members.delete(m.id);
    this.log.info("agent left", { id: m.id, name: m.name, addr: m.addr });
    if (announce) this.broadcast({ t: "leave", id: m.id }, undefined);
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
        else this.relay(s, msg);
        return;
      case "closed":
        return;
    }
  }

  private hello(s: SignalSession, h: Extract<ClientMsg, { t: "hello" }>): void {
    s.clearHelloTimer();
    if (!checkTokenMac(this.joinKey, h.mac, CTX_HELLO, s.nonce, h.id, h.instance)) {
      this.stats_.badToken++;
      this.log.warn("agent refused: bad cluster token", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_TOKEN, "bad token: the hello proof does not match this server's cluster token");
      return;
    }
    let derived: string | undefined;
    try {
      derived = deriveNodeId(h.pub);
    } catch {
      derived = undefined;
    }
    if (derived !== h.id) {
      this.stats_.badIdentity++;
      this.log.warn("agent refused: node id is not derived from its public key", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_IDENTITY, "bad identity: node id is not derived from the public key");
      return;
    }
    if (!verifyFields(h.pub, h.sig, CTX_HELLO, s.nonce, h.id, h.instance)) {
      this.stats_.badIdentity++;
      this.log.warn("agent refused: hello signature does not verify", { id: h.id, name: h.name, addr: s.addr });
      s.terminate(CLOSE_CODES.BAD_IDENTITY, "bad identity: hello signature does not verify");
      return;
    }
    const member: MemberInfo = { id: h.id, name: h.name, pub: h.pub, meta: h.meta, instance: h.instance, addr: s.addr, connectedAt: this.now() };
    s.member = member;
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
    s.state = "challenged";
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
    this.members.set(m.id, s);
    this.stats_.accepted++;
    if (replacing !== undefined) {
      this.stats_.replaced++;
      // members already points at s, so the old session's detach neither unregisters nor broadcasts.
      replacing.terminate(CLOSE_CODES.REPLACED, "replaced by a newer connection of the same agent");
    }
    const peers: PeerInfo[] = [];
    for (const o of this.members.values()) if (o !== s) peers.push(peerInfo(o.member!));
    const welcome: ServerMsg = { t: "welcome", you: { id: m.id, addr: m.addr }, peers, stunPort: this.stunPort };
    if (this.opts.stunAltPort) welcome.stunAltPort = this.opts.stunAltPort;
    const ice = this.opts.iceServersFor?.(m.id);
    if (ice && ice.length) welcome.iceServers = ice;
    s.send(welcome);
    const old = replacing?.member;
    const changed = old === undefined || old.name !== m.name || JSON.stringify(old.meta) !== JSON.stringify(m.meta);
    if (changed) this.broadcast({ t: "join", peer: peerInfo(m) }, s);
    this.log.info(replacing ? "agent reconnected" : "agent joined", { id: m.id, name: m.name, addr: m.addr, members: this.members.size });
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

  /** Last-resort data path: forward opaque (end-to-end sealed) bytes, within the sender's rate. */
  private relayData(s: SignalSession, msg: Extract<Inbound, { t: "relay" }>): void {
    const from = s.member!.id;
    const n = msg.data.byteLength;
    if (!this.relayEnabled) {
      this.stats_.relayDropped++;
      s.complainOnce("ERR_RELAY_DISABLED", "this signaling server does not relay data (started with --no-relay)", this.now());
      return;
    }
    if (!s.relayBucket.take(n, this.now(), this.relayRate)) {
      this.stats_.relayDropped++;
      s.complainOnce("ERR_RELAY_RATE", `relay rate limit of ${Math.round((this.relayRate * 8) / 1e6)} Mbit/s exceeded; frames dropped`, this.now());
      return;
    }
    const target = msg.to === from ? undefined : this.members.get(msg.to);
    if (target === undefined) {
      this.stats_.relayDropped++;
      s.complainOnce("ERR_NO_PEER", `no agent ${msg.to} is connected to this server`, this.now(), msg.to);
      return;
    }
    this.stats_.relayFrames++;
    this.stats_.relayBytes += n;
    target.sendBytes(encodeSignal({ t: "relay", from, data: msg.data }));
  }

  private broadcast(msg: ServerMsg, except: SignalSession | undefined): void {
    const bytes = encodeSignal(msg);
    for (const o of this.members.values()) if (o !== except) o.sendBytes(bytes);
  }
}

function peerInfo(m: MemberInfo): PeerInfo {
  return { id: m.id, name: m.name, pub: m.pub, meta: m.meta };
}

/** The join key a server checks with: given directly, or derived from a cluster token (which is then dropped). */
export function serverJoinKey(o: { joinKey?: string | undefined; token?: string | undefined }): string {
  if (typeof o.joinKey === "string" && o.joinKey.length > 0) return o.joinKey;
  if (typeof o.token === "string" && o.token.length > 0) return joinKeyOf(o.token);
  throw new WeftError("ERR_USAGE", "signaling hub needs a join key (or a cluster token to derive it from)");
}
