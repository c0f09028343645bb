/**
 * Coalesced, asynchronous, atomic snapshot file (the IPAM state, agent/ipam.ts).
 *
 *   markDirty()   the state changed: returns its generation and schedules a write (setImmediate, so a burst
 *                 of changes handled in one turn of the event loop is one snapshot)
 *   flushed(gen)  resolves once a snapshot taken at or after `gen` is on disk (the barrier before an address
 *                 leaves the process); rejects if the write covering it failed
 *   onDurable(f)  f(gen) after every successful write: what waited for that state may leave now
 *   close()       writes what is dirty and waits for it (agent stop)
 *
 * At most one write is in flight; changes made meanwhile are written next, from the latest state (one
 * snapshot() per write, not per change). A write goes to `<path>.tmp-<pid>-<n>`, is fsynced, renamed over
 * `path`, then the directory is fsynced: a crash at any point leaves the previous file or the new one, never
 * a torn one (test/integration/snapshot-crash.test.ts kills a writer mid-loop). The disk work runs on libuv's
 * thread pool; the event loop only pays for snapshot() itself. A failed write is reported and retried
 * after `retryMs` while the state stays dirty.
 */
import { open, rename, unlink } from "node:fs/promises";
import { dirname } from "node:path";

/** write `data` to `path` atomically: temp file, fsync, rename, directory fsync (best effort) */
export async function writeFileAtomicAsync(path: string, data: string | Uint8Array, mode = 0o600, tmp = `${path}.tmp-${process.pid}-${Date.now()}`): Promise<void> {
  try {
    const fh = await open(tmp, "w", mode);
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
  try {
    const dh = await open(dirname(path), "r");
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  } catch {
    // directory fsync is best effort (not supported on every filesystem)
  }
}

export interface SnapshotWriterOptions {
  mode?: number;
  /** a write failed (it is retried after retryMs) */
  onError?(err: Error): void;
  retryMs?: number;
  /** the atomic write itself (tests inject failures); default writeFileAtomicAsync */
  write?(path: string, data: string | Uint8Array, mode: number): Promise<void>;
}

export class SnapshotWriter {
  /** generation of the latest change (markDirty) */
  requested = 0;
  /** generation known to be on disk */
  durable = 0;
  readonly counters = { writes: 0, errors: 0, bytes: 0, coalesced: 0, loopMs: 0 };
  private writing = false;
  private scheduled: { cancel(): void } | undefined;
  private waiters: { gen: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  private readonly durableListeners: ((gen: number) => void)[] = [];
  private closed = false;
  private seq = 0;

  constructor(
    readonly path: string,
    private readonly snapshot: () => string | Uint8Array,
    private readonly opts: SnapshotWriterOptions = {},
  ) {}

  markDirty(): number {
    if (this.closed) throw new Error(`snapshot writer for ${this.path} is closed`);
    if (this.requested > this.durable) this.counters.coalesced++;
    this.requested++;
    this.schedule();
    return this.requested;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** true while a change is not on disk yet */
  get pending(): boolean {
    return this.requested > this.durable;
  }

  flushed(gen = this.requested): Promise<void> {
    if (gen <= this.durable) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ gen, resolve, reject }));
  }

  onDurable(f: (gen: number) => void): void {
    this.durableListeners.push(f);
  }

  /** Write what is dirty, wait for it, and refuse further changes. */
  async close(): Promise<void> {
    const gen = this.requested;
    this.closed = true;
    if (gen > this.durable) {
      if (!this.writing) {
        this.scheduled?.cancel();
        this.scheduled = undefined;
        void this.run();
      }
      await this.flushed(gen);
    }
  }

  private schedule(delayMs = 0): void {
    if (this.writing || this.scheduled) return;
    if (delayMs > 0) {
      const t = setTimeout(() => this.start(), delayMs);
      this.scheduled = { cancel: () => clearTimeout(t) };
    } else {
      const t = setImmediate(() => this.start());
      this.scheduled = { cancel: () => clearImmediate(t) };
    }
  }

  private start(): void {
    this.scheduled = undefined;
    void this.run();
  }

  private async run(): Promise<void> {
    if (this.writing || this.requested <= this.durable) return;
    this.writing = true;
    const gen = this.requested;
    const t0 = performance.now();
    let failed: Error | undefined;
    try {
      const data = this.snapshot();
      this.counters.bytes += data.length;
      const write = this.opts.write ?? ((p, d, m) => writeFileAtomicAsync(p, d, m, `${p}.tmp-${process.pid}-${++this.seq}`));
      const p = write(this.path, data, this.opts.mode ?? 0o600);
      this.counters.loopMs += performance.now() - t0; // the synchronous part: snapshot + starting the write
      await p;
    } catch (e) {
      failed = e as Error;
    }
    this.writing = false;
    if (failed) {
      this.counters.errors++;
      const stale = this.waiters.filter((w) => w.gen <= gen);
      this.waiters = this.waiters.filter((w) => w.gen > gen);
      for (const w of stale) w.reject(failed);
      this.opts.onError?.(failed);
      if (this.closed) for (const w of this.waiters.splice(0)) w.reject(failed);
      else this.schedule(this.opts.retryMs ?? 1000);
      return;
    }
    this.counters.writes++;
    this.durable = Math.max(this.durable, gen);
    const ready = this.waiters.filter((w) => w.gen <= this.durable);
    this.waiters = this.waiters.filter((w) => w.gen > this.durable);
    for (const f of this.durableListeners) f(this.durable);
    for (const w of ready) w.resolve();
    if (this.requested > this.durable) {
      if (this.closed) void this.run();
      else this.schedule();
    }
  }
}
