/**
 * The read loop both FFI devices use (agent/os/tun.ts: the TUN, agent/os/udp.ts: the bulk link's UDP socket),
 * plus the libc binding they share (koffi, loaded once per process).
 *
 * Loop, all on the JS thread except the wait:
 *   drain:  the owner's drain() reads until EAGAIN or its batch limit and says which: "more" (limit hit:
 *           continue via setImmediate so timers and I/O get their turn), "data"/"idle" (EAGAIN after some
 *           data / none), "stop".
 *   wait:   poll([fd, eventfd], timeout) through koffi's async call, i.e. on a libuv worker thread, so the
 *           event loop never blocks. close() writes the eventfd so an in-flight poll returns at once; the
 *           timeout (default 200 ms) is only a safety net. close() resolves once no poll is in flight, so
 *           the owner never closes an fd number a worker thread still polls.
 *   busy-poll: a wake-up through the worker thread costs two thread switches (worker, then the event loop),
 *           which on a loaded box is most of an idle round trip. So for a short window after traffic on ANY
 *           reader of this process (busyPollUs, default 1000 us; WEFTNET_BUSY_POLL_US, 0 = off), an idle
 *           drain is retried from setImmediate instead of parking in poll(): the packet that answers the
 *           one just forwarded (a ping's reply, a TCP ACK) is read by the running event loop. Traffic on
 *           one reader (say the UDP socket) also kicks the others (the TUN, where the answer will appear).
 *           The window is bounded, so an idle agent sleeps in poll() as before. Only a process with more
 *           than one reader (the TUN and the bulk socket) arms it: a TUN alone (--no-bulk) never spins.
 */
import { createRequire } from "node:module";

export interface BaseLibc {
  koffi: typeof import("koffi");
  lib: ReturnType<typeof import("koffi").load>;
  errno(): number;
  errnoName(e: number): string;
  errnoOf(name: string, fallback: number): number;
  read(fd: number, buf: Uint8Array, n: number): number;
  write(fd: number, buf: Uint8Array, n: number): number;
  close(fd: number): number;
  eventfd(init: number, flags: number): number;
  pollAsync(fds: Uint8Array, n: number, timeout: number, cb: (err: unknown, rc: number) => void): void;
  /** A buffer's address (memcpy(p, p, 0) returns p). */
  addr(buf: Uint8Array): number;
}

let base: BaseLibc | undefined;

/** libc through koffi (Linux only; the caller checks the platform and says what to do instead). */
export function baseLibc(): BaseLibc {
  if (base) return base;
  const require = createRequire(import.meta.url);
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const koffi = require("koffi") as typeof import("koffi");
  const lib = koffi.load("libc.so.6");
  const en = koffi.os.errno;
  const names = new Map<number, string>(Object.entries(en).map(([k, v]) => [v, k]));
  const strerror = lib.func("const char *strerror(int errnum)");
  const poll = lib.func("int poll(void *fds, unsigned long nfds, int timeout)");
  const memcpy = lib.func("uintptr_t memcpy(void *d, void *s, size_t n)");
  base = {
    koffi,
    lib,
    errno: () => koffi.errno(),
    errnoName: (e) => `${names.get(e) ?? `errno ${e}`} (${strerror(e) as string})`,
    errnoOf: (name, fallback) => en[name] ?? fallback,
    read: lib.func("long read(int fd, void *buf, size_t n)") as BaseLibc["read"],
    write: lib.func("long write(int fd, const void *buf, size_t n)") as BaseLibc["write"],
    close: lib.func("int close(int fd)") as BaseLibc["close"],
    eventfd: lib.func("int eventfd(unsigned int initval, int flags)") as BaseLibc["eventfd"],
    pollAsync: (fds, n, timeout, cb) => poll.async(fds, n, timeout, cb),
    addr: (b) => Number(memcpy(b, b, 0)),
  };
  return base;
}

const POLLIN = 1;
const EFD_NONBLOCK = 0o4000;
const EFD_CLOEXEC = 0o2000000;

/** "more": the batch limit was hit; "data": read something, then EAGAIN; "idle": nothing there; "stop": the loop ends. */
export type DrainResult = "more" | "data" | "idle" | "stop";

export interface FdReaderOptions {
  /** Safety-net poll timeout. Default 200 ms. */
  pollTimeoutMs?: number;
  /** Busy-poll window after traffic, microseconds (see the header). Default WEFTNET_BUSY_POLL_US or 1000. */
  busyPollUs?: number;
}

export function defaultBusyPollUs(): number {
  const v = Number(process.env.WEFTNET_BUSY_POLL_US);
  return process.env.WEFTNET_BUSY_POLL_US !== undefined && Number.isFinite(v) && v >= 0 ? v : 1000;
}

/** Traffic seen by any reader of this process: until when idle drains spin instead of parking. */
const activity = { until: 0 };
const readers = new Set<FdReader>();

export class FdReader {
  private readonly pfd = Buffer.alloc(16); // struct pollfd[2] { int fd; short events; short revents; }
  private readonly wake = Buffer.alloc(8);
  private readonly efd: number;
  private readonly pollTimeoutMs: number;
  private readonly busyPollMs: number;
  private polling = false;
  private scheduled = false;
  private started = false;
  private paused = false;
  private closing = false;
  private closed = false;
  private closePromise: Promise<void> | undefined;
  private resolveClose: (() => void) | undefined;
  private pollFailures = 0;

  /**
   * `drain` reads what is there (see DrainResult); `fail` is told when poll() keeps failing (the loop stops).
   * Throws when the eventfd cannot be made (the owner cleans up).
   */
  constructor(
    private readonly c: BaseLibc,
    fd: number,
    private readonly drain: () => DrainResult,
    private readonly fail: (err: Error) => void,
    opts: FdReaderOptions = {},
  ) {
    this.efd = c.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (this.efd < 0) throw new Error(`eventfd failed: ${c.errnoName(c.errno())}`);
    this.pollTimeoutMs = Math.max(1, opts.pollTimeoutMs ?? 200);
    this.busyPollMs = Math.max(0, opts.busyPollUs ?? defaultBusyPollUs()) / 1000;
    this.pfd.writeInt32LE(fd, 0);
    this.pfd.writeInt16LE(POLLIN, 4);
    this.pfd.writeInt32LE(this.efd, 8);
    this.pfd.writeInt16LE(POLLIN, 12);
    this.wake.writeBigUInt64LE(1n);
  }

  get isPaused(): boolean {
    return this.paused;
  }

  start(): void {
    this.started = true;
    readers.add(this);
    this.schedule();
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    // An in-flight poll restarts the drain when it returns; otherwise start one now.
    if (!this.polling) this.schedule();
  }

  /** Traffic passed (a read, or a send expecting an answer): every reader spins for the busy-poll window. */
  static traffic(windowMs: number): void {
    if (windowMs <= 0) return;
    const until = performance.now() + windowMs;
    if (until <= activity.until) return;
    const wasIdle = performance.now() >= activity.until;
    activity.until = until;
    if (wasIdle) for (const r of readers) r.schedule();
  }

  /** This reader's window (so owners can report traffic without knowing the default). */
  traffic(): void {
    FdReader.traffic(this.busyPollMs);
  }

  private schedule(): void {
    if (this.scheduled || this.closing || this.paused || !this.started) return;
    this.scheduled = true;
    setImmediate(this.run);
  }

  private readonly run = (): void => {
    this.scheduled = false;
    if (this.closing || this.paused) return;
    const r = this.drain();
    if (r === "stop" || this.closing || this.paused) return;
    // Only a process with more than one reader arms the window: spinning exists to read the answer that
    // appears on ANOTHER reader (the bulk UDP socket's reply to what the TUN sent, and back). With the TUN
    // alone (--no-bulk: WebRTC carries the packets and its answers come through libdatachannel's own
    // threads), a spinning event loop only took CPU from libdatachannel on a 2-core box (quiet box, native
    // WebRTC jumbo: 736-748 Mbit/s spinning vs 848 without; ping p50 2.1-2.9 vs 1.7-1.9 ms).
    if (r !== "idle" && readers.size > 1) this.traffic();
    if (r === "more") this.schedule();
    else if (this.busyPollMs > 0 && performance.now() < activity.until) this.schedule();
    else if (!this.polling) this.waitReadable();
  };

  private waitReadable(): void {
    this.polling = true;
    this.c.pollAsync(this.pfd, 2, this.pollTimeoutMs, (err, rc) => {
      this.polling = false;
      if (this.closing) {
        this.finishClose();
        return;
      }
      if (err || rc < 0) {
        // EINTR or a transient failure: retry, but never spin.
        if (++this.pollFailures > 100) {
          readers.delete(this);
          this.fail(new Error(`poll keeps failing: ${String(err ?? rc)}`));
          return;
        }
        if (!this.paused) setTimeout(() => this.schedule(), 10);
        return;
      }
      this.pollFailures = 0;
      if (!this.paused && !this.scheduled) this.run();
    });
  }

  /** Stop the loop; resolves once no poll is in flight (then the owner may close its fd). */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    readers.delete(this);
    this.closePromise = new Promise<void>((resolve) => {
      this.resolveClose = resolve;
    });
    if (this.polling) this.c.write(this.efd, this.wake, 8); // the poll callback finishes the close
    else this.finishClose();
    return this.closePromise;
  }

  private finishClose(): void {
    if (this.closed) return;
    this.closed = true;
    this.c.close(this.efd);
    this.resolveClose?.();
  }
}
