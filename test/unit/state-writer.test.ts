// The IPAM state file's writer (agent/snapshot-writer.ts) and the driver's rule "on disk before it leaves"
// (agent/ipam.ts): coalesced asynchronous atomic writes, the durability barrier, held messages, failures.
// The crash half (kill -9 mid-write) is test/integration/snapshot-crash.test.ts.
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { IpamDriver } from "../../agent/ipam.js";
import { SnapshotWriter, writeFileAtomicAsync } from "../../agent/snapshot-writer.js";
import type { IpamOutput } from "../../src/ipam/index.js";
import { createLogger, silentLogger, type Logger } from "../../src/log.js";
import type { MeshManager } from "../../src/mesh/manager.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
const tmp = () => {
  const d = mkdtempSync(join(tmpdir(), "weft-state-writer-"));
  dirs.push(d);
  return d;
};

/** A write that waits until the test opens the gate (counts writes in flight at once). */
function gatedWrite() {
  const g = { open: undefined as (() => void) | undefined, started: 0, inFlight: 0, maxInFlight: 0, fail: 0 };
  const write = async (path: string, data: string | Uint8Array, mode: number) => {
    g.started++;
    g.maxInFlight = Math.max(g.maxInFlight, ++g.inFlight);
    try {
      await new Promise<void>((r) => (g.open = r));
      if (g.fail > 0) {
        g.fail--;
        throw new Error("injected: disk full");
      }
      await writeFileAtomicAsync(path, data, mode);
    } finally {
      g.inFlight--;
    }
  };
  return { g, write };
}

const until = async (f: () => boolean, what: string, ms = 10_000) => {
  const t0 = Date.now();
  while (!f()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
};

describe("SnapshotWriter", () => {
  it("coalesces a burst into one write of the latest state; flushed() resolves once it is on disk", async () => {
    const path = join(tmp(), "s.json");
    let state = 0;
    const w = new SnapshotWriter(path, () => JSON.stringify({ state }));
    for (let i = 0; i < 100; i++) {
      state = i;
      w.markDirty();
    }
    expect(existsSync(path)).toBe(false); // nothing written synchronously
    await w.flushed();
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: 99 });
    expect(w.counters.writes).toBe(1);
    expect(w.durable).toBe(100);
    expect(readdirSync(join(path, "..")).filter((n) => n.includes(".tmp-"))).toEqual([]);
  });

  it("keeps at most one write in flight; changes made meanwhile are written next, from the latest state", async () => {
    const path = join(tmp(), "s.json");
    const { g, write } = gatedWrite();
    let state = 0;
    const w = new SnapshotWriter(path, () => JSON.stringify({ state }), { write });
    state = 1;
    const g1 = w.markDirty();
    await until(() => g.started === 1, "first write");
    const first = w.flushed(g1);
    for (state = 2; state <= 5; state++) w.markDirty();
    state = 5;
    const last = w.flushed();
    g.open!();
    await first;
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: 1 });
    expect(w.pending).toBe(true);
    await until(() => g.started === 2, "second write");
    g.open!();
    await last;
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: 5 });
    expect(g.started).toBe(2); // four changes during the first write: one more write
    expect(g.maxInFlight).toBe(1);
    expect(w.pending).toBe(false);
  });

  it("a failed write rejects its waiters, leaves the previous file intact, and is retried", async () => {
    const path = join(tmp(), "s.json");
    writeFileSync(path, JSON.stringify({ state: "previous" }));
    const { g, write } = gatedWrite();
    const errors: string[] = [];
    let state = "new";
    const w = new SnapshotWriter(path, () => JSON.stringify({ state }), { write, retryMs: 20, onError: (e) => errors.push(e.message) });
    g.fail = 1;
    w.markDirty();
    const p = w.flushed();
    await until(() => g.started === 1, "first write");
    g.open!();
    await expect(p).rejects.toThrow("disk full");
    expect(errors).toEqual(["injected: disk full"]);
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: "previous" });
    expect(w.pending).toBe(true);
    state = "newer";
    const again = w.flushed();
    await until(() => g.started === 2, "the retry");
    g.open!();
    await again;
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: "newer" });
    expect(w.counters).toMatchObject({ writes: 1, errors: 1 });
  });

  it("a real write that fails (the temp file cannot be created) keeps the previous file and leaves no temp behind", async () => {
    const dir = tmp();
    const path = join(dir, "s.json");
    writeFileSync(path, "previous");
    // the temp file's name is taken by a directory: open(tmp, "w") fails with EISDIR, as root too
    const tmpName = `${path}.tmp-blocked`;
    const { mkdirSync } = await import("node:fs");
    mkdirSync(tmpName);
    await expect(writeFileAtomicAsync(path, "new", 0o600, tmpName)).rejects.toThrow();
    expect(readFileSync(path, "utf8")).toBe("previous");
    await writeFileAtomicAsync(path, "new", 0o600, `${path}.tmp-ok`);
    expect(readFileSync(path, "utf8")).toBe("new");
    expect(readdirSync(dir).sort()).toEqual(["s.json", "s.json.tmp-blocked"]);
  });

  it("close() writes what is dirty and waits for it", async () => {
    const path = join(tmp(), "s.json");
    let state = 1;
    const w = new SnapshotWriter(path, () => JSON.stringify({ state }));
    w.markDirty();
    state = 2;
    w.markDirty();
    await w.close();
    expect(JSON.parse(readFileSync(path, "utf8"))).toEqual({ state: 2 });
    expect(() => w.markDirty()).toThrow(/closed/);
  });
});

describe("IpamDriver persistence", () => {
  const sent: { to: string; body: unknown; onDisk: string }[] = [];
  afterEach(() => void sent.splice(0));
  function driver(dir: string, write?: ReturnType<typeof gatedWrite>["write"], log: Logger = silentLogger) {
    const path = join(dir, "ipam.json");
    const mesh = {
      onPeerUp() {},
      onPeerDown() {},
      onApp() {},
      sendApp(to: string, _ch: string, body: unknown) {
        sent.push({ to, body, onDisk: existsSync(path) ? readFileSync(path, "utf8") : "" });
        return true;
      },
    } as unknown as MeshManager;
    const d = new IpamDriver({ id: "00000000000000aa", range: "10.40.0.0/24", blockPrefix: 28, bootstrapWaitMs: 0 }, dir, mesh, log, Date.now, write ? { write, retryMs: 20 } : {});
    // the driver's step for one output of the IPAM core (what every mesh event and tick goes through)
    const apply = (out: Partial<IpamOutput>) => (d as unknown as { apply(o: IpamOutput): void }).apply({ send: [], persist: false, revoked: [], errors: [], ...out });
    return { d, apply, path };
  }

  it("an address is on disk when allocate() returns", async () => {
    const dir = tmp();
    const { d, path } = driver(dir);
    d.tick(); // founds a one-node cluster and pins a block
    d.tick();
    const a = await d.allocate("pod/a", 5_000);
    expect(JSON.stringify(JSON.parse(readFileSync(path, "utf8")))).toContain(a.ip);
    const [b, c] = await Promise.all([d.allocate("pod/b", 5_000), d.allocate("pod/c", 5_000)]);
    const onDisk = readFileSync(path, "utf8");
    expect(onDisk).toContain(b.ip);
    expect(onDisk).toContain(c.ip);
    await d.close();
  });

  it("allocate() waits for a slow write; messages wait for the write of the state they came from, in order", async () => {
    const dir = tmp();
    const { g, write } = gatedWrite();
    const { d, apply, path } = driver(dir, write);
    d.tick();
    d.tick();
    // let the founding writes through
    while (d.writer.pending) {
      await until(() => g.open !== undefined || !d.writer.pending, "a write");
      g.open?.();
      g.open = undefined;
      await new Promise((r) => setImmediate(r));
    }
    let done = false;
    const alloc = d.allocate("pod/slow", 5_000).then((a) => ((done = true), a));
    await until(() => g.open !== undefined, "the allocation's write");
    await new Promise((r) => setTimeout(r, 50));
    expect(done).toBe(false); // the address is not handed out before its write completes
    apply({ persist: true, send: [{ to: "p1", body: "after-change" }] });
    apply({ send: [{ to: "p2", body: "no-change-of-its-own" }] }); // must not overtake the held one
    expect(sent).toEqual([]);
    g.open!();
    g.open = undefined;
    const a = await alloc;
    expect(readFileSync(path, "utf8")).toContain(a.ip);
    expect(sent).toEqual([]); // produced after the change that is still being written
    await until(() => g.open !== undefined, "the next write");
    g.open!();
    await until(() => sent.length === 2, "held messages");
    expect(sent.map((s) => s.body)).toEqual(["after-change", "no-change-of-its-own"]);
    expect(d.counters.held).toBe(2);
    // nothing pending: messages leave at once
    apply({ send: [{ to: "p3", body: "direct" }] });
    expect(sent.map((s) => s.to)).toEqual(["p1", "p2", "p3"]);
  });

  it("a failing disk holds messages and fails allocations instead of handing out an address that is not on disk", async () => {
    const dir = tmp();
    const { g, write } = gatedWrite();
    const lines: string[] = [];
    const { d, apply } = driver(dir, write, createLogger({ level: "info", sink: (l) => lines.push(l) }));
    const pump = setInterval(() => g.open?.(), 5);
    try {
      d.tick();
      d.tick();
      await until(() => !d.writer.pending, "founding written");
      lines.splice(0);
      g.fail = 3;
      await expect(d.allocate("pod/x", 5_000)).rejects.toThrow("disk full");
      apply({ persist: true, send: [{ to: "p1", body: "m" }] });
      await until(() => sent.length === 1, "the message after the retries");
      expect(d.counters.persistErrors).toBe(3);
      // retried until it worked, said once, and once that it works again
      expect(lines.filter((l) => l.includes("cannot write the IPAM state"))).toHaveLength(1);
      expect(lines.filter((l) => l.includes("IPAM state written again"))).toHaveLength(1);
    } finally {
      clearInterval(pump);
    }
  });

  it("a restart loads the last complete write and removes temp files a crash left", async () => {
    const dir = tmp();
    const { d } = driver(dir);
    d.tick();
    d.tick();
    const a = await d.allocate("pod/a", 5_000);
    await d.close();
    writeFileSync(join(dir, "ipam.json.tmp-99999-7"), '{"torn":'); // a write killed mid-way
    const { d: again } = driver(dir);
    expect(again.node.allocations().get("pod/a")).toBe(a.ip);
    expect(readdirSync(dir).filter((n) => n.includes(".tmp-"))).toEqual([]);
  });
});
