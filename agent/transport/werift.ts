/**
 * werift implementation of the transport port (src/mesh/transport.ts).
 *
 * One Transport = one DTLS certificate (ECDSA P-256, generated once in createWeriftTransport, or passed in),
 * shared by every RTCPeerConnection it creates, so `transport.fingerprint` is known before any link exists
 * and equals the a=fingerprint line of every SDP its links produce.
 *
 * One TransportLink = one RTCPeerConnection with two pre-negotiated data channels (negotiated: true):
 *   control  id 0  reliable, ordered
 *   packets  id 1  ordered: false, maxRetransmits: 0
 *
 * Limits enforced here (see LIMITS):
 * - Message size: werift advertises a=max-message-size (default 65536) and throws on send when a message is
 *   larger than what the REMOTE advertised; it enforces nothing on receive. We advertise
 *   maxMessageSize (default 1 MiB) and refuse (send() -> false, logged once per link and channel) messages
 *   larger than min(our maxMessageSize, the remote's advertised size). Control messages (msgpack, up to
 *   ~256 KiB) therefore fit between two weftnet agents; a peer advertising 64 KiB gets 64 KiB.
 * - Send buffer: werift's send path slows down quadratically with its queue length (design brief section 5),
 *   so send() refuses a message when the channel already holds more than its low-water mark AND the message
 *   would take bufferedAmount over the limit (control 1 MiB, packets 64 KiB). That bounds bufferedAmount by
 *   max(limit, lowWater + one message), and guarantees that a refusal happens above the low-water mark, so
 *   werift's bufferedamountlow event fires later and we call onDrain(channel) once (asynchronously).
 *
 * Loopback: werift gathers host candidates from non-internal interfaces only; two peers on one machine
 * connect over those (eth0 here) or, with no usable interface, need iceAdditionalHostAddresses: ['127.0.0.1'].
 * `loopbackOnly: true` adds a 127.0.0.1 host candidate and restricts candidate pairs to loopback (IPv4):
 * for tests in one or several processes on one box, independent of the machine's interfaces.
 *
 * Failure: werift does not always report ICE failure (a peer that never answers leaves the link
 * "connecting" forever); the mesh layer owns that timeout and calls close(), which frees sockets and timers.
 */
import { RTCCertificate, RTCPeerConnection, CipherContext, type CandidatePair, type RTCDataChannel, type RTCIceCandidate } from "werift";
import type {
  ChannelName,
  Fingerprint,
  LinkHandlers,
  LinkOptions,
  LinkSignal,
  LinkState,
  LinkStats,
  SelectedPath,
  Transport,
  TransportLink,
} from "../../src/mesh/transport.js";
import type { IceCandidateInit } from "../../src/wire/signal.js";
import { silentLogger, type Logger } from "../../src/log.js";

export const LIMITS = {
  /** bufferedAmount above which send() refuses (see header). */
  controlBufferLimit: 1024 * 1024,
  packetsBufferLimit: 64 * 1024,
  /** onDrain fires when bufferedAmount falls to or below this after a refusal. */
  controlLowWater: 256 * 1024,
  packetsLowWater: 16 * 1024,
  /** a=max-message-size we advertise and the largest message we send (capped by the remote's). */
  maxMessageSize: 1024 * 1024,
  /** werift's default when the remote SDP has no a=max-message-size (RFC 8841 says 64 KiB too). */
  defaultRemoteMaxMessageSize: 65536,
} as const;

/** PEM key + certificate, e.g. to persist the DTLS identity across restarts. */
export interface DtlsCertificatePem {
  certPem: string;
  keyPem: string;
}

export interface WeriftTransportOptions {
  logger?: Logger;
  /** Extra host candidate addresses (werift skips loopback/tun interfaces by default), e.g. ['127.0.0.1']. */
  iceAdditionalHostAddresses?: string[];
  /** UDP port range for ICE sockets, [min, max], min < max. */
  icePortRange?: [number, number];
  /** Bind ICE sockets to these local addresses ({udp4: '127.0.0.1'}). */
  iceInterfaceAddresses?: { udp4?: string; udp6?: string };
  iceUseIpv4?: boolean;
  iceUseIpv6?: boolean;
  iceTransportPolicy?: "all" | "relay";
  /**
   * Tests on one machine: add a 127.0.0.1 host candidate and only pair loopback with loopback (IPv4 only).
   * Other host candidates are still gathered and advertised (werift cannot skip them) but never checked.
   */
  loopbackOnly?: boolean;
  /**
   * Never pair candidates whose address matches (local or remote): the agent passes the overlay's own
   * ranges so ICE never tries to reach a peer through the TUN/bridge it is about to build (recursion).
   */
  excludeAddress?: (ip: string) => boolean;
  /** Reuse an existing certificate instead of generating one. */
  certificate?: DtlsCertificatePem;
  /** Overrides of LIMITS (tests, tuning). */
  limits?: Partial<Pick<typeof LIMITS, "controlBufferLimit" | "packetsBufferLimit" | "controlLowWater" | "packetsLowWater" | "maxMessageSize">>;
}

export interface WeriftTransport extends Transport {
  /** The certificate in PEM, to persist it if wanted. */
  readonly certificate: DtlsCertificatePem;
  /** Links not yet closed. */
  readonly linkCount: number;
}

/** ECDSA P-256 + SHA-256, what werift itself uses (SignatureAlgorithm.ecdsa = 3, HashAlgorithm.sha256 = 4, secp256r1 = 23). */
export async function generateDtlsCertificate(): Promise<DtlsCertificatePem> {
  const { certPem, keyPem } = await CipherContext.createSelfSignedCertificateWithKey({ signature: 3, hash: 4 }, 23);
  return { certPem, keyPem };
}

function toRtcCertificate(pem: DtlsCertificatePem): RTCCertificate {
  return new RTCCertificate(pem.keyPem, pem.certPem, { signature: 3, hash: 4 });
}

export async function createWeriftTransport(opts: WeriftTransportOptions = {}): Promise<WeriftTransport> {
  const log = (opts.logger ?? silentLogger).child("transport");
  const pem = opts.certificate ?? (await generateDtlsCertificate());
  const cert = toRtcCertificate(pem);
  const fp = cert.getFingerprints()[0];
  if (!fp) throw new Error("werift certificate has no fingerprint");
  const fingerprint: Fingerprint = { algorithm: fp.algorithm.toLowerCase(), value: fp.value.toUpperCase() };
  const limits = { ...LIMITS, ...(opts.limits ?? {}) };
  const links = new Set<WeriftLink>();
  let closed = false;
  let seq = 0;

  const ice: IceConfig = {
    iceAdditionalHostAddresses: opts.iceAdditionalHostAddresses,
    icePortRange: opts.icePortRange,
    iceInterfaceAddresses: opts.iceInterfaceAddresses,
    iceUseIpv4: opts.iceUseIpv4,
    iceUseIpv6: opts.iceUseIpv6,
    iceTransportPolicy: opts.iceTransportPolicy,
  };
  if (opts.loopbackOnly) {
    // werift gathers non-internal interfaces only; add 127.0.0.1 and pair loopback with loopback only.
    // (iceInterfaceAddresses {udp4: 127.0.0.1} is NOT the way: werift then binds every host candidate's
    // socket to 127.0.0.1 while still advertising the interface addresses.)
    ice.iceAdditionalHostAddresses = [...new Set(["127.0.0.1", ...(opts.iceAdditionalHostAddresses ?? [])])];
    ice.iceUseIpv6 = false;
    ice.iceFilterCandidatePair = (pair) => isLoopback(pair.localCandidate?.host) && isLoopback(pair.remoteCandidate?.host);
  }
  if (opts.excludeAddress) {
    const ex = opts.excludeAddress;
    const prev = ice.iceFilterCandidatePair;
    ice.iceFilterCandidatePair = (pair) => {
      const l = pair.localCandidate?.host;
      const r = pair.remoteCandidate?.host;
      if ((l && ex(l)) || (r && ex(r))) return false;
      return prev ? prev(pair) : true;
    };
  }

  return {
    name: "werift",
    fingerprint,
    certificate: pem,
    get linkCount() {
      return links.size;
    },
    createLink(lo: LinkOptions): TransportLink {
      if (closed) throw new Error("transport is closed");
      const link = new WeriftLink(lo, { cert, ice, limits, log: log.child("link", { link: ++seq }), onGone: (l) => links.delete(l) });
      links.add(link);
      return link;
    },
    async close() {
      closed = true;
      const all = [...links];
      await Promise.all(all.map((l) => l.closeAndWait("transport closed")));
    },
  };
}

interface IceConfig {
  iceAdditionalHostAddresses: string[] | undefined;
  icePortRange: [number, number] | undefined;
  iceInterfaceAddresses: { udp4?: string; udp6?: string } | undefined;
  iceUseIpv4: boolean | undefined;
  iceUseIpv6: boolean | undefined;
  iceTransportPolicy: "all" | "relay" | undefined;
  iceFilterCandidatePair?: ((pair: CandidatePair) => boolean) | undefined;
}

function isLoopback(host: string | undefined): boolean {
  return !!host && (host.startsWith("127.") || host === "::1");
}

interface LinkEnv {
  cert: RTCCertificate;
  ice: IceConfig;
  limits: typeof LIMITS;
  log: Logger;
  onGone(l: WeriftLink): void;
}

const ABORT_GRACE_MS = 20;

const CHANNELS: readonly ChannelName[] = ["control", "packets"];

class WeriftLink implements TransportLink {
  private readonly pc: RTCPeerConnection;
  private readonly dc: Record<ChannelName, RTCDataChannel>;
  private readonly handlers: LinkHandlers;
  private readonly log: Logger;
  private readonly limits: typeof LIMITS;
  private readonly initiator: boolean;
  private _state: LinkState = "new";
  private remoteSet = false;
  private sendFailLogged = false;
  private pendingCandidates: (IceCandidateInit | null)[] = [];
  private readonly wantDrain: Record<ChannelName, boolean> = { control: false, packets: false };
  private readonly oversizeLogged: Record<ChannelName, boolean> = { control: false, packets: false };
  private stringLogged = false;
  private bytesSent = 0;
  private bytesReceived = 0;
  private closePromise: Promise<void> | undefined;
  private readonly disposers: (() => void)[] = [];

  constructor(opts: LinkOptions, private readonly env: LinkEnv) {
    this.handlers = opts.handlers;
    this.log = env.log;
    this.limits = env.limits;
    this.initiator = opts.initiator;
    const ice = env.ice;
    this.pc = new RTCPeerConnection({
      iceServers: opts.iceServers,
      certificates: [env.cert],
      maxMessageSize: env.limits.maxMessageSize,
      ...(ice.iceAdditionalHostAddresses ? { iceAdditionalHostAddresses: ice.iceAdditionalHostAddresses } : {}),
      ...(ice.icePortRange ? { icePortRange: ice.icePortRange } : {}),
      ...(ice.iceInterfaceAddresses ? { iceInterfaceAddresses: ice.iceInterfaceAddresses } : {}),
      ...(ice.iceUseIpv4 !== undefined ? { iceUseIpv4: ice.iceUseIpv4 } : {}),
      ...(ice.iceUseIpv6 !== undefined ? { iceUseIpv6: ice.iceUseIpv6 } : {}),
      ...(ice.iceTransportPolicy ? { iceTransportPolicy: ice.iceTransportPolicy } : {}),
      ...(ice.iceFilterCandidatePair ? { iceFilterCandidatePair: ice.iceFilterCandidatePair } : {}),
    });
    this.dc = {
      control: this.pc.createDataChannel("control", { negotiated: true, id: 0, ordered: true }),
      packets: this.pc.createDataChannel("packets", { negotiated: true, id: 1, ordered: false, maxRetransmits: 0 }),
    };
    this.wire();
  }

  get state(): LinkState {
    return this._state;
  }

  // ---- events -------------------------------------------------------------------------------------

  private wire(): void {
    const pc = this.pc;
    const sub = (d: { unSubscribe: () => void }) => this.disposers.push(() => d.unSubscribe());
    sub(
      pc.onIceCandidate.subscribe((c: RTCIceCandidate | undefined) => {
        if (this.isDone()) return;
        this.emitSignal({ kind: "candidate", candidate: c ? candidateInit(c) : null });
      }),
    );
    sub(
      pc.connectionStateChange.subscribe((s) => {
        this.log.debug("connection state", { state: s });
        if (s === "failed") this.finish("failed", "connection failed");
        else if (s === "closed") this.finish("closed", "connection closed");
      }),
    );
    for (const name of CHANNELS) {
      const dc = this.dc[name];
      dc.bufferedAmountLowThreshold = name === "control" ? this.limits.controlLowWater : this.limits.packetsLowWater;
      sub(
        dc.stateChanged.subscribe((s) => {
          this.log.debug("channel state", { channel: name, state: s });
          if (s === "open") this.maybeOpen();
          else if (s === "closed" || s === "closing") this.finish("closed", `${name} channel closed`);
        }),
      );
      sub(dc.onMessage.subscribe((m) => this.deliver(name, m)));
      sub(
        dc.bufferedAmountLow.subscribe(() => {
          if (!this.wantDrain[name] || this.isDone()) return;
          this.wantDrain[name] = false;
          // werift fires this from inside its flush loop: call out asynchronously so a handler that sends
          // again does not re-enter it.
          setImmediate(() => {
            if (this.isDone()) return;
            this.call("onDrain", () => this.handlers.onDrain?.(name));
          });
        }),
      );
    }
  }

  private deliver(name: ChannelName, m: string | Buffer): void {
    if (this.isDone()) return;
    let bytes: Uint8Array;
    if (typeof m === "string") {
      if (!this.stringLogged) {
        this.stringLogged = true;
        this.log.warn("peer sent a string data-channel message; delivering its UTF-8 bytes", { channel: name });
      }
      bytes = new TextEncoder().encode(m);
    } else {
      bytes = new Uint8Array(m.buffer, m.byteOffset, m.byteLength);
    }
    this.bytesReceived += bytes.byteLength;
    this.call("onMessage", () => this.handlers.onMessage(name, bytes));
  }

  private maybeOpen(): void {
    if (this._state !== "new" && this._state !== "connecting") return;
    if (this.dc.control.readyState !== "open" || this.dc.packets.readyState !== "open") return;
    this._state = "open";
    this.log.debug("link open");
    this.call("onOpen", () => this.handlers.onOpen());
  }

  private emitSignal(sig: LinkSignal): void {
    this.call("onSignal", () => this.handlers.onSignal(sig));
  }

  /** Run a handler; never let it throw into werift. */
  private call(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error("link handler threw", { handler: what, err });
    }
  }

  private isDone(): boolean {
    return this._state === "closed" || this._state === "failed";
  }

  /** Terminal transition: free everything, call onClose once. */
  private finish(state: "closed" | "failed", reason: string): void {
    if (this.isDone()) return;
    this._state = state;
    this.pendingCandidates = [];
    for (const d of this.disposers.splice(0)) {
      try {
        d();
      } catch {
        /* ignore */
      }
    }
    this.closePromise = this.teardown();
    this.env.onGone(this);
    this.log.debug("link closed", { reason, state });
    this.call("onClose", () => this.handlers.onClose(reason));
  }

  /**
   * werift's pc.close() closes ICE before SCTP and never sends a DTLS close_notify, so the remote would only
   * notice after ICE consent expires (~30 s). Abort the SCTP association first (an ABORT chunk over the still
   * open DTLS session) so the remote's channels close at once, then close the peer connection.
   */
  private async teardown(): Promise<void> {
    const sctp = this.pc.sctpTransport;
    try {
      if (sctp && sctp.sctp?.associationState === 4 /* ESTABLISHED */) {
        await withTimeout(sctp.stop(), 500);
        // werift does not await the datagram all the way down: give the ABORT a moment to leave the socket
        // before pc.close() closes it (without this the remote misses it on loopback, measured).
        await new Promise((r) => setTimeout(r, ABORT_GRACE_MS));
      }
    } catch (err) {
      this.log.debug("sctp abort failed", { err });
    }
    try {
      await withTimeout(this.pc.close(), 2000);
    } catch (err) {
      this.log.debug("pc.close failed", { err });
    }
  }

  // ---- port API -----------------------------------------------------------------------------------

  async start(): Promise<void> {
    if (!this.initiator) throw new Error("start() is for the initiator only");
    if (this._state !== "new") return;
    this._state = "connecting";
    try {
      const offer = await this.pc.createOffer();
      if (this.isDone()) return;
      await this.pc.setLocalDescription(offer);
      if (this.isDone()) return;
      const sdp = this.pc.localDescription?.sdp ?? offer.sdp;
      this.emitSignal({ kind: "offer", sdp });
    } catch (err) {
      if (this.isDone()) return;
      this.log.warn("creating the offer failed", { err });
      this.finish("failed", `offer failed: ${errMsg(err)}`);
    }
  }

  async handleSignal(sig: LinkSignal): Promise<void> {
    if (this.isDone()) return;
    try {
      switch (sig.kind) {
        case "offer": {
          if (this.initiator) {
            this.log.warn("initiator got an offer; ignored");
            return;
          }
          if (this.remoteSet) {
            this.log.warn("second offer ignored (renegotiation is not supported)");
            return;
          }
          this._state = "connecting";
          await this.pc.setRemoteDescription({ type: "offer", sdp: sig.sdp });
          if (this.isDone()) return;
          this.remoteSet = true;
          await this.flushCandidates();
          if (this.isDone()) return;
          const answer = await this.pc.createAnswer();
          if (this.isDone()) return;
          await this.pc.setLocalDescription(answer);
          if (this.isDone()) return;
          this.emitSignal({ kind: "answer", sdp: this.pc.localDescription?.sdp ?? answer.sdp });
          return;
        }
        case "answer": {
          if (!this.initiator) {
            this.log.warn("answerer got an answer; ignored");
            return;
          }
          if (this.remoteSet) {
            this.log.debug("duplicate answer ignored");
            return;
          }
          if (this.pc.signalingState !== "have-local-offer") {
            this.log.warn("answer before our offer; ignored", { signalingState: this.pc.signalingState });
            return;
          }
          await this.pc.setRemoteDescription({ type: "answer", sdp: sig.sdp });
          if (this.isDone()) return;
          this.remoteSet = true;
          await this.flushCandidates();
          return;
        }
        case "candidate": {
          if (!this.remoteSet) {
            if (this.pendingCandidates.length < 256) this.pendingCandidates.push(sig.candidate);
            return;
          }
          await this.addCandidate(sig.candidate);
          return;
        }
      }
    } catch (err) {
      if (this.isDone()) return;
      this.log.warn("handling a signal failed", { kind: sig.kind, err });
      if (sig.kind !== "candidate") this.finish("failed", `${sig.kind} failed: ${errMsg(err)}`);
    }
  }

  private async flushCandidates(): Promise<void> {
    const list = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const c of list) {
      if (this.isDone()) return;
      await this.addCandidate(c);
    }
  }

  private async addCandidate(c: IceCandidateInit | null): Promise<void> {
    try {
      // werift takes `undefined`/null as end-of-candidates.
      await this.pc.addIceCandidate(c === null ? null : { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex });
    } catch (err) {
      this.log.debug("remote candidate rejected", { candidate: c?.candidate, err });
    }
  }

  send(channel: ChannelName, data: Uint8Array): boolean {
    if (this._state !== "open") return false;
    const dc = this.dc[channel];
    if (!dc || dc.readyState !== "open") return false;
    const size = data.byteLength;
    const maxSize = this.maxMessageSize();
    if (size > maxSize) {
      if (!this.oversizeLogged[channel]) {
        this.oversizeLogged[channel] = true;
        this.log.warn("message larger than the max message size dropped", { channel, size, max: maxSize });
      }
      return false;
    }
    const limit = channel === "control" ? this.limits.controlBufferLimit : this.limits.packetsBufferLimit;
    const low = dc.bufferedAmountLowThreshold;
    const buffered = dc.bufferedAmount;
    if (buffered > low && buffered + size > limit) {
      this.wantDrain[channel] = true;
      return false;
    }
    try {
      const buf = Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      dc.send(buf);
      this.bytesSent += size;
      return true;
    } catch (err) {
      // A channel that closes under a burst of sends would log once per message: warn once per link.
      if (!this.sendFailLogged) this.log.warn("data channel send failed (further failures on this link are not logged)", { channel, size, err });
      this.sendFailLogged = true;
      return false;
    }
  }

  /** min(what we advertise, what the remote advertised); werift throws above the latter. */
  private maxMessageSize(): number {
    const sctp = this.pc.sctpTransport;
    const remote = sctp ? sctp.remoteMaxMessageSize : LIMITS.defaultRemoteMaxMessageSize;
    return remote === 0 ? this.limits.maxMessageSize : Math.min(remote, this.limits.maxMessageSize);
  }

  bufferedAmount(channel: ChannelName): number {
    return this.dc[channel]?.bufferedAmount ?? 0;
  }

  async stats(): Promise<LinkStats> {
    const out: LinkStats = { bytesSent: this.bytesSent, bytesReceived: this.bytesReceived };
    if (this.isDone()) return out;
    try {
      const sel = (await selectedPathFromStats(this.pc)) ?? selectedPathFromIce(this.pc);
      if (sel) out.selected = sel;
    } catch (err) {
      this.log.debug("stats: selected pair unavailable", { err });
    }
    return out;
  }

  close(): void {
    this.finish("closed", "closed locally");
  }

  /** close() and wait for werift to release its sockets. */
  async closeAndWait(reason: string): Promise<void> {
    this.finish("closed", reason);
    await this.closePromise;
  }
}

function candidateInit(c: RTCIceCandidate): IceCandidateInit {
  const out: IceCandidateInit = { candidate: c.candidate };
  if (c.sdpMid != null) out.sdpMid = c.sdpMid;
  if (c.sdpMLineIndex != null) out.sdpMLineIndex = c.sdpMLineIndex;
  return out;
}

async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<undefined>((resolve) => {
    timer = setTimeout(() => resolve(undefined), ms);
  });
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}

function errMsg(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

type StatsEntry = Record<string, unknown> & { type?: string; id?: string };

/** The selected pair from pc.getStats(): transport.selectedCandidatePairId -> candidate-pair -> candidates. */
async function selectedPathFromStats(pc: RTCPeerConnection): Promise<SelectedPath | undefined> {
  const report = (await pc.getStats()) as unknown as Map<string, StatsEntry>;
  const byId = new Map<string, StatsEntry>();
  let pairId: string | undefined;
  for (const [id, v] of report) {
    byId.set(typeof v.id === "string" ? v.id : id, v);
    if (v.type === "transport" && typeof v.selectedCandidatePairId === "string") pairId ??= v.selectedCandidatePairId;
  }
  const pair = pairId ? byId.get(pairId) : undefined;
  if (!pair) return undefined;
  const l = byId.get(String(pair.localCandidateId));
  const r = byId.get(String(pair.remoteCandidateId));
  if (!l || !r) return undefined;
  const addr = (c: StatsEntry) => `${String(c.address ?? c.ip ?? "?")}:${String(c.port ?? "?")}`;
  return { localType: String(l.candidateType ?? "unknown"), localAddress: addr(l), remoteType: String(r.candidateType ?? "unknown"), remoteAddress: addr(r) };
}

/** Fallback: the nominated pair from werift's ICE connection (internals, guarded: absent fields give undefined). */
function selectedPathFromIce(pc: RTCPeerConnection): SelectedPath | undefined {
  const conn = (pc.iceTransports[0] as unknown as { connection?: { nominated?: unknown } } | undefined)?.connection;
  const pair = conn?.nominated as
    | { localCandidate?: { type?: string; host?: string; port?: number }; remoteCandidate?: { type?: string; host?: string; port?: number } }
    | undefined;
  const l = pair?.localCandidate;
  const r = pair?.remoteCandidate;
  if (!l || !r) return undefined;
  return {
    localType: String(l.type ?? "unknown"),
    localAddress: `${l.host ?? "?"}:${l.port ?? "?"}`,
    remoteType: String(r.type ?? "unknown"),
    remoteAddress: `${r.host ?? "?"}:${r.port ?? "?"}`,
  };
}

