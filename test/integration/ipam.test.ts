/**
 * IPAM through the real mesh: 5 agents (werift on loopback, real signaling server) agree on blocks of one
 * range, keep them across a restart, reclaim a stopped agent's free blocks with exactly one heir, and
 * keep the blocks holding its pods for it.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { Cluster, fullMesh, startServer, waitFor } from "../helpers/cluster.js";

const TOKEN = "ipam-integration-token";
// R = 10 s, M = 2 s: the heir is the lowest id heard within W = R - M; with W = 4 s (R = 5 s) a loaded box
// (load average 11-13, 4 agents in this one process) let two agents each count itself heir and split the
// promises (safe — each block version is promised once — but not "exactly one heir", and slow to agree)
const IPAM = { reclaimAfterMs: 10_000, safetyMarginMs: 2000, resyncMs: 800, claimSettleMs: 500, bootstrapWaitMs: 500 };

const owners = (a: Agent) => new Map(a.ipamStatus().blocks.filter((b) => b.owner).map((b) => [b.cidr, b.owner]));

describe("IPAM over the mesh", () => {
  let c: Cluster;
  let agents: Agent[];

  beforeAll(async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    agents = [];
    for (const n of ["i1", "i2", "i3", "i4", "i5"]) agents.push(await c.agent(n, { ipam: IPAM }));
    await waitFor(() => fullMesh(agents), 30_000, "full mesh");
  }, 60_000);
  afterAll(async () => c?.cleanup());

  it("five agents get disjoint blocks of one range and allocate from them", async () => {
    const addrs = await Promise.all(agents.map((a, i) => a.allocate(`pod-${i}`, 20_000)));
    for (const [i, a] of addrs.entries()) {
      expect(a.ip).toMatch(/^10\.40\./);
      expect(agents[i]!.ipam.localBlocks()).toContain(a.block);
    }
    expect(new Set(addrs.map((a) => a.ip)).size).toBe(5);
    const blocks = agents.map((a) => a.ipam.localBlocks());
    const all = blocks.flat();
    expect(new Set(all).size).toBe(all.length); // no block owned twice
    for (const b of all) expect(b).toMatch(/\/26$/);
    // same pod id, same address (idempotent)
    expect((await agents[0]!.allocate("pod-0")).ip).toBe(addrs[0]!.ip);
    // every node converges to the same ownership view
    await waitFor(() => agents.every((a) => JSON.stringify([...owners(a)].sort()) === JSON.stringify([...owners(agents[0]!)].sort())), 10_000, "same view everywhere");
    const st = agents[0]!.ipamStatus();
    expect(st.range).toBe("10.40.0.0/16");
    expect(st.blocks.find((b) => b.cidr === addrs[1]!.block)).toMatchObject({ owner: agents[1]!.id, reachable: true });
  }, 40_000);

  it("a restarted agent keeps its blocks and its pods keep their addresses", async () => {
    const old = agents[2]!;
    const before = await old.allocate("pod-2");
    const { stateDir, name } = old.cfg;
    await old.stop();
    // what it held when it stopped (read before, a grant to a peer still in flight could complete meanwhile)
    const blocks = old.ipam.localBlocks();
    expect(blocks).toContain(before.block);
    const again = await c.agent(name!, { stateDir, ipam: IPAM });
    agents[2] = again;
    expect(again.id).toBe(old.id);
    expect(again.ipam.localBlocks()).toEqual(blocks);
    // (the first full mesh of this file gets 30 s too; failed once at 20 s at load ~10: say who lacked whom)
    await waitFor(() => fullMesh(agents), 30_000, "mesh again").catch(async (e: Error) => {
      throw new Error(`${e.message}: ${JSON.stringify(await Promise.all(agents.map(async (a) => ({ [a.name]: (await a.mesh.status()).filter((p) => p.state !== "connected").map((p) => `${p.name} ${p.state} ${p.lastError ?? ""}`) }))))}`);
    });
    const after = await again.allocate("pod-2", 20_000);
    expect(after.ip).toBe(before.ip);
  }, 60_000);

  it("a stopped agent's free blocks are reclaimed by exactly one heir; the blocks holding its pods stay its own, and it comes back with them", async () => {
    // the founder owns most of the range: many free blocks, and one pinned block with pod-0
    const gi = agents.map((a) => a.ipam.localBlocks().length).reduce((best, n, i, all) => (n > all[best]! ? i : best), 0);
    const gone = agents[gi]!;
    const pod = await gone.allocate(`pod-${gi}`);
    const pinned = gone.ipamStatus().blocks.filter((b) => b.mine && b.kind === "p").map((b) => b.cidr);
    expect(pinned).toContain(pod.block);
    const free = gone.ipam.localBlocks().filter((b) => !pinned.includes(b));
    expect(free.length).toBeGreaterThan(0);
    const { stateDir, name } = gone.cfg;
    await gone.stop();
    const live = agents.filter((a) => a !== gone);
    await waitFor(
      () => live.every((a) => { const own = owners(a); return free.every((b) => { const o = own.get(b); return o !== undefined && o !== gone.id; }); }),
      // ~1000 claimed blocks, each with a majority's signed promises to verify, for 4 agents in this one
      // process: 11-18 s here at load average 4-10, but past 60 s at 11-15 (2 of 2 runs on main)
      150_000,
      "reclaim of the stopped agent's free blocks",
    );
    await waitFor(() => { const ref = owners(live[0]!); return live.every((a) => { const own = owners(a); return free.every((b) => own.get(b) === ref.get(b)); }); }, 60_000, "agreement on the heir").catch((e: Error) => {
      // which blocks the live agents still disagree on, and their owners in each view
      const views = live.map(owners);
      const split = free.filter((b) => new Set(views.map((v) => v.get(b))).size > 1);
      throw new Error(`${e.message}: ${split.length} blocks differ, e.g. ${JSON.stringify(split.slice(0, 3).map((b) => [b, views.map((v) => v.get(b)?.slice(0, 6))]))}; claims ${JSON.stringify(live.map((a) => a.ipamStatus().counters.claims))}`);
    });
    const ref = owners(live[0]!);
    const heirs = new Set(free.map((b) => ref.get(b)));
    // (if not: who heard whom, and each one's claim counter — the heir is the lowest id heard within W)
    const diag = live.map((a) => ({ id: a.id, claims: a.ipamStatus().counters.claims, heard: a.ipamStatus().peers.map((p) => [p.id.slice(0, 6), p.heardAgoMs]) }));
    expect(heirs.size, JSON.stringify({ heirs: [...heirs], diag })).toBe(1);
    const heir = live.find((a) => heirs.has(a.id))!;
    for (const b of free) expect(heir.ipam.localBlocks()).toContain(b);
    for (const a of live) if (a !== heir) for (const b of free) expect(a.ipam.localBlocks()).not.toContain(b);
    for (const a of live) { const own = owners(a); for (const b of pinned) expect(own.get(b)).toBe(gone.id); } // reserved for its pods
    const again = await c.agent(name!, { stateDir, ipam: IPAM });
    agents[gi] = again;
    expect((await again.allocate(`pod-${gi}`, 2000)).ip).toBe(pod.ip);
    expect(again.ipamStatus().counters.revoked).toBe(0);
    for (const a of agents) expect(a.ipamStatus().counters.forged).toBe(0); // honest signed state all verified
  }, 240_000);

  it("refuses an agent started with a different range, with a clear error", async () => {
    const odd = await c.agent("odd", { ipam: { ...IPAM, range: "10.99.0.0/16" } });
    await waitFor(() => odd.mesh.connectedPeers().length > 0, 15_000, "odd agent links up");
    await waitFor(() => odd.ipamStatus().conflicts.length > 0 || agents.some((a) => a.ipamStatus().conflicts.length > 0), 10_000, "range conflict reported");
    const conflict = [...odd.ipamStatus().conflicts, ...agents.flatMap((a) => a.ipamStatus().conflicts)][0]!;
    expect(conflict.code).toBe("ERR_RANGE_MISMATCH");
    expect(conflict.message).toMatch(/10\.99\.0\.0\/16|10\.40\.0\.0\/16/);
    await expect(odd.allocate("x", 1500)).rejects.toThrow();
    await odd.stop();
  }, 40_000);
});
