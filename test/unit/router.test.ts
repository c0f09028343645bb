// Router (src/mesh/router.ts) over real MeshManagers on the in-memory transport: the data path's nextHop()
// never recomputes routes; gossip and new links ask the driver for a flush (onDirty) and the change shows
// once that flush runs; a lost link is applied in the peer-down event itself, so nextHop() never names a
// neighbour that is gone.
import { describe, expect, it } from "vitest";
import { silentLogger } from "../../src/log.js";
import { Router } from "../../src/mesh/router.js";
import type { MemoryLink } from "../../src/testing/memory-transport.js";
import { cluster, flush } from "../helpers/memory-mesh.js";

function routedMesh() {
  const c = cluster(3);
  const asked = new Set<Router>();
  const asks = new Map<Router, number>();
  const routers = new Map<string, Router>();
  for (const [id, m] of c.managers) {
    const r: Router = new Router({
      mesh: m,
      logger: silentLogger,
      now: () => c.clock.now,
      localPrefixes: () => [],
      onDirty: () => {
        asked.add(r);
        asks.set(r, (asks.get(r) ?? 0) + 1);
      },
    });
    routers.set(id, r);
  }
  /** the driver: run the flushes the routers asked for (the agent does this in a setImmediate) */
  const runAsked = () => {
    for (const r of [...asked]) {
      asked.delete(r);
      r.flush();
    }
  };
  const [a, b, d] = c.ids.map((x) => x.id) as [string, string, string];
  return { c, routers, asked, asks, runAsked, a, b, d, ra: routers.get(a)!, ma: c.managers.get(a)! };
}

/** advance the fake clock, tick the managers, deliver, run asked flushes until `done()` */
async function until(m: ReturnType<typeof routedMesh>, done: () => boolean, what: string, each?: () => void) {
  for (let t = 0; t < 120_000; t += 200) {
    if (done()) return;
    m.c.clock.now += 200;
    for (const mm of m.c.all) mm.tick();
    await flush();
    each?.();
    m.runAsked();
  }
  throw new Error(`not done after 120 s of fake time: ${what}`);
}

describe("Router: route recomputation off the packet path", () => {
  it("nextHop() never recomputes; gossip asks for one flush, and the flush applies the change", async () => {
    const m = routedMesh();
    const { c, ra, a, b, d } = m;
    c.welcome();
    const direct = () => [...m.routers].every(([self, r]) => [a, b, d].every((n) => n === self || r.route(n)?.nextHop === n));
    await until(m, direct, "every node routes every other directly");
    expect(ra.nextHop(d)).toBe(d);

    // a loses its link to d: applied in the peer-down event, before any flush the driver runs
    const flushesBefore = ra.counters.recomputes;
    (m.ma.link(d) as MemoryLink).close("test: link lost");
    expect(m.ma.isConnected(d)).toBe(false);
    expect(ra.counters.recomputes).toBeGreaterThan(flushesBefore);
    expect(ra.nextHop(d)).toBe(b); // via the neighbour that still reaches d, never d itself
    expect(ra.route(d)?.via).toBe(b);

    // the link comes back (the mesh redials): d's new record reaches a as gossip. Until a's flush runs,
    // nextHop() answers from the table it has, and asking it changes nothing.
    let sawGossipApplied = false;
    await until(
      m,
      () => ra.nextHop(d) === d,
      "a routes d directly again",
      () => {
        if (!m.asked.has(ra)) return;
        const before = ra.counters.recomputes;
        const hop = ra.nextHop(d);
        for (let i = 0; i < 50; i++) expect(ra.nextHop(d)).toBe(hop);
        expect(ra.counters.recomputes).toBe(before); // nextHop() never flushes
        expect(ra.dirty).toBe(true);
        expect(m.asks.get(ra)).toBeGreaterThan(0);
        m.asked.delete(ra);
        ra.flush();
        expect(ra.counters.recomputes).toBe(before + 1);
        expect(ra.dirty).toBe(false);
        if (hop === b && ra.nextHop(d) === d) sawGossipApplied = true;
      },
    );
    expect(sawGossipApplied).toBe(true);
    expect(ra.route(d)?.via).toBe("direct");
  });

  it("asks the driver once per flush, however much gossip arrives in between", async () => {
    const m = routedMesh();
    m.c.welcome();
    let maxAsksBetweenFlushes = 0;
    const counted = new Map<Router, number>();
    await until(
      m,
      () => m.c.all.every((x) => x.connectedPeers().length === 2) && [...m.routers.values()].every((r) => r.entries().length === 2),
      "mesh and routes formed",
      () => {
        for (const [r, n] of m.asks) {
          maxAsksBetweenFlushes = Math.max(maxAsksBetweenFlushes, n - (counted.get(r) ?? 0));
          counted.set(r, n);
        }
      },
    );
    expect(maxAsksBetweenFlushes).toBe(1);
    expect([...m.asks.values()].every((n) => n >= 1)).toBe(true);
  });
});
