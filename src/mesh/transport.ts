/**
 * The port between the mesh core and a WebRTC implementation (werift: agent/transport/werift.ts, libdatachannel: native.ts; the signaling server's data relay: relay.ts).
 * The core never imports any of them; src/testing/memory-transport.ts is the in-memory fake.
 *
 * One TransportLink = one RTCPeerConnection to one peer with two pre-negotiated data channels:
 *   control  id 0, reliable + ordered      gossip, RPC, heartbeats (msgpack, see wire/control.ts)
 *   packets  id 1, unordered, maxRetransmits 0   encapsulated pod IP frames (data plane)
 */
import type { IceCandidateInit } from "../wire/signal.js";

export type ChannelName = "control" | "packets";

/**
 * What TransportLink.send did with a message (one backpressure policy; src/packet/forwarder.ts reacts):
 *   ok       queued or sent
 *   full     over the channel's buffer limit: refused, and onDrain(channel) follows once it can take more
 *   too-big  larger than the link's max message size: refused for good (a counted drop; never waits for a drain)
 *   closed   the link or channel is not open (not yet, or any more): refused; no drain follows
 */
export type SendResult = "ok" | "full" | "too-big" | "closed";

export interface Fingerprint {
  algorithm: string; // e.g. "sha-256"
  value: string; // uppercase hex pairs separated by ':'
}

/** What a link hands to the signaling layer (and accepts back from the remote side). */
export type LinkSignal =
  | { kind: "offer" | "answer"; sdp: string }
  | { kind: "candidate"; candidate: IceCandidateInit | null };

export type LinkState = "new" | "connecting" | "open" | "closed" | "failed";

export interface LinkHandlers {
  onSignal(sig: LinkSignal): void;
  /** Both channels open. */
  onOpen(): void;
  onMessage(channel: ChannelName, data: Uint8Array): void;
  /** Terminal: the link is gone (closed locally, failed, or the remote went away). Called once. */
  onClose(reason: string): void;
  /**
   * The channel's buffered amount fell to its low-water mark after `send` returned "full", or (packets
   * channel) after a send left it above the low-water mark: the watermark signal the Forwarder's
   * per-peer high-water pause waits for. Called once per such episode; may be stale (check queued).
   */
  onDrain?(channel: ChannelName): void;
}

export interface SelectedPath {
  localType: string; // host | srflx | prflx | relay
  localAddress: string;
  remoteType: string;
  remoteAddress: string;
}

export interface LinkStats {
  bytesSent: number;
  bytesReceived: number;
  selected?: SelectedPath;
  /** Path MTU the link sends with, once confirmed (transports that choose one). */
  pathMtu?: number;
  /** How pathMtu was found (transports that choose one, and werift: "fixed"). */
  pmtuHow?: LinkPmtuHow;
  /** The link's path MTU search (src/mesh/pmtu.ts), when it ran one. */
  pmtu?: LinkPmtuStats;
}

/**
 * How a WebRTC link's path MTU was found (status peers[].pmtuHow): "confirmed" its full-size probe was acked at the
 * MTU it was built for (--link-mtu, or the uplink's); "route-limit" the local kernel's route MTU toward the selected
 * pair (over TURN: toward the TURN server, less TURN's ChannelData header) is below that, so the link is built for
 * it; "black-hole" full-size probes were lost and the size is what probing found; "peer" the peer's search found
 * it; "default" built for 1280 and never checked; "fixed" werift (1200-byte SCTP chunks, no search); "searching"
 * the check is still running.
 */
export type LinkPmtuHow = "confirmed" | "route-limit" | "black-hole" | "peer" | "default" | "fixed" | "searching";

/** What a link's path MTU search did: probes sent/acked, sizes lost or skipped (above the local limit), typed drops of probe traffic. */
export interface LinkPmtuStats {
  probes: number;
  acked: number;
  lost: number;
  skipped: number;
  /** by reason: stale-ack, ack-not-in-flight, ack-after-done (the search), malformed, unsolicited-ack (the link) */
  drops: Record<string, number>;
  /** the size found when below the link's (the link then failed and the next one is built for it) */
  found?: number;
}

export interface TransportLink {
  /** Initiator only: create and emit the offer. */
  start(): Promise<void>;
  /** Feed a signal from the remote side (offer/answer/candidate). Candidates before the remote description are buffered. */
  handleSignal(sig: LinkSignal): Promise<void>;
  /**
   * Queue a message; anything but "ok" means it was dropped (see SendResult).
   * `data` is borrowed for the duration of the call only: the caller may overwrite it once send() returns,
   * so a link that keeps the bytes (queues them) copies them first.
   */
  send(channel: ChannelName, data: Uint8Array): SendResult;
  bufferedAmount(channel: ChannelName): number;
  /**
   * Bytes of one `packets` message that travel in one packet on the wire (one SCTP packet in one DTLS
   * datagram), when the link can lose messages; undefined when it cannot (a relay over TCP) or is unknown.
   * The forwarder segments GSO super-packets to this size once loss shows (src/packet/gso-policy.ts).
   */
  readonly packetBudget?: number;
  readonly state: LinkState;
  stats(): Promise<LinkStats>;
  close(): void;
  /**
   * The fingerprint of the certificate the remote actually presented in the DTLS handshake (once open):
   * what the link-level identity proof (mesh/auth.ts proveLink) covers. Transports without DTLS (relay,
   * fakes) leave it out; their links are not proven that way.
   */
  remoteFingerprint?(): Fingerprint | undefined;
}

export interface LinkOptions {
  initiator: boolean;
  /** the remote node and this attempt's connection id (transports that address peers themselves need them) */
  peer?: string;
  conn?: string;
  iceServers: { urls: string | string[]; username?: string; credential?: string }[];
  handlers: LinkHandlers;
  /**
   * Build this link for at most this path MTU. A peer that is not a weftnet link (a browser or other viewer of
   * the topology page) does not answer path MTU probes, so its link is built for 1280 and never probes.
   */
  maxMtu?: number;
}

/** A transport's path MTU searches so far, all links together (weftnet_pmtu_* metrics). */
export interface PmtuCounters {
  /** searches that ended: confirmed (the built MTU), searched (a smaller size found by probing), local-limit (the kernel's route MTU, nothing probed above it) */
  searches: { confirmed: number; searched: number; "local-limit": number };
  probes: number;
  acked: number;
  /** sizes that counted as lost */
  lost: number;
  /** a confirmed size stopped getting through while smaller traffic passed (the bulk link's confirmation probes) */
  blackHoles: number;
  /** WebRTC links failed because ICE then selected a pair whose local limit is below the link's MTU */
  pairChanges: number;
  /** probe traffic dropped, by reason (LinkPmtuStats.drops) */
  drops: Record<string, number>;
}

export function emptyPmtuCounters(): PmtuCounters {
  return { searches: { confirmed: 0, searched: 0, "local-limit": 0 }, probes: 0, acked: 0, lost: 0, blackHoles: 0, pairChanges: 0, drops: {} };
}

export interface Transport {
  readonly name: string;
  /** Path MTU search counters of this transport's links (transports that search: native). */
  pmtu?(): PmtuCounters;
  /** Why this transport's links do not search their path MTU (transports that cannot: werift), for status. */
  readonly pmtuFixed?: string;
  /** DTLS certificate fingerprint used by every link of this transport (one certificate per agent run). */
  readonly fingerprint: Fingerprint;
  createLink(opts: LinkOptions): TransportLink;
  close(): Promise<void>;
}

/**
 * Part of a link's close reason when it failed after ICE had connected (DTLS or SCTP failed): UDP reaches
 * the peer, so the mesh retries WebRTC instead of falling back to the relay (manager.ts noteFailure).
 */
export const AFTER_ICE_CONNECTED = "after ICE connected";

/** Extract the first a=fingerprint line from an SDP. Pure; used to bind SDP to node identity. */
export function sdpFingerprint(sdp: string): Fingerprint | undefined {
  const m = /^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$/m.exec(sdp);
  if (!m || !m[1] || !m[2]) return undefined;
  return { algorithm: m[1].toLowerCase(), value: m[2].toUpperCase() };
}

export function fingerprintString(fp: Fingerprint): string {
  return `${fp.algorithm} ${fp.value}`;
}
