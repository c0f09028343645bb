/**
 * Pods: network namespaces attached to the node bridge by a veth pair. Used by `weftnet pod add|del` and
 * (later) the CNI plugin's ADD/DEL/CHECK/GC, so the rules follow the CNI spec:
 *   - addPod is all-or-nothing: an add that fails half-way undoes, in reverse order, exactly the steps it
 *     completed (never something that existed before it started), then throws.
 *   - delPod is idempotent: deleting twice, or a pod that never existed, succeeds.
 *   - checkPod reports every difference from the spec (CNI CHECK), listPods finds pods by marker (CNI GC).
 *
 * Layout of one pod:
 *   host (node) namespace                           pod namespace (by name: /run/netns/NAME, or a path)
 *   bridge weft-br0 <- master - wp1a2b3c4d5e (veth)  ===  eth0 (veth) IP/prefix, up, MTU
 *                                                        lo up, default via gateway dev eth0
 *
 * Host veth name: `wp` + 10 hex digits of sha256(pod id) (12 chars <= IFNAMSIZ-1), stable for the same id,
 * see podVethName(). The default id is "<netns>/<ifName>"; the CNI plugin passes containerId/ifName.
 * Marker: the host veth's ifalias is "weftnet-pod " + JSON {netns, ifName, ip, prefixLen, createdNetns}.
 * It survives agent restarts (it lives in the kernel with the veth), so listPods() and delPod() work
 * without any agent state, and delPod never deletes a host interface that does not carry it.
 *
 * Commands: host side `ip [-n HOSTNS] ...` (HOSTNS only in tests, where the "node" is a namespace);
 * pod side `nsenter --net=PATH ip ...` (works for named namespaces and runtime paths like
 * /proc/PID/ns/net or /var/run/netns/cni-..., which `ip -n` cannot open).
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import { WeftError } from "../../src/errors.js";
import { parseIp } from "../../src/ipam/cidr.js";
import { silentLogger, type Logger } from "../../src/log.js";
import { CommandError, execCommand, HostExec } from "./exec.js";
import { DEFAULT_BRIDGE, DEFAULT_MTU } from "./netconf.js";

export type PodErrorCode = "ERR_POD_INPUT" | "ERR_POD_NO_NETNS" | "ERR_POD_EXISTS" | "ERR_POD_NOT_OURS" | "ERR_POD_COMMAND";

export class PodError extends WeftError {
  static override readonly name = "PodError";
  constructor(
    code: PodErrorCode,
    message: string,
    readonly command?: readonly string[],
    readonly stderr?: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** A pod's network namespace: a name under /run/netns (created by addPod when missing) or a path. */
export type NetnsRef = { name: string } | { path: string };

export const POD_MARKER = "weftnet-pod ";
export const NETNS_DIR = "/run/netns";

export interface PodSpec {
  netns: NetnsRef;
  /** Interface name inside the pod. Default eth0. */
  ifName?: string;
  /** Host-side veth name. Default podVethName(podId ?? "<netns>/<ifName>"). */
  hostVeth?: string;
  /** Stable id the host veth name is derived from (CNI: containerId + "/" + ifName). */
  podId?: string;
  ip: string;
  prefixLen: number;
  gateway: string;
  /** Node bridge. Default weft-br0. */
  bridge?: string;
  /** Default 1400 (see netconf.ts). */
  mtu?: number;
  /** Named namespace that plays the node (tests only); the agent leaves it unset. */
  hostNetns?: string;
  logger?: Logger;
}

export interface PodResult {
  hostVeth: string;
  ifName: string;
  /** MAC of the pod's interface (CNI result `interfaces[].mac`). */
  mac: string;
  hostMac: string;
  /** Path of the pod's namespace (CNI `sandbox`). */
  netnsPath: string;
  /** addPod created the named namespace (delPod with deleteNetns removes it). */
  createdNetns: boolean;
  ip: string;
  prefixLen: number;
  gateway: string;
  mtu: number;
}

export interface PodRef {
  netns: NetnsRef;
  ifName?: string;
  hostVeth?: string;
  podId?: string;
  /** Remove the named namespace too (never done for a path: the runtime owns it). */
  deleteNetns?: boolean;
  hostNetns?: string;
  logger?: Logger;
}

export interface PodCheck {
  ok: boolean;
  /** One line per difference between the spec and the kernel. */
  problems: string[];
}

export interface ListedPod {
  hostVeth: string;
  netns: string;
  ifName: string;
  ip: string;
  prefixLen: number;
  createdNetns: boolean;
  up: boolean;
  bridge: string | undefined;
}

interface Marker {
  netns: string;
  ifName: string;
  ip: string;
  prefixLen: number;
  createdNetns: boolean;
}

interface LinkJson {
  ifindex: number;
  ifname: string;
  flags?: string[];
  mtu?: number;
  address?: string;
  master?: string;
  ifalias?: string;
  link_index?: number;
  linkinfo?: { info_kind?: string };
  addr_info?: { family?: string; local?: string; prefixlen?: number }[];
}
interface RouteJson {
  dst: string;
  gateway?: string;
  dev?: string;
}

const IFNAME_RE = /^[A-Za-z0-9_.-]{1,15}$/;

/** Stable host veth name for a pod id: "wp" + 10 hex digits of sha256 (12 chars). */
export function podVethName(podId: string): string {
  return "wp" + createHash("sha256").update(podId).digest("hex").slice(0, 10);
}

export function netnsPath(ref: NetnsRef): string {
  return "name" in ref ? `${NETNS_DIR}/${ref.name}` : ref.path;
}

function netnsLabel(ref: NetnsRef): string {
  return "name" in ref ? ref.name : ref.path;
}

function defaults(s: { netns: NetnsRef; ifName?: string; hostVeth?: string; podId?: string }): { ifName: string; hostVeth: string } {
  if ("name" in s.netns && !/^[A-Za-z0-9_.-]{1,64}$/.test(s.netns.name)) throw new PodError("ERR_POD_INPUT", `bad netns name ${JSON.stringify(s.netns.name)}`);
  if ("path" in s.netns && !s.netns.path.startsWith("/")) throw new PodError("ERR_POD_INPUT", `netns path must be absolute: ${JSON.stringify(s.netns.path)}`);
  const ifName = s.ifName ?? "eth0";
  const hostVeth = s.hostVeth ?? podVethName(s.podId ?? `${netnsLabel(s.netns)}/${ifName}`);
  for (const [n, what] of [
    [ifName, "ifName"],
    [hostVeth, "hostVeth"],
  ] as const) {
    if (!IFNAME_RE.test(n)) throw new PodError("ERR_POD_INPUT", `${what} ${JSON.stringify(n)} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)`);
  }
  return { ifName, hostVeth };
}

function wrap(e: unknown, what: string): never {
  if (e instanceof PodError) throw e;
  if (e instanceof CommandError) throw new PodError("ERR_POD_COMMAND", `${what}: ${e.message}`, e.command, e.stderr, { cause: e });
  throw e;
}

/** Pod-side `ip` through nsenter (named or path namespaces alike). */
function podIp(path: string, args: string[]): Promise<{ stdout: string }> {
  return execCommand("nsenter", [`--net=${path}`, "ip", ...args]);
}

async function podIpJson<T>(path: string, args: string[]): Promise<T[]> {
  const { stdout } = await podIp(path, ["-j", ...args]);
  return stdout.trim() ? (JSON.parse(stdout) as T[]) : [];
}

async function hostLink(host: HostExec, name: string): Promise<LinkJson | undefined> {
  try {
    const [l] = await host.ipJson<LinkJson>(["-d", "link", "show", "dev", name]);
    return l;
  } catch (e) {
    if (e instanceof CommandError && /does not exist|Cannot find device/i.test(e.stderr)) return undefined;
    throw e;
  }
}

async function podLink(path: string, name: string): Promise<LinkJson | undefined> {
  try {
    const [l] = await podIpJson<LinkJson>(path, ["-d", "addr", "show", "dev", name]);
    return l;
  } catch (e) {
    if (e instanceof CommandError && /does not exist|Cannot find device/i.test(e.stderr)) return undefined;
    throw e;
  }
}

function parseMarker(alias: string | undefined): Marker | undefined {
  if (!alias?.startsWith(POD_MARKER)) return undefined;
  try {
    const m = JSON.parse(alias.slice(POD_MARKER.length)) as Marker;
    return typeof m.netns === "string" && typeof m.ifName === "string" ? m : undefined;
  } catch {
    return undefined;
  }
}

/** Create the pod's network: see the file comment. All-or-nothing. */
export async function addPod(spec: PodSpec): Promise<PodResult> {
  const { ifName, hostVeth } = defaults(spec);
  const bridge = spec.bridge ?? DEFAULT_BRIDGE;
  const mtu = spec.mtu ?? DEFAULT_MTU;
  const log = spec.logger ?? silentLogger;
  const host = new HostExec(spec.hostNetns);
  try {
    parseIp(spec.ip);
    parseIp(spec.gateway);
  } catch (e) {
    throw new PodError("ERR_POD_INPUT", (e as Error).message, undefined, undefined, { cause: e });
  }
  if (!Number.isInteger(spec.prefixLen) || spec.prefixLen < 1 || spec.prefixLen > 32) throw new PodError("ERR_POD_INPUT", `prefixLen ${spec.prefixLen} out of range (1..32)`);
  if (!Number.isInteger(mtu) || mtu < 576 || mtu > 65535) throw new PodError("ERR_POD_INPUT", `mtu ${mtu} out of range (576..65535)`);

  const path = netnsPath(spec.netns);
  const undo: { what: string; run: () => Promise<unknown> }[] = [];
  let createdNetns = false;
  let step = "";
  try {
    step = "prepare the network namespace";
    if (!fs.existsSync(path)) {
      if (!("name" in spec.netns)) throw new PodError("ERR_POD_NO_NETNS", `network namespace ${path} does not exist (the container runtime must create it first)`);
      const name = spec.netns.name;
      await execCommand("ip", ["netns", "add", name]);
      createdNetns = true;
      undo.push({ what: `delete netns ${name}`, run: () => execCommand("ip", ["netns", "del", name]) });
    }
    step = "check for an existing pod";
    if (await hostLink(host, hostVeth)) throw new PodError("ERR_POD_EXISTS", `host interface ${hostVeth} already exists: delete the old pod first (\`weftnet pod del\`), or pick another name`);
    if (await podLink(path, ifName)) throw new PodError("ERR_POD_EXISTS", `${ifName} already exists in network namespace ${netnsLabel(spec.netns)}: delete it first`);

    step = "create the veth pair";
    const marker: Marker = { netns: netnsLabel(spec.netns), ifName, ip: spec.ip, prefixLen: spec.prefixLen, createdNetns };
    // The pod end is created directly inside the pod namespace under its final name: no host-side
    // temporary name, no rename, nothing to collide with on the host.
    await host.ip(["link", "add", "name", hostVeth, "mtu", String(mtu), "type", "veth", "peer", "name", ifName, "mtu", String(mtu), "netns", path]);
    undo.push({ what: `delete veth ${hostVeth}`, run: () => host.ip(["link", "del", "dev", hostVeth]) });
    await host.ip(["link", "set", "dev", hostVeth, "alias", POD_MARKER + JSON.stringify(marker)]);

    step = "configure the pod interface";
    await podIp(path, ["link", "set", "dev", "lo", "up"]);
    await podIp(path, ["addr", "add", `${spec.ip}/${spec.prefixLen}`, "dev", ifName]);
    await podIp(path, ["link", "set", "dev", ifName, "up"]);
    step = "add the default route";
    await podIp(path, ["route", "add", "default", "via", spec.gateway, "dev", ifName]);

    // Before the veth joins the bridge: the pod may send from its own address only (no window).
    step = "install the pod's anti-spoofing filter";
    if (await podFilterAdd(host, hostVeth, spec.ip, log)) undo.push({ what: `remove the anti-spoofing filter of ${hostVeth}`, run: () => podFilterDel(host, hostVeth) });

    step = `attach ${hostVeth} to bridge ${bridge}`;
    await host.ip(["link", "set", "dev", hostVeth, "master", bridge]);
    await host.ip(["link", "set", "dev", hostVeth, "up"]);

    step = "read back the interfaces";
    const inner = await podLink(path, ifName);
    const outer = await hostLink(host, hostVeth);
    const result: PodResult = {
      hostVeth,
      ifName,
      mac: inner?.address ?? "",
      hostMac: outer?.address ?? "",
      netnsPath: path,
      createdNetns,
      ip: spec.ip,
      prefixLen: spec.prefixLen,
      gateway: spec.gateway,
      mtu,
    };
    log.info("pod added", { ...result });
    return result;
  } catch (e) {
    for (const u of undo.reverse()) {
      try {
        await u.run();
      } catch (ue) {
        log.warn("rollback step failed", { step: u.what, error: ue });
      }
    }
    if (e instanceof PodError) throw e;
    if (e instanceof CommandError) {
      const hint = /Operation not permitted/i.test(e.stderr) ? " (needs root or CAP_NET_ADMIN)" : /Nexthop has invalid gateway|Network is unreachable/i.test(e.stderr) ? ` (gateway ${spec.gateway} must be inside ${spec.ip}/${spec.prefixLen})` : /Cannot find device "?[^"]*"?/.test(e.stderr) && step.startsWith("attach") ? ` (does bridge ${bridge} exist? the node network must be applied first)` : "";
      throw new PodError("ERR_POD_COMMAND", `pod ${netnsLabel(spec.netns)}: could not ${step}: ${e.message}${hint}; nothing was left behind`, e.command, e.stderr, { cause: e });
    }
    throw e;
  }
}

/** Remove the pod's network. Idempotent: a missing pod, veth or namespace is not an error. */
export async function delPod(ref: PodRef): Promise<void> {
  const { ifName, hostVeth } = defaults(ref);
  const host = new HostExec(ref.hostNetns);
  const log = ref.logger ?? silentLogger;
  const path = netnsPath(ref.netns);
  try {
    const l = await hostLink(host, hostVeth);
    await podFilterDel(host, hostVeth).catch((err) => log.warn("could not remove the pod's anti-spoofing filter", { hostVeth, err }));
    if (l) {
      if (!parseMarker(l.ifalias)) throw new PodError("ERR_POD_NOT_OURS", `host interface ${hostVeth} exists but weftnet did not create it (no "${POD_MARKER.trim()}" ifalias); not deleting it`);
      try {
        await host.ip(["link", "del", "dev", hostVeth]);
      } catch (e) {
        // deleted concurrently: fine
        if (!(e instanceof CommandError && /Cannot find device|does not exist/i.test(e.stderr))) throw e;
      }
    }
    // The pod end, if the host end was lost (e.g. renamed): only a veth, never something else.
    if (fs.existsSync(path)) {
      const inner = await podLink(path, ifName).catch(() => undefined);
      if (inner?.linkinfo?.info_kind === "veth") await podIp(path, ["link", "del", "dev", ifName]).catch(() => undefined);
    }
    if (ref.deleteNetns && "name" in ref.netns && fs.existsSync(path)) {
      try {
        await execCommand("ip", ["netns", "del", ref.netns.name]);
      } catch (e) {
        if (!(e instanceof CommandError && /No such file/i.test(e.stderr))) throw e;
      }
    }
    log.info("pod deleted", { netns: netnsLabel(ref.netns), hostVeth });
  } catch (e) {
    wrap(e, `delete pod ${netnsLabel(ref.netns)}`);
  }
}

/** What differs from `spec` (CNI CHECK). ok=true with no problems when the pod is as specified. */
export async function checkPod(spec: PodSpec): Promise<PodCheck> {
  const { ifName, hostVeth } = defaults(spec);
  const bridge = spec.bridge ?? DEFAULT_BRIDGE;
  const mtu = spec.mtu ?? DEFAULT_MTU;
  const host = new HostExec(spec.hostNetns);
  const path = netnsPath(spec.netns);
  const problems: string[] = [];
  try {
    const outer = await hostLink(host, hostVeth);
    if (!outer) problems.push(`host interface ${hostVeth} is missing`);
    else {
      if (!parseMarker(outer.ifalias)) problems.push(`host interface ${hostVeth} is not marked as a weftnet pod`);
      if (outer.linkinfo?.info_kind !== "veth") problems.push(`host interface ${hostVeth} is a ${outer.linkinfo?.info_kind ?? "non-veth"}, not a veth`);
      if (outer.master !== bridge) problems.push(`host interface ${hostVeth} is not attached to ${bridge} (master: ${outer.master ?? "none"})`);
      if (!(outer.flags ?? []).includes("UP")) problems.push(`host interface ${hostVeth} is down`);
      if (outer.mtu !== mtu) problems.push(`host interface ${hostVeth} has mtu ${outer.mtu}, want ${mtu}`);
    }
    if (!fs.existsSync(path)) {
      problems.push(`network namespace ${path} does not exist`);
      return { ok: false, problems };
    }
    const inner = await podLink(path, ifName);
    if (!inner) problems.push(`${ifName} is missing in ${netnsLabel(spec.netns)}`);
    else {
      if (inner.linkinfo?.info_kind !== "veth") problems.push(`${ifName} is not a veth`);
      if (!(inner.flags ?? []).includes("UP")) problems.push(`${ifName} is down`);
      if (inner.mtu !== mtu) problems.push(`${ifName} has mtu ${inner.mtu}, want ${mtu}`);
      const addrs = (inner.addr_info ?? []).filter((a) => a.family === "inet").map((a) => `${a.local}/${a.prefixlen}`);
      if (!addrs.includes(`${spec.ip}/${spec.prefixLen}`)) problems.push(`${ifName} lacks ${spec.ip}/${spec.prefixLen} (has ${addrs.join(", ") || "none"})`);
      if (outer && inner.link_index !== undefined && outer.link_index !== undefined && inner.link_index !== outer.ifindex) problems.push(`${ifName} is not the peer of ${hostVeth}`);
      const routes = await podIpJson<RouteJson>(path, ["-4", "route", "show", "default"]);
      if (!routes.some((r) => r.gateway === spec.gateway && r.dev === ifName)) problems.push(`no default route via ${spec.gateway} dev ${ifName}`);
    }
  } catch (e) {
    wrap(e, `check pod ${netnsLabel(spec.netns)}`);
  }
  return { ok: problems.length === 0, problems };
}

/** Every pod on this node, found by the host veth marker (no agent state needed). */
export async function listPods(opts: { hostNetns?: string } = {}): Promise<ListedPod[]> {
  const host = new HostExec(opts.hostNetns);
  let links: LinkJson[];
  try {
    links = await host.ipJson<LinkJson>(["-d", "link", "show", "type", "veth"]);
  } catch (e) {
    wrap(e, "list pods");
  }
  const out: ListedPod[] = [];
  for (const l of links) {
    const m = parseMarker(l.ifalias);
    if (!m) continue;
    out.push({ hostVeth: l.ifname, netns: m.netns, ifName: m.ifName, ip: m.ip, prefixLen: m.prefixLen, createdNetns: m.createdNetns, up: (l.flags ?? []).includes("UP"), bridge: l.master });
  }
  return out.sort((a, b) => a.hostVeth.localeCompare(b.hostVeth));
}

// ---- per-pod anti-spoofing (ebtables on the host veth) ----------------------------------------------------

/**
 * ebtables chain holding one pair of rules per pod, jumped to first from the bridge's FORWARD (pod to pod
 * on this node) and INPUT (pod to the host and, routed, to the TUN) chains:
 *   -i HOSTVETH -p IPv4 --ip-src ! POD_IP -j DROP        IP from any other source
 *   -i HOSTVETH -p ARP --arp-ip-src ! POD_IP -j DROP     ARP claiming another address
 * Pod IPv6 is not routed by weftnet. Without ebtables the filter is skipped with a warning (the data path
 * still refuses sources outside this node's blocks; a pod could then pose as another pod of this node).
 */
export const POD_EB_CHAIN = "WEFTNET-POD";
let ebtablesMissingLogged = false;

async function ensurePodChain(host: HostExec): Promise<void> {
  try {
    await host.run("ebtables", ["-L", POD_EB_CHAIN]);
  } catch (e) {
    if (e instanceof CommandError && e.exitCode === null) throw e; // ebtables not installed
    try {
      await host.run("ebtables", ["-N", POD_EB_CHAIN]);
    } catch (e2) {
      if (!(e2 instanceof CommandError && /exist/i.test(e2.stderr))) throw e2; // a concurrent ADD made it
    }
  }
  for (const base of ["FORWARD", "INPUT"]) {
    const { stdout } = await host.run("ebtables", ["-L", base]);
    if (!stdout.includes(`-j ${POD_EB_CHAIN}`)) await host.run("ebtables", ["-I", base, "1", "-j", POD_EB_CHAIN]);
  }
}

/** Install the pod's rules; false (and a warning once) when ebtables is not installed. */
export async function podFilterAdd(host: HostExec, hostVeth: string, ip: string, log: Logger): Promise<boolean> {
  try {
    await ebRetry(() => ensurePodChain(host));
  } catch (e) {
    if (e instanceof CommandError && e.exitCode === null) {
      if (!ebtablesMissingLogged) log.warn("ebtables is not installed: pods are not prevented from sending with another pod's address (install ebtables)", {});
      ebtablesMissingLogged = true;
      return false;
    }
    throw e;
  }
  // Delete-then-append is idempotent, so the whole sequence is what a conflict retries. The result is
  // read back: a listing or delete that lost a race to another process's commit must not leave a
  // duplicate (seen in CI: three rules for one veth), so anything but exactly this pair is retried.
  await ebRetry(async () => {
    await podFilterDelOnce(host, hostVeth);
    await host.run("ebtables", ["-A", POD_EB_CHAIN, "-i", hostVeth, "-p", "IPv4", "--ip-src", "!", ip, "-j", "DROP"]);
    await host.run("ebtables", ["-A", POD_EB_CHAIN, "-i", hostVeth, "-p", "ARP", "--arp-ip-src", "!", ip, "-j", "DROP"]);
    const mine = vethRules((await host.run("ebtables", ["-L", POD_EB_CHAIN])).stdout, hostVeth);
    if (mine.length !== 2) throw new EbConflict(`${hostVeth} has ${mine.length} rules after the update, not 2`);
  });
  return true;
}

/** A change that another process's concurrent commit undid or doubled: retried like exit 4. */
class EbConflict extends Error {}

/** The rules of this veth in a chain listing, as printed (`-p IPv4 -i wp.. --ip-src ! 10.40.3.9 -j DROP`). */
function vethRules(listing: string, hostVeth: string): string[] {
  return listing
    .split("\n")
    .map((l) => l.trim())
    .filter((rule) => rule.startsWith("-") && ` ${rule} `.includes(` -i ${hostVeth} `));
}

/**
 * ebtables-nft builds each change against a cached copy of the ruleset; when another process (a
 * concurrent CNI ADD runs as its own plugin process) commits in between, the command fails with exit 4
 * ("RULE_DELETE failed", "RULE_APPEND failed") and nothing was applied (nft batches are atomic).
 * Changes are serialised within this process and retried with jitter across processes.
 */
let ebQueue: Promise<unknown> = Promise.resolve();
async function ebRetry<T>(fn: () => Promise<T>, attempts = 6): Promise<T> {
  const run = async (): Promise<T> => {
    for (let i = 1; ; i++) {
      try {
        return await fn();
      } catch (e) {
        const conflict = e instanceof EbConflict || (e instanceof CommandError && e.exitCode === 4);
        if (!conflict || i >= attempts) throw e;
        await new Promise((r) => setTimeout(r, 20 * i + Math.floor(Math.random() * 30)));
      }
    }
  };
  const p = ebQueue.then(run, run);
  ebQueue = p.catch(() => undefined);
  return p;
}

/** Remove every rule of this veth (idempotent; nothing to do without ebtables or the chain). */
export async function podFilterDel(host: HostExec, hostVeth: string): Promise<void> {
  return ebRetry(() => podFilterDelOnce(host, hostVeth));
}

async function podFilterDelOnce(host: HostExec, hostVeth: string): Promise<void> {
  let listing: string;
  try {
    listing = (await host.run("ebtables", ["-L", POD_EB_CHAIN])).stdout;
  } catch (e) {
    if (e instanceof CommandError && e.exitCode === 4) throw e; // a concurrent change: retried
    return; // no chain (exit 1) or no ebtables: nothing to delete
  }
  for (const rule of vethRules(listing, hostVeth)) {
    await host.run("ebtables", ["-D", POD_EB_CHAIN, ...rule.split(/\s+/)]).catch((e) => {
      if (e instanceof CommandError && e.exitCode === 4) throw e; // a concurrent change: retried
    });
  }
}
