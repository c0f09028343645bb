/**
 * The bulk link: a direct UDP data path per peer BESIDE the WebRTC (or relay) link, WireGuard's model
 * (src/bulk/session.ts, wire.ts): every datagram one inner packet sealed on its own, counter nonces,
 * replay window, key rotation, keepalives; no congestion control of its own (the inner TCP has one).
 *
 * Lifecycle, per peer:
 *   mesh link up (WebRTC or relay: the control channel is authenticated end to end)
 *     -> the lower node id sends `init` on the control channel (app channel "bulk"), the other answers
 *        `resp`: X25519 ephemeral keys signed by both node identities, plus each side's candidates
 *        (host addresses + the STUN-learnt mapping of this socket, "a.b.c.d:port")
 *     -> both send keepalives to every candidate of the other (simultaneous punching: each side's
 *        outbound datagrams open its own NAT for the other's)
 *     -> the path is `up` once each side hears the other and knows it is heard: pod frames for that peer
 *        now go out on UDP (make-before-break: the WebRTC link stays, and frames still arriving on it are
 *        delivered as before)
 *   silence (no authenticated datagram for deadMs, default 650 ms (keepalives every 150 ms), or the peer stops hearing us)
 *     -> `down`: frames go back to WebRTC at once; keepalives keep probing, and the link comes back up by
 *        itself when the path recovers. Where no UDP path forms, nothing changes: WebRTC carries on.
 *   mesh link down -> the bulk session ends (a new mesh link starts a new handshake).
 *
 * Send path (send(peer, frame), called by the forwarder for every frame to a next hop): the frame's
 * records are split into single packets, GSO super-packets segmented in software (src/packet/gso.ts),
 * each packet sealed as its own datagram [header | frame header | record | tag] into one send buffer, and
 * runs of equal-size datagrams leave with one sendmsg + UDP_SEGMENT (agent/os/udp.ts). Receive path: GRO
 * buffers are cut by segment size, each datagram opened by the keypair its receiver index names, and the
 * inner one-packet frame goes to the forwarder like a frame from the packets channel (so multi-hop frames
 * work over either link type).
 *
 * Drops are typed and counted: per peer (session drops: short, bad-type, unknown-index, stale-key,
 * bad-auth, replay, bad-inner, handshake-rate: a peer sending init/resp faster than ~5/s) and here (no-peer: a receiver index nobody owns; send-full: the socket
 * refused a batch; segment-drop: a GSO packet gso.ts refuses to split, e.g. UFO or a malformed header).
 */
import { lookup } from "node:dns/promises";
import { networkInterfaces } from "node:os";
import { randomBytes } from "node:crypto";
import type { Identity } from "../../src/identity.js";
import { signFields, verifyFields } from "../../src/identity.js";
import type { Logger } from "../../src/log.js";
import { nodeAead, randomU32, type Aead } from "../../src/bulk/crypto.js";
import { BulkPeer, KEEPALIVE, type BulkAction, type BulkTiming } from "../../src/bulk/session.js";
import { BULK_CHANNEL, BULK_WIRE_VERSION, HEADER_LEN, SEAL_OVERHEAD, formatEndpoint, type Endpoint } from "../../src/bulk/wire.js";
import { FRAME_HEADER_LEN, RECORD_HEADER_LEN } from "../../src/packet/frame.js";
import { ByteArena, segment } from "../../src/packet/gso.js";
import { coalesce, type GroStats } from "../../src/packet/gro.js";
import { DEFAULT_MAX_MESSAGE_SIZE } from "../../src/packet/frame.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { FLAG_SEALED } from "../../src/packet/seal.js";
import { encodeBindingRequest, parseBindingSuccess, parseIp } from "../../src/wire/stun.js";
import { loadSodiumAead } from "../os/sodium.js";
import { kernelPathMtu } from "../os/route-mtu.js";
import { expectAnswer } from "../os/fd-reader.js";
import { emptyPmtuCounters, type PmtuCounters } from "../../src/mesh/transport.js";
import type { BulkPmtuStatus } from "../../src/bulk/session.js";
import { UDP_GSO_MAX_BYTES, UDP_GSO_MAX_SEGMENTS, UdpSocket, type UdpSocketOptions } from "../os/udp.js";

export const CTX_BULK = "weftnet/bulk/v1";
/** Datagram bytes around a pod packet's IP bytes: seal header + tag, frame header, record length, virtio header. */
const PACKET_OVERHEAD = SEAL_OVERHEAD + FRAME_HEADER_LEN + RECORD_HEADER_LEN + VNET_HDR_LEN;
const TICK_MS = 100;

/**
 * WEFTNET_BULK_PMTU_CHECKS (benchmarks, A/B measurements; docs/loss.md): "off" = no Don't Fragment on the bulk
 * socket and no black-hole checks while up (the first search still runs); "periodic" = the 5 s confirmation probe
 * without the quick check; anything else the default "on".
 */
function pmtuChecks(): "on" | "periodic" | "off" {
  const v = process.env.WEFTNET_BULK_PMTU_CHECKS;
  return v === "off" || v === "periodic" ? v : "on";
}
/** IPv4 + UDP headers: the kernel's path MTU counts IP packets, the bulk link's sizes are UDP payloads. */
const IPV4_UDP_HEADERS = 28;

function ipv4String(a: number): string {
  return `${a >>> 24}.${(a >>> 16) & 255}.${(a >>> 8) & 255}.${a & 255}`;
}
const STUN_EVERY_MS = 30_000;

/** The mesh as the bulk link needs it (MeshManager implements it). */
export interface BulkMeshPort {
  onApp(ch: string, h: (from: string, body: unknown) => void): void;
  sendApp(peer: string, ch: string, body: unknown): boolean;
  onPeerUp(f: (id: string) => void): void;
  onPeerDown(f: (id: string) => void): void;
  isConnected(peer: string): boolean;
  peerPublicKey(peer: string): Uint8Array | undefined;
  peerName(peer: string): string | undefined;
}

export interface BulkOptions {
  identity: Identity;
  mesh: BulkMeshPort;
  logger: Logger;
  /** UDP port (0: any free port) and bind address. */
  port?: number;
  address?: string;
  /** Offer only 127.0.0.1 as host candidate (single-host tests). */
  loopbackOnly?: boolean;
  /** Addresses never offered as candidates (the overlay's own). */
  excludeAddress?: (ip: string) => boolean;
  /** The signaling server's STUN responder, to learn this socket's public mapping. */
  stun?: () => { host: string; port: number } | undefined;
  timing?: Partial<BulkTiming>;
  /** MTU of the TUN (pod packets): sets the largest datagram and the keepalives' size. Default 1400. */
  mtu?: number;
  socket?: Omit<UdpSocketOptions, "port" | "address">;
  aead?: Aead;
}

export interface BulkPeerStatus {
  state: string;
  reason: string;
  endpoint: string | null;
  peerCands: string[];
  rttMs: number | null;
  keyAgeMs: number | null;
  /** path MTU: the largest datagram (UDP payload bytes) the link sends, as its search found it (null: none yet) */
  pathMax: number | null;
  /** how pathMax was found, and this peer's search figures */
  pmtu: BulkPmtuStatus;
  txDatagrams: number;
  rxDatagrams: number;
  txBytes: number;
  rxBytes: number;
  rotations: number;
  ups: number;
  downs: number;
  drops: Record<string, number>;
}

export interface BulkCounters {
  noPeer: number;
  sendFull: number;
  segmentDrops: number;
  /** frames with a non-TCP packet larger than the path MTU (they take the WebRTC link) */
  tooBigForPath: number;
  /** datagrams the kernel refused with EMSGSIZE (above its route MTU toward the peer; the search then runs again) */
  tooBigLocal: number;
  stunAnswers: number;
  framesOut: number;
  framesIn: number;
  /** frames sealed end to end (transit) sent / received whole, one per datagram */
  sealedOut: number;
  sealedIn: number;
}

export class BulkService {
  private readonly peers = new Map<string, BulkPeer>();
  private readonly byIndex = new Map<number, BulkPeer>();
  private readonly peerIds = new WeakMap<BulkPeer, string>();
  private readonly log: Logger;
  private readonly aead: Aead;
  private readonly timer: NodeJS.Timeout;
  private frameHandler: ((from: string, frame: Uint8Array) => void) | undefined;
  private readonly upDownListeners: ((peer: string, up: boolean, reason: string) => void)[] = [];
  private cands: string[];
  private srflx: string | undefined;
  private stunTx: Uint8Array | undefined;
  private lastStun = -Infinity;
  private stunAddr: Endpoint | undefined;
  private closed = false;
  /** path MTU searches of all peers' bulk links (weftnet_pmtu_* link_type="bulk") */
  readonly pmtu: PmtuCounters = emptyPmtuCounters();
  readonly counters: BulkCounters = { noPeer: 0, sendFull: 0, segmentDrops: 0, tooBigForPath: 0, tooBigLocal: 0, stunAnswers: 0, framesOut: 0, framesIn: 0, sealedOut: 0, sealedIn: 0 };
  // send path buffers (long-lived: the socket caches their addresses)
  private readonly slab = Buffer.allocUnsafeSlow(UDP_GSO_MAX_BYTES + 4096);
  private readonly arena = new ByteArena(256 * 1024);
  // receive path: coalescing (userspace GRO) per GRO buffer, frames in an arena reset per socket drain
  private readonly rxArena = new ByteArena(1 << 20);
  private readonly rxPkts: Uint8Array[] = [];
  private readonly rxOut: Uint8Array[] = [];
  private rxDrain = -1;
  readonly gro: GroStats = { merged: 0, built: 0 };
  private readonly segOut: Uint8Array[] = [];
  private segOpts: { maxIp: number; csum: "partial" };
  private readonly mtu: number;
  private batchLen = 0;
  private batchCount = 0;
  private batchSeg = 0;
  private batchTo: Endpoint | undefined;
  private batchPeer: BulkPeer | undefined;

  private constructor(
    private readonly o: BulkOptions,
    readonly socket: UdpSocket,
  ) {
    this.log = o.logger.child("bulk");
    this.aead = o.aead ?? loadSodiumAead() ?? nodeAead();
    this.mtu = o.mtu ?? 1400;
    this.segOpts = { maxIp: this.mtu, csum: "partial" };
    this.cands = this.hostCandidates();
    o.mesh.onPeerUp((id) => this.peerUp(id));
    o.mesh.onPeerDown((id) => this.peerDown(id, "mesh link down"));
    o.mesh.onApp(BULK_CHANNEL, (from, body) => this.onControl(from, body));
    socket.start(
      (data, seg, from) => this.onDatagrams(data, seg, from),
      undefined,
      (err) => this.log.warn("bulk UDP socket error", { err }),
    );
    this.timer = setInterval(() => this.tick(), TICK_MS);
    this.timer.unref?.();
    this.log.info("bulk link listening", { port: socket.port, candidates: this.cands, gso: socket.gso, gro: socket.gro, crypto: this.aead.name, ...(pmtuChecks() !== "on" ? { pmtuChecks: pmtuChecks() } : {}) });
  }

  static open(o: BulkOptions): BulkService {
    const socket = UdpSocket.open({ ...(o.socket ?? {}), ...(pmtuChecks() === "off" ? { dontFragment: false } : {}), port: o.port ?? 0, address: o.address ?? "0.0.0.0" });
    return new BulkService(o, socket);
  }

  get port(): number {
    return this.socket.port;
  }

  /** Which AEAD implementation seals (libsodium through FFI, or node:crypto). */
  get cryptoName(): string {
    return this.aead.name;
  }

  /**
   * Frames that arrived over bulk links (the packets of one GRO read, TCP segments coalesced back into
   * super-packets). A frame is valid until the socket's next drain, i.e. through the rest of this turn of
   * the event loop and its setImmediate callbacks; copy to keep it longer.
   */
  onFrame(f: (from: string, frame: Uint8Array) => void): void {
    this.frameHandler = f;
  }

  onUpDown(f: (peer: string, up: boolean, reason: string) => void): void {
    this.upDownListeners.push(f);
  }

  /** Up and with a path MTU (after a black hole the link stays up but carries nothing for a round trip). */
  isUp(peer: string): boolean {
    const p = this.peers.get(peer);
    return p?.up === true && p.pathMax !== undefined;
  }

  candidates(): string[] {
    return [...this.cands];
  }

  status(peer: string): BulkPeerStatus | null {
    const p = this.peers.get(peer);
    if (!p) return null;
    const d = p.describe(performance.now());
    const c = p.counters;
    return { ...d, txDatagrams: c.txDatagrams, rxDatagrams: c.rxDatagrams, txBytes: c.txBytes, rxBytes: c.rxBytes, rotations: c.rotations, ups: c.ups, downs: c.downs, drops: Object.fromEntries(Object.entries(p.drops).filter(([, v]) => v > 0)) };
  }

  /** Totals over all peers (metrics). */
  totals(): { up: number; txDatagrams: number; rxDatagrams: number; txBytes: number; rxBytes: number; drops: Record<string, number> } {
    const t = { up: 0, txDatagrams: 0, rxDatagrams: 0, txBytes: 0, rxBytes: 0, drops: {} as Record<string, number> };
    for (const p of this.peers.values()) {
      if (p.up) t.up++;
      t.txDatagrams += p.counters.txDatagrams;
      t.rxDatagrams += p.counters.rxDatagrams;
      t.txBytes += p.counters.txBytes;
      t.rxBytes += p.counters.rxBytes;
      for (const [k, v] of Object.entries(p.drops)) t.drops[k] = (t.drops[k] ?? 0) + v;
    }
    const c = this.counters;
    t.drops["no-peer"] = c.noPeer;
    t.drops["send-full"] = c.sendFull;
    t.drops["segment-drop"] = c.segmentDrops;
    return t;
  }

  // ---- peers ----------------------------------------------------------------------------------------

  private peer(id: string): BulkPeer | undefined {
    let p = this.peers.get(id);
    if (p || this.closed) return p;
    const pub = this.o.mesh.peerPublicKey(id);
    if (!pub) return undefined;
    const self = this.o.identity;
    p = new BulkPeer({
      selfId: self.id,
      peerId: id,
      aead: this.aead,
      auth: { sign: (...f) => signFields(self, CTX_BULK, ...f), verifyPeer: (sig, ...f) => verifyFields(pub, sig, CTX_BULK, ...f) },
      random: randomU32,
      cands: this.cands,
      maxDatagram: this.mtu + PACKET_OVERHEAD,
      localLimit: (to) => {
        const m = kernelPathMtu(ipv4String(to.addr));
        return m === undefined ? undefined : m - IPV4_UDP_HEADERS;
      },
      pmtuCounters: this.pmtu,
      pmtuChecks: pmtuChecks(),
      ...(this.o.timing ? { timing: this.o.timing } : {}),
    });
    this.peers.set(id, p);
    this.peerIds.set(p, id);
    return p;
  }

  private peerUp(id: string): void {
    const p = this.peer(id);
    if (p) this.run(id, p, p.handle({ type: "start" }, performance.now()));
  }

  private peerDown(id: string, reason: string): void {
    const p = this.peers.get(id);
    if (!p) return;
    this.run(id, p, p.handle({ type: "stop", reason }, performance.now()));
    this.peers.delete(id);
  }

  private onControl(from: string, body: unknown): void {
    if (!this.o.mesh.isConnected(from)) return;
    const p = this.peer(from);
    if (p) this.run(from, p, p.handle({ type: "control", body }, performance.now()));
  }

  private tick(): void {
    if (this.closed) return;
    const now = performance.now();
    for (const [id, p] of this.peers) this.run(id, p, p.handle({ type: "tick" }, now));
    // Learn the public mapping: every second until an answer came, then every STUN_EVERY_MS.
    if (now - this.lastStun >= (this.srflx ? STUN_EVERY_MS : 1000)) void this.stunProbe(now);
  }

  private run(id: string, p: BulkPeer, acts: BulkAction[]): void {
    for (const a of acts) {
      switch (a.type) {
        case "control":
          this.o.mesh.sendApp(id, BULK_CHANNEL, a.body);
          break;
        case "send":
          if (!this.socket.send(a.to, a.data)) this.counters.sendFull++;
          break;
        case "index":
          for (const i of a.del) if (this.byIndex.get(i) === p) this.byIndex.delete(i);
          for (const i of a.add) this.byIndex.set(i, p);
          break;
        case "up":
        case "down": {
          const up = a.type === "up";
          const reason = a.type === "down" ? a.reason : "";
          if (up) this.log.info("bulk link up: pod traffic moves to UDP", { peer: id, peerName: this.o.mesh.peerName(id), endpoint: p.endpoint ? formatEndpoint(p.endpoint) : null });
          else this.log.info("bulk link down: pod traffic back on WebRTC", { peer: id, peerName: this.o.mesh.peerName(id), reason });
          for (const f of this.upDownListeners) f(id, up, reason);
          break;
        }
      }
    }
    if (p.pendingIndexDel.length) {
      for (const i of p.pendingIndexDel) if (this.byIndex.get(i) === p) this.byIndex.delete(i);
      p.pendingIndexDel.length = 0;
    }
  }

  // ---- candidates and STUN ----------------------------------------------------------------------------

  private hostCandidates(): string[] {
    const port = this.socket.port;
    if (this.o.loopbackOnly) return [`127.0.0.1:${port}`];
    const out: string[] = [];
    const bound = this.o.address && this.o.address !== "0.0.0.0" ? this.o.address : undefined;
    if (bound) return [`${bound}:${port}`];
    for (const [name, addrs] of Object.entries(networkInterfaces())) {
      if (name.startsWith("weft")) continue;
      for (const a of addrs ?? []) {
        if (a.family !== "IPv4" || a.internal) continue;
        if (this.o.excludeAddress?.(a.address)) continue;
        out.push(`${a.address}:${port}`);
      }
    }
    if (this.srflx && !out.includes(this.srflx)) out.unshift(this.srflx);
    return out.slice(0, 8);
  }

  private async stunProbe(now: number): Promise<void> {
    const s = this.o.stun?.();
    if (!s || s.port <= 0 || this.o.loopbackOnly) return;
    this.lastStun = now;
    try {
      let ip = parseIp(s.host);
      if (!ip) ip = parseIp((await lookup(s.host, { family: 4 })).address);
      if (!ip || ip.length !== 4 || this.closed) return;
      this.stunAddr = { addr: ((ip[0]! << 24) | (ip[1]! << 16) | (ip[2]! << 8) | ip[3]!) >>> 0, port: s.port };
      this.stunTx = new Uint8Array(randomBytes(12));
      this.socket.send(this.stunAddr, encodeBindingRequest(this.stunTx));
    } catch (err) {
      this.log.debug("bulk STUN probe failed", { err });
    }
  }

  private onStun(d: Uint8Array): void {
    const r = parseBindingSuccess(d);
    if (!r.ok || !this.stunTx || !Buffer.from(r.value.transactionId).equals(Buffer.from(this.stunTx))) return;
    this.counters.stunAnswers++;
    const m = r.value.mapped;
    if (m.family !== "IPv4") return;
    const srflx = `${m.address}:${m.port}`;
    if (srflx === this.srflx) return;
    this.srflx = srflx;
    this.cands = this.hostCandidates();
    this.log.info("bulk link public mapping (STUN)", { mapped: srflx });
    const now = performance.now();
    for (const [id, p] of this.peers) this.run(id, p, p.handle({ type: "cands", cands: this.cands }, now));
  }

  // ---- receive path -----------------------------------------------------------------------------------

  /**
   * One GRO buffer: datagrams of one flow from one address. Each is opened; the inner one-packet frames are
   * grouped by frame header (same source, destination and ttl: nearly always all of them) and their
   * packets coalesced (src/packet/gro.ts: TCP segments of one flow back into a GSO super-packet), then
   * handed on as multi-record frames: the TUN write that follows takes one super-packet instead of ~45
   * single packets. Frames live in an arena reset when the socket's next drain starts (see onFrame).
   */
  private onDatagrams(data: Uint8Array, seg: number, from: Endpoint): void {
    const now = performance.now();
    this.lastRxAt = now;
    if (this.socket.drains !== this.rxDrain) {
      this.rxDrain = this.socket.drains;
      this.rxArena.reset();
    }
    if (seg <= 0) seg = data.length;
    const pkts = this.rxPkts;
    let groupHdr: Uint8Array | undefined;
    let groupPeer: BulkPeer | undefined;
    for (let o = 0; o < data.length; o += seg) {
      const d = data.subarray(o, Math.min(data.length, o + seg));
      if (d[0]! <= 1) {
        this.onStun(d);
        continue;
      }
      const p = d.length >= 8 ? this.byIndex.get(BulkPeer.receiverIndex(d)) : undefined;
      if (!p) {
        this.counters.noPeer++;
        continue;
      }
      const r = p.open(d, from, now);
      if (p.pendingSends.length) {
        for (const x of p.pendingSends) if (!this.socket.send(x.to, x.data)) this.counters.sendFull++;
        p.pendingSends.length = 0;
      }
      if (typeof r === "string" || r === KEEPALIVE) continue;
      this.counters.framesIn++;
      if ((r[0]! & FLAG_SEALED) !== 0) {
        // One whole frame sealed end to end (wire.ts 0x11): opaque here, handed on as it is, in order.
        this.flushGroup(groupPeer, groupHdr);
        groupHdr = undefined;
        this.counters.sealedIn++;
        this.frameHandler?.(this.peerIds.get(p)!, r);
        continue;
      }
      // One record of a valid frame? Anything else is handed on as it is (the forwarder validates and counts).
      const recLen = r.length >= FRAME_HEADER_LEN + RECORD_HEADER_LEN ? ((r[FRAME_HEADER_LEN]! << 24) | (r[FRAME_HEADER_LEN + 1]! << 16) | (r[FRAME_HEADER_LEN + 2]! << 8) | r[FRAME_HEADER_LEN + 3]!) >>> 0 : -1;
      if (recLen !== r.length - FRAME_HEADER_LEN - RECORD_HEADER_LEN || recLen <= VNET_HDR_LEN) {
        this.flushGroup(groupPeer, groupHdr);
        groupHdr = undefined;
        this.frameHandler?.(this.peerIds.get(p)!, r);
        continue;
      }
      const hdr = r.subarray(0, FRAME_HEADER_LEN);
      if (groupHdr && (groupPeer !== p || !sameBytes(groupHdr, hdr))) {
        this.flushGroup(groupPeer, groupHdr);
        groupHdr = undefined;
      }
      if (!groupHdr) {
        groupHdr = hdr;
        groupPeer = p;
      }
      pkts.push(r.subarray(FRAME_HEADER_LEN + RECORD_HEADER_LEN));
    }
    this.flushGroup(groupPeer, groupHdr);
  }

  /** Coalesce the collected packets and hand them on in frames of at most the data plane's message size. */
  private flushGroup(p: BulkPeer | undefined, hdr: Uint8Array | undefined): void {
    const pkts = this.rxPkts;
    if (!p || !hdr || pkts.length === 0) {
      pkts.length = 0;
      return;
    }
    const out = this.rxOut;
    out.length = 0;
    coalesce(pkts, this.rxArena, out, this.gro);
    pkts.length = 0;
    const id = this.peerIds.get(p)!;
    let i = 0;
    while (i < out.length) {
      let size = FRAME_HEADER_LEN;
      let j = i;
      while (j < out.length && (j === i || size + RECORD_HEADER_LEN + out[j]!.length <= DEFAULT_MAX_MESSAGE_SIZE)) size += RECORD_HEADER_LEN + out[j++]!.length;
      const f = this.rxArena.alloc(size);
      f.set(hdr, 0);
      let o = FRAME_HEADER_LEN;
      for (let k = i; k < j; k++) {
        const q = out[k]!;
        f[o] = q.length >>> 24;
        f[o + 1] = (q.length >>> 16) & 255;
        f[o + 2] = (q.length >>> 8) & 255;
        f[o + 3] = q.length & 255;
        f.set(q, o + RECORD_HEADER_LEN);
        o += RECORD_HEADER_LEN + q.length;
      }
      i = j;
      this.frameHandler?.(id, f);
    }
    out.length = 0;
  }

  // ---- send path --------------------------------------------------------------------------------------

  /**
   * Send a data-plane frame to `peer` over its bulk link. "ok" when it went out (or was dropped on a full
   * socket, counted: UDP has no backpressure and the inner TCP recovers); undefined when the bulk link to
   * that peer is not up (the caller uses the WebRTC link).
   */
  send(peer: string, frame: Uint8Array): "ok" | undefined {
    const p = this.peers.get(peer);
    if (!p || !p.up || !p.endpoint || p.pathMax === undefined) return undefined;
    const to = p.endpoint;
    if (this.batchCount > 0 && this.batchTo !== to) this.flush();
    // A frame sealed end to end for a node behind this peer (src/packet/seal.ts) is opaque here: it travels
    // whole in one datagram (wire.ts 0x11). The forwarder sizes sealed frames for a bulk hop to
    // sealedBudget(peer), so every frame of a flow fits; one that does not (the path MTU shrank under it,
    // a non-TCP packet larger than the path) takes the WebRTC link (counted: too-big-for-path).
    if ((frame[0]! & FLAG_SEALED) !== 0) return this.sendSealed(p, to, frame);
    const hdr = frame.subarray(0, FRAME_HEADER_LEN);
    // The largest IP packet a datagram of the confirmed path MTU carries. TCP is segmented to fit; a frame
    // with a larger packet of anything else goes on the WebRTC link instead (counted: too-big-for-path).
    const maxIp = Math.min(this.mtu, p.pathMax - PACKET_OVERHEAD);
    if (this.segOpts.maxIp !== maxIp) this.segOpts = { maxIp, csum: "partial" };
    if (maxIp < this.mtu && !this.fitsPath(frame, maxIp)) {
      this.counters.tooBigForPath++;
      return undefined;
    }
    let off = FRAME_HEADER_LEN;
    this.batchTo = to;
    this.batchPeer = p;
    this.flushScheduled = false;
    while (off + RECORD_HEADER_LEN <= frame.length) {
      const len = ((frame[off]! << 24) | (frame[off + 1]! << 16) | (frame[off + 2]! << 8) | frame[off + 3]!) >>> 0;
      const rec = frame.subarray(off + RECORD_HEADER_LEN, off + RECORD_HEADER_LEN + len);
      off += RECORD_HEADER_LEN + len;
      const segs = this.segOut;
      segs.length = 0;
      const drop = segment(rec, this.segOpts, this.arena, segs);
      if (drop) {
        this.counters.segmentDrops++;
        continue;
      }
      for (let i = 0; i < segs.length; i++) this.sealOne(p, hdr, segs[i]!);
      this.arena.reset();
    }
    this.flush();
    this.counters.framesOut++;
    return "ok";
  }

  /**
   * The largest frame sealed end to end (seal.ts) that the bulk link to `peer` carries whole, in one
   * datagram: the confirmed path MTU less this link's header and tag. undefined when the link is not up
   * (sealed frames then take the mesh link, sized to its own budget). The forwarder segments and packs
   * sealed frames for such a hop to fit (src/packet/forwarder.ts), so a flow never splits by size.
   */
  sealedBudget(peer: string): number | undefined {
    const p = this.peers.get(peer);
    if (!p || !p.up || !p.endpoint || p.pathMax === undefined) return undefined;
    return p.pathMax - SEAL_OVERHEAD;
  }

  /**
   * One sealed frame as one datagram. It joins the pending batch (a transit forwarding a GRO read's worth of
   * small sealed frames, or a TUN batch cut into many, sends them with one sendmsg) which is flushed at the
   * end of this turn's synchronous work (a microtask), by the next send to another endpoint, or when full.
   */
  private sendSealed(p: BulkPeer, to: Endpoint, frame: Uint8Array): "ok" | undefined {
    if (frame.length + SEAL_OVERHEAD > p.pathMax!) {
      this.counters.tooBigForPath++;
      return undefined;
    }
    const size = frame.length + SEAL_OVERHEAD;
    if (this.batchCount > 0 && (size > this.batchSeg || this.batchLen % this.batchSeg !== 0 || this.batchCount >= UDP_GSO_MAX_SEGMENTS || this.batchLen + size > UDP_GSO_MAX_BYTES)) this.flush();
    this.slab.set(frame, this.batchLen + HEADER_LEN);
    const n = p.seal(this.slab, this.batchLen, frame.length);
    if (n < 0) return undefined;
    this.batchTo = to;
    this.batchPeer = p;
    if (this.batchCount === 0) this.batchSeg = n;
    this.batchLen += n;
    this.batchCount++;
    this.counters.sealedOut++;
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      queueMicrotask(this.flushCb);
    }
    return "ok";
  }

  private flushScheduled = false;
  /** when the socket last delivered a datagram (performance.now()): the answer wait's "exchange starts" test */
  private lastRxAt = 0;
  private readonly flushCb = () => {
    if (!this.flushScheduled) return;
    this.flushScheduled = false;
    this.flush();
  };

  /** Every record of the frame is TCP (segmentable) or fits `maxIp`. */
  private fitsPath(frame: Uint8Array, maxIp: number): boolean {
    let off = FRAME_HEADER_LEN;
    while (off + RECORD_HEADER_LEN <= frame.length) {
      const len = ((frame[off]! << 24) | (frame[off + 1]! << 16) | (frame[off + 2]! << 8) | frame[off + 3]!) >>> 0;
      const rec = off + RECORD_HEADER_LEN;
      off = rec + len;
      if (len - VNET_HDR_LEN <= maxIp) continue;
      const ip = rec + VNET_HDR_LEN;
      const v = frame[ip]! >> 4;
      const proto = v === 4 ? frame[ip + 9] : v === 6 ? frame[ip + 6] : -1;
      if (proto !== 6) return false;
    }
    return true;
  }

  private sealOne(p: BulkPeer, hdr: Uint8Array, pkt: Uint8Array): void {
    const size = FRAME_HEADER_LEN + RECORD_HEADER_LEN + pkt.length + SEAL_OVERHEAD;
    // A batch is a run of equal sizes with at most one shorter datagram at its end.
    if (this.batchCount > 0 && (size > this.batchSeg || this.batchLen % this.batchSeg !== 0 || this.batchCount >= UDP_GSO_MAX_SEGMENTS || this.batchLen + size > UDP_GSO_MAX_BYTES)) this.flush();
    // Assemble the inner one-packet frame in place (after room for the header), then seal it there.
    const slab = this.slab;
    const o = this.batchLen + HEADER_LEN;
    slab.set(hdr, o);
    const r = o + FRAME_HEADER_LEN;
    slab[r] = pkt.length >>> 24;
    slab[r + 1] = (pkt.length >>> 16) & 255;
    slab[r + 2] = (pkt.length >>> 8) & 255;
    slab[r + 3] = pkt.length & 255;
    slab.set(pkt, r + RECORD_HEADER_LEN);
    const n = p.seal(slab, this.batchLen, FRAME_HEADER_LEN + RECORD_HEADER_LEN + pkt.length);
    if (n < 0) return;
    if (this.batchCount === 0) this.batchSeg = n;
    this.batchLen += n;
    this.batchCount++;
  }

  private flush(): void {
    if (this.batchCount === 0 || !this.batchTo) return;
    if (this.closed) {
      this.batchLen = this.batchCount = 0;
      return;
    }
    const tooBig = this.socket.stats.txTooBig;
    const sent = this.socket.sendBatch(this.batchTo, this.slab.subarray(0, this.batchLen), this.batchSeg, this.batchCount);
    const lost = this.batchCount - sent;
    this.batchLen = 0;
    this.batchCount = 0;
    // An exchange starts (nothing heard for a while) toward a near peer: wait on the CPU for its answer
    // instead of sleeping through a cold wake-up (fd-reader.ts, "answer wait"). Answers and streams (data
    // heard within ANSWER_QUIET_MS) never wait; nor do peers further than ANSWER_MAX_RTT_MS.
    const rtt = this.batchPeer?.rttMs;
    if (sent > 0 && rtt !== undefined && rtt <= ANSWER_MAX_RTT_MS) {
      const now = performance.now();
      if (now - this.lastRxAt > ANSWER_QUIET_MS) expectAnswer(Math.min(ANSWER_MAX_RTT_MS, 2 * rtt + 0.3));
    }
    if (lost === 0) return;
    if (this.socket.stats.txTooBig !== tooBig) {
      // Above the kernel's path MTU toward the peer (Don't Fragment): typed, and the peer's search runs again.
      this.counters.tooBigLocal += lost;
      const p = this.batchPeer;
      const id = p && this.peerIds.get(p);
      if (p && id && !this.closed) this.run(id, p, p.handle({ type: "too-big" }, performance.now()));
    } else this.counters.sendFull += lost;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    for (const id of [...this.peers.keys()]) {
      this.o.mesh.sendApp(id, BULK_CHANNEL, { t: "off", v: BULK_WIRE_VERSION, reason: "agent stopping" });
      this.peerDown(id, "agent stopping");
    }
    this.closed = true;
    clearInterval(this.timer);
    await this.socket.close();
  }
}

/** Answer wait (fd-reader.ts): only toward peers whose keepalive round trip is at most this (ms)... */
const ANSWER_MAX_RTT_MS = 2;
/** ...and only when the socket delivered nothing for this long (ms): a send right after a receive answers. */
const ANSWER_QUIET_MS = 1;

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** What an agent with --no-bulk answers to a peer's handshake, so the peer stops trying. */
export function refuseBulk(mesh: Pick<BulkMeshPort, "onApp" | "sendApp">): void {
  mesh.onApp(BULK_CHANNEL, (from, body) => {
    const t = typeof body === "object" && body !== null ? (body as { t?: unknown }).t : undefined;
    if (t === "init" || t === "cands") mesh.sendApp(from, BULK_CHANNEL, { t: "off", v: BULK_WIRE_VERSION, reason: "bulk link disabled on this node (--no-bulk)" });
  });
}
