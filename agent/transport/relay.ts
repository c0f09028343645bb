/**
 * Relay transport: the last-resort path. A relay link carries both channels (control and packets) as
 * `relay` frames over the agents' WebSockets to the signaling server and back out to the peer, when no
 * WebRTC path forms (both ends behind symmetric NAT and no TURN, a site that blocks UDP).
 *
 * The server only sees sealed bytes. Each link runs its own key agreement through the usual signed
 * offer/answer (mesh/auth.ts): the "SDP" carries an ephemeral X25519 public key, its a=fingerprint is the
 * SHA-256 of that key, and the offer/answer signature and token MAC cover that fingerprint — so a server
 * that swaps keys to sit in the middle is caught exactly like one that swaps a DTLS fingerprint.
 *
 *   keys   = HKDF-SHA256(X25519(eph_self, eph_peer), salt = SHA-256(peer key; agent.ts passes it as `token`),
 *                        info = "weftnet/relay/v1" | offerer id | answerer id | conn)  -> 2 x 32 bytes
 *   frame  = [1 version=1][1 conn length n][n conn][1 channel 0=control 1=packets][8 counter, big-endian]
 *            [ChaCha20-Poly1305(key of this direction, nonce = 0x00000000 | counter,
 *                               aad = frame header | from id | to id) of the message][16 tag]
 *
 * Counters start at 1 and must increase strictly (the WebSocket path is reliable and ordered), so a
 * replayed or reordered frame is dropped. Frames that fail to open are counted and dropped; a link that
 * keeps receiving them is closed.
 */
import { createCipheriv, createDecipheriv, createHash, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, type KeyObject } from "node:crypto";
import { silentLogger, type Logger } from "../../src/log.js";
import type { ChannelName, Fingerprint, LinkOptions, LinkSignal, LinkState, LinkStats, SendResult, Transport, TransportLink } from "../../src/mesh/transport.js";

export const RELAY_FRAME_VERSION = 1;
/** Above this much data queued on the signaling WebSocket, sends are refused (backpressure). */
export const RELAY_BUFFER_LIMIT = 2 * 1024 * 1024;
/**
 * Packets are refused this much earlier than control messages (one control message at most: wire/control.ts
 * MAX_CONTROL_BYTES), so pod traffic that fills the socket never makes heartbeats, gossip or IPAM messages
 * "full": the control channel keeps its room on a saturated relay.
 */
export const RELAY_CONTROL_HEADROOM = 256 * 1024;
export const RELAY_LOW_WATER = 512 * 1024;
/**
 * After a packets send leaves more than this queued, the link reports the fall back to it (onDrain): the
 * Forwarder's high-water pause (src/packet/forwarder.ts QUEUE_HIGH) waits for that, so this stays below it.
 */
export const RELAY_PACKETS_LOW_WATER = 48 * 1024;
/** Largest message a relay link accepts: one GSO frame and some. */
export const RELAY_MAX_MESSAGE = 72 * 1024;
const MAX_BAD_FRAMES = 32;
const X25519_SPKI_PREFIX = Buffer.from("302a300506032b656e032100", "hex");

export interface RelayPort {
  readonly up: boolean;
  /** send one relay frame to a node through the signaling server */
  sendRelay(to: string, data: Uint8Array): boolean;
  /** bytes queued on the signaling socket */
  bufferedAmount(): number;
}

export interface RelayTransportOptions {
  selfId: string;
  token: string;
  port: RelayPort;
  logger?: Logger;
}

export interface RelayTransport extends Transport {
  /** a `relay` frame from the signaling server */
  deliver(from: string, data: Uint8Array): void;
  readonly counters: { badFrames: number; framesIn: number; framesOut: number; bytesIn: number; bytesOut: number };
}

function hex(b: Uint8Array): string {
  return Buffer.from(b).toString("hex").toUpperCase().match(/../g)!.join(":");
}

function keyFingerprint(pub: Uint8Array): Fingerprint {
  return { algorithm: "sha-256", value: hex(createHash("sha256").update(pub).digest()) };
}

function relaySdp(pub: Uint8Array): string {
  const fp = keyFingerprint(pub);
  return `v=0\r\ns=weftnet-relay\r\na=x-weft-relay:${RELAY_FRAME_VERSION}\r\na=x-weft-key:${Buffer.from(pub).toString("base64")}\r\na=fingerprint:${fp.algorithm} ${fp.value}\r\n`;
}

/** The peer's ephemeral key from a relay SDP; undefined when absent or not matching its fingerprint. */
export function parseRelaySdp(sdp: string): Uint8Array | undefined {
  const k = /^a=x-weft-key:([A-Za-z0-9+/=]+)\s*$/m.exec(sdp);
  const f = /^a=fingerprint:sha-256 ([0-9A-F:]+)\s*$/m.exec(sdp);
  if (!k || !f) return undefined;
  const pub = new Uint8Array(Buffer.from(k[1]!, "base64"));
  if (pub.byteLength !== 32 || keyFingerprint(pub).value !== f[1]) return undefined;
  return pub;
}

export function createRelayTransport(o: RelayTransportOptions): RelayTransport {
  const log = (o.logger ?? silentLogger).child("relay");
  const links = new Map<string, RelayLink>(); // conn -> link
  const counters = { badFrames: 0, framesIn: 0, framesOut: 0, bytesIn: 0, bytesOut: 0 };
  const salt = createHash("sha256").update(o.token).digest();
  let drainTimer: NodeJS.Timeout | undefined;
  let drainAt = Infinity;
  /** Poll the signaling socket until its queue is at or below `at`, then tell the links that asked. */
  const waitDrain = (at: number) => {
    drainAt = Math.min(drainAt, at);
    if (drainTimer) return;
    drainTimer = setInterval(() => {
      if (o.port.bufferedAmount() > drainAt) return;
      clearInterval(drainTimer);
      drainTimer = undefined;
      drainAt = Infinity;
      for (const l of links.values()) l.drained();
    }, 10);
    drainTimer.unref?.();
  };
  const t: RelayTransport = {
    name: "relay",
    // Relay links use a fresh key per link; this is the fingerprint format, not a fixed identity.
    fingerprint: { algorithm: "sha-256", value: "00" },
    counters,
    createLink(opts: LinkOptions): TransportLink {
      if (!opts.peer || !opts.conn) throw new Error("relay links need the peer id and connection id");
      const l = new RelayLink(opts, o, salt, log, counters, waitDrain, () => links.delete(opts.conn!));
      links.set(opts.conn, l);
      return l;
    },
    deliver(from: string, data: Uint8Array) {
      counters.framesIn++;
      counters.bytesIn += data.byteLength;
      const conn = peekConn(data);
      const l = conn === undefined ? undefined : links.get(conn);
      if (!l || l.peer !== from) {
        counters.badFrames++;
        return;
      }
      l.receive(data);
    },
    async close() {
      for (const l of [...links.values()]) l.close();
      if (drainTimer) clearInterval(drainTimer);
    },
  };
  return t;
}

function peekConn(data: Uint8Array): string | undefined {
  if (data.byteLength < 2 || data[0] !== RELAY_FRAME_VERSION) return undefined;
  const n = data[1]!;
  if (data.byteLength < 2 + n + 9 + 16) return undefined;
  return Buffer.from(data.subarray(2, 2 + n)).toString("latin1");
}

class RelayLink implements TransportLink {
  state: LinkState = "new";
  readonly peer: string;
  private readonly conn: string;
  private readonly connBytes: Buffer;
  private readonly initiator: boolean;
  private readonly priv: KeyObject;
  private readonly pub: Uint8Array;
  private sendKey: Buffer | undefined;
  private recvKey: Buffer | undefined;
  private sendCounter = 0n;
  private recvCounter = 0n;
  private bytesSent = 0;
  private bytesReceived = 0;
  private bad = 0;
  private wantDrain = false;
  private closedOnce = false;

  constructor(
    private readonly opts: LinkOptions,
    private readonly t: RelayTransportOptions,
    private readonly salt: Buffer,
    private readonly log: Logger,
    private readonly counters: { framesOut: number; badFrames: number; bytesOut: number },
    private readonly waitDrain: (at: number) => void,
    private readonly forget: () => void,
  ) {
    this.peer = opts.peer!;
    this.conn = opts.conn!;
    this.connBytes = Buffer.from(this.conn, "latin1");
    if (this.connBytes.length > 255) throw new Error("relay connection id too long");
    this.initiator = opts.initiator;
    const kp = generateKeyPairSync("x25519");
    this.priv = kp.privateKey;
    this.pub = new Uint8Array(kp.publicKey.export({ type: "spki", format: "der" }).subarray(-32));
  }

  async start(): Promise<void> {
    if (!this.initiator || this.state !== "new") return;
    this.state = "connecting";
    const sdp = relaySdp(this.pub);
    setImmediate(() => this.call(() => this.opts.handlers.onSignal({ kind: "offer", sdp })));
  }

  async handleSignal(sig: LinkSignal): Promise<void> {
    if (this.state === "closed" || this.state === "failed" || sig.kind === "candidate") return;
    if (sig.kind === "offer" && this.initiator) return;
    if (sig.kind === "answer" && !this.initiator) return;
    const peerPub = parseRelaySdp(sig.sdp);
    if (!peerPub) {
      this.fail("relay SDP without a valid key");
      return;
    }
    const shared = diffieHellman({ privateKey: this.priv, publicKey: createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, peerPub]), format: "der", type: "spki" }) });
    const [offerer, answerer] = this.initiator ? [this.t.selfId, this.peer] : [this.peer, this.t.selfId];
    const info = Buffer.concat([Buffer.from("weftnet/relay/v1"), Buffer.from(offerer), Buffer.from(answerer), this.connBytes]);
    const okm = Buffer.from(hkdfSync("sha256", shared, this.salt, info, 64));
    const o2a = okm.subarray(0, 32);
    const a2o = okm.subarray(32, 64);
    this.sendKey = this.initiator ? o2a : a2o;
    this.recvKey = this.initiator ? a2o : o2a;
    if (sig.kind === "offer") {
      this.state = "connecting";
      const sdp = relaySdp(this.pub);
      this.call(() => this.opts.handlers.onSignal({ kind: "answer", sdp }));
    }
    // Both sides hold the keys now; the WebSocket path is ordered, so the offerer sees the answer
    // before any frame the answerer sends.
    this.state = "open";
    setImmediate(() => this.state === "open" && this.call(() => this.opts.handlers.onOpen()));
  }

  send(channel: ChannelName, data: Uint8Array): SendResult {
    if (this.state !== "open" || !this.sendKey || !this.t.port.up) return "closed";
    if (data.byteLength > RELAY_MAX_MESSAGE) return "too-big";
    if (this.t.port.bufferedAmount() > RELAY_BUFFER_LIMIT - (channel === "packets" ? RELAY_CONTROL_HEADROOM : 0)) {
      this.wantDrain = true;
      this.waitDrain(RELAY_LOW_WATER);
      return "full";
    }
    const header = Buffer.allocUnsafe(2 + this.connBytes.length + 9);
    header[0] = RELAY_FRAME_VERSION;
    header[1] = this.connBytes.length;
    this.connBytes.copy(header, 2);
    let o = 2 + this.connBytes.length;
    header[o++] = channel === "control" ? 0 : 1;
    const counter = ++this.sendCounter;
    header.writeBigUInt64BE(counter, o);
    const nonce = Buffer.alloc(12);
    nonce.writeBigUInt64BE(counter, 4);
    const c = createCipheriv("chacha20-poly1305", this.sendKey, nonce, { authTagLength: 16 });
    c.setAAD(Buffer.concat([header, Buffer.from(this.t.selfId), Buffer.from(this.peer)]), { plaintextLength: data.byteLength });
    const frame = Buffer.concat([header, c.update(data), c.final(), c.getAuthTag()]);
    if (!this.t.port.sendRelay(this.peer, frame)) return "closed";
    this.counters.framesOut++;
    this.counters.bytesOut += frame.byteLength;
    this.bytesSent += data.byteLength;
    if (channel === "packets" && this.t.port.bufferedAmount() > RELAY_PACKETS_LOW_WATER) {
      this.wantDrain = true;
      this.waitDrain(RELAY_PACKETS_LOW_WATER);
    }
    return "ok";
  }

  receive(frame: Uint8Array): void {
    if (this.state !== "open" || !this.recvKey) return;
    const b = Buffer.from(frame.buffer, frame.byteOffset, frame.byteLength);
    const n = b[1]!;
    let o = 2 + n;
    const ch = b[o++];
    const counter = b.readBigUInt64BE(o);
    o += 8;
    const header = b.subarray(0, o);
    const body = b.subarray(o, b.length - 16);
    const tag = b.subarray(b.length - 16);
    if ((ch !== 0 && ch !== 1) || counter <= this.recvCounter) return this.badFrame("replayed, reordered or unknown-channel relay frame");
    const nonce = Buffer.alloc(12);
    nonce.writeBigUInt64BE(counter, 4);
    let plain: Buffer;
    try {
      const d = createDecipheriv("chacha20-poly1305", this.recvKey, nonce, { authTagLength: 16 });
      d.setAAD(Buffer.concat([header, Buffer.from(this.peer), Buffer.from(this.t.selfId)]), { plaintextLength: body.length });
      d.setAuthTag(tag);
      plain = Buffer.concat([d.update(body), d.final()]);
    } catch {
      return this.badFrame("relay frame failed authentication");
    }
    this.recvCounter = counter;
    this.bytesReceived += plain.byteLength;
    const msg = new Uint8Array(plain.buffer, plain.byteOffset, plain.byteLength);
    this.call(() => this.opts.handlers.onMessage(ch === 0 ? "control" : "packets", msg));
  }

  private badFrame(why: string): void {
    this.counters.badFrames++;
    if (++this.bad === 1) this.log.warn("dropping relay frame", { peer: this.peer, why });
    if (this.bad >= MAX_BAD_FRAMES) this.fail(`closed after ${this.bad} bad relay frames (${why})`);
  }

  drained(): void {
    if (!this.wantDrain || this.state !== "open") return;
    this.wantDrain = false;
    this.call(() => {
      this.opts.handlers.onDrain?.("packets");
      this.opts.handlers.onDrain?.("control");
    });
  }

  bufferedAmount(): number {
    return this.t.port.bufferedAmount();
  }

  async stats(): Promise<LinkStats> {
    return {
      bytesSent: this.bytesSent,
      bytesReceived: this.bytesReceived,
      selected: { localType: "relay", localAddress: "signaling server", remoteType: "relay", remoteAddress: "signaling server" },
    };
  }

  close(reason = "closed locally"): void {
    this.finish("closed", reason);
  }

  private fail(reason: string): void {
    this.finish("failed", reason);
  }

  private finish(state: "closed" | "failed", reason: string): void {
    if (this.closedOnce) return;
    this.closedOnce = true;
    this.state = state;
    this.forget();
    this.call(() => this.opts.handlers.onClose(reason));
  }

  private call(f: () => void): void {
    try {
      f();
    } catch (err) {
      this.log.error("relay link handler threw", { peer: this.peer, err });
    }
  }
}
