/**
 * The read loop both FFI devices use (agent/os/tun.ts: the TUN, agent/os/udp.ts: the bulk link's UDP socket),
 * plus the libc binding they share (koffi, loaded once per process).
 *
 * Loop, all on the JS thread:
 *   drain:  the owner's drain() reads until EAGAIN or its batch limit and says which: "more" (limit hit:
 *           continue via setImmediate so timers and I/O get their turn), "data"/"idle" (EAGAIN after some
 *           data / none), "stop".
 *   wait:   two ways to learn that the fd is readable again (WEFTNET_FD_WAIT=uv|pool picks one; default uv
 *           where it works):
 *           - "uv" (default): the event loop's own epoll watches the fd. A uv_poll handle (libuv's uv_poll_init
 *             and uv_poll_start, exported by the node binary, called through koffi.load(null)) with a koffi
 *             registered callback, which libuv calls on the JS thread: a readable fd wakes the event loop
 *             directly, one wake-up per packet, like a native addon's uv_poll. The callback drains at once
 *             (in the poll phase, so what the drain defers with setImmediate still runs in this loop
 *             iteration), then runs the promise jobs and nextTicks the drain queued, as the end of a callback
 *             scope would. The watcher stays started across idle wake-ups (level-triggered: a drain to EAGAIN
 *             quiets it) and is stopped only while the reader runs from setImmediate, and on pause/close.
 *             Only on Node's main thread (uv_default_loop() is the main thread's loop; a worker thread falls
 *             back to "pool").
 *           - "pool": poll([fd, eventfd], timeout) through koffi's async call, i.e. on a libuv worker thread.
 *             A wake costs two: the kernel wakes the worker, the worker's completion (uv_async_send) wakes
 *             the event loop; and the pool is shared with fs/dns/crypto work. close() writes the eventfd so
 *             an in-flight poll returns at once; the timeout (default 200 ms) is only a safety net.
 *           Either way close() resolves once nothing watches the fd any more, so the owner never closes an
 *           fd number libuv or a worker thread still uses.
 *   busy-poll: for a short window after traffic on ANY reader of this process (busyPollUs; WEFTNET_BUSY_POLL_US,
 *           0 = off), an idle drain is retried from setImmediate instead of parking: the packet that answers
 *           the one just forwarded (a ping's reply, a TCP ACK) is read by the running event loop. Traffic on
 *           one reader (say the UDP socket) also kicks the others (the TUN, where the answer will appear).
 *           The window is bounded, so an idle agent sleeps. Only a process with more than one reader arms it
 *           (a TUN alone, --no-bulk, never spins). Default 1000 us with "pool" (there it saved a two-thread
 *           wake); 0 with "uv" (measured: a direct wake costs no more than the spin saved, see README).
 *   answer wait: an owner that has just sent something that starts an exchange (the bulk link, when a packet
 *           from the TUN leaves for a peer that sent us no data for a while: a ping, a request, the first
 *           segment after a pause) and expects the answer within a short window (the peer's measured round
 *           trip) calls expectAnswer(windowMs). At the end of that uv callback the event loop stays on the
 *           CPU for at most the window, draining every reader without blocking (sched_yield between rounds,
 *           so a runnable thread of this CPU goes first), and stops at the first datagram or packet read. The
 *           answer then costs no wake-up of a sleeping thread: on this VM a cold wake is ~100 us and leaves
 *           the caches cold, which makes the next pass of JS 3-5x slower than a warm one. Bounded by a CPU
 *           budget (ANSWER_BUDGET: at most 2% of the time, burst 20 ms), so one-way streams and far peers
 *           cost nothing worth counting; WEFTNET_ANSWER_WAIT=0 turns it off. Only on the "uv" wait.
 */
import { createRequire } from "node:module";
import { isMainThread } from "node:worker_threads";

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
  schedYield(): number;
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
    schedYield: lib.func("int sched_yield(void)") as BaseLibc["schedYield"],
    pollAsync: (fds, n, timeout, cb) => poll.async(fds, n, timeout, cb),
    addr: (b) => Number(memcpy(b, b, 0)),
  };
  return base;
}

const POLLIN = 1;
const EFD_NONBLOCK = 0o4000;
const EFD_CLOEXEC = 0o2000000;
const UV_POLL = 8; // uv_handle_type
const UV_READABLE = 1;

/** "more": the batch limit was hit; "data": read something, then EAGAIN; "idle": nothing there; "stop": the loop ends. */
export type DrainResult = "more" | "data" | "idle" | "stop";

/** How an idle reader waits for its fd (see the header). */
export type FdWaitMode = "uv" | "pool";

export interface FdReaderOptions {
  /** Safety-net poll timeout ("pool" only). Default 200 ms. */
  pollTimeoutMs?: number;
  /** Busy-poll window after traffic, microseconds (see the header). Default WEFTNET_BUSY_POLL_US, else 0 ("uv") / 1000 ("pool"). */
  busyPollUs?: number;
  /** Wait mode. Default WEFTNET_FD_WAIT, else "uv" where available. */
  wait?: FdWaitMode;
}

export function defaultBusyPollUs(mode: FdWaitMode = "pool"): number {
  const v = Number(process.env.WEFTNET_BUSY_POLL_US);
  if (process.env.WEFTNET_BUSY_POLL_US !== undefined && Number.isFinite(v) && v >= 0) return v;
  return mode === "uv" ? 0 : 1000;
}

/**
 * libuv's poll handle through the node binary's own exports (koffi.load(null) = the running process). One
 * registered callback pair per module instance; callbacks find their reader by the handle's address.
 */
interface UvPoll {
  handleSize: number;
  /** handle address -> what to call when libuv reports it readable (status < 0: an error) */
  watchers: Map<number, (status: number) => void>;
  /** handle address -> what to call once libuv let go of the handle */
  closers: Map<number, () => void>;
  init(handle: Uint8Array, fd: number): number;
  start(handle: Uint8Array): number;
  stop(handle: Uint8Array): number;
  close(handle: Uint8Array): void;
  strerror(rc: number): string;
}

let uvPoll: UvPoll | null | undefined;

/** The uv_poll binding, or null where it cannot work (not Node's main thread, symbols missing). */
export function uvPollBinding(c: BaseLibc = baseLibc()): UvPoll | null {
  if (uvPoll !== undefined) return uvPoll;
  uvPoll = null;
  if (!isMainThread || typeof process.versions.uv !== "string" || process.versions.bun || (globalThis as { Deno?: unknown }).Deno) return null;
  try {
    const k = c.koffi;
    const self = k.load(null as unknown as string);
    const loop = self.func("void *uv_default_loop(void)")() as unknown;
    const handleSize = Number(self.func("size_t uv_handle_size(int type)")(UV_POLL));
    if (!loop || !(handleSize > 0 && handleSize <= 4096)) return null;
    const pollInit = self.func("int uv_poll_init(void *loop, void *handle, int fd)");
    const PollCb = k.proto("void", ["uintptr_t", "int", "int"]);
    const CloseCb = k.proto("void", ["uintptr_t"]);
    const pollStart = self.func("uv_poll_start", "int", ["void *", "int", k.pointer(PollCb)]);
    const pollStop = self.func("int uv_poll_stop(void *handle)");
    const uvClose = self.func("uv_close", "void", ["void *", k.pointer(CloseCb)]);
    const uvStrerror = self.func("const char *uv_strerror(int err)");
    const watchers = new Map<number, (status: number) => void>();
    const closers = new Map<number, () => void>();
    // Called by libuv on this (the JS) thread, outside any JS frame and outside a callback scope: must never
    // throw, and must run what it queued (a drain's promise jobs, the close promise's continuation) itself,
    // or that would wait for the next unrelated callback (seconds on an idle agent).
    const onPoll = k.register((h: number | bigint, status: number) => {
      answer.until = 0;
      answer.inCallback = true;
      try {
        watchers.get(Number(h))?.(status);
      } catch {
        /* the reader reports its own errors */
      }
      runJobs();
      answer.inCallback = false;
      // The drain (or the jobs it queued: the bulk link's flush) may have sent what expects an answer.
      if (answer.until > 0) waitForAnswer(c);
      answer.until = 0;
    }, k.pointer(PollCb));
    const onClose = k.register((h: number | bigint) => {
      const done = closers.get(Number(h));
      closers.delete(Number(h));
      try {
        done?.();
      } catch {
        /* see onPoll */
      }
      runJobs();
    }, k.pointer(CloseCb));
    uvPoll = {
      handleSize,
      watchers,
      closers,
      init: (h, fd) => pollInit(loop, h, fd) as number,
      start: (h) => pollStart(h, UV_READABLE, onPoll) as number,
      stop: (h) => pollStop(h) as number,
      close: (h) => uvClose(h, onClose),
      strerror: (rc) => uvStrerror(rc) as string,
    };
  } catch {
    uvPoll = null;
  }
  return uvPoll;
}

function waitModeOf(opt: FdWaitMode | undefined): FdWaitMode {
  const env = process.env.WEFTNET_FD_WAIT;
  return opt ?? (env === "pool" || env === "uv" ? env : "uv");
}

/**
 * Run queued promise jobs and nextTicks now, as Node does when a callback scope ends (process._tickCallback,
 * Node's runNextTicks; a setImmediate where a runtime lacks it). An error thrown there (an unhandled
 * rejection with no handler) is rethrown from a fresh callback so it is not lost in the FFI callback.
 */
const tickCallback = (process as { _tickCallback?: () => void })._tickCallback;
function runJobs(): void {
  if (typeof tickCallback !== "function") {
    setImmediate(() => {});
    return;
  }
  try {
    tickCallback.call(process);
  } catch (err) {
    setImmediate(() => {
      throw err;
    });
  }
}

/** Traffic seen by any reader of this process: until when idle drains spin instead of parking. */
const activity = { until: 0 };
const readers = new Set<FdReader>();

/**
 * Answer wait's CPU budget: the share of the time it may spin, and the burst (ms) it may spend at once
 * (WEFTNET_ANSWER_BURST_MS; tests raise it so a window is not cut by the budget).
 */
export const ANSWER_BUDGET = { share: 0.02, burstMs: envNumber("WEFTNET_ANSWER_BURST_MS", 20) };

function envNumber(name: string, fallback: number): number {
  const v = Number(process.env[name]);
  return process.env[name] !== undefined && Number.isFinite(v) && v >= 0 ? v : fallback;
}

/** Answer wait (see the header): the pending wait, the budget, and counters (`answerWaitStats()`). */
const answer = {
  enabled: process.env.WEFTNET_ANSWER_WAIT !== "0",
  /** only a send from inside a uv callback (the drain, its jobs) arms a wait: that callback's end runs it */
  inCallback: false,
  until: 0,
  tokens: ANSWER_BUDGET.burstMs,
  refilledAt: 0,
  waits: 0,
  answered: 0,
  refused: 0,
  spunMs: 0,
};

export interface AnswerWaitStats {
  enabled: boolean;
  /** waits run; of them ended by an answer; not run for lack of budget; time spent waiting (ms) */
  waits: number;
  answered: number;
  refused: number;
  spunMs: number;
}

export function answerWaitStats(): AnswerWaitStats {
  return { enabled: answer.enabled, waits: answer.waits, answered: answer.answered, refused: answer.refused, spunMs: answer.spunMs };
}

/** Turn the answer wait on or off (WEFTNET_ANSWER_WAIT=0 starts it off). */
export function setAnswerWait(on: boolean): void {
  answer.enabled = on;
  if (!on) answer.until = 0;
}

/**
 * Something just sent expects an answer within `windowMs` (see the header): the end of the current uv
 * callback waits for it on the CPU, within the budget. Cheap when called often (one comparison).
 */
export function expectAnswer(windowMs: number): void {
  if (!answer.enabled || !answer.inCallback || !(windowMs > 0)) return;
  const now = performance.now();
  const tokens = Math.min(ANSWER_BUDGET.burstMs, answer.tokens + (now - answer.refilledAt) * ANSWER_BUDGET.share);
  answer.tokens = tokens;
  answer.refilledAt = now;
  if (tokens <= 0) {
    answer.refused++;
    return;
  }
  answer.until = Math.max(answer.until, now + Math.min(windowMs, tokens));
}

/** Drain every reader without blocking until one reads something or the window ends (uv callbacks only). */
function waitForAnswer(c: BaseLibc): void {
  const start = performance.now();
  const until = answer.until;
  answer.until = 0;
  if (start >= until) return;
  answer.waits++;
  let now = start;
  let got = false;
  while (!got && now < until) {
    for (const r of readers) if (r.poke()) got = true;
    runJobs();
    if (got) break;
    c.schedYield();
    now = performance.now();
  }
  if (got) answer.answered++;
  const spent = performance.now() - start;
  answer.spunMs += spent;
  answer.tokens -= spent;
}

export class FdReader {
  private readonly pfd = Buffer.alloc(16); // struct pollfd[2] { int fd; short events; short revents; }
  private readonly wake = Buffer.alloc(8);
  private readonly efd: number;
  private readonly pollTimeoutMs: number;
  private readonly busyPollMs: number;
  private mode: FdWaitMode;
  /** "uv": the uv_poll_t (held until libuv's close callback), its address, whether uv_poll_init ran */
  private uvHandle: Buffer | undefined;
  private uvAddr = 0;
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
   * `drain` reads what is there (see DrainResult); `fail` is told when waiting keeps failing (the loop stops).
   * Throws when the eventfd cannot be made (the owner cleans up).
   */
  constructor(
    private readonly c: BaseLibc,
    private readonly fd: number,
    private readonly drain: () => DrainResult,
    private readonly fail: (err: Error) => void,
    opts: FdReaderOptions = {},
  ) {
    this.mode = waitModeOf(opts.wait);
    if (this.mode === "uv" && !uvPollBinding(c)) this.mode = "pool";
    this.efd = c.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (this.efd < 0) throw new Error(`eventfd failed: ${c.errnoName(c.errno())}`);
    this.pollTimeoutMs = Math.max(1, opts.pollTimeoutMs ?? 200);
    this.busyPollMs = Math.max(0, opts.busyPollUs ?? defaultBusyPollUs(this.mode)) / 1000;
    this.pfd.writeInt32LE(fd, 0);
    this.pfd.writeInt16LE(POLLIN, 4);
    this.pfd.writeInt32LE(this.efd, 8);
    this.pfd.writeInt16LE(POLLIN, 12);
    this.wake.writeBigUInt64LE(1n);
  }

  /** How this reader waits ("pool" also where "uv" was asked for but is not available). */
  get waitMode(): FdWaitMode {
    return this.mode;
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
    // A parked uv watcher would keep firing (level-triggered) while nobody reads: stop it.
    if (this.mode === "uv" && this.polling) this.uvStop();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    // An in-flight pool poll restarts the drain when it returns; otherwise start one now.
    if (!this.polling) this.schedule();
  }

  /**
   * Drain once without blocking, if this reader is parked on its uv watcher (not paused, closing, or
   * already scheduled); true if it read something. The watcher stays started. Used by the answer wait and
   * by owners that know data is there (the TUN right after a write: TunDevice.readNow).
   */
  poke(): boolean {
    if (this.mode !== "uv" || !this.polling || this.closing || this.paused || this.scheduled) return false;
    const r = this.drain();
    if (r === "idle" || r === "stop") return false;
    if (r === "more") this.schedule();
    return true;
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
    if (this.polling && this.mode === "uv") this.uvStop(); // read now; park again after the drain
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
    if (this.mode === "uv" && this.uvWait()) return;
    this.polling = true;
    this.c.pollAsync(this.pfd, 2, this.pollTimeoutMs, (err, rc) => {
      this.polling = false;
      if (this.closing) {
        this.finishClose();
        return;
      }
      if (err || rc < 0) {
        this.waitFailed(String(err ?? rc));
        return;
      }
      this.pollFailures = 0;
      if (!this.paused && !this.scheduled) this.run();
    });
  }

  /** EINTR or a transient failure: retry, but never spin; give up after 100 in a row. */
  private waitFailed(why: string): void {
    if (++this.pollFailures > 100) {
      readers.delete(this);
      this.fail(new Error(`waiting for the fd keeps failing: ${why}`));
      return;
    }
    if (!this.paused) setTimeout(() => this.schedule(), 10);
  }

  // ---- "uv": the event loop's epoll watches the fd ----------------------------------------------------

  /** Park on a uv_poll watcher; false: "uv" does not work for this fd (the reader switches to "pool"). */
  private uvWait(): boolean {
    const uv = uvPollBinding(this.c)!;
    if (!this.uvHandle) {
      const h = Buffer.allocUnsafeSlow(uv.handleSize).fill(0);
      const rc = uv.init(h, this.fd);
      if (rc < 0) {
        // e.g. EEXIST: something else in this process already watches the fd
        this.mode = "pool";
        return false;
      }
      this.uvHandle = h;
      this.uvAddr = this.c.addr(h);
      uv.watchers.set(this.uvAddr, this.uvReadable);
    }
    const rc = uv.start(this.uvHandle);
    if (rc < 0) {
      this.waitFailed(`uv_poll_start: ${uv.strerror(rc)}`);
      return true;
    }
    this.polling = true;
    return true;
  }

  private uvStop(): void {
    this.polling = false;
    if (this.uvHandle) uvPollBinding(this.c)!.stop(this.uvHandle);
  }

  /** libuv: the fd is readable (or status < 0: an error). On the JS thread, outside any JS frame. */
  private readonly uvReadable = (status: number): void => {
    if (!this.polling || this.closing) return;
    if (status < 0) {
      this.uvStop();
      this.waitFailed(`uv_poll: ${uvPollBinding(this.c)!.strerror(status)}`);
      return;
    }
    this.pollFailures = 0;
    if (this.paused || this.scheduled) return;
    // The watcher stays started: a drain that reads to EAGAIN leaves the fd unreadable, so it does not fire
    // again until the next packet, and an idle wake-up costs no uv_poll_stop/start calls (each FFI call is
    // ~10-15 us cold here). It is stopped only while the reader runs from setImmediate (batch limit,
    // busy-poll) and on pause/close.
    // Drain right here, in the poll phase: a setImmediate hop first cost ~50 us per cold wake on the 2-core
    // VM (bench:wake), and what the drain defers with setImmediate (the TUN write of received packets) still
    // runs in this same loop iteration. The dispatcher (onPoll) then runs the promise jobs and nextTicks the
    // drain queued (the bulk link flushes sealed frames from a microtask), as a callback scope's end would.
    this.run();
  };

  /** Stop the loop; resolves once nothing waits on the fd (then the owner may close it). */
  close(): Promise<void> {
    if (this.closePromise) return this.closePromise;
    this.closing = true;
    readers.delete(this);
    this.closePromise = new Promise<void>((resolve) => {
      this.resolveClose = resolve;
    });
    if (this.uvHandle) {
      // libuv owns the handle's memory until its close callback: keep the buffer referenced until then.
      const uv = uvPollBinding(this.c)!;
      const h = this.uvHandle;
      this.polling = false;
      uv.watchers.delete(this.uvAddr);
      uv.closers.set(this.uvAddr, () => {
        void h;
        this.uvHandle = undefined;
        this.finishClose();
      });
      uv.stop(h);
      uv.close(h);
    } else if (this.polling) this.c.write(this.efd, this.wake, 8); // the poll callback finishes the close
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
