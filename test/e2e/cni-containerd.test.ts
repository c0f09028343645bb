/**
 * The CNI plugin under a real container runtime (root): Debian's containerd + runc run a container with
 * `ctr run --cni`, using the shipped examples/cni/10-weftnet.conflist (only stateDir points at the lab
 * node). The container (a rootfs built here from the static busybox, no image registry) gets its address
 * from the node's agent, pings a pod on the other node over the mesh, and when it exits ctr calls DEL,
 * which removes the veth and releases the address.
 *
 * Nothing of the host's container set-up is used or changed: the test starts its own containerd (own
 * root, state, socket; CRI and the /opt/containerd plugin off) and stops it at the end, also on failure.
 * ctr 1.6 reads CNI config from /etc/cni/net.d and plugins from /opt/cni/bin only, so ctr runs in a
 * private mount namespace where /etc and /opt are overlays whose upper layers (in the lab dir) hold the
 * conflist and the plugin (on a tmpfs in that namespace): the host's /etc and /opt stay untouched. ctr runs in node n1's network
 * namespace (the plugin attaches the container to n1's bridge, as on a real node).
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmdirSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { apiRequest } from "../../agent/api-client.js";
import { podVethName } from "../../agent/os/pod.js";
import { apiSocketPath } from "../../agent/state.js";
import { stopChild } from "../helpers/netns.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const has = (tool: string) => spawnSync("sh", ["-c", `command -v ${tool}`], { stdio: "ignore" }).status === 0;
const missing = ["containerd", "ctr", "runc", "busybox", "unshare"].filter((t) => !has(t));
if (!isRoot) console.warn("skipping CNI-under-containerd e2e: needs root (network namespaces, TUN, containerd)");
else if (missing.length) console.warn(`skipping CNI-under-containerd e2e: missing ${missing.join(", ")} (apt-get install containerd runc busybox-static; npm test installs them)`);

/** Dirs a containerd 1.6 shim or ctr creates under /run whatever the config says: removed at the end if we made them and they are empty. */
const RUN_DIRS = ["/run/containerd/s", "/run/containerd/fifo", "/run/containerd/runc", "/run/containerd"];

interface Ipam {
  canAllocate: boolean;
  allocations: { podId: string; ip: string }[];
}

describe.skipIf(!isRoot || missing.length > 0)("CNI plugin under containerd + runc (ctr run --cni, 2 nodes)", () => {
  const lab = new MeshLab(2);
  const dir = join(lab.root, "containerd");
  const sock = join(dir, "containerd.sock");
  const runcRoot = join(dir, "runc");
  const rootfs = join(dir, "rootfs");
  const upper = { etc: join(dir, "etc-upper"), opt: join(dir, "opt-upper") };
  const existedBefore = new Set(RUN_DIRS.filter((d) => existsSync(d)));
  const containers: string[] = [];
  let containerd: ChildProcess | undefined;
  let n1: LabNode;
  let n2: LabNode;
  let peer: { ip: string; name: string };
  const dump = () => [...lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`), `--- containerd\n${lab.log("containerd/containerd.log")}`].join("\n");
  const ipam = (n: LabNode) => apiRequest<Ipam>(apiSocketPath(n.stateDir), "GET", "/v1/ipam", undefined, 5000);
  const ctr = (args: string[]) => spawnSync("ctr", ["--address", sock, ...args], { encoding: "utf8", timeout: 30_000 });

  /** `ctr run --cni --rm` in n1's network namespace and a private mount namespace (see the header). */
  function ctrRun(id: string, script: string): Promise<{ code: number | null; out: string }> {
    // upper and work dirs on a tmpfs (an overlay's upper dir cannot sit on overlayfs, as /tmp does in many CI containers)
    const ovl = join(dir, "ovl");
    const mounts = [
      `mount -t tmpfs tmpfs ${ovl}`,
      ...["etc", "opt"].map((d) => `mkdir -p ${ovl}/${d}/upper ${ovl}/${d}/work && cp -a ${upper[d as "etc"]}/. ${ovl}/${d}/upper/ && mount -t overlay overlay -o lowerdir=/${d},upperdir=${ovl}/${d}/upper,workdir=${ovl}/${d}/work /${d}`),
    ].join(" && ");
    const run = `exec ctr --address ${sock} run --cni --rm --runc-root ${runcRoot} --fifo-dir ${join(dir, "fifo")} --rootfs ${rootfs} ${id} /bin/sh -c '${script}'`;
    containers.push(id);
    return new Promise((resolve) => {
      const p = spawn("setpriv", ["--pdeathsig", "KILL", "nsenter", `--net=/run/netns/${n1.ns}`, "--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", `${mounts} && ${run}`], { stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      p.stdout.on("data", (d: Buffer) => (out += d.toString()));
      p.stderr.on("data", (d: Buffer) => (out += d.toString()));
      const t = setTimeout(() => p.kill("SIGKILL"), 60_000);
      p.on("close", (code) => {
        clearTimeout(t);
        resolve({ code, out });
      });
    });
  }

  beforeAll(async () => {
    await lab.setup();
    await lab.startSignal();
    for (const n of lab.nodes) lab.startAgent(n);
    [n1, n2] = lab.nodes as [LabNode, LabNode];
    await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
    await until(async () => (await Promise.all(lab.nodes.map(ipam))).every((s) => s.canAllocate), 60_000, "IPAM ready on both nodes", dump);
    peer = await lab.addPod(n2, "ctrpeer");

    // The container's rootfs: the static busybox and the applets the test uses.
    mkdirSync(join(rootfs, "bin"), { recursive: true });
    copyFileSync(execFileSync("sh", ["-c", "command -v busybox"], { encoding: "utf8" }).trim(), join(rootfs, "bin", "busybox"));
    for (const a of ["sh", "ip", "ping", "sleep"]) symlinkSync("busybox", join(rootfs, "bin", a));
    // The shipped conflist, pointed at n1's agent; the plugin as a runtime finds it: /opt/cni/bin/<type>.
    const conflist = JSON.parse(readFileSync("examples/cni/10-weftnet.conflist", "utf8")) as { plugins: Record<string, unknown>[] };
    conflist.plugins[0]!.stateDir = n1.stateDir;
    mkdirSync(join(upper.etc, "cni", "net.d"), { recursive: true });
    writeFileSync(join(upper.etc, "cni", "net.d", "10-weftnet.conflist"), JSON.stringify(conflist, null, 2));
    mkdirSync(join(upper.opt, "cni", "bin"), { recursive: true });
    const plugin = join(upper.opt, "cni", "bin", "weftnet-cni");
    writeFileSync(plugin, `#!/bin/sh\nexec ${process.execPath} ${join(process.cwd(), "dist", "agent", "cni", "main.js")} "$@"\n`);
    chmodSync(plugin, 0o755);
    for (const d of [join(dir, "ovl"), runcRoot, join(dir, "fifo")]) mkdirSync(d, { recursive: true });

    writeFileSync(
      join(dir, "config.toml"),
      [
        "version = 2",
        `root = "${join(dir, "root")}"`,
        `state = "${join(dir, "state")}"`,
        'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]',
        "[grpc]",
        `  address = "${sock}"`,
        "[ttrpc]",
        `  address = "${sock}.ttrpc"`,
        "",
      ].join("\n"),
    );
    containerd = spawn("setpriv", ["--pdeathsig", "KILL", "containerd", "--config", join(dir, "config.toml")], { stdio: ["ignore", "pipe", "pipe"] });
    const log: Buffer[] = [];
    containerd.stdout!.on("data", (d: Buffer) => log.push(d));
    containerd.stderr!.on("data", (d: Buffer) => {
      log.push(d);
      writeFileSync(join(dir, "containerd.log"), Buffer.concat(log));
    });
    await until(async () => ctr(["version"]).status === 0, 20_000, "containerd up", dump);
  }, 180_000);

  afterAll(async () => {
    for (const id of containers) {
      ctr(["task", "kill", "-s", "KILL", id]);
      ctr(["task", "delete", "-f", id]);
      ctr(["container", "delete", id]);
    }
    await stopChild(containerd, 10_000);
    for (const d of RUN_DIRS) {
      if (existedBefore.has(d)) continue;
      try {
        for (const sub of readdirSync(d)) if (d === "/run/containerd/runc") rmdirSync(join(d, sub)); // runc's per-namespace dir, empty
        rmdirSync(d);
      } catch {
        /* absent, or not empty: not ours alone */
      }
    }
    await lab.close();
  }, 60_000);

  it("runs a container whose address comes from n1's agent, pings a pod on n2 over the mesh, and DEL removes it all", async () => {
    const id = `weft-${lab.id}`;
    const podId = `cni/default-${id}/eth0`; // ctr passes <namespace>-<id> as CNI_CONTAINERID
    let during: string | undefined;
    const running = ctrRun(id, `ip -4 -o addr show dev eth0; ping -c 5 -W 2 ${peer.ip}; sleep 1`);
    // while it runs, n1's agent holds the allocation
    const poll = until(async () => (during = (await ipam(n1)).allocations.find((a) => a.podId === podId)?.ip), 30_000, "the container's allocation on n1", dump).catch(() => undefined);
    const r = await running;
    await poll;
    expect(r.code, `${r.out}\n${dump()}`).toBe(0);
    const addr = /inet (10\.40\.\d+\.\d+)\/\d+/.exec(r.out)?.[1];
    expect(addr, r.out).toBeDefined();
    expect(during).toBe(addr);
    const recv = /(\d+) packets transmitted, (\d+) (?:packets )?received/.exec(r.out);
    expect(recv, r.out).not.toBeNull();
    expect(Number(recv![2]), r.out).toBeGreaterThan(0);
    // DEL (ctr calls it when the task is gone): the address is released and the host veth is gone
    await until(async () => !(await ipam(n1)).allocations.some((a) => a.podId === podId), 10_000, "the allocation released by DEL", dump);
    await expect(sh(n1.ns, "ip", ["link", "show", "dev", podVethName(podId)])).rejects.toThrow();
    expect(ctr(["container", "list", "-q"]).stdout).not.toContain(id);
  }, 90_000);
});
