/**
 * Node network configuration, declarative and idempotent (tailscale's Router.Set(cfg) pattern):
 * `apply(desired)` reads the kernel's state with `ip -j`, changes only what differs and returns the list of
 * changes (a second apply with the same desired state returns none); `teardown()` removes exactly what
 * weftnet added. Everything goes through iproute2 (and iptables when installed) with argument arrays.
 *
 * What a node looks like (defaults: TUN weft0, bridge weft-br0, MTU 1400):
 *
 *   cluster ranges (10.40.0.0/16)  --route proto 87-->  TUN weft0 (MTU, up)      the mesh
 *                                  src 10.40.3.1        (host-originated traffic takes this node's address)
 *   local blocks (10.40.3.0/26)    --connected route->  bridge weft-br0, 10.40.3.1/26 (first usable address
 *                                                       of each block = the pods' gateway), MTU, up
 *   extra routes {cidr, dev}       --route proto 87-->  dev
 *   net.ipv4.ip_forward = 1 (pods <-> TUN is routed)
 *   iptables filter chain WEFTNET-FWD, jumped to first from FORWARD: ACCEPT bridge<->bridge, bridge<->TUN
 *
 * Host-originated traffic (desiredNetwork(), src/desired-network.ts): the agents' data-path checks accept a packet into the
 * mesh only when its source lies in the sending node's IPAM blocks (anti-spoofing), so a packet the host
 * itself sends to a pod on another node must not leave with the host's LAN/underlay address. Like other
 * CNIs (Calico, Cilium, flannel), the cluster-range route carries a `src` hint: the gateway address of this
 * node's lowest block holding pods or, with no pods, of its lowest owned block (a block with pods is never
 * handed to another node, so the hint rarely moves). That gateway stays on the bridge whenever the node
 * owns a block, even with no pods, so the hint always names a local address (the kernel refuses a prefsrc
 * that is not local, and drops the route when the address goes; apply() then adds it back with the new
 * hint). A node that owns no block yet gets no hint: until its first block arrives, host-to-pod traffic
 * across nodes is dropped as spoofed, as before (pods cannot exist then either). An explicit source
 * (`ping -I`) still wins, and is still checked.
 *
 * Ownership markers and the crash-leftover rule:
 *   - Nothing is remembered only in memory. What we create carries a marker in the kernel:
 *     the bridge has ifalias "weftnet-managed"; every route we add has protocol 87 (0x57, ASCII 'W'; an
 *     unassigned number in /etc/iproute2/rt_protos, so `ip route show proto 87` lists exactly ours and no
 *     routing daemon (bird=12, zebra=11, dhcp=16, static=4...) claims it); the iptables chain is named
 *     WEFTNET-FWD. Addresses live on our bridge, so they are ours.
 *   - The first apply() or teardown() of a NodeNetwork ADOPTS every marked object left by a previous run
 *     that crashed: apply converges them to the desired state (a stale block address or route is removed
 *     and reported as a change), teardown removes them. So `agent` after a crash just applies, and a
 *     cleanup command is `new NodeNetwork(opts).teardown()`.
 *   - Unmarked objects are never changed or deleted: a device named like our bridge without the marker,
 *     or a foreign route to the same prefix, is a NetconfError telling the operator what to remove or
 *     which flag to change.
 *   - Sysctls carry no marker, so the values we replaced are written to `stateFile` (when given) before
 *     we change them; a restarted agent reads it back, and teardown restores those values and deletes the
 *     file. Without a stateFile a crash loses the record and the sysctl stays as we set it (ip_forward=1).
 *   - Pods (agent/os/pod.ts) outlive the agent: teardown deletes the bridge, which detaches their host
 *     veths (pod traffic stops), and the next apply() attaches every veth marked as a weftnet pod again.
 *   - The TUN device is the agent's (agent/os/tun.ts, non-persistent: it disappears with its fd). We set
 *     its MTU and bring it up; teardown leaves it alone (its routes go with our proto-87 routes anyway).
 *
 * MTU (default 1400, the same on the TUN, the bridge and every pod veth): a pod packet travels as
 * frame header + virtio header + IP packet inside one data-channel message, i.e. SCTP DATA chunk(s) in
 * DTLS records in UDP over the node's uplink: IPv6 40 + UDP 8 + DTLS record 13 + AEAD nonce/tag 24 +
 * SCTP common 12 + DATA chunk 16 + frame/vnet header ~40 = ~153 bytes under a 1500-byte path, or less with
 * PPPoE (8) / a tunnelled uplink. SCTP fragments larger messages anyway (GSO super-packets are ~64 KB and
 * always fragment), so the MTU is not a hard limit of the transport; 1400 is chosen so that an ordinary
 * full-size pod packet plus our overhead still fits one 1500-byte uplink datagram on common paths, keeps
 * the pods' TCP MSS (1360) identical on every node (vnet.ts: gso_size comes from the sender's MTU, so all
 * nodes must agree), and leaves the DTLS/ICE layer room for relayed (TURN, +36) paths.
 *
 * Firewall: pod traffic is routed between the bridge and the TUN (FORWARD chain), and when br_netfilter is
 * loaded with net.bridge.bridge-nf-call-iptables=1 (the default once the module is loaded; Docker and
 * kube-proxy rely on it) even pod-to-pod frames on the same bridge traverse iptables FORWARD. A FORWARD
 * policy DROP (Docker sets one) would then silently break pods. We do NOT turn bridge-nf-call-iptables off
 * (that is global to the namespace and kube-proxy needs it); instead, when the iptables command exists, we
 * insert the WEFTNET-FWD chain first in FORWARD and ACCEPT bridge->bridge, bridge->TUN and TUN->bridge
 * (like Weave's WEAVE chains and the CNI bridge plugin). Without the iptables command we only warn when
 * bridge-nf-call-iptables is 1 (an nftables-only ruleset has to allow these interfaces itself).
 */
import fs from "node:fs/promises";
import path from "node:path";
import { WeftError } from "../../src/errors.js";
import type { DesiredNetwork } from "../../src/desired-network.js";
import { formatIp, parseCidr, type Cidr } from "../../src/ipam/cidr.js";
import { silentLogger, type Logger } from "../../src/log.js";
import { CommandError, HostExec } from "./exec.js";

export type NetconfErrorCode = "ERR_NETCONF_INPUT" | "ERR_NETCONF_NO_TUN" | "ERR_NETCONF_CONFLICT" | "ERR_NETCONF_COMMAND";

/** Node network configuration failed. `command`/`stderr` are set when a tool failed. */
export class NetconfError extends WeftError {
  static override readonly name = "NetconfError";
  constructor(
    code: NetconfErrorCode,
    message: string,
    readonly command?: readonly string[],
    readonly stderr?: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
  }
}

/** Defaults of the node network: pod bridge, and the MTU of the TUN, the bridge and pods (the TUN name: agent/os/tun.ts). */
export const DEFAULT_BRIDGE = "weft-br0";
export const DEFAULT_MTU = 1400;
/** Route protocol marking weftnet's routes: 0x57 ('W'). */
export const ROUTE_PROTO = 87;
/** ifalias marking a bridge weftnet created. */
export const BRIDGE_MARKER = "weftnet-managed";
export const FORWARD_CHAIN = "WEFTNET-FWD";
/** ifalias prefix of a pod's host veth (agent/os/pod.ts POD_MARKER; repeated here to keep imports one-way). */
const POD_VETH_MARKER = "weftnet-pod ";

const IP_FORWARD = "/proc/sys/net/ipv4/ip_forward";
const BRIDGE_NF_IPTABLES = "/proc/sys/net/bridge/bridge-nf-call-iptables";

export interface NodeNetworkOptions {
  /** The TUN device (opened by the agent before apply). */
  tunName: string;
  /** Bridge for this node's pods. Default weft-br0. */
  bridge?: string;
  /** MTU of the TUN and the bridge (pods should use the same). Default 1400. */
  mtu?: number;
  logger?: Logger;
  /** Run everything in this named network namespace (`ip -n NS`); for tests. The agent leaves it unset. */
  netns?: string;
  /** Where replaced sysctl values are recorded so a restarted agent can restore them (see above). */
  stateFile?: string;
  /** Manage the WEFTNET-FWD iptables chain when the iptables command exists. Default true. */
  firewall?: boolean;
}

export { desiredNetwork, type DesiredNetwork } from "../../src/desired-network.js";

export interface ApplyResult {
  /** Human-readable, one per change made; empty when the kernel already matched. */
  changes: string[];
}

interface LinkJson {
  ifindex: number;
  ifname: string;
  flags?: string[];
  mtu?: number;
  ifalias?: string;
  linkinfo?: { info_kind?: string };
}
interface AddrJson {
  addr_info?: { family?: string; local?: string; prefixlen?: number }[];
}
interface RouteJson {
  dst: string;
  dev?: string;
  prefsrc?: string;
}
/** A route we manage: its device and preferred source. */
interface RouteSpec {
  dev: string;
  src?: string;
}

interface StateRecord {
  version: 1;
  /** sysctl path -> the value before weftnet changed it */
  sysctl: Record<string, string>;
}

/** "10.40.0.0/16"; ip prints /32 routes without the suffix and 0/0 as "default". */
function normDst(dst: string): string {
  if (dst === "default") return "0.0.0.0/0";
  return dst.includes("/") ? dst : `${dst}/32`;
}

function cidrInput(s: string, what: string): Cidr {
  try {
    return parseCidr(s);
  } catch (e) {
    throw new NetconfError("ERR_NETCONF_INPUT", `${what}: ${(e as Error).message}`, undefined, undefined, { cause: e });
  }
}

export class NodeNetwork {
  readonly tunName: string;
  readonly bridge: string;
  readonly mtu: number;
  private readonly log: Logger;
  private readonly host: HostExec;
  private readonly stateFile: string | undefined;
  private readonly firewall: boolean;
  private adopted = false;
  /** sysctl values we replaced (adopted from stateFile at startup). */
  private saved: Record<string, string> = {};

  constructor(opts: NodeNetworkOptions) {
    this.tunName = opts.tunName;
    this.bridge = opts.bridge ?? DEFAULT_BRIDGE;
    this.mtu = opts.mtu ?? DEFAULT_MTU;
    this.log = opts.logger ?? silentLogger;
    this.host = new HostExec(opts.netns);
    this.stateFile = opts.stateFile;
    this.firewall = opts.firewall ?? true;
    for (const [n, what] of [
      [this.tunName, "tunName"],
      [this.bridge, "bridge"],
    ] as const) {
      if (!/^[A-Za-z0-9_.-]{1,15}$/.test(n)) throw new NetconfError("ERR_NETCONF_INPUT", `${what} ${JSON.stringify(n)} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)`);
    }
    if (!Number.isInteger(this.mtu) || this.mtu < 576 || this.mtu > 65535) throw new NetconfError("ERR_NETCONF_INPUT", `mtu ${this.mtu} out of range (576..65535)`);
  }

  /** Converge the kernel to `desired`. Safe to call again at any time; returns what it changed. */
  async apply(desired: DesiredNetwork): Promise<ApplyResult> {
    const want = this.validate(desired);
    await this.adopt();
    const changes: string[] = [];

    // 1. TUN: must exist (the agent opened it); MTU and up.
    const tun = await this.link(this.tunName);
    if (!tun) throw new NetconfError("ERR_NETCONF_NO_TUN", `TUN device ${this.tunName} does not exist: open it (agent/os/tun.ts) before applying the network config, or check --iface`);
    await this.ensureMtuUp(tun, changes, "tun");

    // 2. Bridge: ours (marker) or created now.
    let br = await this.link(this.bridge);
    if (!br) {
      await this.ip(["link", "add", "name", this.bridge, "type", "bridge"]);
      await this.ip(["link", "set", "dev", this.bridge, "alias", BRIDGE_MARKER]);
      changes.push(`create bridge ${this.bridge}`);
      br = await this.link(this.bridge);
      if (!br) throw new NetconfError("ERR_NETCONF_COMMAND", `bridge ${this.bridge} vanished right after it was created`);
    }
    await this.ensureMtuUp(br, changes, "bridge");

    // 2b. Pod veths (marked by agent/os/pod.ts) that lost their bridge, e.g. because a previous agent's
    //     teardown deleted it while the pods lived on: attach them again.
    const vethRows = await this.host.ipJson<LinkJson & { master?: string }>(["link", "show", "type", "veth"]);
    for (const v of vethRows) {
      if (!v.ifalias?.startsWith(POD_VETH_MARKER) || v.master === this.bridge) continue;
      await this.ip(["link", "set", "dev", v.ifname, "master", this.bridge]);
      changes.push(`attach pod veth ${v.ifname} to ${this.bridge}`);
    }

    // 3. Gateway addresses on the bridge: exactly one per local block.
    const have = await this.bridgeAddrs();
    for (const [key, a] of want.addrs) {
      if (have.has(key)) continue;
      await this.ip(["addr", "add", key, "dev", this.bridge]);
      changes.push(`add address ${key} to ${this.bridge} (block ${a.block})`);
    }
    for (const key of have) {
      if (want.addrs.has(key)) continue;
      await this.ip(["addr", "del", key, "dev", this.bridge]);
      changes.push(`remove address ${key} from ${this.bridge}`);
    }

    // 4. Routes with our protocol: cluster ranges -> TUN, extra routes -> their device.
    //    (A route whose src address was just removed above is already gone: the kernel drops it.)
    const routes = await this.ourRoutes();
    for (const [dst, { dev }] of routes) {
      if (want.routes.get(dst)?.dev === dev) continue;
      await this.ip(["route", "del", dst, "dev", dev, "proto", String(ROUTE_PROTO)]);
      changes.push(`remove route ${dst} dev ${dev}`);
    }
    for (const [dst, { dev, src }] of want.routes) {
      const cur = routes.get(dst);
      const srcArgs = src === undefined ? [] : ["src", src];
      const srcText = src === undefined ? "" : ` src ${src}`;
      if (cur?.dev === dev) {
        if (cur.src === src) continue;
        // ours already (proto 87, same device): only the preferred source differs
        await this.ip(["route", "replace", dst, "dev", dev, "proto", String(ROUTE_PROTO), ...srcArgs]);
        changes.push(`set route ${dst} dev ${dev} src ${cur.src ?? "(none)"} -> ${src ?? "(none)"}`);
        continue;
      }
      try {
        await this.ip(["route", "add", dst, "dev", dev, "proto", String(ROUTE_PROTO), ...srcArgs]);
      } catch (e) {
        if (e instanceof NetconfError && /File exists/i.test(e.stderr ?? "")) {
          throw new NetconfError(
            "ERR_NETCONF_CONFLICT",
            `a route to ${dst} that weftnet did not create already exists (see \`ip route show ${dst}\`): remove it, or choose a cluster range / route that does not collide`,
            e.command,
            e.stderr,
            { cause: e },
          );
        }
        throw e;
      }
      changes.push(`add route ${dst} dev ${dev} proto ${ROUTE_PROTO}${srcText}`);
    }

    // 5. IPv4 forwarding (pods <-> TUN is routed).
    await this.ensureSysctl(IP_FORWARD, "1", changes);

    // 6. Firewall bypass for pod traffic.
    await this.ensureForwardChain(changes);

    if (changes.length) this.log.info("node network changed", { changes });
    return { changes };
  }

  /** Remove everything weftnet added (this run's and a crashed run's, by marker); restore sysctls. */
  async teardown(): Promise<void> {
    await this.adopt();
    const errors: unknown[] = [];
    const attempt = async (f: () => Promise<void>) => {
      try {
        await f();
      } catch (e) {
        errors.push(e);
      }
    };
    await attempt(async () => {
      for (const [dst, { dev }] of await this.ourRoutes()) await this.ip(["route", "del", dst, "dev", dev, "proto", String(ROUTE_PROTO)]);
    });
    await attempt(async () => {
      const br = await this.link(this.bridge);
      if (br && br.ifalias === BRIDGE_MARKER) await this.ip(["link", "del", "dev", this.bridge]);
    });
    await attempt(() => this.removeForwardChain());
    await attempt(async () => {
      for (const [p, v] of Object.entries(this.saved)) {
        await this.host.writeProc(p, v);
        this.log.info("restored sysctl", { path: p, value: v });
      }
      this.saved = {};
      if (this.stateFile) await fs.rm(this.stateFile, { force: true });
    });
    if (errors.length) throw errors[0];
  }

  // ---- internals ----

  private validate(d: DesiredNetwork): { addrs: Map<string, { block: string }>; routes: Map<string, RouteSpec> } {
    const addrs = new Map<string, { block: string }>();
    for (const b of d.localBlocks) {
      const c = cidrInput(b, "local block");
      if (c.prefix > 30) throw new NetconfError("ERR_NETCONF_INPUT", `local block ${b} is too small for a gateway and pods (need /30 or larger)`);
      addrs.set(`${formatIp(c.base + 1)}/${c.prefix}`, { block: b });
    }
    let src: string | undefined;
    if (d.clusterRouteSrc !== undefined) {
      src = d.clusterRouteSrc;
      if (![...addrs.keys()].some((k) => k.startsWith(`${src}/`))) {
        throw new NetconfError("ERR_NETCONF_INPUT", `cluster route src ${JSON.stringify(src)} is not the gateway address of a local block (${[...addrs.keys()].join(", ") || "none"})`);
      }
    }
    const routes = new Map<string, RouteSpec>();
    const addRoute = (cidr: string, dev: string, what: string, routeSrc?: string) => {
      const c = cidrInput(cidr, what);
      const key = `${formatIp(c.base)}/${c.prefix}`;
      const prev = routes.get(key);
      if (prev !== undefined && prev.dev !== dev) throw new NetconfError("ERR_NETCONF_INPUT", `${key} is routed to both ${prev.dev} and ${dev}`);
      if (!/^[A-Za-z0-9_.-]{1,15}$/.test(dev)) throw new NetconfError("ERR_NETCONF_INPUT", `${what} ${cidr}: bad device name ${JSON.stringify(dev)}`);
      if (prev === undefined || routeSrc !== undefined) routes.set(key, routeSrc === undefined ? { dev } : { dev, src: routeSrc });
    };
    for (const r of d.clusterRanges) addRoute(r, this.tunName, "cluster range", src);
    for (const r of d.extraRoutes ?? []) addRoute(r.cidr, r.dev, "extra route");
    return { addrs, routes };
  }

  /** Once per instance: take over leftovers of a previous run (marked objects) and its sysctl record. */
  private async adopt(): Promise<void> {
    if (this.adopted) return;
    const br = await this.link(this.bridge);
    if (br && br.ifalias !== BRIDGE_MARKER) {
      throw new NetconfError(
        "ERR_NETCONF_CONFLICT",
        `a device named ${this.bridge} exists but weftnet did not create it (no ifalias "${BRIDGE_MARKER}"): choose another --bridge, or delete it (\`ip link del ${this.bridge}\`) if it is a leftover`,
      );
    }
    if (br && br.linkinfo?.info_kind !== undefined && br.linkinfo.info_kind !== "bridge") {
      throw new NetconfError("ERR_NETCONF_CONFLICT", `${this.bridge} is marked as weftnet's but is a ${br.linkinfo.info_kind}, not a bridge: delete it (\`ip link del ${this.bridge}\`)`);
    }
    if (this.stateFile) {
      try {
        const rec = JSON.parse(await fs.readFile(this.stateFile, "utf8")) as StateRecord;
        if (rec.version === 1 && rec.sysctl && typeof rec.sysctl === "object") {
          for (const [p, v] of Object.entries(rec.sysctl)) if (typeof v === "string" && p.startsWith("/proc/sys/")) this.saved[p] = v;
        }
        this.log.info("adopted sysctl record of a previous run", { stateFile: this.stateFile, saved: this.saved });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") this.log.warn("ignoring unreadable netconf state file", { stateFile: this.stateFile, error: e });
      }
    }
    const left = [...(await this.ourRoutes()).keys()];
    if (br || left.length) this.log.info("adopting network objects of a previous run", { bridge: br ? this.bridge : undefined, routes: left });
    this.adopted = true;
  }

  private async ensureMtuUp(l: LinkJson, changes: string[], what: string): Promise<void> {
    if (l.mtu !== this.mtu) {
      await this.ip(["link", "set", "dev", l.ifname, "mtu", String(this.mtu)]);
      changes.push(`set ${what} ${l.ifname} mtu ${l.mtu ?? "?"} -> ${this.mtu}`);
    }
    if (!(l.flags ?? []).includes("UP")) {
      await this.ip(["link", "set", "dev", l.ifname, "up"]);
      changes.push(`set ${what} ${l.ifname} up`);
    }
  }

  private async ensureSysctl(p: string, value: string, changes: string[]): Promise<void> {
    const cur = await this.host.readProc(p);
    if (cur === undefined || cur === value) return;
    if (!(p in this.saved)) {
      this.saved[p] = cur;
      await this.writeState();
    }
    await this.host.writeProc(p, value);
    changes.push(`set ${p.slice("/proc/sys/".length).replaceAll("/", ".")} ${cur} -> ${value}`);
  }

  private async writeState(): Promise<void> {
    if (!this.stateFile) return;
    const rec: StateRecord = { version: 1, sysctl: this.saved };
    await fs.mkdir(path.dirname(this.stateFile), { recursive: true });
    const tmp = `${this.stateFile}.${process.pid}.tmp`;
    await fs.writeFile(tmp, JSON.stringify(rec) + "\n", { mode: 0o600 });
    await fs.rename(tmp, this.stateFile);
  }

  private forwardRules(): string[][] {
    return [
      ["-i", this.bridge, "-o", this.bridge, "-j", "ACCEPT"],
      ["-i", this.bridge, "-o", this.tunName, "-j", "ACCEPT"],
      ["-i", this.tunName, "-o", this.bridge, "-j", "ACCEPT"],
    ];
  }

  /** undefined when there is no iptables command (or the firewall is disabled). */
  private async iptables(args: string[]): Promise<{ ok: boolean; stdout: string; stderr: string } | undefined> {
    try {
      const r = await this.host.run("iptables", ["-w", "5", ...args]);
      return { ok: true, ...r };
    } catch (e) {
      if (e instanceof CommandError) {
        if (e.exitCode === null && /not found/.test(e.message)) return undefined;
        // `ip netns exec NS iptables` without iptables installed
        if (/No such file or directory|exec of "iptables" failed/i.test(e.stderr) && !/chain|rule/i.test(e.stderr)) return undefined;
        return { ok: false, stdout: "", stderr: e.stderr };
      }
      throw e;
    }
  }

  private async ensureForwardChain(changes: string[]): Promise<void> {
    if (!this.firewall) return;
    const listed = await this.iptables(["-S", FORWARD_CHAIN]);
    if (listed === undefined) {
      if ((await this.host.readProc(BRIDGE_NF_IPTABLES)) === "1") {
        this.log.warn("br_netfilter sends bridged pod traffic through the firewall and there is no iptables command: make sure FORWARD accepts traffic on the bridge and the TUN", { bridge: this.bridge, tun: this.tunName });
      }
      return;
    }
    const want = this.forwardRules().map((r) => `-A ${FORWARD_CHAIN} ${r.join(" ")}`);
    if (!listed.ok) {
      await this.mustIptables(["-N", FORWARD_CHAIN]);
      changes.push(`create iptables chain ${FORWARD_CHAIN}`);
    }
    const have = listed.ok ? listed.stdout.split("\n").filter((l) => l.startsWith(`-A ${FORWARD_CHAIN} `)) : [];
    if (have.join("\n") !== want.join("\n")) {
      await this.mustIptables(["-F", FORWARD_CHAIN]);
      for (const r of this.forwardRules()) await this.mustIptables(["-A", FORWARD_CHAIN, ...r]);
      changes.push(`set iptables chain ${FORWARD_CHAIN} (accept ${this.bridge}<->${this.bridge}, ${this.bridge}<->${this.tunName})`);
    }
    const jump = await this.iptables(["-C", "FORWARD", "-j", FORWARD_CHAIN]);
    if (!jump?.ok) {
      await this.mustIptables(["-I", "FORWARD", "1", "-j", FORWARD_CHAIN]);
      changes.push(`jump to ${FORWARD_CHAIN} first in FORWARD`);
    }
  }

  private async removeForwardChain(): Promise<void> {
    if (!this.firewall) return;
    const listed = await this.iptables(["-S", FORWARD_CHAIN]);
    if (!listed?.ok) return;
    for (let i = 0; i < 16; i++) {
      const r = await this.iptables(["-D", "FORWARD", "-j", FORWARD_CHAIN]);
      if (!r?.ok) break;
    }
    await this.mustIptables(["-F", FORWARD_CHAIN]);
    await this.mustIptables(["-X", FORWARD_CHAIN]);
  }

  private async mustIptables(args: string[]): Promise<void> {
    const r = await this.iptables(args);
    if (!r?.ok) throw new NetconfError("ERR_NETCONF_COMMAND", `iptables ${args.join(" ")} failed: ${r?.stderr.trim() ?? "iptables not found"}; check the firewall setup, or run the agent with the firewall handling off`, ["iptables", ...args], r?.stderr);
  }

  private async ip(args: string[]): Promise<string> {
    try {
      return (await this.host.ip(args)).stdout;
    } catch (e) {
      if (e instanceof CommandError) {
        const hint = /Operation not permitted/i.test(e.stderr) ? " (needs root or CAP_NET_ADMIN)" : "";
        throw new NetconfError("ERR_NETCONF_COMMAND", `${e.message}${hint}`, e.command, e.stderr, { cause: e });
      }
      throw e;
    }
  }

  private async link(name: string): Promise<LinkJson | undefined> {
    try {
      const [l] = await this.host.ipJson<LinkJson>(["-d", "link", "show", "dev", name]);
      return l;
    } catch (e) {
      if (e instanceof CommandError && /does not exist|Cannot find device/i.test(e.stderr)) return undefined;
      throw new NetconfError("ERR_NETCONF_COMMAND", (e as Error).message, (e as CommandError).command, (e as CommandError).stderr, { cause: e });
    }
  }

  /** IPv4 addresses on the bridge as "a.b.c.d/len". */
  private async bridgeAddrs(): Promise<Set<string>> {
    const out = new Set<string>();
    const rows = await this.host.ipJson<AddrJson>(["-4", "addr", "show", "dev", this.bridge]);
    for (const row of rows) for (const a of row.addr_info ?? []) if (a.family === "inet" && a.local) out.add(`${a.local}/${a.prefixlen}`);
    return out;
  }

  /** Our routes in the main table: dst -> dev and preferred source. */
  private async ourRoutes(): Promise<Map<string, RouteSpec>> {
    const rows = await this.host.ipJson<RouteJson>(["-4", "route", "show", "table", "main", "proto", String(ROUTE_PROTO)]);
    const out = new Map<string, RouteSpec>();
    for (const r of rows) if (r.dev) out.set(normDst(r.dst), r.prefsrc ? { dev: r.dev, src: r.prefsrc } : { dev: r.dev });
    return out;
  }
}
