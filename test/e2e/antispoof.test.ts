/**
 * End to end (root): cryptokey routing against the real kernel. Two nodes on a LAN, pods on each.
 *   - a pod cannot send with another address: not another pod's of its own node (only the host veth
 *     filter can see that), not one of the other node's blocks, not an outside address;
 *   - a node cannot make another route link-local / cloud metadata (169.254.169.254), the other's own LAN
 *     or the signaling server into the mesh, even when that one accepts every advertised route;
 *   - honest pod-to-pod traffic keeps flowing.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

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
  const lab = new MeshLab(2);
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");
  let pods: { a1: { ip: string; name: string }; a2: { ip: string; name: string }; a3: { ip: string; name: string }; b1: { ip: string; name: string } };

  beforeAll(async () => {
    await lab.setup();
    const [n1, n2] = lab.nodes as [LabNode, LabNode];
    await lab.startSignal();
    // n1 is the "rogue": it advertises metadata, n2's LAN and the signaling server's address.
    lab.startAgent(n1, ["--advertise-routes", `169.254.169.254/32,${lab.signalAddr}/32,172.31.0.0/16`]);
    lab.startAgent(n2, ["--accept-routes", "all"]);
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
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
});
