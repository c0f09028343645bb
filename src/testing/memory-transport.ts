/**
 * In-memory Transport: links between transports of one MemoryNetwork, with the same signalling shape
 * as WebRTC (offer/answer SDP carrying a=fingerprint, trickled candidates) and asynchronous delivery.
 * A link only opens when the offer/answer fingerprints match the two transports' real fingerprints,
 * so fingerprint tampering in transit makes the link fail to open, as DTLS would.
 */
import type { ChannelName, Fingerprint, LinkOptions, LinkSignal, LinkState, LinkStats, SendResult, Transport, TransportLink } from "../mesh/transport.js";
import { sdpFingerprint } from "../mesh/transport.js";

export class MemoryNetwork {
  private seq = 0;
  readonly links = new Map<string, MemoryLink>();
  /** Set false to make every new link fail to open (like blocked UDP). */
  reachable = true;
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
  constructor(private readonly net: MemoryNetwork) {
    const hex = (++fpCounter).toString(16).padStart(64, "0").toUpperCase();
    this.fingerprint = { algorithm: "sha-256", value: hex.match(/../g)!.join(":") };
  }
  createLink(opts: LinkOptions): TransportLink {
    return new MemoryLink(this.net, this.fingerprint, opts);
  }
  async close(): Promise<void> {}
}

export class MemoryLink implements TransportLink {
  state: LinkState = "new";
  readonly id: string;
  peer: MemoryLink | undefined;
  private sent = 0;
  private received = 0;
  constructor(
    private readonly net: MemoryNetwork,
    readonly fingerprint: Fingerprint,
    private readonly opts: LinkOptions,
  ) {
    this.id = net.nextId();
    net.links.set(this.id, this);
  }
  private sdp(kind: string): string {
    return `v=0\r\na=x-memlink:${this.id}\r\na=fingerprint:${this.fingerprint.algorithm} ${this.fingerprint.value}\r\na=x-kind:${kind}\r\n`;
  }
  async start(): Promise<void> {
    this.state = "connecting";
    setImmediate(() => this.opts.handlers.onSignal({ kind: "offer", sdp: this.sdp("offer") }));
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
      setImmediate(() => this.opts.handlers.onSignal({ kind: "answer", sdp: this.sdp("answer") }));
    } else if (this.net.reachable && dtlsOk) {
      setImmediate(() => {
        if (this.state === "closed" || remote.state === "closed") return;
        this.state = "open";
        remote.state = "open";
        this.opts.handlers.onOpen();
        remote.opts.handlers.onOpen();
      });
    }
  }
  send(channel: ChannelName, data: Uint8Array): SendResult {
    const peer = this.peer;
    if (this.state !== "open" || !peer) return "closed";
    this.sent += data.byteLength;
    const copy = new Uint8Array(data);
    setImmediate(() => {
      if (peer.state !== "open") return;
      peer.received += copy.byteLength;
      peer.opts.handlers.onMessage(channel, copy);
    });
    return "ok";
  }
  bufferedAmount(): number {
    return 0;
  }
  async stats(): Promise<LinkStats> {
    return { bytesSent: this.sent, bytesReceived: this.received, selected: { localType: "host", localAddress: "memory", remoteType: "host", remoteAddress: "memory" } };
  }
  close(reason = "closed locally"): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.net.links.delete(this.id);
    this.opts.handlers.onClose(reason);
    const peer = this.peer;
    if (peer && peer.state !== "closed") setImmediate(() => peer.close("remote closed"));
  }
}
