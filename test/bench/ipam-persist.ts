/**
 * npm run bench:ipam-persist [-- --nodes 3 --burst 200 --rounds 3] [--driver path/to/dist/agent/ipam.js]
 *
 * What persisting the IPAM state costs the event loop (issue 15): N IpamDrivers (agent/ipam.ts, the real
 * driver with its real state files under $TMPDIR, fsync included) in one process, linked by an in-process
 * mesh that delivers IPAM messages on the next turn of the event loop. Phases:
 *   start   from creation until every node has allocated its first address (founding, block grants and
 *           the gossip around them: the "first 10 s after start" of the CPU profiles)
 *   burst   every node allocates --burst addresses at once (a wave of CNI ADDs), then frees them
 * Per phase it prints the event loop's busy time (perf_hooks eventLoopUtilization: everything the loop ran,
 * persistence included), the wall time, the state files written, the loop time inside persistence itself
 * (burst; only where the driver counts it: the asynchronous writer's snapshot + write start — with one
 * synchronous write per change it is most of the busy time), and allocation latency p50/p99 (burst).
 * --driver loads another build's IpamDriver (e.g. main before the change) for a same-run comparison; the
 * rounds alternate nothing themselves: run both builds back to back, several rounds each, and compare
 * ratios (the box is shared: absolute figures are noisy). Never fails on a time.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { performance } from "node:perf_hooks";
import type { IpamDriver as Driver } from "../../agent/ipam.js";
import { silentLogger } from "../../src/log.js";
import type { MeshManager } from "../../src/mesh/manager.js";

const { values } = parseArgs({
  options: {
    nodes: { type: "string", default: "3" },
    burst: { type: "string", default: "200" },
    rounds: { type: "string", default: "3" },
    driver: { type: "string" },
  },
});
const N = Number(values.nodes);
const BURST = Number(values.burst);
const ROUNDS = Number(values.rounds);
const modPath = values.driver ? pathToFileURL(resolve(values.driver)).href : "../../agent/ipam.js";
const { IpamDriver } = (await import(modPath)) as { IpamDriver: typeof Driver };

const ids = Array.from({ length: N }, (_, i) => (0xa0 + i).toString(16).padStart(16, "0"));
const pct = (xs: number[], p: number) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))]! : NaN);
const f1 = (x: number) => x.toFixed(1);

interface Phase {
  busyMs: number;
  wallMs: number;
  writes: number;
  /** event-loop time inside persistence itself (snapshot + starting the write), where the driver counts it (asynchronous writer); NaN otherwise */
  persistMs: number;
}
const persistLoopMs = (drivers: Driver[]) => drivers.reduce((a, d) => a + ((d as { writer?: { counters: { loopMs: number } } }).writer?.counters.loopMs ?? NaN), 0);
function measure<T>(drivers: Driver[], f: () => Promise<T>): Promise<[T, Phase]> {
  const writes0 = drivers.reduce((a, d) => a + d.counters.persists, 0);
  const p0 = persistLoopMs(drivers);
  const elu0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  return f().then(async (r) => {
    // the last writes of the phase (asynchronous after the change) belong to it
    await Promise.all(drivers.map((d) => (d as { flushed?: () => Promise<void> }).flushed?.()));
    const elu = performance.eventLoopUtilization(elu0);
    return [r, { busyMs: elu.active, wallMs: performance.now() - t0, writes: drivers.reduce((a, d) => a + d.counters.persists, 0) - writes0, persistMs: persistLoopMs(drivers) - (drivers.length ? p0 : 0) }];
  });
}

async function round(): Promise<{ start: Phase; burst: Phase; p50: number; p99: number }> {
  const dirs = ids.map(() => mkdtempSync(join(tmpdir(), "weft-bench-persist-")));
  const handlers = new Map<string, { app?: (from: string, body: unknown) => void; up?: (p: string) => void }>();
  const drivers: Driver[] = [];
  let down = false; // teardown: messages still on their way are dropped
  const mesh = (self: string) => {
    const h: { app?: (from: string, body: unknown) => void; up?: (p: string) => void } = {};
    handlers.set(self, h);
    return {
      onPeerUp: (f: (p: string) => void) => (h.up = f),
      onPeerDown() {},
      onApp: (_ch: string, f: (from: string, body: unknown) => void) => (h.app = f),
      sendApp: (to: string, _ch: string, body: unknown) => {
        const copy = JSON.parse(JSON.stringify(body)) as unknown; // a message crosses a wire
        setImmediate(() => !down && handlers.get(to)?.app?.(self, copy));
        return true;
      },
    } as unknown as MeshManager;
  };
  const timer = setInterval(() => drivers.forEach((d) => d.tick()), 200);
  try {
    const [, start] = await measure(drivers, async () => {
      ids.forEach((id, i) => drivers.push(new IpamDriver({ id, mayFound: () => i === 0, range: "10.40.0.0/16", blockPrefix: 24, resyncMs: 1000, claimSettleMs: 500, bootstrapWaitMs: 500 }, dirs[i]!, mesh(id), silentLogger)));
      for (const a of ids) for (const b of ids) if (a !== b) handlers.get(a)!.up?.(b);
      await Promise.all(drivers.map((d, i) => d.allocate(`first/${i}`, 120_000)));
    });
    const lat: number[] = [];
    const [, burst] = await measure(drivers, async () => {
      await Promise.all(
        drivers.flatMap((d, i) =>
          Array.from({ length: BURST }, async (_, k) => {
            const t0 = performance.now();
            await d.allocate(`pod/${i}/${k}`, 120_000);
            lat.push(performance.now() - t0);
          }),
        ),
      );
      for (const [i, d] of drivers.entries()) for (let k = 0; k < BURST; k++) d.release(`pod/${i}/${k}`);
    });
    return { start, burst, p50: pct(lat, 0.5), p99: pct(lat, 0.99) };
  } finally {
    clearInterval(timer);
    down = true;
    await Promise.all(drivers.map((d) => (d as { close?: () => Promise<void> }).close?.()));
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  }
}

console.log(`bench:ipam-persist  driver=${values.driver ?? "this build"}  nodes=${N} burst=${BURST}/node  state dir=${tmpdir()}`);
console.log("round  start: busy ms  wall ms  writes | burst: busy ms  wall ms  writes  persist ms  alloc p50 ms  p99 ms");
const all: Awaited<ReturnType<typeof round>>[] = [];
for (let r = 0; r < ROUNDS; r++) {
  const x = await round();
  all.push(x);
  console.log(`${String(r + 1).padStart(5)}  ${f1(x.start.busyMs).padStart(13)}  ${f1(x.start.wallMs).padStart(7)}  ${String(x.start.writes).padStart(6)} | ${f1(x.burst.busyMs).padStart(13)}  ${f1(x.burst.wallMs).padStart(7)}  ${String(x.burst.writes).padStart(6)}  ${f1(x.burst.persistMs).padStart(10)}  ${f1(x.p50).padStart(12)}  ${f1(x.p99).padStart(6)}`);
}
const med = (f: (x: (typeof all)[number]) => number) => f1(pct(all.map(f), 0.5));
console.log(`median start: busy ${med((x) => x.start.busyMs)} ms, writes ${med((x) => x.start.writes)}; burst: busy ${med((x) => x.burst.busyMs)} ms, wall ${med((x) => x.burst.wallMs)} ms, writes ${med((x) => x.burst.writes)}, alloc p50 ${med((x) => x.p50)} ms p99 ${med((x) => x.p99)} ms`);
