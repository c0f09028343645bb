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
 * Limits enforced here (see WERIFT_LIMITS):
 * - Message size: werift advertises a=max-message-size (default 65536) and throws on send when a message is
 *   larger than what the REMOTE advertised; it enforces nothing on receive. We advertise
 *   maxMessageSize (default 1 MiB) and refuse (send() -> false, logged once per link and channel) messages
 *   larger than min(our maxMessageSize, the remote's advertised size). Control messages (msgpack, up to
 *   ~256 KiB) therefore fit between two weftnet agents; a peer advertising 64 KiB gets 64 KiB.
 * - Send buffer: werift's send path slows down quadratically with its queue length (every queued send awaits a shared event whose subscriber list is scanned on each flush: 1200-byte messages go from ~340 to ~5,800 per second with a 64 KiB instead of a 1 MiB queue),
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
import { RTCCertificate, RTCPeerConnection, type CandidatePair, type RTCDataChannel, type RTCIceCandidate } from "werift";
import type {
  ChannelName,
  Fingerprint,
  LinkOptions,
  LinkPmtuHow,
  LinkSignal,
  SelectedPath,
  Transport,
  TransportLink,
} from "../../src/mesh/transport.js";
import type { IceCandidateInit } from "../../src/wire/signal.js";
import { silentLogger, type Logger } from "../../src/log.js";
import { generateDtlsCertificate, type DtlsCertificatePem } from "./cert.js";
import { CHANNELS, LinkBase } from "./link-base.js";
import { checkSdpFingerprints } from "../../src/mesh/auth.js";
import { createHash } from "node:crypto";

export { generateDtlsCertificate, type DtlsCertificatePem } from "./cert.js";

export const WERIFT_LIMITS = {
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
  /** Overrides of WERIFT_LIMITS (tests, tuning). */
  limits?: Partial<Pick<typeof WERIFT_LIMITS, "controlBufferLimit" | "packetsBufferLimit" | "controlLowWater" | "packetsLowWater" | "maxMessageSize">>;
}

export interface WeriftTransport extends Transport {
  /** The certificate in PEM, to persist it if wanted. */
  readonly certificate: DtlsCertificatePem;
  /** Links not yet closed. */
  readonly linkCount: number;
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
  const limits = { ...WERIFT_LIMITS, ...(opts.limits ?? {}) };
  const links = new Set<LinkBase>();
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
    pmtuFixed: WERIFT_PMTU_FIXED,
    fingerprint,
    certificate: pem,
    get linkCount() {
      return links.size;
    },
    createLink(lo: LinkOptions): TransportLink {
      if (closed) throw new Error("transport is closed");
      const link = new WeriftLink(lo, { cert, ice, limits, log: log.child("link", { link: ++seq, peer: lo.peer, conn: lo.conn }), onGone: (l) => links.delete(l) });
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
  limits: typeof WERIFT_LIMITS;
  log: Logger;
  onGone(l: LinkBase): void;
}

const ABORT_GRACE_MS = 20;
/** werift's SCTP DATA chunk payload limit (werift/sctp USERDATA_MAX_LENGTH). */
const WERIFT_CHUNK = 1200;
/**
 * Why werift links never search their path MTU (status `pmtuFixed`): werift's SCTP has no per-association MTU or
 * maximum packet size (node_modules/werift/lib/sctp/src/sctp.js: USERDATA_MAX_LENGTH = 1200 is a module constant
 * its fragmentation and congestion window use), so every packet is one chunk of at most 1200 bytes (~1290 bytes of
 * IPv4 with SCTP/DTLS/UDP headers) whatever the path carries: there is no larger size to probe for.
 */
export const WERIFT_PMTU_FIXED = "fixed 1200-byte SCTP chunks (~1290-byte packets): werift cannot change its SCTP chunk size per association (USERDATA_MAX_LENGTH is a module constant of werift/sctp), so there is no path MTU to search";

class WeriftLink extends LinkBase {
  private readonly pc: RTCPeerConnection;
  private readonly dc: Record<ChannelName, RTCDataChannel>;
  private readonly disposers: (() => void)[] = [];

  /** werift's SCTP cuts every message into DATA chunks of at most 1200 bytes (USERDATA_MAX_LENGTH), one per packet. */
  override get packetBudget(): number {
    return WERIFT_CHUNK;
  }

  /** No search: fixed chunks (WERIFT_PMTU_FIXED). */
  override get pmtuHow(): LinkPmtuHow {
    return "fixed";
  }

  constructor(opts: LinkOptions, env: LinkEnv) {
    super({ initiator: opts.initiator, handlers: opts.handlers, limits: env.limits, log: env.log, onGone: env.onGone });
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
    sub(pc.connectionStateChange.subscribe((s) => this.connectionState(s)));
    sub(pc.iceConnectionStateChange.subscribe((s) => this.stage(`ice ${s}`)));
    sub(pc.iceGatheringStateChange.subscribe((s) => this.stage(`gathering ${s}`)));
    for (const name of CHANNELS) {
      const dc = this.dc[name];
      dc.bufferedAmountLowThreshold = this.lowWater(name);
      sub(dc.stateChanged.subscribe((s) => this.channelState(name, s)));
      sub(dc.onMessage.subscribe((m) => this.deliver(name, m)));
      // werift fires this from inside its flush loop: call out asynchronously so a handler that sends
      // again does not re-enter it.
      sub(dc.bufferedAmountLow.subscribe(() => this.drained(name, { defer: (fn) => setImmediate(fn) })));
    }
  }

  protected override channelsOpen(): boolean {
    return this.dc.control.readyState === "open" && this.dc.packets.readyState === "open";
  }

  protected override dispose(): Promise<void> {
    for (const d of this.disposers.splice(0)) {
      try {
        d();
      } catch {
        /* ignore */
      }
    }
    return this.teardown();
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

  // ---- signaling ----------------------------------------------------------------------------------

  protected override async makeOffer(): Promise<string | undefined> {
    return this.setLocal(await this.pc.createOffer());
  }

  /** Set a freshly created offer/answer as local description; its SDP, or undefined when the link finished meanwhile. */
  private async setLocal(desc: Awaited<ReturnType<RTCPeerConnection["createOffer"]>>): Promise<string | undefined> {
    if (this.isDone()) return undefined;
    await this.pc.setLocalDescription(desc);
    if (this.isDone()) return undefined;
    return this.pc.localDescription?.sdp ?? desc.sdp;
  }

  /** sha-256 of the certificate the remote presented in the DTLS handshake (not the SDP's claim). */
  remoteFingerprint(): Fingerprint | undefined {
    const cert = this.pc.sctpTransport?.dtlsTransport?.dtls?.remoteCertificate;
    if (!cert) return undefined;
    return { algorithm: "sha-256", value: createHash("sha256").update(cert).digest("hex").toUpperCase().match(/../g)!.join(":") };
  }

  protected override async setRemote(type: "offer" | "answer", sdp: string): Promise<void> {
    // werift accepts a DTLS certificate matching ANY a=fingerprint of the SDP: refuse all but exactly one.
    checkSdpFingerprints(sdp, "remote SDP");
    await this.pc.setRemoteDescription({ type, sdp });
  }

  protected override async makeAnswer(): Promise<string | undefined> {
    return this.setLocal(await this.pc.createAnswer());
  }

  protected override signalingState(): string {
    return this.pc.signalingState;
  }

  protected override async addCandidate(c: IceCandidateInit | null): Promise<void> {
    try {
      // werift takes `undefined`/null as end-of-candidates.
      await this.pc.addIceCandidate(c === null ? null : { candidate: c.candidate, sdpMid: c.sdpMid, sdpMLineIndex: c.sdpMLineIndex });
    } catch (err) {
      this.log.debug("remote candidate rejected", { candidate: c?.candidate, err });
    }
  }

  // ---- data ---------------------------------------------------------------------------------------

  protected override sendCapacity(channel: ChannelName): { maxSize: number; buffered: number } | undefined {
    const dc = this.dc[channel];
    if (!dc || dc.readyState !== "open") return undefined;
    return { maxSize: this.maxMessageSize(), buffered: dc.bufferedAmount };
  }

  protected override sendNow(channel: ChannelName, data: Uint8Array): void {
    // werift keeps slices of the buffer in its SCTP queue, and send()'s caller may reuse it: copy.
    this.dc[channel].send(Buffer.from(data));
  }

  /** min(what we advertise, what the remote advertised); werift throws above the latter. */
  private maxMessageSize(): number {
    const sctp = this.pc.sctpTransport;
    const remote = sctp ? sctp.remoteMaxMessageSize : WERIFT_LIMITS.defaultRemoteMaxMessageSize;
    return remote === 0 ? this.limits.maxMessageSize : Math.min(remote, this.limits.maxMessageSize);
  }

  override bufferedAmount(channel: ChannelName): number {
    return this.dc[channel]?.bufferedAmount ?? 0;
  }

  protected override async selectedPath(): Promise<SelectedPath | undefined> {
    return (await selectedPathFromStats(this.pc)) ?? selectedPathFromIce(this.pc);
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

