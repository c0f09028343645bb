/**
 * End to end (root): cryptokey routing against the real kernel. Two nodes on a LAN, pods on each.
 *   - a pod cannot send with another address: not another pod's of its own node (only the host veth
 *     filter can see that), not one of the other node's blocks, not an outside address;
 *   - a node cannot make another route link-local / cloud metadata (169.254.169.254), the other's own LAN
 *     or the signaling server into the mesh, even when that one accepts every advertised route;
 *   - a rogue agent (a real agent process with the token, test/e2e/rogue-agent.ts) that injects spoofed
 *     frames on its link to a victim — another node as source, inner sources outside its blocks, inner
 *     destinations not the victim's, forged, altered and replayed end-to-end-sealed frames — gets every one
 *     dropped and counted by type on the victim, and none reaches a pod (counted by iptables in the pods);
 *   - honest pod-to-pod traffic keeps flowing, during the attack too.
 */
import { type ChildProcess } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { spawnInNetns, stopChild } from "../helpers/netns.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";
import { SPORT, type RogueConfig } from "./rogue-agent.js";

const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping anti-spoofing e2e: needs root");

async function pingOk(ns: string, to: string, from?: string): Promise<boolean> {
  try {
    const { stdout } = await sh(ns, "ping", ["-c", "2", "-i", "0.2", "-W", "1", ...(from ? ["-I", from] : []), to], 8000);
    return /[1-9] received/.test(stdout);
  } catch {
    return false;
  }
}

d("anti-spoofing (cryptokey routing)", () => {
  const lab = new MeshLab(3); // n3: the rogue agent of the last test (started there)
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");
  let pods: { a1: { ip: string; name: string }; a2: { ip: string; name: string }; a3: { ip: string; name: string }; b1: { ip: string; name: string } };

  beforeAll(async () => {
    await lab.setup();
    const [n1, n2] = lab.nodes as [LabNode, LabNode];
    await lab.startSignal();
    // n1 is the "rogue": it advertises metadata, n2's LAN and the signaling server's address.
    lab.startAgent(n1, ["--advertise-routes", `169.254.169.254/32,${lab.signalAddr}/32,172.31.0.0/16`]);
    lab.startAgent(n2, ["--accept-routes", "all"]);
    await until(async () => (await Promise.all([n1, n2].map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
    pods = { a1: await lab.addPod(n1, "a1"), a2: await lab.addPod(n1, "a2"), a3: await lab.addPod(n1, "a3"), b1: await lab.addPod(n2, "b1") };
    await until(async () => (await pingOk(pods.a1.name, pods.b1.ip)) || undefined, 30_000, "pod a1 -> pod b1", dump);
  }, 90_000);
  afterAll(async () => lab.close(), 60_000);

  it("a pod cannot send with another pod's, another node's or an outside address; its own still works", async () => {
    const { a1, a2, a3, b1 } = pods;
    const otherBlock = b1.ip.replace(/\.(\d+)$/, (_m, x) => `.${(Number(x) % 250) + 2}`); // an address of n2's block
    for (const spoof of [a2.ip, otherBlock, "192.0.2.77"]) {
      await sh(a1.name, "ip", ["addr", "add", `${spoof}/32`, "dev", "eth0"]).catch(() => undefined);
      expect(await pingOk(a1.name, b1.ip, spoof), `spoofed source ${spoof}`).toBe(false);
      // (to a third pod: pinging the spoofed address itself would stay inside a1)
      expect(await pingOk(a1.name, a3.ip, spoof), `spoofed source ${spoof} to a pod of the same node`).toBe(false);
    }
    expect(await pingOk(a1.name, b1.ip)).toBe(true);
    expect(await pingOk(a1.name, a2.ip)).toBe(true);
    // the host veth filter counted them
    const [n1] = lab.nodes as [LabNode];
    const { stdout } = await sh(n1.ns, "ebtables", ["-L", "WEFTNET-POD", "--Lc"]);
    const counts = [...stdout.matchAll(/pcnt = (\d+)/g)].map((m) => Number(m[1]));
    expect(counts.reduce((a, b) => a + b, 0)).toBeGreaterThan(0);
  }, 60_000);

  it("advertised metadata, server and LAN addresses are never installed by a node that accepts all routes", async () => {
    const [, n2] = lab.nodes as [LabNode, LabNode];
    const st = await until(
      async () => {
        const s = await lab.status(n2);
        return s.dataplane?.routes.length ? s : undefined;
      },
      20_000,
      "route decisions on n2",
      dump,
    );
    const byCidr = new Map(st.dataplane!.routes.map((r) => [r.cidr, r]));
    expect(byCidr.get("169.254.169.254/32")).toMatchObject({ accepted: false, reason: expect.stringMatching(/link-local/) });
    expect(byCidr.get(`${lab.signalAddr}/32`)).toMatchObject({ accepted: false });
    expect(byCidr.get("172.31.0.0/16")).toMatchObject({ accepted: true });
    const { stdout } = await sh(n2.ns, "ip", ["route", "show"]);
    expect(stdout).not.toMatch(/169\.254\.169\.254/);
    expect(stdout).toMatch(/172\.31\.0\.0\/16 dev weft0/);
    // a pod on n2 does not reach the metadata address through the mesh
    expect(await pingOk(pods.b1.name, "169.254.169.254")).toBe(false);
    expect(st.dataplane!.drops["spoofed-node"] ?? 0).toBe(0);
  }, 60_000);

  it("a rogue agent's spoofed frames (another source node, foreign inner source or destination, forged, altered, replayed sealed frames) are dropped and counted; pod traffic flows on", async () => {
    const [n1, n2, n3] = lab.nodes as [LabNode, LabNode, LabNode];
    const { a1, b1 } = pods;
    const [s1, s2] = [await lab.status(n1), await lab.status(n2)];
    // count what reaches the pods: one rule per attack (udp source port) to port 9999, no target
    for (const pod of [a1.name, b1.name]) for (const sport of Object.values(SPORT)) await sh(pod, "iptables", ["-w", "-A", "INPUT", "-p", "udp", "--dport", "9999", "--sport", String(sport)]);
    const reached = async (pod: string) => {
      const { stdout } = await sh(pod, "iptables", ["-w", "-L", "INPUT", "-v", "-x", "-n"]);
      const m = new Map<number, number>();
      for (const line of stdout.split("\n")) {
        const r = /^\s*(\d+)\s+\d+\s+(?:udp|17)\s.*spt:(\d+) dpt:9999/.exec(line); // (iptables-nft -n prints the protocol number)
        if (r) m.set(Number(r[2]), Number(r[1]));
      }
      return m;
    };
    const drops0 = s2.dataplane!.drops;
    mkdirSync(n3.stateDir, { recursive: true });
    const rounds = 20;
    const cfg: RogueConfig = { signal: `ws://${lab.signalAddr}:7000`, token: lab.token, stateDir: n3.stateDir, victim: s2.node.id, honest: s1.node.id, honestStateDir: n1.stateDir, honestPodIp: a1.ip, victimPodIp: b1.ip, rounds, intervalMs: 250 };
    const cfgPath = join(lab.root, "rogue.json");
    writeFileSync(cfgPath, JSON.stringify(cfg));
    const procs = new Set<ChildProcess>();
    const logPath = join(lab.root, "rogue.log");
    const rogue = spawnInNetns(n3.ns, process.execPath, [join(process.cwd(), "dist", "test", "e2e", "rogue-agent.js"), cfgPath], logPath, procs);
    const lines = () => {
      try {
        return readFileSync(logPath, "utf8").split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l) as { ready?: boolean; done?: boolean; error?: string; sent?: Record<string, number> });
      } catch {
        return [];
      }
    };
    const rogueDump = () => `--- rogue\n${lab.log("rogue.log")}\n${dump()}`;
    try {
      await until(async () => lines().some((l) => l.ready || l.error), 90_000, "the rogue agent linked to the victim", rogueDump);
      expect(lines().find((l) => l.error)?.error).toBeUndefined();
      // honest pod traffic during the attack (20 rounds x 250 ms)
      const honest = sh(a1.name, "ping", ["-c", "25", "-i", "0.2", "-W", "1", b1.ip], 30_000).then((r) => r.stdout, (e: { stdout?: string }) => e.stdout ?? "");
      const done = await until(async () => lines().find((l) => l.done || l.error), 90_000, "the rogue's attack rounds", rogueDump);
      expect(done.error).toBeUndefined();
      const sent = done.sent!;
      const received = Number(/(\d+) received/.exec(await honest)?.[1] ?? 0);
      expect(received, "honest pings a1 -> b1 during the attack (of 25)").toBeGreaterThanOrEqual(20);
      expect(await pingOk(a1.name, b1.ip)).toBe(true);
      // every kind was sent, and the victim dropped each under its own reason
      for (const k of ["spoofed-node", "spoofed-source", "foreign-destination", "sealed-genuine", "sealed-replay", "sealed-altered", "sealed-forged"]) expect(sent[k], k).toBeGreaterThan(0);
      const drops = await until(
        async () => {
          const d = (await lab.status(n2)).dataplane!.drops;
          const delta = (r: keyof typeof d) => (d[r] ?? 0) - (drops0[r] ?? 0);
          return delta("spoofed-node") > 0 && delta("spoofed-source") > 0 && delta("foreign-destination") > 0 && delta("bad-seal") > 0 && delta("replayed") > 0 ? d : undefined;
        },
        10_000,
        "the victim's drop counters",
        rogueDump,
      );
      const delta = (r: keyof typeof drops) => (drops[r] ?? 0) - (drops0[r] ?? 0);
      // (the packets channel is unreliable: a frame may be lost, never counted twice)
      expect(delta("spoofed-node")).toBeLessThanOrEqual(sent["spoofed-node"]!);
      expect(delta("spoofed-node")).toBeGreaterThanOrEqual(Math.ceil(sent["spoofed-node"]! / 2));
      expect(delta("spoofed-source")).toBeGreaterThanOrEqual(Math.ceil(sent["spoofed-source"]! / 2));
      expect(delta("foreign-destination")).toBeGreaterThanOrEqual(Math.ceil(sent["foreign-destination"]! / 2));
      expect(delta("bad-seal")).toBeGreaterThanOrEqual(Math.ceil((sent["sealed-altered"]! + sent["sealed-forged"]!) / 2));
      expect(delta("replayed")).toBeGreaterThanOrEqual(Math.ceil(sent["sealed-replay"]! / 2));
      // nothing spoofed reached a pod; the genuine sealed frames did (the counting works), each at most once
      const [inA, inB] = [await reached(a1.name), await reached(b1.name)];
      for (const sport of [SPORT.spoofedNode, SPORT.spoofedSource, SPORT.foreignDest, SPORT.altered, SPORT.forged]) {
        expect(inB.get(sport) ?? 0, `victim pod, attack sport ${sport}`).toBe(0);
        expect(inA.get(sport) ?? 0, `honest pod, attack sport ${sport}`).toBe(0);
      }
      expect(inB.get(SPORT.genuine) ?? 0, `genuine sealed frames in the victim pod; victim drops ${JSON.stringify(drops)} before ${JSON.stringify(drops0)}, sent ${JSON.stringify(sent)}`).toBeGreaterThan(0);
      expect(inB.get(SPORT.genuine) ?? 0, "a replayed sealed frame was delivered").toBeLessThanOrEqual(sent["sealed-genuine"]!);
      // the victim keeps its link to the honest node
      expect((await lab.status(n2)).peers.find((p) => p.id === s1.node.id)?.state).toBe("connected");
    } finally {
      await stopChild(rogue, 10_000);
      for (const p of procs) p.kill("SIGKILL");
    }
  }, 240_000);
});
