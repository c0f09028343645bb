/**
 * node-datachannel (libdatachannel) implementation of the transport port (src/mesh/transport.ts), the second
 * one next to agent/transport/werift.ts, whose behaviour it mirrors.
 *
 * node-datachannel is an OPTIONAL dependency. Its prebuilt binary ships inside a per-platform npm package
 * (@node-datachannel/linux-x64-gnu, ...) that npm installs as an optional dependency of node-datachannel: no
 * install script runs (npm 11 does not run unapproved ones anyway). The module is loaded lazily with a dynamic
 * import; nativeAvailable() tells whether it loads, createNativeTransport() throws a clear error when not.
 *
 * Certificate: one DTLS certificate per transport (ECDSA P-256 from cert.ts, as werift's, or passed in),
 * handed to every PeerConnection as PEM text (libdatachannel's certificatePemFile/keyPemFile accept the PEM
 * itself when it contains "-----BEGIN CERTIFICATE-----"; nothing is written to disk). Without it libdatachannel
 * would share ONE generated certificate among all connections of the process. createNativeTransport checks
 * that libdatachannel really uses the certificate: it reads the a=fingerprint of a throwaway offer (no ICE
 * gathering) and refuses to start if it differs. So `transport.fingerprint` is known before any link exists
 * and equals the a=fingerprint line of every SDP its links produce.
 *
 * One TransportLink = one PeerConnection with two pre-negotiated data channels (negotiated: true):
 *   control  id 0  reliable, ordered
 *   packets  id 1  unordered, maxRetransmits 0
 * Auto-negotiation is disabled (otherwise creating the negotiated channels makes BOTH sides emit an offer):
 * the initiator calls setLocalDescription("offer") in start(), the answerer setLocalDescription("answer") after
 * the remote offer. References to the PeerConnection and both DataChannels live on the link object, and the
 * transport holds every live link: node-datachannel closes a channel whose JS object is garbage collected.
 *
 * Limits (NATIVE_LIMITS, same shape and meaning as werift's):
 * - Message size: we advertise a=max-message-size = maxMessageSize (default 1 MiB); libdatachannel reports
 *   min(ours, the remote's a=max-message-size, 65536 when absent) as dc.maxMessageSize() and throws on a larger
 *   send. send() refuses (false, logged once per link and channel) messages above that.
 * - Send buffer: send() refuses a message when the channel already holds more than its low-water mark AND the
 *   message would take bufferedAmount over the limit; the next time libdatachannel's buffered amount falls to
 *   or below the low-water mark (onBufferedAmountLow), onDrain(channel) is called once. libdatachannel does not
 *   slow down with a long queue the way werift does, but an unordered maxRetransmits-0 channel should not
 *   queue much anyway (latency): the packets limit is larger than werift's only to keep the pipe full.
 *
 * - Path MTU (`mtu`, the agent's --link-mtu): libdatachannel's SCTP packets are mtu - 108 bytes, one UDP
 *   datagram each, sent with Don't Fragment. The data path's cost is per datagram (measured: a third of both
 *   cores in the kernel sending them), so a larger mtu carries more: libdatachannel alone on loopback did
 *   488 Mbit/s at 1280, 633 at 1500, 1,081 at 4096 in one run. Default 1280 (safe on any path); at most
 *   MAX_LINK_MTU (libjuice's 4 KiB receive buffer).
 *
 * Events: libdatachannel runs on its own threads; node-datachannel posts every callback to the JS thread
 * (asynchronous, never re-entrant into send()). An exception escaping such a callback aborts the process,
 * so every callback body is guarded.
 *
 * Loopback: libjuice gathers host candidates from the machine's interfaces (not loopback). `loopbackOnly`
 * binds ICE to 127.0.0.1 (bindAddress: it then gathers exactly one host candidate, 127.0.0.1) and drops remote
 * candidates that are not IPv4 loopback, which interoperates with a werift `loopbackOnly` peer.
 *
 * Closing: close() is synchronous for the caller (state "closed", onClose once); behind it both channels are
 * closed (SCTP stream resets, which close the remote's channels at once) and 20 ms later pc.close() frees the
 * native connection (pc.close() alone was missed by a werift peer about 1 run in 6). The remote notices within
 * a few ms on loopback, werift or libdatachannel. transport.close() closes every link and waits for that.
 *
 * node-datachannel's cleanup() is deliberately NOT called: with 0.33.4 it aborts the process
 * (napi_release_threadsafe_function: Assertion `(func) != nullptr`) once links like ours (channels with
 * message/drain/error callbacks) have been closed — measured, in plain Node and under vitest. Without it the
 * process still exits by itself once everything is closed, but node-datachannel keeps the event loop alive
 * for about 8 s after the last PeerConnection closes (measured; it holds no socket: libjuice's sockets are
 * closed by pc.close()). A CLI that wants to exit at once calls process.exit().
 *
 * Failure: libdatachannel reports ICE failure as state "failed" (after its own timeout); the mesh layer still
 * owns its own connect timeout and calls close().
 *
 * Not supported here (werift options without a libdatachannel equivalent): iceAdditionalHostAddresses,
 * iceUseIpv4/iceUseIpv6, candidate-pair filters other than loopbackOnly. TURN over TCP/TLS is skipped:
 * libjuice relays over UDP only.
 */
import { X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import type * as Ndc from "node-datachannel";
import type {
  ChannelName,
  Fingerprint,
  LinkOptions,
  SelectedPath,
  Transport,
  TransportLink,
  PmtuCounters,
} from "../../src/mesh/transport.js";
import { emptyPmtuCounters, sdpFingerprint } from "../../src/mesh/transport.js";
import { checkSdpFingerprints } from "../../src/mesh/auth.js";
import type { IceCandidateInit } from "../../src/wire/signal.js";
import { silentLogger, type Logger } from "../../src/log.js";
import { generateDtlsCertificate, type DtlsCertificatePem } from "./cert.js";
import { CHANNELS, errMsg, LinkBase, MAX_LINK_MTU, SAFE_LINK_MTU, type FoundHow } from "./link-base.js";
import { kernelPathMtu } from "../os/route-mtu.js";

/** How long a peer whose path failed the MTU check gets the MTU its link found (search) before the configured one is tried again. */
const MTU_FALLBACK_MS = 60 * 60_000;

export type { DtlsCertificatePem } from "./cert.js";

type NdcModule = typeof Ndc;

export const NATIVE_LIMITS = {
  /** bufferedAmount above which send() refuses (see header). */
  controlBufferLimit: 1024 * 1024,
  packetsBufferLimit: 256 * 1024,
  /** onDrain fires when bufferedAmount falls to or below this after a refusal. */
  controlLowWater: 256 * 1024,
  packetsLowWater: 64 * 1024,
  /** a=max-message-size we advertise and the largest message we send (capped by the remote's). */
  maxMessageSize: 1024 * 1024,
  /** RFC 8841 / libdatachannel default when the remote SDP has no a=max-message-size. */
  defaultRemoteMaxMessageSize: 65536,
} as const;

export interface NativeTransportOptions {
  logger?: Logger;
  /** UDP port range for ICE sockets, [min, max]. */
  icePortRange?: [number, number];
  /** Bind ICE sockets to this local address (libjuice then gathers only that host candidate). */
  bindAddress?: string;
  iceTransportPolicy?: "all" | "relay";
  /** One UDP port for all connections of the process (libjuice ICE UDP mux). */
  enableIceUdpMux?: boolean;
  /**
   * Tests on one machine: bind ICE to 127.0.0.1 (one host candidate) and ignore remote candidates that are
   * not IPv4 loopback. Interoperates with werift's loopbackOnly.
   */
  loopbackOnly?: boolean;
  /**
   * Never use candidates whose address matches (as werift's excludeAddress): the agent passes the overlay's
   * own ranges so ICE never reaches a peer through the TUN/bridge. Remote candidates that match are ignored
   * (trickled or inside the SDP); local ones are neither trickled nor left in the SDP we send.
   */
  excludeAddress?: (ip: string) => boolean;
  /** Reuse an existing certificate instead of generating one (same PEM format as the werift transport). */
  certificate?: DtlsCertificatePem;
  /**
   * Path MTU the links may assume: the largest IP packet every path between the nodes carries, in bytes
   * (libdatachannel's `mtu`; its full-size packets are this minus 31 bytes of IPv4, NATIVE_WIRE_BELOW_MTU).
   * Default 1280 (libdatachannel's, the IPv6 minimum: safe on any path). libjuice sets Don't Fragment, so a value above the real path MTU makes every full-size SCTP
   * packet vanish. Every link built with more than 1280 checks once open that such packets reach the peer
   * (LinkBase: path MTU check, capped by the kernel's route MTU); when they do not, the link searches what
   * does (src/mesh/pmtu.ts), fails, and the next links to that peer are built for the size found for an hour.
   */
  mtu?: number;
  /** Overrides of NATIVE_LIMITS (tests, tuning). */
  limits?: Partial<Pick<typeof NATIVE_LIMITS, "controlBufferLimit" | "packetsBufferLimit" | "controlLowWater" | "packetsLowWater" | "maxMessageSize">>;
}

export interface NativeTransport extends Transport {
  /** The certificate in PEM, to persist it if wanted. */
  readonly certificate: DtlsCertificatePem;
  /** Links not yet closed. */
  readonly linkCount: number;
  /** libdatachannel's version, e.g. "0.24.5". */
  readonly libraryVersion: string;
}

// ---- lazy module loading ------------------------------------------------------------------------------

let loading: Promise<NdcModule> | undefined;
let loadError: unknown;

function loadNative(): Promise<NdcModule> {
  loading ??= import("node-datachannel").then(
    (m) => {
      if (typeof m.PeerConnection !== "function") throw new Error("node-datachannel loaded but has no PeerConnection");
      return m;
    },
    (err: unknown) => {
      loadError = err;
      throw err;
    },
  );
  return loading;
}

/** Whether node-datachannel and its prebuilt binary load on this machine. Never throws. */
export async function nativeAvailable(): Promise<boolean> {
  try {
    await loadNative();
    return true;
  } catch {
    return false;
  }
}

/** Why nativeAvailable() is false (undefined when it loaded or was not tried). */
export function nativeLoadError(): string | undefined {
  return loadError === undefined ? undefined : errMsg(loadError);
}

async function requireNative(): Promise<NdcModule> {
  try {
    return await loadNative();
  } catch (err) {
    throw new Error(
      `native transport unavailable: node-datachannel (optional dependency) did not load on ${process.platform}-${process.arch}: ${errMsg(err)}. ` +
        `Install it with 'npm install node-datachannel' (the prebuilt binary comes from @node-datachannel/${process.platform}-${process.arch}*) or use the werift transport.`,
      { cause: err },
    );
  }
}

// ---- transport ----------------------------------------------------------------------------------------

export async function createNativeTransport(opts: NativeTransportOptions = {}): Promise<NativeTransport> {
  const ndc = await requireNative();
  const log = (opts.logger ?? silentLogger).child("transport");
  enableLibraryLog(ndc, log);
  const pem = opts.certificate ?? (await generateDtlsCertificate());
  const limits = { ...NATIVE_LIMITS, ...(opts.limits ?? {}) };

  const base: Ndc.RtcConfig = {
    iceServers: [],
    disableAutoNegotiation: true,
    certificatePemFile: pem.certPem,
    keyPemFile: pem.keyPem,
    maxMessageSize: limits.maxMessageSize,
    ...(opts.icePortRange ? { portRangeBegin: opts.icePortRange[0], portRangeEnd: opts.icePortRange[1] } : {}),
    ...(opts.iceTransportPolicy ? { iceTransportPolicy: opts.iceTransportPolicy } : {}),
    ...(opts.enableIceUdpMux ? { enableIceUdpMux: true } : {}),
  };
  if (opts.mtu !== undefined && (!Number.isInteger(opts.mtu) || opts.mtu < 1280 || opts.mtu > MAX_LINK_MTU)) {
    throw new RangeError(`native transport: mtu must be an integer between 1280 and ${MAX_LINK_MTU}, got ${opts.mtu}`);
  }
  if (opts.loopbackOnly) base.bindAddress = "127.0.0.1";
  else if (opts.bindAddress) base.bindAddress = opts.bindAddress;

  const fingerprint = certificateFingerprint(ndc, base, pem);
  const ex = opts.excludeAddress;
  const loopOnly = !!opts.loopbackOnly;
  const keepAddress = (ip: string): boolean => (!loopOnly || ip.startsWith("127.")) && !(ex && safe(() => ex(ip), false));
  const links = new Set<LinkBase>();
  const linkMtu = opts.mtu ?? SAFE_LINK_MTU;
  /** peer -> the smaller MTU its links use, how it was found, and until when (its path failed the MTU check). */
  const mtuFallback = new Map<string, { mtu: number; how: FoundHow; until: number }>();
  let closed = false;
  let seq = 0;
  const pmtuCounters = emptyPmtuCounters();

  return {
    name: "native",
    fingerprint,
    pmtu: () => structuredClone(pmtuCounters),
    certificate: pem,
    libraryVersion: safe(() => ndc.getLibraryVersion(), "unknown"),
    get linkCount() {
      return links.size;
    },
    createLink(lo: LinkOptions): TransportLink {
      if (closed) throw new Error("transport is closed");
      const n = ++seq;
      const linkLog = log.child("link", { link: n, peer: lo.peer, conn: lo.conn });
      // A peer whose path failed the MTU check gets the MTU the link's search found for a while, then the
      // configured MTU again.
      const peer = lo.peer;
      let fb = peer ? mtuFallback.get(peer) : undefined;
      if (peer && fb && fb.until <= Date.now()) {
        mtuFallback.delete(peer);
        fb = undefined;
      }
      const pathMtu = Math.min(fb ? fb.mtu : linkMtu, lo.maxMtu ?? Number.POSITIVE_INFINITY);
      const iceServers = toNdcIceServers(lo.iceServers, linkLog);
      const config: Ndc.RtcConfig = { ...base, mtu: pathMtu, iceServers };
      const onPathMtuFailed = (found: number, how: FoundHow) => {
        // The link searched what the path carries (LinkBase): the next link is built for exactly that.
        if (peer) mtuFallback.set(peer, { mtu: Math.max(SAFE_LINK_MTU, Math.min(found, pathMtu)), how, until: Date.now() + MTU_FALLBACK_MS });
      };
      const pathMtuHow = fb && fb.mtu <= pathMtu ? fb.how : undefined;
      const turnServers = iceServers.filter((s) => s.relayType !== undefined).map((s) => (isIP(s.hostname) ? s.hostname : ""));
      const link = new NativeLink(lo, { ndc, config, name: `weftnet-${n}`, pathMtu, turnServers, ...(pathMtuHow ? { pathMtuHow } : {}), onPathMtuFailed, pmtuCounters, keepAddress, limits, log: linkLog, onGone: (l) => links.delete(l) });
      links.add(link);
      return link;
    },
    async close() {
      if (closed) return;
      closed = true;
      await Promise.all([...links].map((l) => l.closeAndWait("transport closed")));
    },
  };
}

/**
 * Diagnostics: env WEFTNET_NATIVE_LOG=Verbose|Debug|Info|Warning|Error routes libdatachannel's own log (ICE,
 * DTLS, SCTP internals; process-wide, not per link) into ours at debug level. Off by default.
 */
let libraryLogOn = false;
function enableLibraryLog(ndc: NdcModule, log: Logger): void {
  const level = process.env.WEFTNET_NATIVE_LOG;
  if (libraryLogOn || !level || !["Verbose", "Debug", "Info", "Warning", "Error", "Fatal"].includes(level)) return;
  libraryLogOn = true;
  const lib = log.child("libdatachannel", { pid: process.pid });
  safe(() => ndc.initLogger(level as Ndc.LogLevel, (lv, message) => lib.debug(message, { lv })), undefined);
}

/**
 * The SHA-256 fingerprint of `pem`, checked against the a=fingerprint of an offer that libdatachannel builds
 * with the same configuration (no gathering, no sockets): proof that every link's SDP will carry it.
 */
function certificateFingerprint(ndc: NdcModule, base: Ndc.RtcConfig, pem: DtlsCertificatePem): Fingerprint {
  let expected: Fingerprint;
  try {
    expected = { algorithm: "sha-256", value: new X509Certificate(pem.certPem).fingerprint256.toUpperCase() };
  } catch (err) {
    throw new Error(`native transport: invalid certificate PEM: ${errMsg(err)}`);
  }
  const pc = new ndc.PeerConnection("weftnet-fingerprint-probe", { ...base, disableAutoGathering: true });
  let dc: Ndc.DataChannel | undefined;
  try {
    dc = pc.createDataChannel("probe", { negotiated: true, id: 0 });
    pc.setLocalDescription("offer");
    const sdp = pc.localDescription()?.sdp ?? "";
    const got = sdpFingerprint(sdp);
    if (!got || got.algorithm !== expected.algorithm || got.value !== expected.value) {
      throw new Error(`libdatachannel does not use the transport certificate (SDP has ${got ? `${got.algorithm} ${got.value}` : "no fingerprint"})`);
    }
    return expected;
  } finally {
    safe(() => dc?.close(), undefined);
    safe(() => pc.close(), undefined);
  }
}

/**
 * RTCIceServer ({urls, username, credential}) -> node-datachannel's {hostname, port, username, password,
 * relayType}. URLs: stun:/stuns:/turn:/turns: host[:port][?transport=udp|tcp] (IPv6 in brackets).
 * TURN over TCP/TLS is skipped (libjuice relays over UDP only).
 */
export function toNdcIceServers(servers: LinkOptions["iceServers"], log: Logger = silentLogger): Ndc.IceServer[] {
  const out: Ndc.IceServer[] = [];
  for (const s of servers) {
    const urls = Array.isArray(s.urls) ? s.urls : [s.urls];
    for (const url of urls) {
      const m = /^(stuns?|turns?):(?:\/\/)?(\[[0-9a-fA-F:.]+\]|[^:?/\s]+)(?::(\d+))?(?:\?transport=(udp|tcp))?$/i.exec(url.trim());
      if (!m || !m[1] || !m[2]) {
        log.warn("ICE server URL not understood; skipped", { url });
        continue;
      }
      const scheme = m[1].toLowerCase();
      const hostname = m[2].startsWith("[") ? m[2].slice(1, -1) : m[2];
      const secure = scheme.endsWith("s");
      const port = m[3] ? Number(m[3]) : secure ? 5349 : 3478;
      const transport = (m[4] ?? (secure ? "tcp" : "udp")).toLowerCase();
      if (scheme.startsWith("stun")) {
        out.push({ hostname, port });
        continue;
      }
      if (secure || transport === "tcp") {
        log.warn("TURN over TCP/TLS is not supported by libdatachannel's ICE (libjuice); skipped", { url });
        continue;
      }
      if (s.username === undefined || s.credential === undefined) {
        log.warn("TURN server without username/credential; skipped", { url });
        continue;
      }
      out.push({ hostname, port, username: s.username, password: s.credential, relayType: "TurnUdp" });
    }
  }
  return out;
}

// ---- link -----------------------------------------------------------------------------------------------

interface LinkEnv {
  ndc: NdcModule;
  config: Ndc.RtcConfig;
  name: string;
  /** Path MTU of this link (config.mtu; checked once open when above 1280). */
  pathMtu: number;
  onPathMtuFailed(found: number, how: FoundHow): void;
  /** pathMtu came from an earlier link's check (the fallback), found this way */
  pathMtuHow?: FoundHow;
  pmtuCounters: PmtuCounters;
  /** LinkBaseOptions.turnServers: the TURN servers' IP literals ("" for a name). */
  turnServers: string[];
  /** Candidate filter (loopbackOnly, excludeAddress). */
  keepAddress(ip: string): boolean;
  limits: typeof NATIVE_LIMITS;
  log: Logger;
  onGone(l: LinkBase): void;
}

/** Between closing the channels (stream resets) and closing the peer connection. */
const CLOSE_GRACE_MS = 20;

/**
 * How far below its `mtu` a full-size libdatachannel packet stays on the wire, per IP version (measured with
 * strace on loopback, mtu 1300 and 2000: the largest UDP payload is mtu - 59, i.e. SCTP packets of mtu - 96
 * inside a 37-byte DTLS 1.2 AES-GCM record; + 8 UDP + 20 IPv4 = mtu - 31, + 40 IPv6 = mtu - 11). A cipher
 * with less overhead only makes packets smaller.
 */
export const NATIVE_WIRE_BELOW_MTU = { v4: 31, v6: 11 } as const;

/** The search's local limit (link-base.ts): the largest mtu whose packets the kernel lets out toward `host`. */
export function nativeMtuLimit(host: string): number | undefined {
  const route = kernelPathMtu(host);
  if (route === undefined) return undefined;
  return route + (host.includes(":") ? NATIVE_WIRE_BELOW_MTU.v6 : NATIVE_WIRE_BELOW_MTU.v4);
}

class NativeLink extends LinkBase {
  private pc: Ndc.PeerConnection | undefined;
  /** Strong references: node-datachannel closes a DataChannel whose JS object is collected. */
  private dc: Partial<Record<ChannelName, Ndc.DataChannel>> = {};
  private readonly open: Record<ChannelName, boolean> = { control: false, packets: false };
  /** a=mid of the remote description's first m-section, for candidates that come without sdpMid. */
  private remoteMid: string | undefined;
  private endOfCandidatesSent = false;

  constructor(
    opts: LinkOptions,
    private readonly env: LinkEnv,
  ) {
    // libdatachannel checks the DTLS peer's certificate against a remote description it may not have recorded
    // yet when the peer's ClientHello came before the answer: hold our candidates until then (link-base.ts).
    super({ initiator: opts.initiator, handlers: opts.handlers, limits: env.limits, log: env.log, onGone: env.onGone, pathMtu: env.pathMtu, ...(env.pathMtuHow ? { pathMtuHow: env.pathMtuHow } : {}), onPathMtuFailed: env.onPathMtuFailed, localMtuLimit: nativeMtuLimit, turnServers: env.turnServers, pmtuCounters: env.pmtuCounters, holdCandidatesUntilAnswer: true });
  }

  /**
   * Create the native peer connection on first use (start() or the first signal), not in the constructor:
   * a link closed before it is used never touches libdatachannel (mirrors werift, which gathers on start()).
   */
  private ensurePc(): Ndc.PeerConnection {
    if (this.pc) return this.pc;
    const pc = new this.env.ndc.PeerConnection(this.env.name, this.env.config);
    this.pc = pc;
    try {
      this.dc = {
        control: pc.createDataChannel("control", { negotiated: true, id: 0 }),
        packets: pc.createDataChannel("packets", { negotiated: true, id: 1, unordered: true, maxRetransmits: 0 }),
      };
      this.wire(pc);
    } catch (err) {
      this.pc = undefined;
      safe(() => pc.close(), undefined);
      throw err;
    }
    return pc;
  }

  // ---- events (all posted to the JS thread by node-datachannel; every body guarded) ---------------------

  private wire(pc: Ndc.PeerConnection): void {
    pc.onLocalCandidate((candidate, mid) =>
      this.guard("local candidate", () => {
        if (this.isDone()) return;
        // libdatachannel writes "a=candidate:..."; the W3C form (and werift) is "candidate:...".
        const c = candidate.startsWith("a=") ? candidate.slice(2) : candidate;
        if (!this.keepCandidate(c)) return;
        this.emitSignal({ kind: "candidate", candidate: { candidate: c, sdpMid: mid, sdpMLineIndex: 0 } });
      }),
    );
    pc.onGatheringStateChange((s) =>
      this.guard("gathering state", () => {
        this.stage(`gathering ${s}`);
        if (this.isDone() || s !== "complete" || this.endOfCandidatesSent) return;
        this.endOfCandidatesSent = true;
        this.emitSignal({ kind: "candidate", candidate: null });
      }),
    );
    pc.onStateChange((s) => this.guard("connection state", () => this.connectionState(s)));
    pc.onIceStateChange((s) =>
      this.guard("ice state", () => {
        this.stage(`ice ${s}`);
        // "completed": a pair is nominated, and it may not be the one the path MTU check ran on (link-base.ts)
        this.selectedPairMayHaveChanged();
      }),
    );
    for (const name of CHANNELS) {
      const dc = this.dc[name]!;
      const low = this.lowWater(name);
      dc.setBufferedAmountLowThreshold(low);
      dc.onOpen(() =>
        this.guard("channel open", () => {
          this.open[name] = true;
          this.channelState(name, "open");
        }),
      );
      dc.onClosed(() =>
        this.guard("channel closed", () => {
          this.open[name] = false;
          this.channelState(name, "closed");
        }),
      );
      dc.onError((err) => this.guard("channel error", () => this.log.debug("channel error", { channel: name, err })));
      dc.onMessage((m) => this.guard("channel message", () => this.deliver(name, m)));
      // A crossing posted before our last refusal can arrive late: only report a real drain. The buffer is
      // above the mark in that case, so libdatachannel will cross it again.
      dc.onBufferedAmountLow(() => this.guard("buffered amount low", () => this.drained(name, { stillAbove: () => dc.bufferedAmount() > low })));
    }
  }

  /** Body of a native callback: an exception escaping it would abort the process. */
  private guard(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      try {
        this.log.error("native callback failed", { callback: what, err });
      } catch {
        /* ignore */
      }
    }
  }

  protected override channelsOpen(): boolean {
    return this.open.control && this.open.packets;
  }

  protected override dispose(): Promise<void> {
    this.open.control = this.open.packets = false;
    return this.teardown();
  }

  /**
   * pc.close() alone (SCTP shutdown + DTLS close, then ICE) is sometimes not noticed by a werift peer (about 1
   * run in 6 on loopback, measured: the last packets do not leave before the socket closes). Close both data
   * channels first (an SCTP stream reset each: the remote's channels close on it), give that a moment, then
   * close the peer connection, which frees the native resources.
   */
  private async teardown(): Promise<void> {
    const pc = this.pc;
    if (!pc) return;
    const wasOpen = CHANNELS.some((n) => safe(() => this.dc[n]?.isOpen() ?? false, false));
    if (wasOpen) {
      for (const n of CHANNELS) safe(() => this.dc[n]?.close(), undefined);
      await new Promise<void>((r) => setTimeout(r, CLOSE_GRACE_MS));
    }
    safe(() => pc.close(), undefined);
  }

  // ---- signaling ------------------------------------------------------------------------------------------

  protected override async makeOffer(): Promise<string> {
    const pc = this.ensurePc();
    pc.setLocalDescription("offer");
    return this.filterSdp(localSdp(pc));
  }

  /** The certificate fingerprint libdatachannel saw (and verified) in the DTLS handshake. */
  remoteFingerprint(): Fingerprint | undefined {
    const fp = safe(() => this.pc?.remoteFingerprint(), undefined);
    if (!fp?.value || !fp.algorithm) return undefined;
    return { algorithm: fp.algorithm.toLowerCase(), value: fp.value.toUpperCase() };
  }

  protected override async setRemote(type: "offer" | "answer", sdp: string): Promise<void> {
    // Exactly one sha-256 fingerprint, checked here too (the mesh checks it before; tests feed links directly).
    checkSdpFingerprints(sdp, "remote SDP");
    const pc = this.ensurePc();
    // libdatachannel sets up the ICE transport of a new offer on its own thread; an answer that
    // comes back very fast (loaded host) can overtake it ("remote candidate without ICE
    // transport"). Retry briefly instead of failing the whole attempt.
    for (let attempt = 0; ; attempt++) {
      try {
        pc.setRemoteDescription(this.filterSdp(sdp), type);
        break;
      } catch (err) {
        if (type !== "answer" || attempt >= 20 || !/without ICE transport/i.test(errMsg(err)) || this.isDone()) throw err;
        await new Promise<void>((r) => setTimeout(r, 25));
      }
    }
    this.remoteMid = firstMid(sdp);
  }

  protected override async makeAnswer(): Promise<string> {
    const pc = this.ensurePc();
    pc.setLocalDescription("answer");
    return this.filterSdp(localSdp(pc));
  }

  protected override signalingState(): string | undefined {
    return this.pc?.signalingState();
  }

  /** Apply the candidate filter to the a=candidate lines of an SDP (remote before use, local before sending). */
  private filterSdp(sdp: string): string {
    if (!/^a=candidate:/m.test(sdp)) return sdp;
    return sdp
      .split(/\r?\n/)
      .filter((l) => !l.startsWith("a=candidate:") || this.keepCandidate(l))
      .join("\r\n");
  }

  private keepCandidate(line: string): boolean {
    const addr = candidateAddress(line);
    return addr === undefined || this.env.keepAddress(addr);
  }

  protected override addCandidate(c: IceCandidateInit | null): void {
    // libdatachannel has no end-of-candidates call: nothing to do for null.
    if (c === null || !this.pc) return;
    const line = c.candidate.trim();
    if (line === "") return; // the W3C end-of-candidates form
    if (!this.keepCandidate(line)) {
      this.log.debug("remote candidate ignored (loopbackOnly/excludeAddress)", { candidate: line });
      return;
    }
    // werift and browsers put the mid in sdpMid; some peers only give sdpMLineIndex (one m-section here).
    const mid = c.sdpMid ?? this.remoteMid ?? "0";
    try {
      this.pc.addRemoteCandidate(line.startsWith("a=") ? line.slice(2) : line, mid);
    } catch (err) {
      this.log.debug("remote candidate rejected", { candidate: line, mid, err });
    }
  }

  // ---- data -----------------------------------------------------------------------------------------------

  protected override sendCapacity(channel: ChannelName): { maxSize: number; buffered: number } | undefined {
    const dc = this.dc[channel];
    if (!this.open[channel] || !dc) return undefined;
    try {
      return { maxSize: Math.min(dc.maxMessageSize(), this.limits.maxMessageSize), buffered: dc.bufferedAmount() };
    } catch {
      return undefined;
    }
  }

  protected override sendNow(channel: ChannelName, data: Uint8Array): void {
    // libdatachannel copies the bytes before returning (the caller may reuse `data`). Returns false when it
    // queued the message instead of handing it to SCTP at once: still sent.
    this.dc[channel]!.sendMessageBinary(data);
  }

  override bufferedAmount(channel: ChannelName): number {
    if (this.isDone()) return 0;
    return safe(() => this.dc[channel]?.bufferedAmount() ?? 0, 0);
  }

  protected override selectedPath(): SelectedPath | undefined {
    const pair = this.pc?.getSelectedCandidatePair();
    if (!pair) return undefined;
    return {
      localType: pair.local.type,
      localAddress: hostPort(pair.local.address, pair.local.port),
      remoteType: pair.remote.type,
      remoteAddress: hostPort(pair.remote.address, pair.remote.port),
    };
  }
}

function localSdp(pc: Ndc.PeerConnection): string {
  const sdp = pc.localDescription()?.sdp;
  if (!sdp) throw new Error("no local description after setLocalDescription");
  return sdp;
}

function firstMid(sdp: string): string | undefined {
  return /^a=mid:(\S+)\s*$/m.exec(sdp)?.[1];
}

/** "candidate:1 1 UDP 2114977791 127.0.0.1 46943 typ host" -> "127.0.0.1" (undefined when unparsable). */
function candidateAddress(line: string): string | undefined {
  return line.replace(/^a=/, "").trim().split(/\s+/)[4];
}

function hostPort(address: string, port: number): string {
  return address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;
}

function safe<T>(fn: () => T, fallback: T): T {
  try {
    return fn();
  } catch {
    return fallback;
  }
}
