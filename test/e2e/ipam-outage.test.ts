/**
 * IPAM across a real outage (root): three agents in namespaces (test/e2e/mesh-lab.ts) with a short
 * --reclaim-after R. A node with 20 pods is cut off (iptables: nothing in or out of its uplink, so no
 * WebRTC, no signaling, no relay) for 2 x R, then healed (issue 15):
 *   - the other two keep allocating meanwhile; the cut-off node's pinned blocks show as reserved, not reclaimed;
 *   - after the heal all 20 pods keep their addresses (nothing revoked) and answer pings from another node's pod;
 *   - no address is held twice, and the three block tables converge;
 *   - allocation on a node with free space in its own blocks answers at once during the cut, right after
 *     the heal (while it reconnects and resyncs) and right after its own restart: every probe allocates
 *     and frees one address, so the free space stays the same; latencies are printed and bounded.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath } from "../../agent/state.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping IPAM outage e2e: needs root (network namespaces, TUN, iptables)");

const R_MS = 15_000;
const PODS = 20;
/** The issue's requirement: allocation from a node's own blocks never waits (< 1 s; measured 3-120 ms
 *  median on a quiet box, ~500-800 ms on a box loaded with other test runs, where the bridge/route
 *  commands of each allocation are the slow part). The bounds leave room for a loaded 2-core box and are
 *  still far below what waiting looks like (the old resync pause was 15-25 s; U here is 15 s). */
const MEDIAN_BOUND_MS = 2000;
const MAX_BOUND_MS = 5000;

interface IpamView {
  canAllocate: boolean;
  reason: string | null;
  blocks: { cidr: string; owner: string; version: number; kind: string; mine: boolean; free: number | null }[];
  allocations: { podId: string; ip: string }[];
  ownership: { lease: boolean; membersHeard: number; members: number; reason: string | null };
  reserved: { cidr: string; owner: string; silentMs: number | null }[];
  members: { id: string; silentMs: number | null }[];
  counters: { revoked: number; claims: number };
  id: string;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

d("IPAM: a node cut off for 2 x --reclaim-after keeps its pods' addresses", () => {
  const lab = new MeshLab(3);
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");
  const api = <T>(n: LabNode, method: "GET" | "POST", path: string, body?: unknown, timeoutMs = 40_000) => apiRequest<T>(apiSocketPath(n.stateDir), method, path, body, timeoutMs);
  const ipam = (n: LabNode) => api<IpamView>(n, "GET", "/v1/ipam", undefined, 10_000);
  const args = ["--range", "10.40.0.0/22", "--block-size", "28", "--reclaim-after", `${R_MS / 1000}s`];
  let cut: (() => void) | undefined;

  /** Allocate and free one address on n; returns the allocation's latency as the caller sees it. */
  const probe = async (n: LabNode, tag: string): Promise<number> => {
    const t0 = performance.now();
    await api(n, "POST", "/v1/ipam/allocate", { podId: `probe-${tag}`, timeoutMs: 20_000 });
    const ms = performance.now() - t0;
    await api(n, "POST", "/v1/ipam/free", { podId: `probe-${tag}` });
    return ms;
  };
  const connected = async (n: LabNode, count: number) => (await lab.status(n)).peers.filter((p) => p.state === "connected").length === count;
  const pingable = async (from: string, ip: string) => (await sh(from, "ping", ["-c", "1", "-W", "1", ip], 5000)).stdout.includes("1 received");

  beforeAll(async () => {
    await lab.setup();
    await lab.startSignal();
    for (const n of lab.nodes) lab.startAgent(n, args);
    await until(async () => (await Promise.all(lab.nodes.map((n) => connected(n, 2)))).every(Boolean), 60_000, "full mesh", dump);
  }, 90_000);
  afterAll(async () => {
    try {
      cut?.();
    } catch {
      /* namespace already gone */
    }
    await lab.close();
  }, 60_000);

  it("pods keep their addresses and connectivity across the outage; allocation never waits", async () => {
    const [n1, n2, n3] = lab.nodes as [LabNode, LabNode, LabNode];
    // 20 pods on n3, one on n1 to ping them from (one at a time: concurrent pod adds race in ebtables,
    // see NOTES.md "ipam -> trust")
    const pods: { name: string; ip: string }[] = [];
    for (let k = 0; k < PODS; k++) {
      const name = `wl-${lab.id}-q${k}`;
      n3.pods.push(name);
      pods.push({ name, ip: (await api<{ ip: string }>(n3, "POST", "/v1/pods", { name }, 60_000)).ip });
    }
    n1.pods.push(`wl-${lab.id}-pinger`);
    const pinger = (await api<{ ip: string; netns: string }>(n1, "POST", "/v1/pods", { name: `wl-${lab.id}-pinger` }, 60_000)).netns;
    expect(new Set(pods.map((p) => p.ip)).size).toBe(PODS);
    for (const p of pods) await until(() => pingable(pinger, p.ip), 30_000, `n1 pod -> ${p.ip} before the cut`, dump);
    // n3 keeps free pinned space (the reserve): allocation there needs nobody
    await until(async () => (await ipam(n3)).canAllocate, 30_000, "n3 has free pinned space", dump);
    const before = new Map((await ipam(n3)).allocations.map((a) => [a.podId, a.ip]));
    const n3id = (await ipam(n3)).id;

    // ---- cut n3 off: nothing in or out of its uplink
    const rules = [
      ["INPUT", "-i", "uplink", "-j", "DROP"],
      ["OUTPUT", "-o", "uplink", "-j", "DROP"],
    ];
    const ipt = (op: string, r: string[]) => sh(n3.ns, "iptables", [op, ...r]);
    for (const r of rules) await ipt("-I", r);
    const tCut = Date.now();
    cut = () => {
      for (const r of rules) void ipt("-D", r).catch(() => undefined);
    };

    const during: number[] = [];
    for (let k = 0; k < 3; k++) during.push(await probe(n3, `cut-${k}`));
    // the others allocate meanwhile (n2 needs new blocks: a grant with the majority n1+n2)
    const others: string[] = [];
    for (let k = 0; k < 16; k++) {
      for (const n of [n1, n2]) others.push((await api<{ ip: string }>(n, "POST", "/v1/ipam/allocate", { podId: `other-${n.name}-${k}`, timeoutMs: 30_000 })).ip);
    }
    // n1 sees n3 silent past R and keeps its pinned blocks reserved for it (not reclaimed)
    const seen = await until(
      async () => {
        const v = await ipam(n1);
        const silent = v.members.find((m) => m.id === n3id)?.silentMs ?? 0;
        return silent >= R_MS && v.reserved.some((r) => r.owner === n3id) ? v : undefined;
      },
      3 * R_MS,
      "n1 to list n3's blocks as reserved after R of silence",
      dump,
    );
    const reservedForN3 = seen.reserved.filter((r) => r.owner === n3id).map((r) => r.cidr);
    const cutView = await ipam(n3);
    expect(cutView.ownership.lease).toBe(false);
    expect(cutView.ownership.reason).toMatch(/no majority: 1 of 3 members heard/);
    expect(cutView.canAllocate).toBe(true);
    while (Date.now() - tCut < 2 * R_MS) await new Promise((r) => setTimeout(r, 500));
    for (let k = 3; k < 5; k++) during.push(await probe(n3, `cut-${k}`));
    const cutMs = Date.now() - tCut;

    // ---- heal; probe allocation on n3 while it reconnects and resyncs
    cut();
    cut = undefined;
    const tHeal = Date.now();
    const afterHeal: number[] = [];
    let reconnectMs: number | null = null;
    while (Date.now() - tHeal < 12_000 || reconnectMs === null) {
      afterHeal.push(await probe(n3, `heal-${afterHeal.length}`));
      if (reconnectMs === null && (await connected(n3, 2))) reconnectMs = Date.now() - tHeal;
      if (Date.now() - tHeal > 60_000) throw new Error(`n3 did not reconnect within 60 s of the heal\n${dump()}`);
      await new Promise((r) => setTimeout(r, 400));
    }

    // all 20 keep their addresses and answer from another node's pod
    const v3 = await ipam(n3);
    expect(v3.counters.revoked).toBe(0);
    for (const [podId, ip] of before) expect(v3.allocations.find((a) => a.podId === podId)?.ip, podId).toBe(ip);
    for (const p of pods) await until(() => pingable(pinger, p.ip), 30_000, `n1 pod -> ${p.ip} after the heal`, dump);
    // one table everywhere, and no address held twice
    const table = (v: IpamView) => JSON.stringify(v.blocks.map((b) => [b.owner, b.version, b.kind]));
    const views = await until(
      async () => {
        const vs = await Promise.all(lab.nodes.map(ipam));
        return new Set(vs.map(table)).size === 1 ? vs : undefined;
      },
      30_000,
      "one block table on all three nodes",
      dump,
    );
    const held = views.flatMap((v) => v.allocations.map((a) => a.ip));
    expect(new Set(held).size).toBe(held.length);
    for (const ip of others) expect(held).toContain(ip);
    for (const v of views) expect(v.counters.revoked).toBe(0);

    // ---- restart n3: allocate as soon as its API answers
    await lab.stopAgent(n3);
    lab.startAgent(n3, args);
    const tStart = Date.now();
    await until(async () => (await lab.status(n3)) !== undefined, 30_000, "n3's API after the restart", dump);
    const apiMs = Date.now() - tStart;
    const afterRestart: number[] = [];
    for (let k = 0; k < 8; k++) {
      afterRestart.push(await probe(n3, `restart-${k}`));
      await new Promise((r) => setTimeout(r, 400));
    }
    const after = await ipam(n3);
    for (const [podId, ip] of before) expect(after.allocations.find((a) => a.podId === podId)?.ip, podId).toBe(ip);
    await until(() => connected(n3, 2), 60_000, "n3 reconnected after its restart", dump);
    for (const p of pods.slice(0, 4)) await until(() => pingable(pinger, p.ip), 30_000, `n1 pod -> ${p.ip} after n3's restart`, dump);

    const fmt = (xs: number[]) => `n=${xs.length} median ${median(xs).toFixed(0)} ms, max ${Math.max(...xs).toFixed(0)} ms [${xs.map((x) => x.toFixed(0)).join(" ")}]`;
    console.log(
      [
        `ipam outage e2e: R=${R_MS / 1000}s, cut ${(cutMs / 1000).toFixed(1)} s, n3 reconnected ${((reconnectMs ?? 0) / 1000).toFixed(1)} s after the heal; blocks reserved for n3 on n1: ${reservedForN3.join(",")}`,
        `  n3 allocation latency during the cut:        ${fmt(during)}`,
        `  n3 allocation latency in 12 s after heal:    ${fmt(afterHeal)}`,
        `  n3 allocation latency after restart (API up ${apiMs} ms): ${fmt(afterRestart)}`,
        `  others allocated during the cut: ${others.length}, addresses held in the cluster: ${held.length}, all distinct`,
      ].join("\n"),
    );
    for (const xs of [during, afterHeal, afterRestart]) {
      expect(median(xs)).toBeLessThan(MEDIAN_BOUND_MS);
      expect(Math.max(...xs)).toBeLessThan(MAX_BOUND_MS);
    }
  }, 240_000);
});
