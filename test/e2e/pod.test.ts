/**
 * Pods against the real kernel (root). A throwaway "node" namespace wn-<random> gets a plain tun as
 * weft0 and the node network (NodeNetwork, with FORWARD policy DROP to prove the WEFTNET-FWD chain lets
 * pod traffic through); pods are further namespaces wn-<random>-pN wired to the node's bridge. The code
 * under test runs host-side commands with `ip -n <node>` (the hostNetns option).
 */
import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import { customAlphabet } from "nanoid";
import { hasIptables, isRoot } from "../helpers/netns.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NodeNetwork } from "../../agent/os/netconf.js";
import { addPod, checkPod, delPod, listPods, podVethName, PodError, type PodSpec } from "../../agent/os/pod.js";

if (!isRoot) console.warn("test/e2e/pod.test.ts: skipped, needs root (creates network namespaces and veth pairs)");

const suffix = customAlphabet("abcdefghijklmnopqrstuvwxyz0123456789", 8);
const id = suffix();
const sh = (args: string[]) => execFileSync("ip", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
/** Names only: operstate/carrier of the bridge changes asynchronously as ports come and go. */
const netnsList = () =>
  sh(["netns", "list"])
    .split("\n")
    .map((l) => l.split(" ")[0])
    .filter((n) => n?.startsWith(`wn-${id}`)) // other test files make namespaces concurrently
    .sort()
    .join(" ");
const hostLinks = (node: string) =>
  (JSON.parse(sh(["-n", node, "-j", "link"])) as { ifname: string }[])
    .map((l) => l.ifname)
    .sort()
    .join(" ");

function ping(fromNs: string, to: string): { ok: boolean; out: string } {
  try {
    const out = execFileSync("ip", ["netns", "exec", fromNs, "ping", "-c", "2", "-i", "0.2", "-W", "2", to], { encoding: "utf8", timeout: 10_000, stdio: ["ignore", "pipe", "pipe"] });
    return { ok: true, out };
  } catch (e) {
    return { ok: false, out: String((e as { stdout?: string }).stdout ?? e) };
  }
}

describe.skipIf(!isRoot)("pods on the node bridge (root, real kernel)", () => {
  const node = `wn-${id}`;
  const made = new Set<string>([node]);
  const pod = (n: number) => {
    const name = `wn-${id}-p${n}`;
    made.add(name);
    return name;
  };
  let net: NodeNetwork;
  const base = (n: number, ip: string): PodSpec => ({ netns: { name: pod(n) }, ip, prefixLen: 26, gateway: "10.40.3.1", hostNetns: node });

  beforeAll(async () => {
    sh(["netns", "add", node]);
    sh(["-n", node, "tuntap", "add", "dev", "weft0", "mode", "tun"]);
    // a firewall that drops forwarded traffic (as Docker's FORWARD policy does); br_netfilter, when
    // loaded, sends bridged pod-to-pod frames through it too
    if (hasIptables) execFileSync("ip", ["netns", "exec", node, "iptables", "-P", "FORWARD", "DROP"]);
    net = new NodeNetwork({ tunName: "weft0", netns: node });
    await net.apply({ clusterRanges: ["10.40.0.0/16"], localBlocks: ["10.40.3.0/26"] });
  });

  afterAll(async () => {
    await net?.teardown().catch(() => undefined);
    for (const n of made) {
      try {
        sh(["netns", "del", n]);
      } catch {
        /* not there */
      }
    }
  });

  it("two pods reach each other and the gateway; check and list see them", async () => {
    const a = await addPod(base(1, "10.40.3.5"));
    const b = await addPod(base(2, "10.40.3.6"));
    expect(a.hostVeth).toBe(podVethName(`${pod(1)}/eth0`));
    expect(a.hostVeth).toMatch(/^wp[0-9a-f]{10}$/);
    expect(a.createdNetns).toBe(true);
    expect(a.mac).toMatch(/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/);
    expect(a.netnsPath).toBe(`/run/netns/${pod(1)}`);

    const inner = JSON.parse(sh(["-n", pod(1), "-j", "addr", "show", "dev", "eth0"]))[0];
    expect(inner.mtu).toBe(1400);
    expect(inner.address).toBe(a.mac);
    expect(inner.addr_info.some((x: { local: string }) => x.local === "10.40.3.5")).toBe(true);
    expect(sh(["-n", pod(1), "route", "show", "default"])).toMatch(/default via 10\.40\.3\.1 dev eth0/);
    expect(sh(["-n", node, "link", "show", a.hostVeth])).toMatch(/master weft-br0 .*state UP|master weft-br0/);

    const ab = ping(pod(1), "10.40.3.6");
    expect(ab.ok, ab.out).toBe(true);
    const ba = ping(pod(2), "10.40.3.5");
    expect(ba.ok, ba.out).toBe(true);
    const gw = ping(pod(1), "10.40.3.1");
    expect(gw.ok, gw.out).toBe(true);

    expect(await checkPod(base(1, "10.40.3.5"))).toEqual({ ok: true, problems: [] });
    const listed = await listPods({ hostNetns: node });
    expect(listed.map((p) => [p.hostVeth, p.netns, p.ip, p.bridge, p.up])).toEqual(
      [
        [a.hostVeth, pod(1), "10.40.3.5", "weft-br0", true],
        [b.hostVeth, pod(2), "10.40.3.6", "weft-br0", true],
      ].sort((x, y) => String(x[0]).localeCompare(String(y[0]))),
    );

    // CHECK reports what is wrong
    sh(["-n", node, "link", "set", a.hostVeth, "down"]);
    sh(["-n", pod(1), "route", "del", "default"]);
    const bad = await checkPod(base(1, "10.40.3.5"));
    expect(bad.ok).toBe(false);
    expect(bad.problems).toEqual([`host interface ${a.hostVeth} is down`, "no default route via 10.40.3.1 dev eth0"]);
    expect((await checkPod({ ...base(1, "10.40.3.7") })).problems).toContain("eth0 lacks 10.40.3.7/26 (has 10.40.3.5/26)");
  });

  it("delPod removes the pod and is idempotent; unknown pods delete fine", async () => {
    const hostVeth = podVethName(`${pod(1)}/eth0`);
    await delPod({ netns: { name: pod(1) }, hostNetns: node, deleteNetns: true });
    expect(hostLinks(node)).not.toContain(hostVeth);
    expect(netnsList()).not.toContain(pod(1));
    await delPod({ netns: { name: pod(1) }, hostNetns: node, deleteNetns: true });
    await delPod({ netns: { name: pod(99) }, hostNetns: node, deleteNetns: true });
    await delPod({ netns: { path: "/run/netns/does-not-exist" }, hostNetns: node });

    // without deleteNetns the namespace stays, only the network goes
    await delPod({ netns: { name: pod(2) }, hostNetns: node });
    expect(netnsList()).toContain(pod(2));
    expect(sh(["-n", pod(2), "-br", "link"])).not.toMatch(/eth0/);
    expect(await listPods({ hostNetns: node })).toEqual([]);
  });

  it("a namespace given by path (as a container runtime does) works and is never deleted by us", async () => {
    const name = pod(3);
    sh(["netns", "add", name]);
    const spec: PodSpec = { netns: { path: `/run/netns/${name}` }, podId: "container-abc/eth0", ip: "10.40.3.9", prefixLen: 26, gateway: "10.40.3.1", hostNetns: node };
    const r = await addPod(spec);
    expect(r.hostVeth).toBe(podVethName("container-abc/eth0"));
    expect(r.createdNetns).toBe(false);
    const gw = ping(name, "10.40.3.1");
    expect(gw.ok, gw.out).toBe(true);
    expect((await checkPod(spec)).ok).toBe(true);
    await delPod({ ...spec, deleteNetns: true });
    await delPod({ ...spec, deleteNetns: true });
    expect(netnsList()).toContain(name);
    expect(hostLinks(node)).not.toContain(r.hostVeth);
    await expect(addPod({ ...spec, netns: { path: "/run/netns/wn-missing-" + id } })).rejects.toMatchObject({ code: "ERR_POD_NO_NETNS" });
  });

  it("pods survive an agent restart: teardown detaches them, the next apply attaches them again", async () => {
    const a = await addPod(base(8, "10.40.3.20"));
    await addPod(base(9, "10.40.3.21"));
    await net.teardown();
    expect(sh(["-n", node, "link", "show", a.hostVeth])).not.toMatch(/master/);
    net = new NodeNetwork({ tunName: "weft0", netns: node });
    const { changes } = await net.apply({ clusterRanges: ["10.40.0.0/16"], localBlocks: ["10.40.3.0/26"] });
    expect(changes).toContain(`attach pod veth ${a.hostVeth} to weft-br0`);
    const p = ping(pod(8), "10.40.3.21");
    expect(p.ok, p.out).toBe(true);
    expect((await checkPod(base(8, "10.40.3.20"))).ok).toBe(true);
    await delPod({ netns: { name: pod(8) }, hostNetns: node, deleteNetns: true });
    await delPod({ netns: { name: pod(9) }, hostNetns: node, deleteNetns: true });
  });

  it("concurrent adds, from this process and from other processes (as CNI ADDs run), each get their anti-spoofing filter", async () => {
    // ebtables-nft commits against a cached ruleset: unserialised, a concurrent change failed with exit 4
    const rules = () => execFileSync("ip", ["netns", "exec", node, "ebtables", "-L", "WEFTNET-POD"], { encoding: "utf8" });
    const inProc = [30, 31, 32, 33].map((n) => base(n, `10.40.3.${n}`));
    const child = (n: number) =>
      new Promise<void>((resolve, reject) => {
        const spec = JSON.stringify(base(n, `10.40.3.${n}`));
        const code = `import(${JSON.stringify(new URL("../../dist/agent/os/pod.js", import.meta.url).pathname)}).then((m) => m.addPod(${spec}))`;
        execFile("node", ["--input-type=module", "-e", code], { timeout: 60_000 }, (err, _out, stderr) => (err ? reject(new Error(`child add ${n}: ${stderr || err}`)) : resolve()));
      });
    const results = await Promise.allSettled([...inProc.map((s) => addPod(s)), child(34), child(35), child(36)]);
    const failed = results.filter((r): r is PromiseRejectedResult => r.status === "rejected").map((r) => String(r.reason));
    expect(failed).toEqual([]);
    const listing = rules();
    for (const n of [30, 31, 32, 33, 34, 35, 36]) {
      const veth = podVethName(`${pod(n)}/eth0`);
      expect(listing, veth).toContain(`-p IPv4 -i ${veth} --ip-src ! 10.40.3.${n} -j DROP`);
      expect(listing.split("\n").filter((l) => l.includes(`-i ${veth} `)).length, veth).toBe(2);
    }
    await Promise.all([30, 31, 32, 33, 34, 35, 36].map((n) => delPod({ netns: { name: pod(n) }, hostNetns: node, deleteNetns: true })));
    expect(rules()).not.toMatch(/-i wp/);
  });

  it("a failed add leaves nothing behind", async () => {
    const linksBefore = hostLinks(node);
    const nsBefore = netnsList();

    // invalid gateway: the kernel refuses the default route after the veth exists -> everything undone
    const e1 = await addPod({ ...base(4, "10.40.3.10"), gateway: "10.99.0.1" }).catch((e: unknown) => e);
    expect(e1).toBeInstanceOf(PodError);
    expect(e1).toMatchObject({ code: "ERR_POD_COMMAND", message: expect.stringMatching(/default route.*nothing was left behind/) });
    expect(hostLinks(node)).toBe(linksBefore);
    expect(netnsList()).toBe(nsBefore);

    // the bridge does not exist: fails at the last step
    const e2 = await addPod({ ...base(5, "10.40.3.11"), bridge: "no-such-br" }).catch((e: unknown) => e);
    expect(e2).toMatchObject({ code: "ERR_POD_COMMAND", message: expect.stringContaining("no-such-br") });
    expect(hostLinks(node)).toBe(linksBefore);
    expect(netnsList()).toBe(nsBefore);

    // host veth name already used by something that is not ours: refused, and that thing is untouched
    sh(["-n", node, "link", "add", "wpbusy", "type", "veth", "peer", "name", "wpbusy-peer"]);
    const withBusy = hostLinks(node);
    const e3 = await addPod({ ...base(6, "10.40.3.12"), hostVeth: "wpbusy" }).catch((e: unknown) => e);
    expect(e3).toMatchObject({ code: "ERR_POD_EXISTS" });
    expect(hostLinks(node)).toBe(withBusy);
    expect(netnsList()).toBe(nsBefore);
    // ...and delPod will not delete an interface it did not create
    await expect(delPod({ netns: { name: pod(6) }, hostVeth: "wpbusy", hostNetns: node })).rejects.toMatchObject({ code: "ERR_POD_NOT_OURS" });
    expect(hostLinks(node)).toContain("wpbusy");
    sh(["-n", node, "link", "del", "wpbusy"]);

    // the same pod twice: the second add fails and does not disturb the first
    const ok = await addPod(base(7, "10.40.3.13"));
    const e4 = await addPod(base(7, "10.40.3.13")).catch((e: unknown) => e);
    expect(e4).toMatchObject({ code: "ERR_POD_EXISTS" });
    expect((await checkPod(base(7, "10.40.3.13"))).ok).toBe(true);
    await delPod({ netns: { name: pod(7) }, hostNetns: node, deleteNetns: true });
    expect(hostLinks(node)).not.toContain(ok.hostVeth);
    expect(fs.existsSync(`/run/netns/${pod(7)}`)).toBe(false);
  });
});
