/**
 * In-memory Transport: links between transports of one MemoryNetwork, with the same signalling shape
 * as WebRTC (offer/answer SDP carrying a=fingerprint, trickled candidates) and asynchronous delivery.
 * A link only opens when the offer/answer fingerprints match the two transports' real fingerprints,
 * so fingerprint tampering in transit makes the link fail to open, as DTLS would.
 *
 * It keeps the transport contract (test/helpers/transport-contract.ts) like the real ones: typed send
 * results (a message over `maxMessageSize` is "too-big"; over `bufferLimit` bytes not yet delivered it is
 * "full", and onDrain follows once delivery brings the queue to zero), handlers that throw never break a
 * link, onClose fires once. MeshManager and IpamDriver unit tests run on it (test/unit/mesh-manager.test.ts).
 */
import type { ChannelName, Fingerprint, LinkOptions, LinkSignal, LinkState, LinkStats, SendResult, Transport, TransportLink } from "../mesh/transport.js";
import { sdpFingerprint } from "../mesh/transport.js";

export interface MemoryNetworkOptions {
  /** largest message a link accepts (default 1 MiB) */
  maxMessageSize?: number;
  /** bytes per link and channel sent but not delivered yet, above which send() is "full" (default: no limit) */
  bufferLimit?: number;
}

export class MemoryNetwork {
  private seq = 0;
  readonly links = new Map<string, MemoryLink>();
  /** Set false to make every new link fail to open (like blocked UDP). */
  reachable = true;
  readonly maxMessageSize: number;
  readonly bufferLimit: number;
  constructor(o: MemoryNetworkOptions = {}) {
    this.maxMessageSize = o.maxMessageSize ?? 1024 * 1024;
    this.bufferLimit = o.bufferLimit ?? Infinity;
  }
  nextId(): string {
    return `m${++this.seq}`;
  }
  transport(): Transport {
    return new MemoryTransport(this);
  }
}

let fpCounter = 0;
class MemoryTransport implements Transport {
  readonly name = "memory";
  readonly fingerprint: Fingerprint;
  private readonly mine = new Set<MemoryLink>();
  constructor(private readonly net: MemoryNetwork) {
    const hex = (++fpCounter).toString(16).padStart(64, "0").toUpperCase();
    this.fingerprint = { algorithm: "sha-256", value: hex.match(/../g)!.join(":") };
  }
  createLink(opts: LinkOptions): TransportLink {
    const l = new MemoryLink(this.net, this.fingerprint, opts, () => this.mine.delete(l));
    this.mine.add(l);
    return l;
  }
  async close(): Promise<void> {
    for (const l of [...this.mine]) l.close("transport closed");
  }
}

export class MemoryLink implements TransportLink {
  state: LinkState = "new";
  readonly id: string;
  peer: MemoryLink | undefined;
  private sent = 0;
  private received = 0;
  private readonly buffered: Record<ChannelName, number> = { control: 0, packets: 0 };
  private readonly wantDrain: Record<ChannelName, boolean> = { control: false, packets: false };
  constructor(
    private readonly net: MemoryNetwork,
    readonly fingerprint: Fingerprint,
    private readonly opts: LinkOptions,
    private readonly forget: () => void = () => {},
  ) {
    this.id = net.nextId();
    net.links.set(this.id, this);
  }
  private sdp(kind: string): string {
    return `v=0\r\na=x-memlink:${this.id}\r\na=fingerprint:${this.fingerprint.algorithm} ${this.fingerprint.value}\r\na=x-kind:${kind}\r\n`;
  }
  /** Run a handler; never let it throw into the "network". */
  private call(f: () => void): void {
    try {
      f();
    } catch {
      // a throwing handler is the handler's bug; the link carries on
    }
  }
  async start(): Promise<void> {
    if (this.state !== "new") return;
    this.state = "connecting";
    setImmediate(() => this.state === "connecting" && this.call(() => this.opts.handlers.onSignal({ kind: "offer", sdp: this.sdp("offer") })));
  }
  async handleSignal(sig: LinkSignal): Promise<void> {
    if (sig.kind === "candidate" || this.state === "closed") return;
    const m = /a=x-memlink:(\S+)/.exec(sig.sdp);
    const remote = m ? this.net.links.get(m[1]!) : undefined;
    const fp = sdpFingerprint(sig.sdp);
    if (!remote) return;
    this.peer = remote;
    // "DTLS": the certificate actually presented must match the fingerprint in the SDP we were given.
    const dtlsOk = fp !== undefined && fp.value === remote.fingerprint.value;
    if (sig.kind === "offer") {
      this.state = "connecting";
      setImmediate(() => this.state === "connecting" && this.call(() => this.opts.handlers.onSignal({ kind: "answer", sdp: this.sdp("answer") })));
    } else if (this.net.reachable && dtlsOk) {
      setImmediate(() => {
        if (this.state === "closed" || remote.state === "closed") return;
        this.state = "open";
        remote.state = "open";
        this.call(() => this.opts.handlers.onOpen());
        remote.call(() => remote.opts.handlers.onOpen());
      });
    }
  }
  send(channel: ChannelName, data: Uint8Array): SendResult {
    const peer = this.peer;
    if (this.state !== "open" || !peer) return "closed";
    if (data.byteLength > this.net.maxMessageSize) return "too-big";
    if (this.buffered[channel] > 0 && this.buffered[channel] + data.byteLength > this.net.bufferLimit) {
      this.wantDrain[channel] = true;
      return "full";
    }
    this.sent += data.byteLength;
    this.buffered[channel] += data.byteLength;
    const copy = new Uint8Array(data);
    setImmediate(() => {
      this.buffered[channel] -= copy.byteLength;
      if (peer.state === "open") {
        peer.received += copy.byteLength;
        peer.call(() => peer.opts.handlers.onMessage(channel, copy));
      }
      if (this.buffered[channel] === 0 && this.wantDrain[channel] && this.state === "open") {
        this.wantDrain[channel] = false;
        this.call(() => this.opts.handlers.onDrain?.(channel));
      }
    });
    return "ok";
  }
  bufferedAmount(channel: ChannelName): number {
    return this.buffered[channel];
  }
  async stats(): Promise<LinkStats> {
    return { bytesSent: this.sent, bytesReceived: this.received, selected: { localType: "host", localAddress: "memory", remoteType: "host", remoteAddress: "memory" } };
  }
  close(reason = "closed locally"): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.net.links.delete(this.id);
    this.forget();
    this.call(() => this.opts.handlers.onClose(reason));
    const peer = this.peer;
    if (peer && peer.state !== "closed") setImmediate(() => peer.close("remote closed"));
  }
}
