/**
 * CNI plugin rules without root: the contract (spec.ts) and the command logic (plugin.ts) with a fake
 * agent and fake pod operations. The real thing runs in test/e2e/cni.test.ts.
 */
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { WeftError } from "../../src/errors.js";
import { silentLogger } from "../../src/log.js";
import { Plugin, type AgentClient, type PluginDeps } from "../../agent/cni/plugin.js";
import type { PendingStore } from "../../agent/cni/pending.js";
import { CniCode, CniError, expectedFromPrevResult, parseEnv, parseNetConf, parsePodId, podId, result } from "../../agent/cni/spec.js";
import { run } from "../../agent/cni/run.js";

const conf = (o: Record<string, unknown> = {}) => JSON.stringify({ cniVersion: "1.1.0", name: "weftnet", type: "weftnet", stateDir: "/nonexistent/weft", ...o });
const code = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return (e as CniError).cniCode;
  }
  return 0;
};

describe("CNI contract", () => {
  it("requires the env each command needs (error 4)", () => {
    expect(code(() => parseEnv({}))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "FROB" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "ADD", CNI_CONTAINERID: "c1", CNI_IFNAME: "eth0" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "CHECK", CNI_CONTAINERID: "c1", CNI_IFNAME: "eth0" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "DEL", CNI_CONTAINERID: "c1" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "ADD", CNI_CONTAINERID: "-bad", CNI_NETNS: "/x", CNI_IFNAME: "eth0" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "ADD", CNI_CONTAINERID: "c1", CNI_NETNS: "/x", CNI_IFNAME: "much-too-long-ifname" }))).toBe(CniCode.INVALID_ENV);
    expect(code(() => parseEnv({ CNI_COMMAND: "ADD", CNI_CONTAINERID: "c1", CNI_NETNS: "rel/x", CNI_IFNAME: "eth0" }))).toBe(CniCode.INVALID_ENV);
    expect(parseEnv({ CNI_COMMAND: "DEL", CNI_CONTAINERID: "c1", CNI_IFNAME: "eth0" })).toEqual({ command: "DEL", containerId: "c1", ifName: "eth0" });
    expect(parseEnv({ CNI_COMMAND: "GC" }).command).toBe("GC");
    expect(parseEnv({ CNI_COMMAND: "STATUS", CNI_PATH: "/opt/cni/bin" })).toEqual({ command: "STATUS", path: "/opt/cni/bin" });
  });

  it("decodes and validates the network configuration (6, 1, 7)", () => {
    expect(code(() => parseNetConf("{nope"))).toBe(CniCode.DECODE_FAILURE);
    expect(code(() => parseNetConf("[]"))).toBe(CniCode.DECODE_FAILURE);
    expect(code(() => parseNetConf(JSON.stringify({ name: "n", type: "weftnet" })))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => parseNetConf(conf({ cniVersion: "0.3.1" })))).toBe(CniCode.INCOMPATIBLE_VERSION);
    expect(code(() => parseNetConf(conf({ cniVersion: "2.0.0" })))).toBe(CniCode.INCOMPATIBLE_VERSION);
    expect(code(() => parseNetConf(conf({ type: "bridge" })))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => parseNetConf(conf({ name: "" })))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => parseNetConf(conf({ mtu: 100 })))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => parseNetConf(conf({ stateDir: "relative" })))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => parseNetConf(conf({ "cni.dev/valid-attachments": [{ containerID: 1 }] })))).toBe(CniCode.INVALID_NETCONF);
    const c = parseNetConf(conf({ type: "weftnet-cni", bridge: "br9", mtu: 1300, dns: { nameservers: ["10.0.0.10"] }, args: { anything: true }, runtimeConfig: {} }));
    expect(c).toMatchObject({ cniVersion: "1.1.0", type: "weftnet-cni", bridge: "br9", mtu: 1300, ipamTimeoutMs: 30_000, stateDir: "/nonexistent/weft" });
    expect(parseNetConf(JSON.stringify({ cniVersion: "1.0.0", name: "n", type: "weftnet" })).stateDir).toBe("/var/lib/weftnet");
  });

  it("accepts the sample conflist's plugin config as a runtime would pass it", () => {
    const list = JSON.parse(readFileSync("examples/cni/10-weftnet.conflist", "utf8")) as { cniVersion: string; name: string; plugins: Record<string, unknown>[] };
    expect(list.plugins).toHaveLength(1);
    // 1.0.0: containerd 1.6 (Debian 12) accepts results up to 1.0.0 only; runtimes that read cniVersions pick 1.1.0
    expect(list.cniVersion).toBe("1.0.0");
    expect((list as { cniVersions?: string[] }).cniVersions).toEqual(["1.0.0", "1.1.0"]);
    for (const v of ["1.0.0", "1.1.0"]) {
      const c = parseNetConf(JSON.stringify({ ...list.plugins[0], cniVersion: v, name: list.name }));
      expect(c).toMatchObject({ cniVersion: v, name: "weftnet", type: "weftnet-cni", stateDir: "/var/lib/weftnet" });
    }
  });

  it("maps attachments to pod ids and back", () => {
    expect(podId("abc123", "eth0")).toBe("cni/abc123/eth0");
    expect(parsePodId("cni/abc123/eth0")).toEqual({ containerId: "abc123", ifName: "eth0" });
    expect(parsePodId("pod/web")).toBeUndefined();
    expect(parsePodId("cni/a/b/c")).toBeUndefined();
  });

  it("shapes results per version", () => {
    const o = { hostVeth: "wp0123456789", hostMac: "aa:aa:aa:aa:aa:aa", ifName: "eth0", mac: "bb:bb:bb:bb:bb:bb", sandbox: "/run/netns/x", mtu: 1400, ip: "10.40.0.2", prefixLen: 26, gateway: "10.40.0.1" };
    const r11 = result("1.1.0", o, undefined);
    expect(r11).toEqual({
      cniVersion: "1.1.0",
      interfaces: [
        { name: "wp0123456789", mac: "aa:aa:aa:aa:aa:aa", mtu: 1400 },
        { name: "eth0", mac: "bb:bb:bb:bb:bb:bb", sandbox: "/run/netns/x", mtu: 1400 },
      ],
      ips: [{ address: "10.40.0.2/26", gateway: "10.40.0.1", interface: 1 }],
      routes: [{ dst: "0.0.0.0/0", gw: "10.40.0.1" }],
      dns: {},
    });
    const r10 = result("1.0.0", o, { nameservers: ["10.0.0.10"] });
    expect(r10.interfaces[1]).not.toHaveProperty("mtu");
    expect(r10.dns).toEqual({ nameservers: ["10.0.0.10"] });
    expect(result("0.4.0", o, undefined).ips[0]).toEqual({ version: "4", address: "10.40.0.2/26", gateway: "10.40.0.1", interface: 1 });
  });

  it("reads CHECK's expectation from prevResult", () => {
    const prev = result("1.1.0", { hostVeth: "wpx", hostMac: "", ifName: "eth0", mac: "", sandbox: "/s", mtu: 1400, ip: "10.40.0.9", prefixLen: 26, gateway: "10.40.0.1" }, undefined);
    expect(expectedFromPrevResult(prev as unknown as Record<string, unknown>, "eth0")).toEqual({ ip: "10.40.0.9", prefixLen: 26, gateway: "10.40.0.1" });
    expect(code(() => expectedFromPrevResult(undefined, "eth0"))).toBe(CniCode.INVALID_NETCONF);
    expect(code(() => expectedFromPrevResult({ ips: [] }, "eth0"))).toBe(CniCode.INVALID_NETCONF);
  });

  it("run() prints VERSION, and errors as the spec's JSON in the config's version", async () => {
    const v = await run({ CNI_COMMAND: "VERSION" }, "");
    expect(v.code).toBe(0);
    expect(JSON.parse(v.stdout)).toEqual({ cniVersion: "1.1.0", supportedVersions: ["0.4.0", "1.0.0", "1.1.0"] });
    const e = await run({ CNI_COMMAND: "ADD" }, conf({ cniVersion: "1.0.0" }));
    expect(e.code).toBe(1);
    expect(JSON.parse(e.stdout)).toMatchObject({ cniVersion: "1.0.0", code: 4 });
    const g = await run({ CNI_COMMAND: "GC" }, conf({ cniVersion: "1.0.0", "cni.dev/valid-attachments": [] }));
    expect(JSON.parse(g.stdout)).toMatchObject({ cniVersion: "1.0.0", code: 1 });
    const s = await run({ CNI_COMMAND: "STATUS" }, conf());
    expect(JSON.parse(s.stdout)).toMatchObject({ cniVersion: "1.1.0", code: 50 });
  });
});

class FakeAgent implements AgentClient {
  readonly socket = "/fake/agent.sock";
  up = true;
  canAllocate = true;
  next = 2;
  readonly alloc = new Map<string, string>();
  readonly freed: string[] = [];
  private down(): void {
    if (!this.up) throw new WeftError("ERR_NO_AGENT", "no agent is running");
  }
  async ipam() {
    this.down();
    return { canAllocate: this.canAllocate, reason: this.canAllocate ? null : "bootstrapping", allocations: [...this.alloc].map(([podId, ip]) => ({ podId, ip })) };
  }
  async dataplane() {
    this.down();
    return { bridge: "weft-br0", mtu: 1400 };
  }
  async allocate(podId: string) {
    this.down();
    if (!this.alloc.has(podId)) this.alloc.set(podId, `10.40.0.${this.next++}`);
    return { podId, ip: this.alloc.get(podId)!, prefixLen: 26, gateway: "10.40.0.1", block: "10.40.0.0/26" };
  }
  async free(podId: string) {
    this.down();
    this.freed.push(podId);
    return { released: this.alloc.delete(podId) };
  }
}

class MemPending implements PendingStore {
  readonly s = new Set<string>();
  add(id: string) {
    this.s.add(id);
  }
  remove(id: string) {
    this.s.delete(id);
  }
  list() {
    return [...this.s];
  }
}

function setup(over: Partial<PluginDeps> = {}) {
  const agent = new FakeAgent();
  const pending = new MemPending();
  const pods = new Set<string>();
  const calls: string[] = [];
  const deps: PluginDeps = {
    agent,
    pending,
    log: silentLogger,
    netnsExists: (p) => p.startsWith("/run/netns/"),
    macs: async () => ({ hostMac: "aa:aa:aa:aa:aa:aa", mac: "bb:bb:bb:bb:bb:bb" }),
    addPod: async (s) => {
      calls.push(`add ${s.podId}`);
      if (pods.has(s.podId!)) throw Object.assign(new WeftError("ERR_POD_EXISTS", "exists"), {});
      pods.add(s.podId!);
      return { hostVeth: "wpx", ifName: s.ifName!, mac: "bb:bb:bb:bb:bb:bb", hostMac: "aa:aa:aa:aa:aa:aa", netnsPath: "/run/netns/x", createdNetns: false, ip: s.ip, prefixLen: s.prefixLen, gateway: s.gateway, mtu: s.mtu! };
    },
    delPod: async (r) => {
      calls.push(`del ${r.podId}`);
      pods.delete(r.podId!);
    },
    checkPod: async (s) => (pods.has(s.podId!) ? { ok: true, problems: [] } : { ok: false, problems: ["missing"] }),
    ...over,
  };
  return { plugin: new Plugin(deps), agent, pending, pods, calls };
}

const env = (cid = "c1") => ({ command: "ADD" as const, containerId: cid, netns: "/run/netns/x", ifName: "eth0" });
const nc = (o: Record<string, unknown> = {}) => parseNetConf(conf(o));

describe("CNI plugin logic", () => {
  it("ADD is idempotent per pod id; a repeated ADD of a healthy pod returns the same result", async () => {
    const { plugin, agent } = setup();
    const a = await plugin.add(nc(), env());
    const b = await plugin.add(nc(), env());
    expect(b.ips).toEqual(a.ips);
    expect(agent.alloc.size).toBe(1);
  });

  it("an ADD whose interface setup fails releases the address", async () => {
    const { plugin, agent } = setup({ addPod: async () => Promise.reject(Object.assign(new WeftError("ERR_POD_COMMAND", "ip failed"), { stderr: "RTNETLINK answers: boom" })) });
    const e = await plugin.add(nc(), env()).catch((x: CniError) => x);
    expect(e).toBeInstanceOf(CniError);
    expect((e as CniError).cniCode).toBe(CniCode.INTERFACE);
    expect((e as CniError).details).toContain("boom");
    expect(agent.alloc.size).toBe(0);
  });

  it("ADD with a missing netns is error 3 and allocates nothing; with the agent down it is 11", async () => {
    const { plugin, agent } = setup();
    expect(((await plugin.add(nc(), { ...env(), netns: "/proc/none" }).catch((x) => x)) as CniError).cniCode).toBe(CniCode.CONTAINER_UNKNOWN);
    agent.up = false;
    expect(((await plugin.add(nc(), env()).catch((x) => x)) as CniError).cniCode).toBe(CniCode.TRY_AGAIN_LATER);
    expect(agent.alloc.size).toBe(0);
  });

  it("DEL with the agent down removes the interface, succeeds, and the release is sent later", async () => {
    const { plugin, agent, pending, pods } = setup();
    await plugin.add(nc(), env("c1"));
    await plugin.add(nc(), env("c2"));
    agent.up = false;
    await plugin.del(nc(), { command: "DEL", containerId: "c1", ifName: "eth0", netns: "/run/netns/x" });
    expect(pods.has("cni/c1/eth0")).toBe(false);
    expect(pending.list()).toEqual(["cni/c1/eth0"]);
    await plugin.del(nc(), { command: "DEL", containerId: "c1", ifName: "eth0" }); // twice, still down
    agent.up = true;
    await plugin.del(nc(), { command: "DEL", containerId: "c2", ifName: "eth0" });
    expect(pending.list()).toEqual([]);
    expect(agent.alloc.size).toBe(0);
  });

  it("an ADD drops a pending release of its own pod id instead of sending it", async () => {
    const { plugin, agent, pending } = setup();
    pending.add("cni/c1/eth0");
    await plugin.add(nc(), env("c1"));
    expect(pending.list()).toEqual([]);
    expect(agent.alloc.has("cni/c1/eth0")).toBe(true);
    expect(agent.freed).toEqual([]);
  });

  it("GC releases cni/ attachments not in valid-attachments and leaves other pod ids alone", async () => {
    const { plugin, agent, calls } = setup();
    await plugin.add(nc(), env("keep"));
    await plugin.add(nc(), env("gone"));
    agent.alloc.set("pod/web", "10.40.0.50");
    await plugin.gc(nc({ "cni.dev/valid-attachments": [{ containerID: "keep", ifname: "eth0" }] }));
    expect([...agent.alloc.keys()].sort()).toEqual(["cni/keep/eth0", "pod/web"]);
    expect(calls).toContain("del cni/gone/eth0");
    expect(((await plugin.gc(nc()).catch((x) => x)) as CniError).cniCode).toBe(CniCode.INVALID_NETCONF);
  });

  it("CHECK compares prevResult with the agent and the kernel", async () => {
    const { plugin, agent, pods } = setup();
    const r = await plugin.add(nc(), env());
    const withPrev = nc({ prevResult: r });
    await plugin.check(withPrev, { ...env(), command: "CHECK" });
    pods.clear();
    expect(((await plugin.check(withPrev, { ...env(), command: "CHECK" }).catch((x) => x)) as CniError).cniCode).toBe(CniCode.CHECK_FAILED);
    agent.alloc.clear();
    const e = (await plugin.check(withPrev, { ...env(), command: "CHECK" }).catch((x) => x)) as CniError;
    expect(e.cniCode).toBe(CniCode.CHECK_FAILED);
    expect(e.message).toMatch(/no address allocated/);
  });

  it("STATUS: ok, 50 when the agent is down or cannot allocate", async () => {
    const { plugin, agent } = setup();
    await plugin.status();
    agent.canAllocate = false;
    expect(((await plugin.status().catch((x) => x)) as CniError).message).toMatch(/bootstrapping/);
    agent.up = false;
    expect(((await plugin.status().catch((x) => x)) as CniError).cniCode).toBe(CniCode.NOT_AVAILABLE);
  });
});
