/**
 * NodeNetwork against the real kernel (root). Everything happens inside a throwaway "node" namespace
 * wn-<random> (NodeNetwork's `netns` option runs `ip -n NS` / `ip netns exec NS`), never in the host's
 * root namespace. The node gets a plain tun (`ip tuntap add`) as its weft0 and, as a bystander that must
 * survive teardown, a veth pair with an address and a static route.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { customAlphabet } from "nanoid";
import { hasIptables, isRoot } from "../helpers/netns.js";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NodeNetwork, NetconfError, ROUTE_PROTO, BRIDGE_MARKER, FORWARD_CHAIN } from "../../agent/os/netconf.js";

if (!isRoot) console.warn("test/e2e/netconf.test.ts: skipped, needs root (creates network namespaces, bridges and routes)");

const suffix = customAlphabet("abcdefghijklmnopqrstuvwxyz0123456789", 8);
const sh = (args: string[]) => execFileSync("ip", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

describe.skipIf(!isRoot)("NodeNetwork (root, real kernel, inside a throwaway namespace)", () => {
  const ns = `wn-${suffix()}`;
  const ns2 = `wn-${suffix()}`;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "weft-netconf-"));
  const stateFile = path.join(tmp, "netconf.json");
  let before = "";

  /** Kernel state that teardown must restore exactly (the TUN keeps the MTU/up state we gave it). */
  const snapshot = (n = ns) =>
    [
      sh(["-n", n, "-br", "link"]).split("\n").filter((l) => !l.startsWith("weft0")).map((l) => l.replace(/\s+/g, " ")).join("\n"),
      sh(["-n", n, "-br", "-4", "addr"]),
      sh(["-n", n, "-4", "route", "show", "table", "all"]),
      sh(["netns", "exec", n, "cat", "/proc/sys/net/ipv4/ip_forward"]),
      hasIptables ? execFileSync("ip", ["netns", "exec", n, "iptables", "-S"], { encoding: "utf8" }) : "",
    ].join("\n---\n");

  const routes = () => JSON.parse(sh(["-n", ns, "-j", "-4", "route", "show", "table", "main", "proto", String(ROUTE_PROTO)]) || "[]") as { dst: string; dev: string }[];
  const brAddrs = () =>
    (JSON.parse(sh(["-n", ns, "-j", "-4", "addr", "show", "dev", "weft-br0"])) as { addr_info: { local: string; prefixlen: number }[] }[])[0]!.addr_info.map((a) => `${a.local}/${a.prefixlen}`).sort();

  beforeAll(() => {
    for (const n of [ns, ns2]) {
      sh(["netns", "add", n]);
      sh(["-n", n, "tuntap", "add", "dev", "weft0", "mode", "tun"]);
    }
    // bystanders
    sh(["-n", ns, "link", "add", "other0", "type", "veth", "peer", "name", "other1"]);
    sh(["-n", ns, "addr", "add", "192.168.77.1/24", "dev", "other0"]);
    sh(["-n", ns, "link", "set", "other0", "up"]);
    sh(["-n", ns, "link", "set", "other1", "up"]);
    sh(["-n", ns, "route", "add", "172.16.0.0/16", "via", "192.168.77.2", "proto", "static"]);
    if (hasIptables) execFileSync("ip", ["netns", "exec", ns, "iptables", "-A", "FORWARD", "-i", "other0", "-j", "DROP"]);
    before = snapshot();
  });

  afterAll(() => {
    for (const n of [ns, ns2]) {
      try {
        sh(["netns", "del", n]);
      } catch {
        /* already gone */
      }
    }
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const desired = { clusterRanges: ["10.40.0.0/16"], localBlocks: ["10.40.3.0/26"] };

  it("apply creates the bridge, the gateway address, the cluster route, forwarding, MTU", async () => {
    const net = new NodeNetwork({ tunName: "weft0", netns: ns, stateFile });
    const { changes } = await net.apply(desired);
    expect(changes).toEqual(
      expect.arrayContaining([
        "set tun weft0 mtu 1500 -> 1400",
        "set tun weft0 up",
        "create bridge weft-br0",
        "add address 10.40.3.1/26 to weft-br0 (block 10.40.3.0/26)",
        `add route 10.40.0.0/16 dev weft0 proto ${ROUTE_PROTO}`,
        "set net.ipv4.ip_forward 0 -> 1",
      ]),
    );
    const br = JSON.parse(sh(["-n", ns, "-j", "-d", "link", "show", "dev", "weft-br0"]))[0];
    expect(br.linkinfo.info_kind).toBe("bridge");
    expect(br.ifalias).toBe(BRIDGE_MARKER);
    expect(br.mtu).toBe(1400);
    expect(br.flags).toContain("UP");
    expect(JSON.parse(sh(["-n", ns, "-j", "link", "show", "dev", "weft0"]))[0].mtu).toBe(1400);
    expect(brAddrs()).toEqual(["10.40.3.1/26"]);
    expect(routes()).toEqual([expect.objectContaining({ dst: "10.40.0.0/16", dev: "weft0" })]);
    // the kernel's connected route sends the block to the bridge
    expect(sh(["-n", ns, "route", "get", "10.40.3.9"])).toMatch(/dev weft-br0/);
    expect(sh(["-n", ns, "route", "get", "10.40.9.9"])).toMatch(/dev weft0/);
    expect(sh(["netns", "exec", ns, "cat", "/proc/sys/net/ipv4/ip_forward"]).trim()).toBe("1");
    expect(JSON.parse(fs.readFileSync(stateFile, "utf8")).sysctl).toEqual({ "/proc/sys/net/ipv4/ip_forward": "0" });
    if (hasIptables) {
      const rules = execFileSync("ip", ["netns", "exec", ns, "iptables", "-S"], { encoding: "utf8" });
      expect(rules).toContain(`-A FORWARD -j ${FORWARD_CHAIN}`);
      expect(rules).toContain(`-A ${FORWARD_CHAIN} -i weft-br0 -o weft-br0 -j ACCEPT`);
      expect(rules.indexOf(`-A FORWARD -j ${FORWARD_CHAIN}`)).toBeLessThan(rules.indexOf("-A FORWARD -i other0 -j DROP"));
    }

    // the same desired state again: nothing to do
    expect((await net.apply(desired)).changes).toEqual([]);
  });

  it("a block added or removed is exactly that change; extra routes are managed too", async () => {
    const net = new NodeNetwork({ tunName: "weft0", netns: ns, stateFile });
    // a fresh instance adopts the previous one's objects: no changes
    expect((await net.apply(desired)).changes).toEqual([]);

    const two = { ...desired, localBlocks: ["10.40.3.0/26", "10.40.3.64/26"] };
    expect((await net.apply(two)).changes).toEqual(["add address 10.40.3.65/26 to weft-br0 (block 10.40.3.64/26)"]);
    expect(brAddrs()).toEqual(["10.40.3.1/26", "10.40.3.65/26"]);
    expect((await net.apply(two)).changes).toEqual([]);

    const onlySecond = { ...desired, localBlocks: ["10.40.3.64/26"] };
    expect((await net.apply(onlySecond)).changes).toEqual(["remove address 10.40.3.1/26 from weft-br0"]);
    expect(brAddrs()).toEqual(["10.40.3.65/26"]);

    const extra = { ...onlySecond, extraRoutes: [{ cidr: "10.77.0.0/24", dev: "weft0" }] };
    expect((await net.apply(extra)).changes).toEqual([`add route 10.77.0.0/24 dev weft0 proto ${ROUTE_PROTO}`]);
    expect((await net.apply(onlySecond)).changes).toEqual(["remove route 10.77.0.0/24 dev weft0"]);
    expect((await net.apply(desired)).changes).toEqual(["add address 10.40.3.1/26 to weft-br0 (block 10.40.3.0/26)", "remove address 10.40.3.65/26 from weft-br0"]);
  });

  it("a restarted agent adopts a crashed run's leftovers and converges them", async () => {
    // simulate a crash: objects from the "old run" stay in the kernel, nobody tears down
    sh(["-n", ns, "route", "add", "10.41.0.0/16", "dev", "weft0", "proto", String(ROUTE_PROTO)]);
    sh(["-n", ns, "addr", "add", "10.40.9.1/26", "dev", "weft-br0"]);
    const net = new NodeNetwork({ tunName: "weft0", netns: ns, stateFile });
    const { changes } = await net.apply(desired);
    expect(changes.sort()).toEqual(["remove address 10.40.9.1/26 from weft-br0", "remove route 10.41.0.0/16 dev weft0"]);
  });

  it("refuses to take over what it did not create", async () => {
    // a foreign route to the cluster range
    sh(["-n", ns2, "link", "set", "weft0", "up"]);
    sh(["-n", ns2, "route", "add", "10.40.0.0/16", "dev", "weft0"]);
    const net2 = new NodeNetwork({ tunName: "weft0", netns: ns2, firewall: false });
    await expect(net2.apply(desired)).rejects.toMatchObject({ name: "NetconfError", code: "ERR_NETCONF_CONFLICT", message: expect.stringMatching(/10\.40\.0\.0\/16.*did not create/) });
    await net2.teardown();
    expect(sh(["-n", ns2, "-4", "route", "show", "10.40.0.0/16"])).toMatch(/dev weft0/); // still there

    // a bridge with our name that is not ours
    sh(["-n", ns2, "link", "add", "mybr", "type", "bridge"]);
    const net3 = new NodeNetwork({ tunName: "weft0", bridge: "mybr", netns: ns2, firewall: false });
    const err = await net3.apply({ clusterRanges: [], localBlocks: ["10.50.0.0/24"] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NetconfError);
    expect(err).toMatchObject({ code: "ERR_NETCONF_CONFLICT", message: expect.stringContaining("choose another --bridge") });
    await expect(net3.teardown()).rejects.toMatchObject({ code: "ERR_NETCONF_CONFLICT" });
    expect(sh(["-n", ns2, "link", "show", "mybr"])).toMatch(/mybr/);

    // no TUN yet
    const net4 = new NodeNetwork({ tunName: "nosuchtun", bridge: "br-x", netns: ns2, firewall: false });
    await expect(net4.apply(desired)).rejects.toMatchObject({ code: "ERR_NETCONF_NO_TUN" });
    // bad input never reaches the kernel
    await expect(net4.apply({ clusterRanges: ["10.40.0.1/16"], localBlocks: [] })).rejects.toMatchObject({ code: "ERR_NETCONF_INPUT" });
    await expect(net4.apply({ clusterRanges: [], localBlocks: ["10.40.0.0/31"] })).rejects.toMatchObject({ code: "ERR_NETCONF_INPUT" });
  });

  it("the cluster route carries the src hint, follows its block, and drops it when asked", async () => {
    const net = new NodeNetwork({ tunName: "weft0", netns: ns, stateFile });
    expect((await net.apply(desired)).changes).toEqual([]);
    const prefsrc = () => (routes() as { dst: string; prefsrc?: string }[]).find((r) => r.dst === "10.40.0.0/16")?.prefsrc;

    const withSrc = { ...desired, clusterRouteSrc: "10.40.3.1" };
    expect((await net.apply(withSrc)).changes).toEqual(["set route 10.40.0.0/16 dev weft0 src (none) -> 10.40.3.1"]);
    expect(prefsrc()).toBe("10.40.3.1");
    // what the host's own traffic to another node's pod now uses
    expect(sh(["-n", ns, "route", "get", "10.40.9.9"])).toMatch(/dev weft0 src 10\.40\.3\.1\b/);
    expect((await net.apply(withSrc)).changes).toEqual([]);

    // the anchor block moves: its old address goes (the kernel drops the route with it), the route comes back with the new src
    const moved = { ...desired, localBlocks: ["10.40.3.64/26"], clusterRouteSrc: "10.40.3.65" };
    expect((await net.apply(moved)).changes).toEqual(
      expect.arrayContaining(["add address 10.40.3.65/26 to weft-br0 (block 10.40.3.64/26)", "remove address 10.40.3.1/26 from weft-br0"]),
    );
    expect(prefsrc()).toBe("10.40.3.65");
    expect(brAddrs()).toEqual(["10.40.3.65/26"]);
    expect((await net.apply(moved)).changes).toEqual([]);

    // a src that is not a local block's gateway never reaches the kernel
    await expect(net.apply({ ...desired, clusterRouteSrc: "10.40.3.2" })).rejects.toMatchObject({ code: "ERR_NETCONF_INPUT" });
    await expect(net.apply({ ...desired, localBlocks: [], clusterRouteSrc: "10.40.3.1" })).rejects.toMatchObject({ code: "ERR_NETCONF_INPUT" });
    expect(prefsrc()).toBe("10.40.3.65");

    // back to no block-owned hint (a node without a block): the route loses its src
    expect((await net.apply(desired)).changes).toEqual(expect.arrayContaining(["add address 10.40.3.1/26 to weft-br0 (block 10.40.3.0/26)", "remove address 10.40.3.65/26 from weft-br0"]));
    expect(routes()).toEqual([expect.objectContaining({ dst: "10.40.0.0/16", dev: "weft0" })]);
    expect(prefsrc()).toBeUndefined();
    expect((await net.apply(desired)).changes).toEqual([]);
  });

  it("teardown (even by a fresh instance after a crash) removes exactly what was added and restores sysctls", async () => {
    // the instance that applied is gone (crash); a new one reads the sysctl record from the state file
    const net = new NodeNetwork({ tunName: "weft0", netns: ns, stateFile });
    await net.teardown();
    expect(snapshot()).toBe(before);
    expect(sh(["-n", ns, "-br", "link"])).toMatch(/other0/);
    expect(sh(["-n", ns, "route"])).toMatch(/172\.16\.0\.0\/16 via 192\.168\.77\.2/);
    expect(fs.existsSync(stateFile)).toBe(false);
    await net.teardown(); // twice is fine
    expect(snapshot()).toBe(before);
  });
});
