/**
 * Signaling client: keeps one authenticated WebSocket to the signaling server, reconnecting with
 * jittered exponential backoff. Emits presence and forwarded signals (SDP, candidates); a fatal refusal (bad token,
 * duplicate identity) stops reconnecting and is reported once through onFatal.
 * Established WebRTC links do not depend on this connection.
 */
import { nanoid } from "nanoid";
import WebSocket from "ws";
import { CTX_HELLO, joinKeyOf, signFields, tokenMac, type Identity } from "../src/identity.js";
import type { Logger } from "../src/log.js";
import { backoffDelay, type BackoffConfig } from "../src/mesh/backoff.js";
import { CLOSE_CODES, decodeServerMsg, encodeSignal, SIGNAL_PATH, type IceCandidateInit, type PeerInfo, type SignalData, type WelcomeIceServer } from "../src/wire/signal.js";
import { UsageError, WeftError } from "../src/errors.js";

export interface SignalClientEvents {
  onWelcome(peers: PeerInfo[], info: { addr: string; stunPort: number; stunAltPort?: number; iceServers?: WelcomeIceServer[] }): void;
  onJoin(peer: PeerInfo): void;
  onLeave(id: string): void;
  onSignal(from: string, data: SignalData): void;
  onRelay?(from: string, data: Uint8Array): void;
  onServerError(code: string, msg: string, ref?: string): void;
  onDown(reason: string): void;
  onFatal(err: WeftError): void;
}

export interface SignalClientOptions {
  /** one URL, or several separated by commas (order of preference) */
  url: string;
  token: string;
  identity: Identity;
  name: string;
  instance: string;
  meta: Record<string, string>;
  logger: Logger;
  backoff?: BackoffConfig;
  /** while on a later URL, check the earlier ones this often (default twice the backoff's maximum, at most 30 s) */
  preferredRetryMs?: number;
  events: SignalClientEvents;
}

/** `--signal` value: one or more URLs separated by commas, each normalized (see signalEndpoint). */
export function signalEndpoints(urls: string): string[] {
  const list = urls
    .split(",")
    .map((u) => u.trim())
    .filter((u) => u !== "");
  if (list.length === 0) throw new UsageError("--signal needs at least one ws:// or wss:// URL");
  return [...new Set(list.map(signalEndpoint))];
}

export function signalEndpoint(url: string): string {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new UsageError(`--signal ${JSON.stringify(url)} is not a URL (expected ws://HOST:PORT or wss://HOST:PORT)`);
  }
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") throw new UsageError(`--signal must be a ws:// or wss:// URL, got ${u.protocol}`);
  if (u.pathname === "/" || u.pathname === "") u.pathname = SIGNAL_PATH;
  return u.toString();
}

export class SignalClient {
  private ws: WebSocket | undefined;
  private attempts = 0;
  private timer: NodeJS.Timeout | undefined;
  private preferTimer: NodeJS.Timeout | undefined;
  private probeWs: WebSocket | undefined;
  private stopped = false;
  private registered = false;
  private readonly joinKey: string;
  /** the last connection error logged at warn (each distinct cause once until registered) */
  private lastConnectError: string | undefined;
  /** every configured endpoint, in order of preference */
  readonly endpoints: string[];
  /** index into endpoints of the server in use (or being tried) */
  private current = 0;
  /** times this client moved to another server */
  failovers = 0;
  badFrames = 0;

  constructor(private readonly opts: SignalClientOptions) {
    this.endpoints = signalEndpoints(opts.url);
    this.joinKey = joinKeyOf(opts.token);
  }

  /** the endpoint in use (or being tried) */
  get endpoint(): string {
    return this.endpoints[this.current]!;
  }

  get host(): string {
    return new URL(this.endpoint).hostname;
  }

  get up(): boolean {
    return this.registered && this.ws?.readyState === WebSocket.OPEN;
  }

  start(): void {
    this.connect();
  }

  send(to: string, data: SignalData): boolean {
    if (!this.up || !this.ws) return false;
    this.ws.send(encodeSignal({ t: "signal", to, data }));
    return true;
  }

  /**
   * A topology-page browser introduced by the server (its /ui page): answer with sendViewerAnswer and the
   * same ref. Set by agent/ui (the agent's hello meta then says `ui`, so the server asks only us).
   */
  onViewerOffer: ((ref: string, sdp: string) => void) | undefined;

  sendViewerAnswer(a: { ref: string; sdp?: string; candidates?: IceCandidateInit[]; error?: string }): boolean {
    if (!this.up || !this.ws) return false;
    this.ws.send(encodeSignal({ t: "viewer-answer", ...a }));
    return true;
  }

  /** One relay frame for the last-resort data path (see agent/transport/relay.ts). */
  sendRelay(to: string, data: Uint8Array): boolean {
    if (!this.up || !this.ws) return false;
    this.ws.send(encodeSignal({ t: "relay", to, data }));
    return true;
  }

  bufferedAmount(): number {
    return this.ws?.bufferedAmount ?? 0;
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.stopPreferring();
    this.ws?.close(1000, "agent stopping");
    this.ws = undefined;
  }

  private stopPreferring(): void {
    if (this.preferTimer) clearInterval(this.preferTimer);
    this.preferTimer = undefined;
    this.probeWs?.terminate();
    this.probeWs = undefined;
  }

  /** While registered with a later URL, look for an earlier one that answers; move back to it. */
  private preferEarlier(): void {
    this.stopPreferring();
    if (this.current === 0 || this.stopped) return;
    const every = this.opts.preferredRetryMs ?? Math.max(1_000, Math.min(30_000, (this.opts.backoff?.maxMs ?? 30_000) * 2));
    let next = 0;
    this.preferTimer = setInterval(() => {
      if (this.probeWs || !this.up) return;
      const idx = next;
      next = (next + 1) % this.current;
      this.opts.logger.debug("checking a preferred signaling server", { url: this.endpoints[idx] });
      const probe = new WebSocket(this.endpoints[idx]!, { handshakeTimeout: 5_000, maxPayload: 256 * 1024 });
      this.probeWs = probe;
      const done = () => {
        if (this.probeWs === probe) this.probeWs = undefined;
        probe.terminate();
      };
      probe.on("error", done);
      probe.on("close", done);
      probe.on("message", () => {
        // a challenge: that server is up. Leave the current one and register there.
        done();
        if (this.stopped || idx >= this.current) return;
        this.opts.logger.info("a preferred signaling server is back; moving to it", { from: this.endpoint, to: this.endpoints[idx] });
        this.switchTo(idx);
      });
    }, every);
    this.preferTimer.unref();
  }

  private switchTo(idx: number): void {
    this.stopPreferring();
    const old = this.ws;
    this.ws = undefined;
    this.registered = false;
    this.current = idx;
    this.failovers++;
    this.attempts = 0;
    old?.removeAllListeners("close");
    old?.on("error", () => {});
    old?.close(1000, "moving to a preferred signaling server");
    this.connect();
  }

  private connect(): void {
    if (this.stopped) return;
    const log = this.opts.logger;
    const ws = new WebSocket(this.endpoint, { handshakeTimeout: 10_000, maxPayload: 256 * 1024 });
    this.ws = ws;
    let pingTimer: NodeJS.Timeout | undefined;
    let lastPong = Date.now();
    ws.binaryType = "nodebuffer";
    ws.on("open", () => {
      log.debug("signaling socket open", { url: this.endpoint });
      pingTimer = setInterval(() => {
        if (Date.now() - lastPong > 30_000) ws.terminate();
        else ws.ping();
      }, 10_000);
      pingTimer.unref();
    });
    ws.on("pong", () => (lastPong = Date.now()));
    ws.on("ping", () => (lastPong = Date.now()));
    ws.on("message", (raw: Buffer, isBinary: boolean) => {
      lastPong = Date.now();
      if (!isBinary) {
        this.badFrames++;
        return;
      }
      let msg;
      try {
        msg = decodeServerMsg(raw);
      } catch (e) {
        this.badFrames++;
        if (this.badFrames === 1) log.warn("dropping malformed message from signaling server", { err: e });
        return;
      }
      const ev = this.opts.events;
      switch (msg.t) {
        case "challenge": {
          const { identity, instance } = this.opts;
          ws.send(
            encodeSignal({
              t: "hello",
              id: identity.id,
              pub: identity.publicKey,
              name: this.opts.name,
              instance,
              meta: this.opts.meta,
              mac: tokenMac(this.joinKey, CTX_HELLO, msg.nonce, identity.id, instance),
              sig: signFields(identity, CTX_HELLO, msg.nonce, identity.id, instance),
            }),
          );
          break;
        }
        case "welcome":
          this.registered = true;
          this.lastConnectError = undefined;
          this.attempts = 0;
          this.preferEarlier();
          log.info("registered with signaling server", { url: this.endpoint, peers: msg.peers.length, addr: msg.you.addr });
          ev.onWelcome(msg.peers, { addr: msg.you.addr, stunPort: msg.stunPort, ...(msg.stunAltPort ? { stunAltPort: msg.stunAltPort } : {}), ...(msg.iceServers ? { iceServers: msg.iceServers } : {}) });
          break;
        case "join":
          ev.onJoin(msg.peer);
          break;
        case "leave":
          ev.onLeave(msg.id);
          break;
        case "presence":
          for (const id of msg.leave) ev.onLeave(id);
          for (const p of msg.join) ev.onJoin(p);
          break;
        case "signal":
          ev.onSignal(msg.from, msg.data);
          break;
        case "relay":
          ev.onRelay?.(msg.from, msg.data);
          break;
        case "viewer-offer":
          if (this.onViewerOffer) this.onViewerOffer(msg.ref, msg.sdp);
          else this.sendViewerAnswer({ ref: msg.ref, error: "this agent takes no topology-page viewers" });
          break;
        case "error":
          ev.onServerError(msg.code, msg.msg, msg.ref);
          break;
      }
    });
    ws.on("error", (err: NodeJS.ErrnoException) => {
      // Said once per distinct cause (e.g. ECONNREFUSED), at once, not after the registration timeout.
      const cause = err.code ? `${err.code}: ${err.message}` : err.message;
      if (!this.registered && cause !== this.lastConnectError) {
        this.lastConnectError = cause;
        log.warn("cannot reach the signaling server; retrying with backoff", { url: this.endpoint, err: cause });
      } else log.debug("signaling socket error", { err: cause });
    });
    ws.on("close", (code: number, reasonBuf: Buffer) => {
      if (pingTimer) clearInterval(pingTimer);
      const reason = reasonBuf.toString() || `code ${code}`;
      const wasUp = this.registered;
      this.registered = false;
      if (this.ws === ws) this.ws = undefined;
      if (this.stopped) return;
      if (code === CLOSE_CODES.BAD_TOKEN || code === CLOSE_CODES.BAD_IDENTITY) {
        this.stopped = true;
        this.opts.events.onFatal(new WeftError(code === CLOSE_CODES.BAD_TOKEN ? "ERR_BAD_TOKEN" : "ERR_BAD_IDENTITY", `signaling server refused this agent: ${reason}`));
        return;
      }
      if (code === CLOSE_CODES.DUPLICATE_ID) {
        this.stopped = true;
        this.opts.events.onFatal(new WeftError("ERR_DUPLICATE_ID", `signaling server refused this agent: ${reason}`));
        return;
      }
      this.stopPreferring();
      if (wasUp) this.opts.events.onDown(reason);
      // next server in order (wrapping around); the backoff grows with every failed attempt
      if (this.endpoints.length > 1) {
        this.current = (this.current + 1) % this.endpoints.length;
        this.failovers++;
      }
      const delay = backoffDelay(this.attempts++, this.opts.backoff);
      log.debug("signaling connection lost; reconnecting", { reason, inMs: delay, next: this.endpoint });
      this.timer = setTimeout(() => this.connect(), delay);
      this.timer.unref?.();
    });
  }
}

export function newInstanceId(): string {
  return nanoid(12);
}
