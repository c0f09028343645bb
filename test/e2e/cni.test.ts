/**
 * CNI conformance end to end (root): the plugin is executed as a container runtime would — CNI_* env,
 * netconf on stdin, stdout and exit code checked against the spec field by field — inside the node
 * namespaces of a 2-node MeshLab (real agents, TUN data plane, signaling). Container namespaces are
 * made here with `ip netns add` (as a runtime does) and registered in node.pods, so MeshLab.close()
 * removes them even when a test fails.
 *
 * Both shipped forms run: `node dist/agent/cni/main.js`, and the SEA executable weftnet-cni, built in
 * beforeAll by scripts/build-cni.mjs into the lab's temp dir (~10 s; not dist/cni, which another run may
 * be rebuilding); if that build fails the SEA checks are skipped with the reason printed, the rest runs
 * with the JS entry.
 */
import { execFile, execFileSync, spawn } from "node:child_process";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { apiRequest } from "../../agent/api-client.js";
import { PENDING_DIR } from "../../agent/cni/pending.js";
import { podVethName } from "../../agent/os/pod.js";
import { apiSocketPath } from "../../agent/state.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const pexec = promisify(execFile);
const JS = [process.execPath, join(process.cwd(), "dist", "agent", "cni", "main.js")];
const MAC_RE = /^([0-9a-f]{2}:){5}[0-9a-f]{2}$/;

const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping CNI e2e: needs root (network namespaces, TUN)");

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  json: Record<string, unknown> | undefined;
}

/** Run the plugin in the node's namespace with exactly these CNI_* variables (plus PATH). */
function runCni(node: LabNode, bin: string[], vars: Record<string, string | undefined>, stdin: string): Promise<Run> {
  const env: Record<string, string> = { PATH: process.env.PATH ?? "/usr/sbin:/usr/bin:/sbin:/bin" };
  for (const [k, v] of Object.entries(vars)) if (v !== undefined) env[k] = v;
  return new Promise((resolve, reject) => {
    const p = spawn("nsenter", [`--net=/run/netns/${node.ns}`, "--", ...bin], { env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (c: Buffer) => (stdout += c.toString()));
    p.stderr.on("data", (c: Buffer) => (stderr += c.toString()));
    const t = setTimeout(() => p.kill("SIGKILL"), 60_000);
    p.on("error", reject);
    p.on("close", (code) => {
      clearTimeout(t);
      let json: Record<string, unknown> | undefined;
      try {
        json = stdout.trim() ? (JSON.parse(stdout) as Record<string, unknown>) : undefined;
      } catch {
        json = undefined;
      }
      resolve({ code, stdout, stderr, json });
    });
    p.stdin.end(stdin);
  });
}

interface Ipam {
  canAllocate: boolean;
  allocations: { podId: string; ip: string }[];
}
const ipam = (n: LabNode) => apiRequest<Ipam>(apiSocketPath(n.stateDir), "GET", "/v1/ipam", undefined, 5000);
const allocated = async (n: LabNode, podId: string) => (await ipam(n)).allocations.find((a) => a.podId === podId)?.ip;

/** The spec's error object: non-zero exit, JSON on stdout with cniVersion, numeric code, msg. */
function expectError(r: Run, code: number, version = "1.1.0"): void {
  expect(r.code, `stdout: ${r.stdout} stderr: ${r.stderr}`).not.toBe(0);
  expect(r.json).toBeDefined();
  expect(r.json!.cniVersion).toBe(version);
  expect(r.json!.code).toBe(code);
  expect(typeof r.json!.msg).toBe("string");
  expect((r.json!.msg as string).length).toBeGreaterThan(0);
  if ("details" in r.json!) expect(typeof r.json!.details).toBe("string");
}

/** An ADD result, field by field (spec "Success" result, 1.0.0 / 1.1.0). */
async function expectAddResult(r: Run, o: { version: string; netns: string; ifName: string; podId: string; node: LabNode }): Promise<{ ip: string; gateway: string }> {
  expect(r.code, `stdout: ${r.stdout} stderr: ${r.stderr}`).toBe(0);
  const res = r.json as { cniVersion: string; interfaces: Record<string, unknown>[]; ips: Record<string, unknown>[]; routes: Record<string, unknown>[]; dns: unknown };
  expect(res.cniVersion).toBe(o.version);
  expect(Object.keys(res).sort()).toEqual(["cniVersion", "dns", "interfaces", "ips", "routes"]);
  expect(res.interfaces).toHaveLength(2);
  const [host, cont] = res.interfaces as [Record<string, unknown>, Record<string, unknown>];
  expect(host.name).toBe(podVethName(o.podId));
  expect(host.mac).toMatch(MAC_RE);
  expect(host).not.toHaveProperty("sandbox");
  expect(cont.name).toBe(o.ifName);
  expect(cont.mac).toMatch(MAC_RE);
  expect(cont.sandbox).toBe(o.netns);
  if (o.version === "1.1.0") expect(cont.mtu).toBe(1400);
  else expect(cont).not.toHaveProperty("mtu");
  expect(res.ips).toHaveLength(1);
  const ip0 = res.ips[0]!;
  expect(Object.keys(ip0).sort()).toEqual(["address", "gateway", "interface"]);
  expect(ip0.interface).toBe(1);
  expect(ip0.address).toMatch(/^10\.40\.\d+\.\d+\/\d+$/);
  const [ip, len] = (ip0.address as string).split("/") as [string, string];
  expect(ip0.gateway).toMatch(/^10\.40\.\d+\.\d+$/);
  expect(res.routes).toEqual([{ dst: "0.0.0.0/0", gw: ip0.gateway }]);
  expect(res.dns).toEqual({});
  // ... and the kernel and the agent agree with it
  const name = o.netns.replace("/run/netns/", "");
  const [link] = JSON.parse((await sh(name, "ip", ["-j", "addr", "show", "dev", o.ifName])).stdout) as { address: string; addr_info: { family: string; local: string; prefixlen: number }[] }[];
  expect(link!.address).toBe(cont.mac);
  expect(link!.addr_info.some((a) => a.family === "inet" && a.local === ip && a.prefixlen === Number(len))).toBe(true);
  const [hl] = JSON.parse((await sh(o.node.ns, "ip", ["-j", "link", "show", "dev", host.name as string])).stdout) as { address: string; master?: string }[];
  expect(hl!.address).toBe(host.mac);
  expect(hl!.master).toBe("weft-br0");
  expect(await allocated(o.node, o.podId)).toBe(ip);
  return { ip, gateway: ip0.gateway as string };
}

const hostHas = async (n: LabNode, dev: string) => {
  try {
    await sh(n.ns, "ip", ["link", "show", "dev", dev]);
    return true;
  } catch {
    return false;
  }
};

d("CNI plugin executed as a runtime would (2 nodes)", () => {
  const lab = new MeshLab(2);
  let n1: LabNode;
  let n2: LabNode;
  let seaError: string | undefined = "not built";
  const SEA = join(lab.root, "cni", "weftnet-cni");
  let seq = 0;
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");

  /** A container network namespace, as the runtime would create it. */
  const container = (n: LabNode) => {
    const name = `wl-${lab.id}-c${++seq}`;
    execFileSync("ip", ["netns", "add", name]);
    n.pods.push(name);
    return { cid: `ctr${lab.id}${seq}`, netns: `/run/netns/${name}`, name };
  };
  const conf = (n: LabNode, o: Record<string, unknown> = {}) => JSON.stringify({ cniVersion: "1.1.0", name: "weftnet", type: "weftnet", stateDir: n.stateDir, ...o });
  const vars = (command: string, c: { cid: string; netns: string } | undefined, ifName = "eth0") => ({ CNI_COMMAND: command, CNI_CONTAINERID: c?.cid, CNI_NETNS: c?.netns, CNI_IFNAME: ifName, CNI_PATH: "/opt/cni/bin" });
  const add = (n: LabNode, c: { cid: string; netns: string }, bin = JS, o: Record<string, unknown> = {}) => runCni(n, bin, vars("ADD", c), conf(n, o));
  const del = (n: LabNode, c: { cid: string; netns: string }, bin = JS) => runCni(n, bin, vars("DEL", c), conf(n));

  beforeAll(async () => {
    const sea = pexec(process.execPath, ["scripts/build-cni.mjs", "--out", join(lab.root, "cni")], { timeout: 180_000 }).then(
      () => (seaError = existsSync(SEA) ? undefined : `build finished without ${SEA}`),
      (e: Error & { stderr?: string }) => (seaError = `${e.message} ${e.stderr ?? ""}`),
    );
    await lab.setup();
    await lab.startSignal();
    for (const n of lab.nodes) lab.startAgent(n);
    [n1, n2] = lab.nodes as [LabNode, LabNode];
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
    await until(async () => (await Promise.all(lab.nodes.map(ipam))).every((s) => s.canAllocate), 60_000, "IPAM ready on both nodes", dump);
    await sea;
    if (seaError) console.warn(`CNI e2e: SEA executable checks skipped, the build failed: ${seaError}`);
  }, 240_000);
  afterAll(async () => lab.close(), 60_000);

  it("VERSION lists the supported versions (JS and SEA executable)", async () => {
    for (const bin of seaError ? [JS] : [JS, [SEA]]) {
      for (const stdin of ["", conf(n1, { cniVersion: "1.0.0" })]) {
        const r = await runCni(n1, bin, { CNI_COMMAND: "VERSION" }, stdin);
        expect(r.code).toBe(0);
        expect(r.json).toEqual({ cniVersion: "1.1.0", supportedVersions: ["0.4.0", "1.0.0", "1.1.0"] });
      }
    }
  });

  it("STATUS succeeds with the agent up and IPAM ready", async () => {
    const r = await runCni(n1, JS, { CNI_COMMAND: "STATUS", CNI_PATH: "/opt/cni/bin" }, conf(n1));
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toBe("");
  });

  it("ADD, repeated ADD, CHECK, DEL, DEL again: results and effects per the spec", async () => {
    const c = container(n1);
    const podId = `cni/${c.cid}/eth0`;
    const r = await add(n1, c);
    const { ip } = await expectAddResult(r, { version: "1.1.0", netns: c.netns, ifName: "eth0", podId, node: n1 });
    // the bridge has the block's gateway: the pod reaches it
    await until(async () => (await sh(c.name, "ping", ["-c", "1", "-W", "1", (r.json!.ips as { gateway: string }[])[0]!.gateway], 5000)).stdout.includes("1 received"), 10_000, "pod pings its gateway");

    const again = await add(n1, c);
    expect(again.code, again.stdout).toBe(0);
    expect(again.json!.ips).toEqual(r.json!.ips);
    expect(again.json!.interfaces).toEqual(r.json!.interfaces);

    const check = await runCni(n1, JS, vars("CHECK", c), conf(n1, { prevResult: r.json }));
    expect(check.code, check.stdout).toBe(0);
    expect(check.stdout).toBe("");
    await sh(c.name, "ip", ["link", "set", "dev", "eth0", "down"]);
    const bad = await runCni(n1, JS, vars("CHECK", c), conf(n1, { prevResult: r.json }));
    expectError(bad, 102);
    expect(bad.json!.msg).toMatch(/eth0 is down/);
    await sh(c.name, "ip", ["link", "set", "dev", "eth0", "up"]);
    expectError(await runCni(n1, JS, vars("CHECK", c), conf(n1)), 7); // CHECK without prevResult

    const d1 = await del(n1, c);
    expect(d1.code, d1.stdout).toBe(0);
    expect(d1.stdout).toBe("");
    expect(await hostHas(n1, podVethName(podId))).toBe(false);
    expect(await allocated(n1, podId)).toBeUndefined();
    expect((await sh(c.name, "ip", ["-j", "link"])).stdout).not.toContain("eth0");
    const d2 = await del(n1, c);
    expect(d2.code, d2.stdout).toBe(0);
    expect(ip).toMatch(/^10\.40\./);
  }, 60_000);

  it("answers in the config's version: 1.0.0 (no mtu) and 0.4.0 (ips[].version)", async () => {
    const c = container(n1);
    const r = await add(n1, c, JS, { cniVersion: "1.0.0" });
    await expectAddResult(r, { version: "1.0.0", netns: c.netns, ifName: "eth0", podId: `cni/${c.cid}/eth0`, node: n1 });
    expect((await runCni(n1, JS, vars("DEL", c), conf(n1, { cniVersion: "1.0.0" }))).code).toBe(0);
    const c2 = container(n1);
    const r2 = await add(n1, c2, JS, { cniVersion: "0.4.0" });
    expect(r2.code, r2.stdout).toBe(0);
    expect(r2.json!.cniVersion).toBe("0.4.0");
    expect((r2.json!.ips as { version: string }[])[0]!.version).toBe("4");
    expect((await runCni(n1, JS, vars("DEL", c2), conf(n1, { cniVersion: "0.4.0" }))).code).toBe(0);
  }, 60_000);

  it("rejects invalid configurations with the well-known codes and allocates nothing", async () => {
    const c = container(n1);
    const before = (await ipam(n1)).allocations.length;
    expectError(await runCni(n1, JS, vars("ADD", c), "{not json"), 6);
    expectError(await runCni(n1, JS, vars("ADD", c), JSON.stringify({ name: "weftnet", type: "weftnet", stateDir: n1.stateDir })), 7);
    const old = await runCni(n1, JS, vars("ADD", c), conf(n1, { cniVersion: "0.2.0" }));
    expectError(old, 1);
    expect(old.json!.msg).toMatch(/0\.2\.0/);
    expectError(await runCni(n1, JS, vars("ADD", c), conf(n1, { cniVersion: "9.9.9" })), 1);
    const wrongType = await runCni(n1, JS, vars("ADD", c), conf(n1, { type: "bridge" }));
    expectError(wrongType, 7);
    expect(wrongType.json!.msg).toMatch(/bridge/);
    expectError(await runCni(n1, JS, vars("ADD", c), conf(n1, { mtu: "big" })), 7);
    expectError(await runCni(n1, JS, vars("GC", undefined), conf(n1, { cniVersion: "1.0.0", "cni.dev/valid-attachments": [] })), 1, "1.0.0");
    expectError(await runCni(n1, JS, vars("STATUS", undefined), conf(n1, { cniVersion: "1.0.0" })), 1, "1.0.0");
    expect((await ipam(n1)).allocations.length).toBe(before);
    expect((await sh(c.name, "ip", ["-j", "link"])).stdout).not.toContain("eth0");
  }, 60_000);

  it("rejects missing environment variables with code 4", async () => {
    const c = container(n1);
    const cases: [string, Record<string, string | undefined>][] = [
      ["no CNI_COMMAND", { ...vars("ADD", c), CNI_COMMAND: undefined }],
      ["unknown CNI_COMMAND", { ...vars("ADD", c), CNI_COMMAND: "FROB" }],
      ["ADD without CNI_CONTAINERID", { ...vars("ADD", c), CNI_CONTAINERID: undefined }],
      ["ADD without CNI_NETNS", { ...vars("ADD", c), CNI_NETNS: undefined }],
      ["ADD without CNI_IFNAME", { ...vars("ADD", c), CNI_IFNAME: undefined }],
      ["CHECK without CNI_NETNS", { ...vars("CHECK", c), CNI_NETNS: undefined }],
      ["DEL without CNI_CONTAINERID", { ...vars("DEL", c), CNI_CONTAINERID: undefined }],
      ["DEL without CNI_IFNAME", { ...vars("DEL", c), CNI_IFNAME: undefined }],
    ];
    for (const [what, v] of cases) {
      const r = await runCni(n1, JS, v, conf(n1));
      expect(r.json?.code, what).toBe(4);
      expectError(r, 4);
    }
    expect(await allocated(n1, `cni/${c.cid}/eth0`)).toBeUndefined();
  }, 60_000);

  it("ADD into a network namespace that does not exist: code 3, nothing allocated", async () => {
    const c = { cid: `ctr${lab.id}missing`, netns: `/run/netns/wl-${lab.id}-does-not-exist` };
    const r = await add(n1, c);
    expectError(r, 3);
    expect(r.json!.msg).toContain(c.netns);
    expect(await allocated(n1, `cni/${c.cid}/eth0`)).toBeUndefined();
  });

  it("DEL of an unknown container, and DEL after the netns is gone, succeed", async () => {
    const unknown = await del(n1, { cid: `ctr${lab.id}neverseen`, netns: `/run/netns/wl-${lab.id}-never` });
    expect(unknown.code, unknown.stdout).toBe(0);
    expect(unknown.stdout).toBe("");
    const noNetns = await runCni(n1, JS, { ...vars("DEL", { cid: `ctr${lab.id}neverseen2`, netns: "" }), CNI_NETNS: undefined }, conf(n1));
    expect(noNetns.code, noNetns.stdout).toBe(0);

    const c = container(n1);
    const podId = `cni/${c.cid}/eth0`;
    expect((await add(n1, c)).code).toBe(0);
    execFileSync("ip", ["netns", "del", c.name]); // the runtime tore the sandbox down first
    const r = await del(n1, c);
    expect(r.code, r.stdout).toBe(0);
    expect(await hostHas(n1, podVethName(podId))).toBe(false);
    expect(await allocated(n1, podId)).toBeUndefined();
  }, 60_000);

  it("an ADD that fails half-way leaves nothing: no veth, no interface, no address", async () => {
    const c = container(n1);
    const podId = `cni/${c.cid}/eth0`;
    const r = await add(n1, c, JS, { bridge: "nosuchbr0" });
    expectError(r, 100);
    expect(r.json!.msg).toMatch(/nosuchbr0/);
    expect(await hostHas(n1, podVethName(podId))).toBe(false);
    expect((await sh(c.name, "ip", ["-j", "link"])).stdout).not.toContain("eth0");
    expect(await allocated(n1, podId)).toBeUndefined();
  }, 60_000);

  it("GC releases attachments that are not valid any more and keeps the valid ones", async () => {
    const keep = container(n1);
    const gone = container(n1);
    expect((await add(n1, keep)).code).toBe(0);
    expect((await add(n1, gone)).code).toBe(0);
    const r = await runCni(n1, JS, { CNI_COMMAND: "GC", CNI_PATH: "/opt/cni/bin" }, conf(n1, { "cni.dev/valid-attachments": [{ containerID: keep.cid, ifname: "eth0" }] }));
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toBe("");
    expect(await allocated(n1, `cni/${gone.cid}/eth0`)).toBeUndefined();
    expect(await hostHas(n1, podVethName(`cni/${gone.cid}/eth0`))).toBe(false);
    expect(await allocated(n1, `cni/${keep.cid}/eth0`)).toBeDefined();
    expect(await hostHas(n1, podVethName(`cni/${keep.cid}/eth0`))).toBe(true);
    expectError(await runCni(n1, JS, { CNI_COMMAND: "GC" }, conf(n1)), 7); // no valid-attachments: refuse, free nothing
    expect((await del(n1, keep)).code).toBe(0);
  }, 60_000);

  it("pods made by CNI on two nodes ping each other over the mesh (n2's through the SEA executable)", async () => {
    const a = container(n1);
    const b = container(n2);
    const ra = await add(n1, a);
    const binB = seaError ? JS : [SEA];
    if (seaError) console.warn(`CNI e2e: n2's pod uses the JS entry (SEA build failed: ${seaError})`);
    const rb = await add(n2, b, binB);
    const { ip: ipA } = await expectAddResult(ra, { version: "1.1.0", netns: a.netns, ifName: "eth0", podId: `cni/${a.cid}/eth0`, node: n1 });
    const { ip: ipB } = await expectAddResult(rb, { version: "1.1.0", netns: b.netns, ifName: "eth0", podId: `cni/${b.cid}/eth0`, node: n2 });
    expect(ipA).not.toBe(ipB);
    await until(async () => (await sh(a.name, "ping", ["-c", "1", "-W", "1", ipB], 5000)).stdout.includes("1 received"), 30_000, `${ipA} -> ${ipB}`, dump);
    await until(async () => (await sh(b.name, "ping", ["-c", "1", "-W", "1", ipA], 5000)).stdout.includes("1 received"), 30_000, `${ipB} -> ${ipA}`, dump);
    const chk = await runCni(n2, binB, vars("CHECK", b), conf(n2, { prevResult: rb.json }));
    expect(chk.code, chk.stdout).toBe(0);
    expect((await del(n1, a)).code).toBe(0);
    expect((await del(n2, b, binB)).code).toBe(0);
    expect(await allocated(n2, `cni/${b.cid}/eth0`)).toBeUndefined();
  }, 120_000);

  it("survives an agent restart: STATUS 50 and DEL still succeeds while it is down, then ADD, CHECK, DEL work again", async () => {
    const a = container(n1);
    const b = container(n1);
    const ra = await add(n1, a);
    expect(ra.code, ra.stdout).toBe(0);
    expect((await add(n1, b)).code).toBe(0);
    const ipA = await allocated(n1, `cni/${a.cid}/eth0`);

    await lab.stopAgent(n1);
    const st = await runCni(n1, JS, { CNI_COMMAND: "STATUS" }, conf(n1));
    expectError(st, 50);
    expect(st.json!.msg).toMatch(/agent not reachable/);
    const down = await del(n1, b);
    expect(down.code, down.stdout).toBe(0); // interface removed, release pending
    expect(await hostHas(n1, podVethName(`cni/${b.cid}/eth0`))).toBe(false);
    expect(readdirSync(join(n1.stateDir, PENDING_DIR)).length).toBe(1);
    const c = container(n1);
    expectError(await add(n1, c), 11); // try again later
    expect((await sh(c.name, "ip", ["-j", "link"])).stdout).not.toContain("eth0");

    lab.startAgent(n1);
    await until(async () => (await runCni(n1, JS, { CNI_COMMAND: "STATUS" }, conf(n1))).code === 0, 60_000, "STATUS ok after restart", dump);
    expect(await allocated(n1, `cni/${a.cid}/eth0`)).toBe(ipA); // persisted across the restart
    const rc = await add(n1, c);
    await expectAddResult(rc, { version: "1.1.0", netns: c.netns, ifName: "eth0", podId: `cni/${c.cid}/eth0`, node: n1 });
    expect(await allocated(n1, `cni/${b.cid}/eth0`)).toBeUndefined(); // the pending release went out
    expect(readdirSync(join(n1.stateDir, PENDING_DIR))).toEqual([]);
    // the first pod is re-attached to the new bridge and passes CHECK
    await until(async () => (await runCni(n1, JS, vars("CHECK", a), conf(n1, { prevResult: ra.json }))).code === 0, 20_000, "CHECK of the pod made before the restart", dump);
    expect((await del(n1, a)).code).toBe(0);
    expect(await allocated(n1, `cni/${a.cid}/eth0`)).toBeUndefined();
    expect((await del(n1, c)).code).toBe(0);
  }, 150_000);
});
