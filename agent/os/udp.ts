/**
 * A UDP socket through koffi FFI (as tun.ts does for the TUN), built for the bulk link's batches:
 *
 * - send: one sendmsg() per batch of equal-size datagrams laid out back to back in one buffer, with a
 *   UDP_SEGMENT control message (UDP GSO): the kernel cuts the buffer into gsoSize datagrams (the last may
 *   be shorter), up to 64 per call. One syscall instead of up to 64. A kernel or device that refuses GSO
 *   (EIO/EINVAL) turns it off for this socket and the batch goes out one datagram per sendmsg.
 * - receive: UDP_GRO on: the kernel hands consecutive datagrams of one flow as one buffer plus their
 *   segment size (a cmsg); recvmsg() in a loop until EAGAIN (or maxBatch), then wait: the read loop the
 *   TUN uses too (agent/os/fd-reader.ts: a uv_poll watcher on the event loop's epoll). Each recvmsg
 *   of a drain reads into the next part of one receive slab, so everything handed to onData in a drain
 *   stays valid until the next drain starts (the next turn of the event loop at the earliest): a consumer
 *   may collect packets and write them out from setImmediate without copying.
 * - non-blocking fd: a full send buffer (EAGAIN/ENOBUFS) drops the batch and counts it (`queue-full`):
 *   the inner TCP backs off, as it does on any lossy path. Sends never block the event loop.
 *
 * IPv4 only (AF_INET) for now. Pointers inside msghdr/iovec are raw addresses of Node buffers (taken
 * once per buffer with a memcpy(p, p, 0) call that returns p); those buffers are allocated with
 * allocUnsafeSlow and held for the socket's lifetime, so the addresses stay valid.
 */
import { WeftError } from "../../src/errors.js";
import type { Endpoint } from "../../src/bulk/wire.js";
import { baseLibc, FdReader, type BaseLibc, type DrainResult, type FdWaitMode } from "./fd-reader.js";

export type UdpErrorCode = "ERR_UDP_UNAVAILABLE" | "ERR_UDP_BIND" | "ERR_UDP_SETUP" | "ERR_UDP_CLOSED";

export class UdpError extends WeftError {
  static override readonly name = "UdpError";
  constructor(code: UdpErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export interface UdpSocketOptions {
  /** Local port; 0 = any free port. */
  port?: number;
  /** Local address, default 0.0.0.0. */
  address?: string;
  /** Enable UDP_GRO on receive (default true). */
  gro?: boolean;
  /** Use UDP_SEGMENT on send (default true). */
  gso?: boolean;
  /** Don't Fragment (IP_PMTUDISC_DO, default true); false: IP_PMTUDISC_DONT (benchmarks: WEFTNET_BULK_PMTU_CHECKS=off). */
  dontFragment?: boolean;
  /** SO_RCVBUF / SO_SNDBUF (forced when root). Default 4 MiB each. */
  rcvbuf?: number;
  sndbuf?: number;
  /** recvmsg calls per drain before yielding to the event loop (each gets its own part of the slab). Default 16. */
  maxBatch?: number;
  pollTimeoutMs?: number;
  /** Busy-poll window after traffic (agent/os/fd-reader.ts). */
  busyPollUs?: number;
  /** How the idle socket waits (agent/os/fd-reader.ts). */
  wait?: FdWaitMode;
  /**
   * SO_TIMESTAMPNS: record the kernel's receive time of the last datagram read (`lastRxStamp`), so a
   * benchmark can tell the wake-up latency (kernel arrival -> JS). Default false.
   */
  rxTimestamps?: boolean;
}

export interface UdpStats {
  rxCalls: number;
  rxDatagrams: number;
  rxBytes: number;
  txCalls: number;
  txDatagrams: number;
  txBytes: number;
  txDropped: number;
  txErrors: number;
  /** sendmsg calls refused with EMSGSIZE: above the route MTU (Don't Fragment is set, see IP_MTU_DISCOVER) */
  txTooBig: number;
}

/** Largest buffer one sendmsg with UDP_SEGMENT takes (and one GRO read returns). */
export const UDP_GSO_MAX_BYTES = 65_000;
export const UDP_GSO_MAX_SEGMENTS = 64;

const AF_INET = 2;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;
const SO_TIMESTAMPNS = 35; // = SCM_TIMESTAMPNS
const SOL_UDP = 17;
const UDP_SEGMENT = 103;
const UDP_GRO = 104;
const IPPROTO_IP = 0;
const IP_MTU_DISCOVER = 10;
/** Don't Fragment, and EMSGSIZE above the kernel's path MTU (route MTU or ICMP-learnt): the bulk link's path MTU search needs it. */
const IP_PMTUDISC_DO = 2;
const IP_PMTUDISC_DONT = 0;
const MSGHDR_LEN = 56;
const CMSG_HDR = 16;
const CMSG_SPACE_INT = 24;
const RECV_SIZE = 65_536 + 4096;

interface Libc extends BaseLibc {
  socket(d: number, t: number, p: number): number;
  bind(fd: number, addr: Uint8Array, len: number): number;
  getsockname(fd: number, addr: Uint8Array, len: Int32Array): number;
  setsockopt(fd: number, level: number, name: number, val: Uint8Array, len: number): number;
  sendmsg(fd: number, msg: Uint8Array, flags: number): number;
  recvmsg(fd: number, msg: Uint8Array, flags: number): number;
  E: { EAGAIN: number; EINTR: number; ENOBUFS: number; EIO: number; EINVAL: number; EMSGSIZE: number; ECONNREFUSED: number; EPERM: number };
}

let libc: Libc | undefined;

function loadLibc(): Libc {
  if (libc) return libc;
  if (process.platform !== "linux") throw new UdpError("ERR_UDP_UNAVAILABLE", `the bulk link's UDP socket needs Linux (this is ${process.platform}); start the agent with --no-bulk`);
  const b = baseLibc();
  const lib = b.lib;
  libc = {
    ...b,
    socket: lib.func("int socket(int domain, int type, int protocol)") as Libc["socket"],
    bind: lib.func("int bind(int fd, void *addr, uint32_t len)") as Libc["bind"],
    getsockname: lib.func("int getsockname(int fd, void *addr, void *len)") as Libc["getsockname"],
    setsockopt: lib.func("int setsockopt(int fd, int level, int name, void *val, uint32_t len)") as Libc["setsockopt"],
    sendmsg: lib.func("long sendmsg(int fd, void *msg, int flags)") as Libc["sendmsg"],
    recvmsg: lib.func("long recvmsg(int fd, void *msg, int flags)") as Libc["recvmsg"],
    E: {
      EAGAIN: b.errnoOf("EAGAIN", 11),
      EINTR: b.errnoOf("EINTR", 4),
      ENOBUFS: b.errnoOf("ENOBUFS", 105),
      EIO: b.errnoOf("EIO", 5),
      EINVAL: b.errnoOf("EINVAL", 22),
      EMSGSIZE: b.errnoOf("EMSGSIZE", 90),
      ECONNREFUSED: b.errnoOf("ECONNREFUSED", 111),
      EPERM: b.errnoOf("EPERM", 1),
    },
  };
  return libc;
}

function parseV4(s: string): number {
  const m = /^(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(s);
  if (!m) throw new UdpError("ERR_UDP_BIND", `not an IPv4 address: ${s}`);
  return ((Number(m[1]) << 24) | (Number(m[2]) << 16) | (Number(m[3]) << 8) | Number(m[4])) >>> 0;
}

function writeSockaddr(b: Uint8Array, e: Endpoint): void {
  b[0] = AF_INET;
  b[1] = 0;
  b[2] = e.port >> 8;
  b[3] = e.port & 255;
  b[4] = e.addr >>> 24;
  b[5] = (e.addr >>> 16) & 255;
  b[6] = (e.addr >>> 8) & 255;
  b[7] = e.addr & 255;
}

function setU64(b: Buffer, off: number, v: number): void {
  b.writeUInt32LE(v >>> 0, off);
  b.writeUInt32LE(Math.floor(v / 0x1_0000_0000) >>> 0, off + 4);
}

/** Receives one GRO buffer: `data` holds datagrams of `segSize` bytes back to back (the last may be shorter). */
export type UdpReceiver = (data: Uint8Array, segSize: number, from: Endpoint) => void;

export class UdpSocket {
  readonly stats: UdpStats = { rxCalls: 0, rxDatagrams: 0, rxBytes: 0, txCalls: 0, txDatagrams: 0, txBytes: 0, txDropped: 0, txErrors: 0, txTooBig: 0 };
  /** UDP_SEGMENT in use (false after the kernel refused it once) */
  gso: boolean;
  readonly gro: boolean;
  private readonly maxBatch: number;
  // send side: msghdr + sockaddr + iovec + cmsg, preallocated
  private readonly sMsg = Buffer.allocUnsafeSlow(MSGHDR_LEN).fill(0);
  private readonly sName = Buffer.allocUnsafeSlow(16).fill(0);
  private readonly sIov = Buffer.allocUnsafeSlow(16).fill(0);
  private readonly sCtl = Buffer.allocUnsafeSlow(CMSG_SPACE_INT).fill(0);
  // receive side
  private readonly rMsg = Buffer.allocUnsafeSlow(MSGHDR_LEN).fill(0);
  private readonly rName = Buffer.allocUnsafeSlow(16).fill(0);
  private readonly rIov = Buffer.allocUnsafeSlow(16).fill(0);
  private readonly rCtl = Buffer.allocUnsafeSlow(64).fill(0);
  private readonly rBuf: Buffer;
  private readonly rBufAddr: number;
  private readonly addrCache = new WeakMap<ArrayBufferLike, number>();
  private readonly from: Endpoint = { addr: 0, port: 0 };
  /** With rxTimestamps: CLOCK_REALTIME of the kernel's receipt of the last datagram read, [seconds, nanoseconds]. */
  readonly lastRxStamp: [number, number] = [0, 0];
  private onData: UdpReceiver | undefined;
  private onBatchEnd: (() => void) | undefined;
  private onError: ((err: Error) => void) | undefined;
  private closing = false;
  private closePromise: Promise<void> | undefined;
  private readonly reader: FdReader;

  private constructor(
    private readonly c: Libc,
    readonly fd: number,
    /** the bound port */
    readonly port: number,
    opts: UdpSocketOptions,
    gro: boolean,
  ) {
    this.gso = opts.gso !== false;
    this.gro = gro;
    this.maxBatch = Math.max(1, opts.maxBatch ?? 16);
    this.rBuf = Buffer.allocUnsafeSlow(this.maxBatch * RECV_SIZE);
    this.rBufAddr = c.addr(this.rBuf);
    // send msghdr: name, iov (1 entry), control filled per call
    setU64(this.sMsg, 0, c.addr(this.sName));
    this.sMsg.writeUInt32LE(16, 8);
    setU64(this.sMsg, 16, c.addr(this.sIov));
    setU64(this.sMsg, 24, 1);
    this.sCtl.writeUInt32LE(CMSG_HDR + 2, 0); // cmsg_len = CMSG_LEN(sizeof(u16))
    this.sCtl.writeInt32LE(SOL_UDP, 8);
    this.sCtl.writeInt32LE(UDP_SEGMENT, 12);
    // recv msghdr
    setU64(this.rMsg, 0, c.addr(this.rName));
    setU64(this.rMsg, 16, c.addr(this.rIov));
    setU64(this.rMsg, 24, 1);
    setU64(this.rMsg, 32, c.addr(this.rCtl));
    setU64(this.rIov, 8, RECV_SIZE);
    this.reader = new FdReader(c, fd, this.drain, (err) => this.report(new UdpError("ERR_UDP_SETUP", `bulk UDP socket: ${err.message}`)), {
      ...(opts.pollTimeoutMs !== undefined ? { pollTimeoutMs: opts.pollTimeoutMs } : {}),
      ...(opts.busyPollUs !== undefined ? { busyPollUs: opts.busyPollUs } : {}),
      ...(opts.wait !== undefined ? { wait: opts.wait } : {}),
    });
  }

  /** How the idle socket waits for datagrams ("uv": the event loop's epoll; "pool": a libuv worker thread). */
  get waitMode(): FdWaitMode {
    return this.reader.waitMode;
  }

  static open(opts: UdpSocketOptions = {}): UdpSocket {
    const c = loadLibc();
    const fd = c.socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw new UdpError("ERR_UDP_UNAVAILABLE", `socket(AF_INET, SOCK_DGRAM) failed: ${c.errnoName(c.errno())}`);
    try {
      const int = (v: number) => {
        const b = Buffer.alloc(4);
        b.writeInt32LE(v);
        return b;
      };
      const rcv = opts.rcvbuf ?? 4 << 20;
      const snd = opts.sndbuf ?? 4 << 20;
      if (c.setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, int(rcv), 4) < 0) c.setsockopt(fd, SOL_SOCKET, SO_RCVBUF, int(rcv), 4);
      if (c.setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, int(snd), 4) < 0) c.setsockopt(fd, SOL_SOCKET, SO_SNDBUF, int(snd), 4);
      if (opts.rxTimestamps) c.setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, int(1), 4);
      let gro = false;
      if (opts.gro !== false) gro = c.setsockopt(fd, SOL_UDP, UDP_GRO, int(1), 4) === 0;
      // no fragments: the path MTU is searched (src/bulk/session.ts)
      c.setsockopt(fd, IPPROTO_IP, IP_MTU_DISCOVER, int(opts.dontFragment === false ? IP_PMTUDISC_DONT : IP_PMTUDISC_DO), 4);
      const sa = Buffer.alloc(16);
      writeSockaddr(sa, { addr: parseV4(opts.address ?? "0.0.0.0"), port: opts.port ?? 0 });
      if (c.bind(fd, sa, 16) < 0) {
        const e = c.errno();
        throw new UdpError("ERR_UDP_BIND", `cannot bind the bulk UDP socket to ${opts.address ?? "0.0.0.0"}:${opts.port ?? 0}: ${c.errnoName(e)}; pick another port with --bulk-port or turn the bulk link off with --no-bulk`);
      }
      const len = new Int32Array([16]);
      if (c.getsockname(fd, sa, len) < 0) throw new UdpError("ERR_UDP_SETUP", `getsockname failed: ${c.errnoName(c.errno())}`);
      const port = (sa[2]! << 8) | sa[3]!;
      return new UdpSocket(c, fd, port, opts, gro);
    } catch (e) {
      c.close(fd);
      throw e;
    }
  }

  private addressOf(buf: Uint8Array): number {
    let base = this.addrCache.get(buf.buffer);
    if (base === undefined) {
      base = this.c.addr(new Uint8Array(buf.buffer, 0, 1)) ;
      this.addrCache.set(buf.buffer, base);
    }
    return base + buf.byteOffset;
  }

  /**
   * Send `count` datagrams laid out in `buf` (each `segSize` bytes, the last `buf.length - (count-1)*segSize`):
   * with UDP GSO one syscall, else one per datagram. `buf` must be backed by a long-lived buffer
   * (allocUnsafeSlow): its address is cached. Returns the datagrams the kernel took.
   */
  sendBatch(to: Endpoint, buf: Uint8Array, segSize: number, count: number): number {
    if (this.closing || count <= 0) return 0;
    writeSockaddr(this.sName, to);
    if (count > 1 && this.gso && count <= UDP_GSO_MAX_SEGMENTS) {
      const r = this.sendOne(buf, segSize);
      if (r === "ok") {
        this.stats.txDatagrams += count;
        return count;
      }
      if (r === "full") {
        this.stats.txDropped += count;
        return 0;
      }
      // The kernel refused GSO for this path: never again on this socket; fall through.
      this.gso = false;
    }
    let sent = 0;
    for (let off = 0, i = 0; i < count; i++, off += segSize) {
      const end = i === count - 1 ? buf.length : off + segSize;
      const r = this.sendOne(buf.subarray(off, end), 0);
      if (r === "ok") sent++;
      else this.stats.txDropped++;
    }
    this.stats.txDatagrams += sent;
    return sent;
  }

  /** One sendmsg; segSize > 0 adds UDP_SEGMENT. */
  private sendOne(buf: Uint8Array, segSize: number): "ok" | "full" | "error" {
    const c = this.c;
    setU64(this.sIov, 0, this.addressOf(buf));
    setU64(this.sIov, 8, buf.length);
    if (segSize > 0 && segSize < buf.length) {
      this.sCtl.writeUInt16LE(segSize, CMSG_HDR);
      setU64(this.sMsg, 32, this.addressOf(this.sCtl));
      setU64(this.sMsg, 40, CMSG_SPACE_INT);
    } else {
      setU64(this.sMsg, 32, 0);
      setU64(this.sMsg, 40, 0);
    }
    this.stats.txCalls++;
    for (;;) {
      const n = c.sendmsg(this.fd, this.sMsg, 0);
      if (n >= 0) {
        this.stats.txBytes += n;
        return "ok";
      }
      const e = c.errno();
      if (e === c.E.EINTR) continue;
      if (e === c.E.EAGAIN || e === c.E.ENOBUFS) return "full";
      this.stats.txErrors++;
      if (e === c.E.EMSGSIZE) this.stats.txTooBig++;
      if (segSize > 0 && (e === c.E.EIO || e === c.E.EINVAL)) return "error";
      return e === c.E.ECONNREFUSED || e === c.E.EPERM || e === c.E.EMSGSIZE ? "full" : "error";
    }
  }

  /** Send one datagram (keepalives, STUN). */
  send(to: Endpoint, data: Uint8Array): boolean {
    if (this.closing) return false;
    writeSockaddr(this.sName, to);
    // Short control datagrams come from short-lived buffers: copy into the receive-independent scratch.
    const tmp = this.scratch.length >= data.length ? this.scratch : (this.scratch = Buffer.allocUnsafeSlow(data.length));
    tmp.set(data);
    const ok = this.sendOne(tmp.subarray(0, data.length), 0) === "ok";
    if (ok) this.stats.txDatagrams++;
    else this.stats.txDropped++;
    return ok;
  }

  private scratch = Buffer.allocUnsafeSlow(2048);

  /** Start receiving. `onData` gets GRO buffers (valid until the next drain, see the header); `onBatchEnd` after each drain. */
  start(onData: UdpReceiver, onBatchEnd?: () => void, onError?: (err: Error) => void): void {
    if (this.closing) throw new UdpError("ERR_UDP_CLOSED", "UDP socket is closed");
    this.onData = onData;
    this.onBatchEnd = onBatchEnd;
    this.onError = onError;
    this.reader.start();
  }

  /** Stop reading after the current drain (datagrams wait in the socket's buffer); resume() reads on. */
  pause(): void {
    this.reader.pause();
  }

  resume(): void {
    this.reader.resume();
  }

  /** Drains started so far: data from an earlier drain is no longer valid (see the header). */
  drains = 0;

  private readonly drain = (): DrainResult => {
    if (this.closing || !this.onData) return "stop";
    this.drains++;
    const c = this.c;
    let wouldBlock = false;
    let got = 0;
    let off = 0;
    for (let i = 0; i < this.maxBatch; i++) {
      setU64(this.rIov, 0, this.rBufAddr + off); // this read's part of the slab
      this.rMsg.writeUInt32LE(16, 8); // msg_namelen
      setU64(this.rMsg, 40, this.rCtl.length); // msg_controllen
      this.rMsg.writeInt32LE(0, 48);
      const n = c.recvmsg(this.fd, this.rMsg, 0);
      if (n < 0) {
        const e = c.errno();
        if (e === c.E.EAGAIN) {
          wouldBlock = true;
          break;
        }
        if (e === c.E.EINTR || e === c.E.ECONNREFUSED) continue;
        this.report(new UdpError("ERR_UDP_SETUP", `recvmsg failed: ${c.errnoName(e)}`));
        wouldBlock = true;
        break;
      }
      this.stats.rxCalls++;
      got++;
      let seg = n;
      const ctlLen = this.rMsg.readUInt32LE(40);
      for (let o = 0; o + CMSG_HDR <= ctlLen; ) {
        const len = this.rCtl.readUInt32LE(o);
        if (len < CMSG_HDR) break;
        const level = this.rCtl.readInt32LE(o + 8);
        const type = this.rCtl.readInt32LE(o + 12);
        if (level === SOL_UDP && type === UDP_GRO) seg = this.rCtl.readInt32LE(o + CMSG_HDR) || n;
        else if (level === SOL_SOCKET && type === SO_TIMESTAMPNS && len >= CMSG_HDR + 16) {
          this.lastRxStamp[0] = Number(this.rCtl.readBigInt64LE(o + CMSG_HDR));
          this.lastRxStamp[1] = Number(this.rCtl.readBigInt64LE(o + CMSG_HDR + 8));
        }
        o += (len + 7) & ~7;
      }
      const r = this.rName;
      this.from.port = (r[2]! << 8) | r[3]!;
      this.from.addr = ((r[4]! << 24) | (r[5]! << 16) | (r[6]! << 8) | r[7]!) >>> 0;
      this.stats.rxDatagrams += seg > 0 ? Math.ceil(n / seg) : 1;
      this.stats.rxBytes += n;
      try {
        this.onData(this.rBuf.subarray(off, off + n), seg, this.from);
      } catch (err) {
        this.report(err instanceof Error ? err : new Error(String(err)));
      }
      if (this.closing) return "stop";
      off += RECV_SIZE;
    }
    if (got > 0 && this.onBatchEnd) {
      try {
        this.onBatchEnd();
      } catch (err) {
        this.report(err instanceof Error ? err : new Error(String(err)));
      }
    }
    if (this.closing) return "stop";
    return !wouldBlock ? "more" : got > 0 ? "data" : "idle";
  };

  private report(err: Error): void {
    if (this.onError) this.onError(err);
  }

  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.onData = undefined;
    // The fd closes once no poll on a worker thread uses its number any more.
    this.closePromise = this.reader.close().then(() => {
      this.c.close(this.fd);
    });
    return this.closePromise;
  }
}
