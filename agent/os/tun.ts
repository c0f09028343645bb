/**
 * Linux TUN device without a bespoke native build: /dev/net/tun is opened with fs, the ioctls and the
 * hot-path read/write/poll go through koffi (prebuilt FFI binaries from npm).
 *
 * Setup: TUNSETIFF(IFF_TUN | IFF_NO_PI | IFF_VNET_HDR), TUNSETVNETLE (virtio header little-endian on
 * every host, so frames carry it verbatim between nodes, see src/packet/vnet.ts), TUNSETOFFLOAD
 * (CSUM | TSO4 | TSO6: the kernel hands over GSO super-packets up to ~64 KB, measured ~8x throughput),
 * TUNSETPERSIST 0 (the interface disappears when the fd closes), O_NONBLOCK (and O_CLOEXEC, as Node
 * opens every fd: child processes never hold the device open).
 *
 * Read loop (all on the JS thread except the wait):
 *   drain: read() until EAGAIN (or maxBatch packets / maxBatchBytes) into a 1 MiB slab; each packet is a
 *          subarray of the slab, 8-byte aligned; a full slab is replaced, never overwritten, so delivered
 *          packets stay valid (with reuseSlab every drain starts at the slab's beginning again: the batch is
 *          valid only during onBatch). Deliver the batch to onBatch (one call per drain: the caller flushes
 *          coalesced frames there). If the drain stopped on the batch limit, continue via setImmediate so
 *          timers and I/O get their turn; if it hit EAGAIN, wait.
 *   wait:  agent/os/fd-reader.ts (shared with the bulk link's UDP socket): by default a uv_poll watcher on
 *          the event loop's own epoll (a readable TUN wakes the JS thread directly); WEFTNET_FD_WAIT=pool:
 *          poll([tun fd, eventfd]) on a libuv worker thread. close() stops the wait and closes the fd only
 *          once nothing watches it. An idle device sleeps.
 *   pause() stops after the current batch; resume() restarts (or lets the in-flight poll restart).
 *
 * Writes are non-blocking write() calls, one per packet; EAGAIN/ENOBUFS count as `queue-full`, any other
 * error as `write-failed` (EINVAL: the kernel rejected the virtio header; EIO: the interface is down).
 *
 * Not done here (the route/bridge adapter's job): MTU, addresses, link up, routes.
 */
import fs from "node:fs";
import { WeftError } from "../../src/errors.js";
import { DropCounters } from "../../src/packet/drop.js";
import type { PacketDevice, PacketDeviceStats } from "../../src/packet/device.js";
import { MAX_VNET_PACKET } from "../../src/packet/vnet.js";
import { baseLibc, FdReader, type BaseLibc, type DrainResult, type FdWaitMode } from "./fd-reader.js";

export type TunErrorCode = "ERR_TUN_PERMISSION" | "ERR_TUN_UNAVAILABLE" | "ERR_TUN_BUSY" | "ERR_TUN_SETUP" | "ERR_TUN_CLOSED";

/** Opening or using the TUN device failed. `code` is stable; the message says what to do. */
export class TunError extends WeftError {
  static override readonly name = "TunError";
  constructor(code: TunErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

export interface TunOptions {
  /** Interface name, at most 15 chars; "%d" lets the kernel pick a number. Default "weft0". */
  name?: string;
  /** IFF_VNET_HDR: every packet carries a virtio_net_hdr. Default true. */
  vnetHdr?: boolean;
  /** With vnetHdr: TUNSETOFFLOAD CSUM|TSO4|TSO6 so the kernel hands over GSO super-packets. Default true.
   *  false: plain MTU-sized packets (still with a virtio header, gso_type NONE), for comparison. */
  offload?: boolean;
  /** Most packets per onBatch call. Default 256. */
  maxBatch?: number;
  /** Most bytes per onBatch call. Default 2 MiB. */
  maxBatchBytes?: number;
  /** Read slab size. Default 1 MiB. */
  slabSize?: number;
  /**
   * The batch handed to onBatch is only valid until onBatch returns (the consumer copies what it keeps):
   * every drain reads into the same slab, and the hot path allocates nothing. Default false: a full slab
   * is replaced, so delivered packets stay valid for as long as they are held.
   */
  reuseSlab?: boolean;
  /** Safety-net poll timeout (close() wakes the poll at once anyway). Default 200 ms. */
  pollTimeoutMs?: number;
  /** Busy-poll window after traffic (agent/os/fd-reader.ts). Default WEFTNET_BUSY_POLL_US, else 0 ("uv") / 1000 us ("pool"). */
  busyPollUs?: number;
  /** How the idle device waits (agent/os/fd-reader.ts). Default WEFTNET_FD_WAIT, else "uv" where available. */
  wait?: FdWaitMode;
}

export const DEFAULT_TUN_NAME = "weft0";

// <linux/if_tun.h>
const TUNSETIFF = 0x400454ca;
const TUNSETPERSIST = 0x400454cb;
const TUNSETOFFLOAD = 0x400454d0;
const TUNSETVNETLE = 0x400454dc;
const IFF_TUN = 0x0001;
const IFF_NO_PI = 0x1000;
const IFF_VNET_HDR = 0x4000;
const TUN_F_CSUM = 0x01;
const TUN_F_TSO4 = 0x02;
const TUN_F_TSO6 = 0x04;
const IFNAMSIZ = 16;
const IFREQ_SIZE = 40;

/** Room for one read: the largest GSO packet + its virtio header, rounded up. */
const READ_SIZE = (MAX_VNET_PACKET + 7) & ~7;

interface Libc extends BaseLibc {
  ioctlPtr(fd: number, req: number, buf: Uint8Array): number;
  ioctlVal(fd: number, req: number, val: number): number;
  ifNameToIndex(name: string): number;
  E: { EAGAIN: number; EINTR: number; EPERM: number; EACCES: number; EBUSY: number; ENOBUFS: number };
}

let libc: Libc | undefined;

function loadLibc(): Libc {
  if (libc) return libc;
  if (process.platform !== "linux") {
    throw new TunError("ERR_TUN_UNAVAILABLE", `TUN devices are only supported on Linux (this is ${process.platform}); start the agent with --no-tun`);
  }
  const b = baseLibc();
  const ioctl = b.lib.func("int ioctl(int fd, unsigned long req, ...)");
  libc = {
    ...b,
    ioctlPtr: (fd, req, buf) => ioctl(fd, req, "void *", buf) as number,
    ioctlVal: (fd, req, val) => ioctl(fd, req, "unsigned long", val) as number,
    ifNameToIndex: b.lib.func("unsigned int if_nametoindex(const char *name)") as Libc["ifNameToIndex"],
    E: {
      EAGAIN: b.errnoOf("EAGAIN", 11),
      EINTR: b.errnoOf("EINTR", 4),
      EPERM: b.errnoOf("EPERM", 1),
      EACCES: b.errnoOf("EACCES", 13),
      EBUSY: b.errnoOf("EBUSY", 16),
      ENOBUFS: b.errnoOf("ENOBUFS", 105),
    },
  };
  return libc;
}

/** Linux interface-name rules (dev_valid_name). */
export function isValidIfaceName(name: string): boolean {
  return name.length > 0 && name.length < IFNAMSIZ && name !== "." && name !== ".." && !/[/:\s]/.test(name) && Buffer.byteLength(name) === name.length;
}

const NO_TUN_HINT = "run the agent as root (or with CAP_NET_ADMIN), or start it with --no-tun to join the mesh without a data plane";

/** Open (create) a TUN interface. Throws TunError with a message that points at --no-tun. */
export function openTun(opts: TunOptions = {}): TunDevice {
  return TunDevice.open(opts);
}

export class TunDevice implements PacketDevice {
  readonly drops = new DropCounters();
  readonly stats: PacketDeviceStats = { rxPackets: 0, rxBytes: 0, rxBatches: 0, txPackets: 0, txBytes: 0, rxMaxPacket: 0 };

  private readonly c: Libc;
  private readonly reader: FdReader;
  private readonly maxBatch: number;
  private readonly maxBatchBytes: number;
  private readonly slabSize: number;
  private readonly reuseSlab: boolean;
  private slab: Uint8Array;
  private off = 0;
  private onBatch: ((packets: Uint8Array[]) => void) | undefined;
  private onError: ((err: Error) => void) | undefined;
  private closing = false;
  private closePromise: Promise<void> | undefined;

  private constructor(
    c: Libc,
    /** The /dev/net/tun file descriptor. */
    readonly fd: number,
    /** The interface name the kernel gave (== opts.name unless it had "%d"). */
    readonly name: string,
    /** Interface index in the namespace where it was created (0 if unknown). Moving it to another namespace may renumber it. */
    readonly ifindex: number,
    readonly vnetHdr: boolean,
    opts: TunOptions,
  ) {
    this.c = c;
    this.maxBatch = Math.max(1, opts.maxBatch ?? 256);
    this.maxBatchBytes = Math.max(READ_SIZE, opts.maxBatchBytes ?? 2 << 20);
    this.slabSize = Math.max(READ_SIZE, opts.slabSize ?? 1 << 20);
    this.reuseSlab = opts.reuseSlab === true;
    this.slab = Buffer.allocUnsafeSlow(this.slabSize);
    this.reader = new FdReader(c, fd, this.drain, (err) => this.fail(new TunError("ERR_TUN_SETUP", `TUN ${this.name}: ${err.message}`)), {
      ...(opts.pollTimeoutMs !== undefined ? { pollTimeoutMs: opts.pollTimeoutMs } : {}),
      ...(opts.busyPollUs !== undefined ? { busyPollUs: opts.busyPollUs } : {}),
      ...(opts.wait !== undefined ? { wait: opts.wait } : {}),
    });
  }

  /** How the idle device waits for packets ("uv": the event loop's epoll; "pool": a libuv worker thread). */
  get waitMode(): FdWaitMode {
    return this.reader.waitMode;
  }

  /** Alias of `name` for the route/bridge adapters. */
  get tunIfaceName(): string {
    return this.name;
  }

  get tunIfaceIndex(): number {
    return this.ifindex;
  }

  static open(opts: TunOptions = {}): TunDevice {
    const name = opts.name ?? DEFAULT_TUN_NAME;
    if (!isValidIfaceName(name)) throw new TunError("ERR_TUN_SETUP", `invalid interface name ${JSON.stringify(name)}: 1-15 ASCII chars, no '/', ':' or spaces`);
    const vnet = opts.vnetHdr ?? true;
    const c = loadLibc();

    let fd: number;
    try {
      fd = fs.openSync("/dev/net/tun", fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === "EACCES" || code === "EPERM") {
        throw new TunError("ERR_TUN_PERMISSION", `cannot open /dev/net/tun for ${name}: permission denied; ${NO_TUN_HINT}`, { cause: e });
      }
      throw new TunError("ERR_TUN_UNAVAILABLE", `cannot open /dev/net/tun for ${name}: ${code ?? (e as Error).message} (no TUN support here: load the tun module or pass /dev/net/tun into the container); or start the agent with --no-tun`, { cause: e });
    }

    try {
      const ifr = Buffer.alloc(IFREQ_SIZE);
      ifr.write(name, 0, IFNAMSIZ - 1, "ascii");
      ifr.writeUInt16LE(IFF_TUN | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0), IFNAMSIZ);
      if (c.ioctlPtr(fd, TUNSETIFF, ifr) < 0) {
        const e = c.errno();
        if (e === c.E.EPERM || e === c.E.EACCES) {
          throw new TunError("ERR_TUN_PERMISSION", `cannot create TUN interface ${name}: ${c.errnoName(e)}, CAP_NET_ADMIN is required; ${NO_TUN_HINT}`);
        }
        if (e === c.E.EBUSY) {
          throw new TunError("ERR_TUN_BUSY", `cannot create TUN interface ${name}: ${c.errnoName(e)}; the name is taken by another interface or another process holds it (is another agent running? pick one with --iface)`);
        }
        throw new TunError("ERR_TUN_SETUP", `TUNSETIFF ${name} failed: ${c.errnoName(e)}`);
      }
      const actual = ifr.toString("ascii", 0, IFNAMSIZ).replace(/\0.*$/s, "");
      const setup = (what: string, rc: number) => {
        if (rc < 0) throw new TunError("ERR_TUN_SETUP", `${what} on ${actual} failed: ${c.errnoName(c.errno())}`);
      };
      setup("TUNSETPERSIST 0", c.ioctlVal(fd, TUNSETPERSIST, 0));
      if (vnet) {
        const one = Buffer.alloc(4);
        one.writeInt32LE(1);
        const rc = c.ioctlPtr(fd, TUNSETVNETLE, one);
        // Little-endian hosts speak LE virtio headers anyway; only a big-endian host truly needs the ioctl.
        if (rc < 0 && new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) setup("TUNSETVNETLE", rc);
        setup("TUNSETOFFLOAD", c.ioctlVal(fd, TUNSETOFFLOAD, opts.offload === false ? 0 : TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6));
      }
      const ifindex = c.ifNameToIndex(actual) >>> 0;
      try {
        return new TunDevice(c, fd, actual, ifindex, vnet, opts);
      } catch (e) {
        throw new TunError("ERR_TUN_SETUP", `TUN ${actual}: ${(e as Error).message}`);
      }
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  get paused(): boolean {
    return this.reader.isPaused;
  }

  start(onBatch: (packets: Uint8Array[]) => void, onError?: (err: Error) => void): void {
    if (this.closing) throw new TunError("ERR_TUN_CLOSED", `TUN ${this.name} is closed`);
    if (this.onBatch) throw new TunError("ERR_TUN_SETUP", `TUN ${this.name} read loop already started`);
    this.onBatch = onBatch;
    this.onError = onError;
    this.reader.start();
  }

  pause(): void {
    this.reader.pause();
  }

  resume(): void {
    this.reader.resume();
  }

  writeBatch(packets: readonly Uint8Array[]): number {
    if (this.closing) {
      this.drops.drop("write-failed", packets.length);
      return 0;
    }
    const c = this.c;
    let ok = 0;
    for (let i = 0; i < packets.length; i++) {
      const p = packets[i]!;
      const n = c.write(this.fd, p, p.length);
      if (n === p.length) {
        ok++;
        this.stats.txBytes += n;
        continue;
      }
      const e = n < 0 ? c.errno() : 0;
      this.drops.drop(e === c.E.EAGAIN || e === c.E.ENOBUFS ? "queue-full" : "write-failed");
    }
    this.stats.txPackets += ok;
    return ok;
  }

  readNow(): void {
    if (!this.closing && this.onBatch) this.reader.poke();
  }

  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    this.onBatch = undefined;
    // The fd closes once no poll on a worker thread uses its number any more.
    this.closePromise = this.reader.close().then(() => fs.closeSync(this.fd));
    return this.closePromise;
  }

  // ---- read loop (scheduling and waiting: FdReader) -------------------------------------------------

  private readonly drain = (): DrainResult => {
    if (this.closing || !this.onBatch) return "stop";
    const c = this.c;
    const fd = this.fd;
    const batch: Uint8Array[] = [];
    let bytes = 0;
    let wouldBlock = false;
    if (this.reuseSlab) this.off = 0; // the previous batch has been consumed
    while (batch.length < this.maxBatch && bytes < this.maxBatchBytes) {
      if (this.slab.length - this.off < READ_SIZE) {
        if (this.reuseSlab) break; // the slab is full: deliver, then continue from its start
        this.slab = Buffer.allocUnsafeSlow(this.slabSize); // delivered packets keep the old slab alive
        this.off = 0;
      }
      const n = c.read(fd, this.slab.subarray(this.off), READ_SIZE);
      if (n > 0) {
        batch.push(this.slab.subarray(this.off, this.off + n));
        this.off += (n + 7) & ~7;
        bytes += n;
        if (n > this.stats.rxMaxPacket) this.stats.rxMaxPacket = n;
        continue;
      }
      const e = n < 0 ? c.errno() : c.E.EAGAIN;
      if (e === c.E.EAGAIN) {
        wouldBlock = true;
        break;
      }
      if (e === c.E.EINTR) continue;
      this.deliver(batch, bytes);
      this.fail(new TunError("ERR_TUN_SETUP", `read from TUN ${this.name} failed: ${c.errnoName(e)}`));
      return "stop";
    }
    this.deliver(batch, bytes);
    if (this.closing) return "stop";
    return !wouldBlock ? "more" : batch.length > 0 ? "data" : "idle";
  };

  private deliver(batch: Uint8Array[], bytes: number): void {
    if (batch.length === 0) return;
    this.stats.rxPackets += batch.length;
    this.stats.rxBytes += bytes;
    this.stats.rxBatches++;
    try {
      this.onBatch!(batch);
    } catch (e) {
      this.report(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private fail(err: Error): void {
    this.onBatch = undefined; // the loop stops; close() still releases the fds
    this.report(err);
  }

  private report(err: Error): void {
    if (this.onError) this.onError(err);
    else queueMicrotask(() => {
      throw err;
    });
  }
}
