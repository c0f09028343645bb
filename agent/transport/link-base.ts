/**
 * What the werift (werift.ts) and libdatachannel (native.ts) links have in common, as an abstract base class
 * over the transport port (src/mesh/transport.ts). The base owns the link's state machine and bookkeeping:
 *
 * - signals: the offer/answer/candidate skeleton (an initiator ignores offers, an answerer ignores answers,
 *   no renegotiation, remote candidates are buffered (up to 256) until the remote description is set);
 * - terminal transition: finish() frees the link once and calls onClose exactly once;
 * - handlers: every call into LinkHandlers goes through call(), which logs instead of throwing into the library;
 * - send(): a typed SendResult; max-message-size check ("too-big", logged once per link and channel), buffer
 *   limit / low-water refusal ("full"), onDrain once after a refusal or after packets went above low water, send-failure logging once per link, byte counters;
 * - receive: string messages (a misbehaving peer) are delivered as their UTF-8 bytes, logged once;
 * - stats(): byte counters plus the selected candidate pair when the library knows it;
 * - path MTU check (probeMtu): see below;
 * - the initiator's candidates wait for the answer (below).
 *
 * Initiator candidates wait for the answer (holdCandidatesUntilAnswer: the native transport). The offer goes out without a=candidate lines and the initiator's
 * trickled candidates are held until the remote answer is applied, then sent in order. Until then the
 * answerer has no address to send ICE checks (or DTLS) to. Reason (measured, libdatachannel 0.24.5): an
 * answerer that knows the offerer's candidates connects ICE within a millisecond on a LAN or loopback (the
 * offerer's ICE agent answers checks before it has the answer) and sends its DTLS ClientHello at once; when
 * the answer then arrives, libdatachannel hands it to ICE before it records the remote description, ICE
 * connects on the spot, the buffered ClientHello is handshaked and the client certificate checked against a
 * remote fingerprint that is not set yet: "certificate verify failed", the whole attempt fails (about half
 * the first attempts in a 5-agent loopback mesh) and the pair starts on the relay. Holding the candidates
 * costs nothing: the offerer cannot complete ICE before it has the answer anyway. (werift has no such race,
 * and holding made its own DTLS weakness more frequent in the same mesh: its client fails on a duplicate
 * HelloVerifyRequest when the server answers a ClientHello later than its 500 ms retransmission.)
 *
 * Path MTU check and search (src/mesh/pmtu.ts decides, this class sends and times). A link built for a path
 * MTU above 1280 (the native transport's --link-mtu) proves it before it opens for the mesh (onOpen comes
 * after; until then only probes travel, so no oversized control message can stall the association). First the
 * local limit: the kernel's path MTU toward the selected pair's remote address (localMtuLimit, native.ts: route
 * MTU + libdatachannel's wire overhead; over TURN the route MTU toward the TURN server less TURN's encapsulation,
 * TURN_OVERHEAD). Below the link's MTU, the search ends at once with it
 * and nothing is sent (a packet above it would fail with EMSGSIZE and wedge usrsctp's send queue for good: see
 * pmtu.ts). Else a probe of exactly one full-size SCTP packet (mtu - PROBE_OVERHEAD bytes of message) goes on
 * `packets`, which the peer's link answers with a small ack on the same channel. One probe is in flight at a
 * time and waits for its ack (at least SEARCH_WAIT_MS, 4 probe round trips on slow paths), SEARCH_TRIES per
 * size. No ack for the full size: packets of that size do not reach the peer (a silent black hole: Don't
 * Fragment meets a smaller MTU further on), and the link searches upwards from 1280, coarse then fine steps (at
 * most three sizes are ever lost, each abandoned by PR-SCTP at its T3 timeout). Then the link fails with a
 * reason that names the size found, and the transport builds the next link to that peer for exactly that MTU
 * (native.ts), whose own full-size check confirms it. Probes and acks start with PROBE_MAGIC, a byte no data
 * frame starts with (src/packet/frame.ts: version 1 << 4), and never reach the mesh; the last two bytes of a
 * probe's 8-byte nonce carry its size (acks echo the nonce). Probe traffic that is malformed or acks no probe
 * of ours is dropped and counted by reason (stats().pmtu.drops). Both adapters answer probes, so a werift peer
 * confirms a native peer's MTU (werift links never search: werift's SCTP cuts every message into 1200-byte DATA
 * chunks, USERDATA_MAX_LENGTH, a module constant of werift/sctp, not settable per association).
 *
 * Subclasses implement the small hooks below with their library's calls and keep everything
 * library-specific (teardown order, candidate formats and filters, retries) to themselves.
 */
import { AFTER_ICE_CONNECTED } from "../../src/mesh/transport.js";
import type { ChannelName, LinkHandlers, LinkPmtuHow, LinkPmtuStats, PmtuCounters, LinkSignal, LinkState, LinkStats, SelectedPath, SendResult, TransportLink } from "../../src/mesh/transport.js";
import type { IceCandidateInit } from "../../src/wire/signal.js";
import type { Logger } from "../../src/log.js";
import { PmtuSearch, type PmtuOutcome, type PmtuStep } from "../../src/mesh/pmtu.js";


/**
 * Largest `mtu` that works: libjuice receives into a 4096-byte buffer, and a datagram is mtu - 108 + 37
 * (DTLS 1.2 AES-GCM record) bytes, so from mtu ~4170 on every full-size packet is cut short and lost
 * (measured on loopback: mtu 4100 carries 1.3 Gbit/s, 4200 nothing).
 */
export const MAX_LINK_MTU = 4096;
export const CHANNELS: readonly ChannelName[] = ["control", "packets"];

/** First byte of a link probe or probe ack (see the header); data frames start with 0x1_. */
export const PROBE_MAGIC = 0xf0;
const PROBE_REQ = 1;
const PROBE_ACK = 2;
/** The sender's search ended below the link's MTU with this size (2 bytes): the receiver's next link uses it too. */
const PROBE_RESULT = 3;
/**
 * A message of mtu - PROBE_OVERHEAD bytes fills one SCTP packet of a libdatachannel link exactly: the largest
 * packet the link ever sends (measured with strace, mtu 2000: a 1876-byte message goes as one 1941-byte UDP
 * payload, the same size as the full packets of a 20 KB message; 1877 bytes already take two datagrams). A probe
 * must be that large, or data packets would be up to 12 bytes larger than what the search confirmed.
 */
export const PROBE_OVERHEAD = 124;
/** packetBudget's margin below the link MTU (unchanged since before the search: SCTP/DTLS/UDP/IPv6 108 + DATA 16 + 12). */
const BUDGET_OVERHEAD = 136;
/** Probes per size before it counts as lost (src/mesh/pmtu.ts), and the least time a probe waits for its ack. */
export const SEARCH_TRIES = 2;
export const SEARCH_WAIT_MS = 500;
/** A probe leaves at least this long after the last probe traffic arrived (libdatachannel's delayed SACK is 20 ms). */
const SACK_QUIET_MS = 40;
/**
 * What TURN adds between this host and the TURN server to a relayed datagram of the link: libjuice (libdatachannel's
 * ICE agent) sends every application datagram of a relayed pair as ChannelData (agent.c agent_send ->
 * agent_channel_send: it binds a channel first if needed and wraps the datagram in the 4-byte ChannelData header,
 * never padded; since libjuice 0.7, 2020). Send indications (36 bytes IPv4, 48 IPv6) carry only its ICE checks
 * before nomination, which are small. Measured in the NAT lab (tcpdump at coturn): every relayed DTLS record from a
 * libjuice client came as ChannelData, the largest 4 bytes above the link's full-size datagram (RFC 8656 section 12).
 */
export const TURN_OVERHEAD = { v4: 4, v6: 4 } as const;
/** The path MTU every link may assume (IPv6 minimum; libdatachannel's default). */
export const SAFE_LINK_MTU = 1280;

/** The limit fields the base uses (each adapter has its own defaults: WERIFT_LIMITS, NATIVE_LIMITS). */
export interface LinkLimits {
  controlBufferLimit: number;
  packetsBufferLimit: number;
  controlLowWater: number;
  packetsLowWater: number;
  maxMessageSize: number;
}

export interface LinkBaseOptions {
  initiator: boolean;
  handlers: LinkHandlers;
  limits: LinkLimits;
  log: Logger;
  /** Called once, from finish(): the transport forgets the link. */
  onGone(link: LinkBase): void;
  /** Path MTU this link was built for; above SAFE_LINK_MTU it is checked once open (see the header). */
  pathMtu?: number;
  /** The check failed: packets of pathMtu bytes do not reach the peer; `found`-byte ones do (search), found `how`. */
  onPathMtuFailed?(found: number, how: FoundHow): void;
  /** pathMtu is what an earlier link to this peer found (native.ts's fallback), and how: the link's pmtuHow once confirmed. */
  pathMtuHow?: FoundHow;
  /**
   * The largest link MTU the local kernel lets out toward `host` (the selected pair's remote address), for the
   * search's local limit (src/mesh/pmtu.ts); undefined when unknown. native.ts: the route MTU plus the DTLS/UDP/IP
   * overhead libdatachannel's mtu does not count.
   */
  localMtuLimit?(host: string): number | undefined;
  /**
   * Where the kernel sends a relayed pair's datagrams: the addresses (IP literals) of the TURN servers this link may
   * allocate at, plus "" for each server given by name (then the relayed address stands in for it). Not the relayed
   * address itself: libjuice requests no address family, so a server reached over IPv6 hands out an IPv4 relayed
   * address (RFC 6156's default) while every datagram goes to the server over IPv6 (20 bytes more IP header).
   */
  turnServers?: readonly string[];
  /** The transport's counters, which this link's search adds to when it ends or the link finishes. */
  pmtuCounters?: PmtuCounters;
  /** Initiator: send no candidates before the answer is applied (see the header; native.ts sets it). */
  holdCandidatesUntilAnswer?: boolean;
}

/** What a failed check reports to the transport, for the next link's pmtuHow. */
export type FoundHow = "route-limit" | "black-hole" | "peer";

/** Probe traffic the link drops before the search sees it: too short or an unknown type, or an ack of no probe of ours. */
export type LinkProbeDrop = "malformed" | "unsolicited-ack";

/** "1.2.3.4:5" / "[::1]:5" -> the host part. */
function hostOf(addr: string): string | undefined {
  const v6 = /^\[([^\]]+)\]:\d+$/.exec(addr);
  if (v6) return v6[1];
  const v4 = /^([^:]+):\d+$/.exec(addr);
  return v4?.[1];
}

/** Remote candidates kept while the remote description is not set yet. */
const MAX_PENDING_CANDIDATES = 256;

export abstract class LinkBase implements TransportLink {
  protected readonly handlers: LinkHandlers;
  protected readonly log: Logger;
  protected readonly limits: LinkLimits;
  protected readonly initiator: boolean;
  private readonly onGone: (link: LinkBase) => void;
  private _state: LinkState = "new";
  private remoteSet = false;
  private pendingCandidates: (IceCandidateInit | null)[] = [];
  private sendFailLogged = false;
  private readonly wantDrain: Record<ChannelName, boolean> = { control: false, packets: false };
  private readonly oversizeLogged: Record<ChannelName, boolean> = { control: false, packets: false };
  private stringLogged = false;
  private bytesSent = 0;
  private bytesReceived = 0;
  private closePromise: Promise<void> | undefined;
  private readonly pathMtu: number | undefined;
  private readonly onPathMtuFailed: ((found: number, how: FoundHow) => void) | undefined;
  private readonly pathMtuHow: FoundHow | undefined;
  private probeNonce: Uint8Array | undefined;
  private probeTimer: NodeJS.Timeout | undefined;
  private probeSendTimer: NodeJS.Timeout | undefined;
  /** when a message last arrived on `packets` (performance.now), for the probes' quiet gap */
  private lastProbeRx = -Infinity;
  private readonly localMtuLimit: ((host: string) => number | undefined) | undefined;
  private readonly turnServers: readonly string[];
  private readonly pmtuCounters: PmtuCounters | undefined;
  private pmtuCounted = false;
  /** probe traffic dropped here, by reason (the search counts its own: stale acks etc.) */
  private readonly probeDrops: Record<LinkProbeDrop, number> = { malformed: 0, "unsolicited-ack": 0 };
  private pathMtuConfirmed = false;
  /** when the link was created (performance.now), for the connect-path stage log */
  private readonly bornAt = performance.now();
  private readonly staged = new Set<string>();
  /** initiator: local candidates held until the answer is applied (header); undefined once released */
  private held: { list: IceCandidateInit[]; seen: Set<string>; ended: boolean } | undefined;
  private search: PmtuSearch | undefined;
  /** What the path MTU search found below pathMtu (the link then fails; see probe()), and how. */
  foundPathMtu: number | undefined;

  constructor(opts: LinkBaseOptions) {
    this.handlers = opts.handlers;
    this.log = opts.log;
    this.limits = opts.limits;
    this.initiator = opts.initiator;
    this.onGone = opts.onGone;
    this.pathMtu = opts.pathMtu;
    this.onPathMtuFailed = opts.onPathMtuFailed;
    this.pathMtuHow = opts.pathMtuHow;
    this.localMtuLimit = opts.localMtuLimit?.bind(opts);
    this.turnServers = opts.turnServers ?? [];
    this.pmtuCounters = opts.pmtuCounters;
    if (this.initiator && opts.holdCandidatesUntilAnswer) this.held = { list: [], seen: new Set(), ended: false };
  }

  // ---- hooks: the library calls ---------------------------------------------------------------------

  /** Create the offer and set it as local description; its SDP, or undefined when the link finished meanwhile. */
  protected abstract makeOffer(): Promise<string | undefined>;
  /** Set the remote description (the base has checked the role and that none is set yet). */
  protected abstract setRemote(type: "offer" | "answer", sdp: string): Promise<void>;
  /** After the remote offer: create the answer and set it as local description (undefined: link finished). */
  protected abstract makeAnswer(): Promise<string | undefined>;
  /** The library's signaling state, to ignore an answer that comes before our offer. */
  protected abstract signalingState(): string | undefined;
  /** Hand a remote candidate (null: end of candidates) to the library; never throws. */
  protected abstract addCandidate(c: IceCandidateInit | null): Promise<void> | void;
  /** Both data channels open. */
  protected abstract channelsOpen(): boolean;
  /** The channel is open: the largest message it may send now and its buffered amount; undefined when it cannot send. */
  protected abstract sendCapacity(channel: ChannelName): { maxSize: number; buffered: number } | undefined;
  /** Hand a message to the library; throws when it fails. */
  protected abstract sendNow(channel: ChannelName, data: Uint8Array): void;
  /** The selected candidate pair, when known. */
  protected abstract selectedPath(): Promise<SelectedPath | undefined> | SelectedPath | undefined;
  /**
   * Called once from finish(), synchronously: drop the library's event subscriptions, then close it. The
   * returned promise (the library let go of its sockets) is what closeAndWait() waits for.
   */
  protected abstract dispose(): Promise<void>;
  abstract bufferedAmount(channel: ChannelName): number;

  get state(): LinkState {
    return this._state;
  }

  // ---- for the subclasses' event handlers -------------------------------------------------------------

  protected isDone(): boolean {
    return this._state === "closed" || this._state === "failed";
  }

  /**
   * Connect-path timing (debug level): one line per stage with ms since the link was created, the first
   * time it is reached (offer/answer, first candidates, ICE, DTLS/connection, channels, open). Repeated
   * stages (e.g. every candidate) are logged once; `always` logs every occurrence.
   */
  protected stage(name: string, fields: Record<string, unknown> = {}, always = false): void {
    if (!always && this.staged.has(name)) return;
    this.staged.add(name);
    this.log.debug("link stage", { stage: name, ms: Math.round(performance.now() - this.bornAt), ...fields });
  }

  protected emitSignal(sig: LinkSignal): void {
    if (sig.kind === "candidate" && this.held) {
      this.hold(sig.candidate);
      return;
    }
    if (sig.kind === "candidate") this.stage(sig.candidate ? "local candidate" : "local end-of-candidates", sig.candidate ? { candidate: sig.candidate.candidate } : {});
    else this.stage(`${sig.kind} sent`);
    this.call("onSignal", () => this.handlers.onSignal(sig));
  }

  /** Initiator before the answer: keep a local candidate (null: end of candidates) for releaseHeld(). */
  private hold(c: IceCandidateInit | null): void {
    const h = this.held!;
    if (c === null) {
      h.ended = true;
      return;
    }
    const key = c.candidate.replace(/^a=/, "").trim();
    if (h.seen.has(key)) return;
    h.seen.add(key);
    h.list.push(c);
    this.stage("local candidate held until the answer");
  }

  /** The answer is applied: send the held candidates, then end-of-candidates if gathering finished. */
  private releaseHeld(): void {
    const h = this.held;
    if (!h) return;
    this.held = undefined;
    for (const c of h.list) {
      if (this.isDone()) return;
      this.emitSignal({ kind: "candidate", candidate: c });
    }
    if (h.ended && !this.isDone()) this.emitSignal({ kind: "candidate", candidate: null });
  }

  /** Take the a=candidate / a=end-of-candidates lines out of our offer into the held list (header). */
  private holdOfferCandidates(sdp: string): string {
    if (!/^a=(candidate:|end-of-candidates)/m.test(sdp)) return sdp;
    const mid = /^a=mid:(\S+)\s*$/m.exec(sdp)?.[1];
    const out: string[] = [];
    let ended = false;
    for (const line of sdp.split(/\r?\n/)) {
      if (line.startsWith("a=candidate:")) this.hold({ candidate: line.slice(2), ...(mid !== undefined ? { sdpMid: mid } : {}), sdpMLineIndex: 0 });
      else if (line.startsWith("a=end-of-candidates")) ended = true;
      else out.push(line);
    }
    if (ended) this.hold(null);
    return out.join("\r\n");
  }

  /** Run a handler; never let it throw into the library. */
  protected call(what: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.log.error("link handler threw", { handler: what, err });
    }
  }

  /** The peer connection's state changed. */
  protected connectionState(s: string): void {
    this.stage(`connection ${s}`);
    if (s === "failed") this.finish("failed", this.iceWasUp() ? `connection failed ${AFTER_ICE_CONNECTED} (DTLS/SCTP)` : "connection failed");
    else if (s === "closed") this.finish("closed", "connection closed");
  }

  /** A data channel's state changed: the link opens with both channels, and closes with either. */
  protected channelState(name: ChannelName, s: string): void {
    this.stage(`${name} channel ${s}`);
    if (s === "open") this.maybeOpen();
    else if (s === "closed" || s === "closing") this.finish("closed", `${name} channel closed`);
  }

  private maybeOpen(): void {
    if (this._state !== "new" && this._state !== "connecting") return;
    if (!this.channelsOpen() || this.search) return;
    // A link built above 1280 opens for the mesh only once its path MTU is confirmed (see the header): until
    // then nothing but probes travels on it, so no oversized control message can stall the association.
    if (this.pathMtu !== undefined && this.pathMtu > SAFE_LINK_MTU) {
      this.stage("path MTU search");
      void this.probe();
      return;
    }
    this.opened();
  }

  private opened(): void {
    if (this.isDone()) return;
    this._state = "open";
    this.stage("open");
    this.call("onOpen", () => this.handlers.onOpen());
  }

  /**
   * Probe the path MTU (see the header and src/mesh/pmtu.ts, which decides what to send and when): one probe in
   * flight at a time, never above the local kernel's limit toward the selected remote address. Done: confirmed,
   * or the link fails and reports what the path carries, so the transport's next link is built for exactly that.
   */
  private probe(): void {
    if (this.isDone() || this.pathMtuConfirmed || this.search) return;
    // The local limit needs the selected pair's remote address (and its local type: over TURN the kernel sends
    // to the TURN server: then the limit is toward the server, less TURN's encapsulation; limitFor). Read
    // synchronously when the library can (native): both ends then decide in the same turn their channels open,
    // before the first to fail can close the other's link.
    let sel: SelectedPath | Promise<SelectedPath | undefined> | undefined;
    try {
      sel = this.localMtuLimit ? this.selectedPath() : undefined;
    } catch {
      sel = undefined;
    }
    if (sel instanceof Promise) {
      sel.then(
        (s) => this.startSearch(s),
        () => this.startSearch(undefined),
      );
    } else this.startSearch(sel);
  }

  private startSearch(sel: SelectedPath | undefined): void {
    if (this.isDone() || this.pathMtuConfirmed || this.search) return;
    // The limit is read before every probe from the pair selected then (ICE may still switch pairs until one is
    // nominated; selectedPairMayHaveChanged covers a switch after the search).
    const limit = sel && this.localMtuLimit ? () => this.limitFor(this.selectedNow() ?? sel) : undefined;
    this.log.debug("path MTU search", { built: this.pathMtu, localType: sel?.localType, localAddress: sel?.localAddress, remoteType: sel?.remoteType, remoteAddress: sel?.remoteAddress, limit: limit?.() });
    const search = (this.search = new PmtuSearch({ lo: SAFE_LINK_MTU, hi: this.pathMtu!, tries: SEARCH_TRIES, minWaitMs: SEARCH_WAIT_MS, ...(limit ? { localLimit: limit } : {}) }));
    this.probeNonce = globalThis.crypto.getRandomValues(new Uint8Array(8));
    this.applySearch(search.handle({ kind: "start" }, performance.now()));
  }

  /** The selected pair when the library tells it synchronously (native), else undefined. */
  private selectedNow(): SelectedPath | undefined {
    try {
      const s = this.selectedPath();
      if (s instanceof Promise) {
        s.catch(() => undefined);
        return undefined;
      }
      return s;
    } catch {
      return undefined;
    }
  }

  /**
   * ICE may change the selected pair after the search: libjuice's selected pair is the best one that succeeded so
   * far until the controlling agent nominates one ("ice completed"; agent.c agent_update_ordered_pairs). Measured
   * in the NAT lab with coturn: both ends searched at "ice connected" on prflx->relay (limit 1531), ICE completed
   * 2 s later and one end's pair became relay->prflx. The link's MTU is fixed when it is built, so a new pair whose
   * local limit is below it would fail the first full-size packet with EMSGSIZE and wedge usrsctp (pmtu.ts): the
   * link fails like a search that ended at the local limit, and the next one is built for the new pair's limit.
   * The adapter calls this on every ICE state change (native.ts).
   */
  protected selectedPairMayHaveChanged(): void {
    if (this.isDone() || !this.pathMtuConfirmed || !this.localMtuLimit || this.pathMtu === undefined || this.pathMtu <= SAFE_LINK_MTU) return;
    const sel = this.selectedNow();
    const limit = this.limitFor(sel);
    if (!sel || limit === undefined || limit >= this.pathMtu) return;
    const mtu = Math.max(SAFE_LINK_MTU, limit & ~3);
    if (this.pmtuCounters) this.pmtuCounters.pairChanges++;
    this.log.warn("selected candidate pair changed to one whose local route carries less; the next link is built for it", { built: this.pathMtu, limit: mtu, localType: sel.localType, localAddress: sel.localAddress, remoteType: sel.remoteType, remoteAddress: sel.remoteAddress });
    this.foundLess(mtu, "route-limit", true);
    this.finish("failed", `path MTU check failed ${AFTER_ICE_CONNECTED}: the selected candidate pair changed to ${sel.localType}->${sel.remoteType}, whose local route carries at most ${mtu}-byte link packets, not ${this.pathMtu}; the next link uses ${mtu}`);
  }

  /** Carry out what the search asks: send a probe and arm its timer, or finish. */
  private applySearch(step: PmtuStep): void {
    if (this.isDone() || (!step.done && step.probe === undefined)) return; // nothing to do (an ignored ack or tick)
    const search = this.search!;
    if (this.probeTimer) clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
    if (step.done) {
      this.searchDone(step.done.mtu, step.done.outcome);
      return;
    }
    if (step.probe === undefined) return;
    const size = step.probe;
    const msg = new Uint8Array(size - PROBE_OVERHEAD);
    msg[0] = PROBE_MAGIC;
    msg[1] = PROBE_REQ;
    msg.set(this.probeNonce!.subarray(0, 6), 2);
    msg[8] = size >> 8; // the last two nonce bytes say which size this probe was
    msg[9] = size & 0xff;
    // Quiet gap: a probe sent right after a message arrived carries usrsctp's pending SACK in its packet
    // (measured +24 bytes), so it would test a larger size than it says. Wait until the delayed SACK (20 ms in
    // libdatachannel) has gone out on its own; the timer below moves by the same amount.
    const quiet = Math.max(0, this.lastProbeRx + SACK_QUIET_MS - performance.now());
    const send = () => {
      if (this.isDone() || this.search !== search) return;
      this.sendProbeBytes(msg);
    };
    if (quiet > 0) this.probeSendTimer = setTimeout(send, quiet);
    else send();
    const wait = quiet + Math.max(0, (search.deadline ?? performance.now()) - performance.now());
    this.probeTimer = setTimeout(() => {
      this.probeTimer = undefined;
      this.applySearch(search.handle({ kind: "tick" }, Math.max(performance.now(), search.deadline ?? 0)));
    }, wait);
  }

  private searchDone(mtu: number, outcome: PmtuOutcome): void {
    const search = this.search!;
    if (this.pmtuCounters) this.pmtuCounters.searches[outcome]++;
    this.countPmtu();
    if (mtu >= this.pathMtu!) {
      this.pathMtuConfirmed = true;
      this.log.debug("path MTU confirmed", { mtu, ...search.stats });
      this.opened();
      return;
    }
    // ICE and DTLS work: the mesh redials WebRTC at once (manager.ts noteFailure), built for `mtu`.
    const reason =
      outcome === "local-limit"
        ? `path MTU check failed ${AFTER_ICE_CONNECTED}: the local route toward the peer carries at most ${mtu}-byte link packets, not ${this.pathMtu}; the next link uses ${mtu}`
        : `path MTU check failed ${AFTER_ICE_CONNECTED}: ${this.pathMtu}-byte packets did not reach the peer, ${mtu}-byte ones do; the next link uses ${mtu}`;
    this.log.warn("path MTU check failed; the next link is built for what the path carries", { built: this.pathMtu, found: mtu, outcome, probes: search.stats.probes, lost: search.stats.lost });
    this.foundLess(mtu, outcome === "local-limit" ? "route-limit" : "black-hole", true);
    this.finish("failed", reason);
  }

  /**
   * The path carries less than this link was built for: remember `mtu` and tell the transport how it was found
   * (its next link is built for it). `tellPeer`: also send the peer our result, since its own search may still
   * run (it would build its next link at the old size otherwise, and search again); its next link's full-size
   * check verifies the size for its direction.
   */
  private foundLess(mtu: number, how: FoundHow, tellPeer: boolean): void {
    this.foundPathMtu = mtu;
    if (tellPeer) this.sendProbeBytes(new Uint8Array([PROBE_MAGIC, PROBE_RESULT, mtu >> 8, mtu & 0xff]));
    this.call("onPathMtuFailed", () => this.onPathMtuFailed?.(mtu, how));
  }

  /** A probe or ack arrived on `packets` (never delivered to the mesh). */
  private onProbe(b: Uint8Array): void {
    if (b[1] === PROBE_RESULT && b.length >= 4) return this.onPeerResult((b[2]! << 8) | b[3]!);
    if (b.length < 10) return this.probeDrop("malformed");
    if (b[1] === PROBE_REQ) {
      const ack = new Uint8Array(10);
      ack[0] = PROBE_MAGIC;
      ack[1] = PROBE_ACK;
      ack.set(b.subarray(2, 10), 2);
      this.sendProbeBytes(ack);
      return;
    }
    const n = this.probeNonce;
    const search = this.search;
    if (b[1] !== PROBE_ACK) return this.probeDrop("malformed");
    if (!n || !search || this.isDone()) return this.probeDrop("unsolicited-ack");
    for (let i = 0; i < 6; i++) if (b[2 + i] !== n[i]) return this.probeDrop("unsolicited-ack");
    this.applySearch(search.handle({ kind: "ack", size: (b[8]! << 8) | b[9]! }, performance.now()));
  }

  /**
   * The search's local limit for a selected pair: the kernel's limit toward the remote address; over TURN (our end
   * relayed) toward the TURN server, less TURN's own encapsulation (see TURN_OVERHEAD). The path behind the TURN
   * server (server to peer) is not visible here: the probes find out. undefined: no limit known.
   */
  private limitFor(sel: SelectedPath | undefined): number | undefined {
    const lim = this.localMtuLimit;
    if (!lim || !sel) return undefined;
    if (sel.localType === "relay") {
      // The datagrams go to the TURN server (turnServers); which one of several the pair uses is not known here: the
      // least limit of those this host has a route to. A server given by name: our relayed address, on that server.
      const relayed = hostOf(sel.localAddress);
      const servers = this.turnServers.length > 0 ? this.turnServers.map((s) => s || relayed) : [relayed];
      let least: number | undefined;
      for (const server of servers) {
        const l = server ? lim(server) : undefined;
        if (!server || l === undefined) continue;
        const relayedLimit = l - (server.includes(":") ? TURN_OVERHEAD.v6 : TURN_OVERHEAD.v4);
        least = least === undefined ? relayedLimit : Math.min(least, relayedLimit);
      }
      return least ?? SAFE_LINK_MTU;
    }
    const host = hostOf(sel.remoteAddress);
    return host ? lim(host) : undefined;
  }

  /**
   * A link built above the local limit that closes before its own search decided (the peer's link failed the
   * same check first and closed both): still tell the transport, so that the next link from this side is not
   * built too large again (one more failed link per side otherwise).
   */
  private noteLocalLimitOnEarlyClose(): void {
    if (this.foundPathMtu !== undefined || this.search?.done || this.pathMtuConfirmed || !this.localMtuLimit || this.pathMtu === undefined || this.pathMtu <= SAFE_LINK_MTU) return;
    if (!this.iceWasUp()) return;
    try {
      const limit = this.limitFor(this.selectedNow());
      if (limit === undefined || limit >= this.pathMtu) return;
      const mtu = Math.max(SAFE_LINK_MTU, limit & ~3);
      this.log.debug("closed before its path MTU check; the local route limits the next link", { built: this.pathMtu, limit: mtu });
      this.foundLess(mtu, "route-limit", false);
    } catch {
      /* the library is going away */
    }
  }

  /** The peer's search ended with `mtu` below the link's: ours will not finish on this link (the peer closes it). */
  private onPeerResult(mtu: number): void {
    if (this.isDone() || this.pathMtuConfirmed || this.search?.done || this.pathMtu === undefined) return;
    if (mtu < SAFE_LINK_MTU || mtu >= this.pathMtu) return this.probeDrop("malformed");
    if (this.foundPathMtu !== undefined) return;
    this.log.debug("the peer's path MTU search found less; the next link uses it", { built: this.pathMtu, found: mtu });
    this.foundLess(mtu, "peer", false);
  }

  private probeDrop(reason: LinkProbeDrop): void {
    this.probeDrops[reason]++;
    if (this.pmtuCounted && this.pmtuCounters) this.pmtuCounters.drops[reason] = (this.pmtuCounters.drops[reason] ?? 0) + 1; // after the search: straight in
  }

  /** Add this link's search figures to the transport's counters, once (when the search ends, or at finish). */
  private countPmtu(): void {
    const c = this.pmtuCounters;
    const st = this.pmtuStats;
    if (this.pmtuCounted || !c) return;
    this.pmtuCounted = true;
    if (!st) {
      for (const [k, v] of Object.entries(this.probeDrops)) if (v) c.drops[k] = (c.drops[k] ?? 0) + v;
      return;
    }
    c.probes += st.probes;
    c.acked += st.acked;
    c.lost += st.lost;
    for (const [k, v] of Object.entries(st.drops)) if (v) c.drops[k] = (c.drops[k] ?? 0) + v;
  }

  /** The path MTU search's figures (undefined when this link did not search). */
  get pmtuStats(): LinkPmtuStats | undefined {
    const st = this.search?.stats;
    if (!st) return undefined;
    const drops: Record<string, number> = { ...st.drops, ...this.probeDrops };
    return { probes: st.probes, acked: st.acked, lost: st.lost, skipped: st.skipped, drops, ...(this.foundPathMtu !== undefined ? { found: this.foundPathMtu } : {}) };
  }

  /** Probe traffic on `packets`, past the buffer limits (one small message at a time); never throws. */
  private sendProbeBytes(msg: Uint8Array): void {
    try {
      this.sendNow("packets", msg);
    } catch (err) {
      this.log.debug("probe send failed", { err });
    }
  }

  /** The path MTU the link uses: confirmed (or not above SAFE_LINK_MTU), else SAFE_LINK_MTU while probing. */
  get linkMtu(): number | undefined {
    if (this.pathMtu === undefined) return undefined;
    return this.pathMtu <= SAFE_LINK_MTU || this.pathMtuConfirmed ? this.pathMtu : undefined;
  }

  /** How the MTU the link uses was found (status peers[].pmtuHow; LinkPmtuHow); undefined for a link without one. */
  get pmtuHow(): LinkPmtuHow | undefined {
    if (this.pathMtu === undefined) return undefined;
    if (this.pathMtu <= SAFE_LINK_MTU) return this.pathMtuHow ?? "default";
    if (!this.pathMtuConfirmed) return "searching";
    return this.pathMtuHow ?? "confirmed";
  }

  /**
   * One SCTP packet's worth of message: libdatachannel's SCTP packets are mtu - 108 bytes, minus the SCTP
   * common (12) and DATA chunk (16) headers and 12 of margin (= BUDGET_OVERHEAD), minus 8 more, to a multiple of 4.
   * The unconfirmed MTU of a link still probing counts as SAFE_LINK_MTU. werift overrides it (fixed chunks).
   */
  get packetBudget(): number | undefined {
    return ((this.linkMtu ?? SAFE_LINK_MTU) - BUDGET_OVERHEAD - 8) & ~3;
  }

  /** A message arrived (binary, or a string from a misbehaving peer). */
  protected deliver(name: ChannelName, m: string | ArrayBuffer | Uint8Array): void {
    if (this.isDone()) return;
    let bytes: Uint8Array;
    if (typeof m === "string") {
      if (!this.stringLogged) {
        this.stringLogged = true;
        this.log.warn("peer sent a string data-channel message; delivering its UTF-8 bytes", { channel: name });
      }
      bytes = new TextEncoder().encode(m);
    } else if (m instanceof ArrayBuffer) {
      bytes = new Uint8Array(m);
    } else {
      bytes = new Uint8Array(m.buffer, m.byteOffset, m.byteLength);
    }
    if (name === "packets" && bytes[0] === PROBE_MAGIC) {
      this.lastProbeRx = performance.now();
      this.onProbe(bytes);
      return;
    }
    this.bytesReceived += bytes.byteLength;
    this.call("onMessage", () => this.handlers.onMessage(name, bytes));
  }

  /**
   * The library reports the channel's buffer at or below its low-water mark. When send() refused a message
   * since, call onDrain once. `stillAbove`: the crossing may be stale (then nothing happens and the refusal
   * stands). `defer`: call onDrain from a later turn (the library reports from inside its send loop).
   */
  protected drained(name: ChannelName, opts: { stillAbove?: () => boolean; defer?: (fn: () => void) => void } = {}): void {
    if (!this.wantDrain[name] || this.isDone()) return;
    if (opts.stillAbove?.()) return;
    this.wantDrain[name] = false;
    const fire = () => {
      if (this.isDone()) return;
      this.call("onDrain", () => this.handlers.onDrain?.(name));
    };
    if (opts.defer) opts.defer(fire);
    else fire();
  }

  protected lowWater(channel: ChannelName): number {
    return channel === "control" ? this.limits.controlLowWater : this.limits.packetsLowWater;
  }

  /** Terminal transition: free everything, call onClose once. */
  protected finish(state: "closed" | "failed", reason: string): void {
    if (this.isDone()) return;
    this.noteLocalLimitOnEarlyClose();
    this.countPmtu();
    this._state = state;
    this.pendingCandidates = [];
    if (this.probeTimer) clearTimeout(this.probeTimer);
    if (this.probeSendTimer) clearTimeout(this.probeSendTimer);
    this.probeTimer = undefined;
    this.probeSendTimer = undefined;
    this.closePromise = this.dispose();
    this.onGone(this);
    this.log.debug("link closed", { reason, state });
    this.call("onClose", () => this.handlers.onClose(reason));
  }

  // ---- port API -----------------------------------------------------------------------------------------

  async start(): Promise<void> {
    if (!this.initiator) throw new Error("start() is for the initiator only");
    if (this._state !== "new") return;
    this._state = "connecting";
    try {
      const sdp = await this.makeOffer();
      if (sdp === undefined || this.isDone()) return;
      this.emitSignal({ kind: "offer", sdp: this.held ? this.holdOfferCandidates(sdp) : sdp });
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
          this.stage("offer received");
          await this.setRemote("offer", sig.sdp);
          if (this.isDone()) return;
          this.remoteSet = true;
          await this.flushCandidates();
          if (this.isDone()) return;
          const sdp = await this.makeAnswer();
          if (sdp === undefined || this.isDone()) return;
          this.emitSignal({ kind: "answer", sdp });
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
          const signalingState = this.signalingState();
          if (signalingState !== "have-local-offer") {
            this.log.warn("answer before our offer; ignored", { signalingState });
            return;
          }
          this.stage("answer received");
          await this.setRemote("answer", sig.sdp);
          if (this.isDone()) return;
          this.remoteSet = true;
          this.releaseHeld();
          await this.flushCandidates();
          return;
        }
        case "candidate": {
          this.stage(sig.candidate ? "remote candidate" : "remote end-of-candidates", sig.candidate ? { candidate: sig.candidate.candidate, early: !this.remoteSet } : {});
          if (!this.remoteSet) {
            if (this.pendingCandidates.length < MAX_PENDING_CANDIDATES) this.pendingCandidates.push(sig.candidate);
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

  send(channel: ChannelName, data: Uint8Array): SendResult {
    if (this._state !== "open") return "closed";
    const cap = this.sendCapacity(channel);
    if (!cap) return "closed";
    const size = data.byteLength;
    if (size > cap.maxSize) {
      if (!this.oversizeLogged[channel]) {
        this.oversizeLogged[channel] = true;
        this.log.warn("message larger than the max message size dropped", { channel, size, max: cap.maxSize });
      }
      return "too-big";
    }
    // Refuse only above the low-water mark, so that the library's "buffer low" event comes later (onDrain).
    const low = this.lowWater(channel);
    const limit = channel === "control" ? this.limits.controlBufferLimit : this.limits.packetsBufferLimit;
    if (cap.buffered > low && cap.buffered + size > limit) {
      this.wantDrain[channel] = true;
      return "full";
    }
    try {
      this.sendNow(channel, data);
      this.bytesSent += size;
      // Packets above the low-water mark: report the fall back to it (the Forwarder's high-water pause).
      if (channel === "packets" && cap.buffered + size > low) this.wantDrain.packets = true;
      return "ok";
    } catch (err) {
      // A channel that closes under a burst of sends would log once per message: warn once per link.
      if (!this.sendFailLogged) this.log.warn("data channel send failed (further failures on this link are not logged)", { channel, size, err });
      this.sendFailLogged = true;
      return "closed";
    }
  }

  async stats(): Promise<LinkStats> {
    const out: LinkStats = { bytesSent: this.bytesSent, bytesReceived: this.bytesReceived };
    const mtu = this.linkMtu;
    if (mtu !== undefined) out.pathMtu = mtu;
    const how = this.pmtuHow;
    if (how !== undefined) out.pmtuHow = how;
    const pm = this.pmtuStats;
    if (pm) out.pmtu = pm;
    if (this.isDone()) return out;
    try {
      const sel = await this.selectedPath();
      if (sel) out.selected = sel;
    } catch (err) {
      this.log.debug("stats: selected pair unavailable", { err });
    }
    return out;
  }

  close(): void {
    // Before opening (e.g. the peer's side of the attempt failed and it said bye): say whether UDP worked.
    this.finish("closed", this._state !== "open" && this.iceWasUp() ? `closed locally before opening, ${AFTER_ICE_CONNECTED}` : "closed locally");
  }

  /** ICE reached connected on this link at some point (the stage log records it; werift reports "completed" for gathering, so only "connected" counts). */
  private iceWasUp(): boolean {
    return this.staged.has("ice connected");
  }

  /** close() and wait until the library has released the connection (sockets, native resources). */
  async closeAndWait(reason: string): Promise<void> {
    this.finish("closed", reason);
    await this.closePromise;
  }
}

export function errMsg(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
