/**
 * End to end (root): hybrid networks. Node n1 advertises a LAN (192.168.77.0/24 with a host that runs no
 * weftnet) with SNAT; a pod on n2 reaches that host through the mesh. n2 then also advertises an
 * overlapping prefix: the conflict is reported on both sides and no receiver installs either (the lower
 * node id wins nothing).
 */
import { execFileSync } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping advertised-routes e2e: needs root");

d("advertised routes", () => {
  const lab = new MeshLab(2);
  const host = `wl-${lab.id}-lanhost`;
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");
  const ip = (args: string[]) => execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });

  beforeAll(async () => {
    await lab.setup();
    const [n1] = lab.nodes as [LabNode, LabNode];
    // A LAN behind n1 with a plain host on it (no weftnet, no route back to the cluster range).
    ip(["netns", "add", host]);
    ip(["-n", host, "link", "set", "lo", "up"]);
    ip(["-n", n1.ns, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", host]);
    ip(["-n", n1.ns, "addr", "add", "192.168.77.1/24", "dev", "lan0"]);
    ip(["-n", n1.ns, "link", "set", "lan0", "up"]);
    ip(["-n", host, "addr", "add", "192.168.77.2/24", "dev", "eth0"]);
    ip(["-n", host, "link", "set", "eth0", "up"]);
    await lab.startSignal();
    lab.startAgent(n1, ["--advertise-routes", "192.168.77.0/24", "--snat-routes", "--cluster", "home"]);
    lab.startAgent(lab.nodes[1]!, ["--cluster", "cloud", "--accept-routes", "192.168.0.0/16"]);
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
  }, 60_000);
  afterAll(async () => {
    await lab.close();
    try {
      ip(["netns", "del", host]);
    } catch {
      /* gone */
    }
  }, 60_000);

  it("a pod on another node reaches a host on the advertised LAN (SNAT at the gateway)", async () => {
    const [n1, n2] = lab.nodes as [LabNode, LabNode];
    const pod = await lab.addPod(n2, "adv");
    await until(async () => (await sh(n2.ns, "ip", ["route", "show", "192.168.77.0/24"])).stdout.includes("weft0"), 20_000, "route to the advertised LAN on n2", dump);
    await until(async () => (await sh(pod.name, "ping", ["-c", "1", "-W", "1", "192.168.77.2"], 5000)).stdout.includes("1 received"), 20_000, "pod -> LAN host", dump);
    const st = await lab.status(n1);
    expect(st.routes).toMatchObject({ advertised: ["192.168.77.0/24"], inForce: ["192.168.77.0/24"], snat: true });
    expect(st.node.cluster).toBe("home");
    expect(await lab.cli(n2, ["status"])).toMatch(/cluster home/);
  }, 60_000);

  it("an overlapping advertisement is reported on both sides, naming both, and not won by either", async () => {
    const [n1, n2] = lab.nodes as [LabNode, LabNode];
    await lab.stopAgent(n2);
    lab.startAgent(n2, ["--advertise-routes", "192.168.77.128/25", "--cluster", "cloud", "--accept-routes", "192.168.0.0/16"]);
    const both = await until(
      async () => {
        const [a, b] = await Promise.all([lab.status(n1), lab.status(n2)]);
        return a.routes.conflicts.length && b.routes.conflicts.length ? { a, b } : undefined;
      },
      30_000,
      "route conflict reported on both sides",
      dump,
    );
    for (const [s, route, other] of [[both.a, "192.168.77.0/24", "192.168.77.128/25"], [both.b, "192.168.77.128/25", "192.168.77.0/24"]] as const) {
      expect(s.routes.conflicts).toEqual([expect.objectContaining({ route, other })]);
      expect(s.routes.inForce).toEqual([route]); // nobody withdraws: the lower node id wins nothing
    }
    // n2 installs neither: the route to the LAN is gone from its kernel
    await until(async () => !(await sh(n2.ns, "ip", ["route", "show", "192.168.77.0/24"])).stdout.includes("weft0"), 20_000, "n2 drops the contested route", dump);
    expect(lab.log(`${n1.name}.log`)).toMatch(/overlaps .* install neither/);
  }, 60_000);
});
