/**
 * NAT lab (root): an emulated internet in network namespaces, with sites behind different NATs, real
 * `weftnet` processes (signaling server, agents, optionally coturn) and pods.
 *
 *                        ns <id>-inet: bridge "inet" (198.18.0.0/24, no address of its own)
 *        +------------------+-------------------+---------------------+
 *        |                  |                   |                     |
 *   ns <id>-pub        ns <id>-r1           ns <id>-r2      ...   (one router per site)
 *   198.18.0.1 signal  wan 198.18.0.11      wan 198.18.0.12
 *     ws :7000         lan 10.1.0.1/24      lan 198.18.2.1/24 (a "none" site: public lab addresses,
 *     STUN :3478,:3479 MASQUERADE           routed, no NAT; every router and pub get a route to it)
 *   198.18.0.2 coturn    |                    |
 *     :3478 (optional) ns <id>-s1h1        ns <id>-s2h1      hosts: default route via their router,
 *                      10.1.0.10            198.18.2.10       run `weftnet agent` (TUN, bridge, pods)
 *
 * Site behaviours (iptables in the router namespace):
 *   none         forwards, no NAT; hosts have public lab addresses
 *   cone         -t nat POSTROUTING -o wan -j MASQUERADE: Linux keeps the source port for every
 *                destination (endpoint-independent mapping), conntrack lets in only replies from the
 *                address:port a host sent to (port-restricted cone)
 *   symmetric    MASQUERADE --random-fully: a new random port per destination (address/port-dependent mapping)
 *   udp-blocked  MASQUERADE, and FORWARD drops UDP from the LAN: only TCP (the signaling WebSocket) leaves
 * NAT routers also drop NEW connections from the WAN, to the LAN and to themselves (see build()).
 *
 * Containment: no namespace here has a link to the root namespace, and no namespace has a default route
 * except the hosts (via their router, whose table only knows the lab ranges): nothing can reach the real
 * network. Lab ranges only: 198.18.0.0/15 (RFC 2544 benchmarking), 10.<site>.0.0/24, pods 10.40.0.0/16.
 *
 * Children run as `setpriv --pdeathsig KILL nsenter --net=... <cmd>`, so they die with the test process.
 * Agents log at info (WEFTNET_LAB_LOG_LEVEL=debug for the path MTU search and ICE stages).
 * close() stops them by PID, deletes pod namespaces, lab namespaces and the temp dir (WEFTNET_KEEP_LAB=1
 * keeps the logs); it is safe to call after a failed setup and more than once.
 */
import { execFile, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { customAlphabet } from "nanoid";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath } from "../../agent/state.js";
import type { AgentStatus } from "../../agent/agent.js";
import type { NetcheckReport } from "../../agent/netcheck.js";
import { CLI, isRoot, until } from "./mesh-lab.js";
import { spawnInNetns, stopChild } from "../helpers/netns.js";

export { isRoot, until };
const pexec = promisify(execFile);
const suffix = customAlphabet("abcdefghijklmnopqrstuvwxyz0123456789", 5);

export type NatKind = "none" | "cone" | "symmetric" | "udp-blocked";

export interface SiteSpec {
  nat: NatKind;
  /** hosts behind the router (default 1) */
  hosts?: number;
}

export interface NatHost {
  /** agent name, e.g. "cone1" (site kind + site index) or "cone1b" for a second host */
  name: string;
  ns: string;
  addr: string;
  stateDir: string;
  site: NatSite;
  proc?: ChildProcess;
  pods: string[];
  startedAt?: number;
}

export interface NatSite {
  index: number;
  nat: NatKind;
  router: string;
  wan: string;
  lanNet: string;
  gateway: string;
  hosts: NatHost[];
}

export const PUBLIC_IP = "198.18.0.1";
export const TURN_IP = "198.18.0.2";
export const SIGNAL_PORT = 7000;
export const STUN_PORT = 3478;
export const STUN_ALT_PORT = 3479;
export const TURN_PORT = 3478;

function run(cmd: string, args: string[]): void {
  try {
    execFileSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new Error(`${cmd} ${args.join(" ")}: ${err.stderr?.toString().trim() || err.message}`);
  }
}

export class NatLab {
  readonly id = suffix();
  /**
   * The lab's directory (agent state, logs), made on first use: a lab built at describe level whose tests are
   * filtered out or skipped never runs its afterAll, and left an empty directory behind each run.
   */
  get root(): string {
    return (this.rootDir ??= mkdtempSync(join(tmpdir(), "weft-nat-")));
  }
  private rootDir: string | undefined;
  readonly token = "nat-token-" + suffix() + suffix();
  readonly inet: string;
  readonly pub: string;
  readonly sites: NatSite[] = [];
  turnSecret: string | undefined;
  private readonly namespaces: string[] = [];
  private readonly procs = new Set<ChildProcess>();
  private turnProc: ChildProcess | undefined;
  private signalProc: ChildProcess | undefined;
  private closed: Promise<void> | undefined;

  constructor(readonly specs: SiteSpec[]) {
    if (specs.length > 30) throw new Error("NatLab: at most 30 sites (10.<site>.0.0/24 must stay clear of the pod range 10.40.0.0/16)");
    this.inet = `nl-${this.id}-inet`;
    this.pub = `nl-${this.id}-pub`;
  }

  get hosts(): NatHost[] {
    return this.sites.flatMap((s) => s.hosts);
  }

  host(name: string): NatHost {
    const h = this.hosts.find((x) => x.name === name);
    if (!h) throw new Error(`no host ${name} in the lab (have ${this.hosts.map((x) => x.name).join(", ")})`);
    return h;
  }

  private addNs(ns: string): void {
    run("ip", ["netns", "add", ns]);
    this.namespaces.push(ns);
    run("ip", ["-n", ns, "link", "set", "lo", "up"]);
  }

  /** Run a command in a namespace synchronously (nsenter: network namespace only, like an agent on a host). */
  exec(ns: string, cmd: string, args: string[]): void {
    run("nsenter", [`--net=/run/netns/${ns}`, "--", cmd, ...args]);
  }

  async sh(ns: string, cmd: string, args: string[], timeoutMs = 30_000): Promise<{ stdout: string; stderr: string }> {
    return pexec("nsenter", [`--net=/run/netns/${ns}`, "--", cmd, ...args], { timeout: timeoutMs, maxBuffer: 64 << 20 });
  }

  async setup(): Promise<void> {
    try {
      this.build();
    } catch (e) {
      await this.close();
      throw e;
    }
  }

  private build(): void {
    this.addNs(this.inet);
    run("ip", ["-n", this.inet, "link", "add", "inet", "type", "bridge"]);
    run("ip", ["-n", this.inet, "link", "set", "inet", "up"]);
    const plug = (ns: string, port: string, inside: string, addrs: string[]) => {
      run("ip", ["-n", ns, "link", "add", inside, "type", "veth", "peer", "name", port, "netns", this.inet]);
      run("ip", ["-n", this.inet, "link", "set", port, "master", "inet", "up"]);
      for (const a of addrs) run("ip", ["-n", ns, "addr", "add", a, "dev", inside]);
      run("ip", ["-n", ns, "link", "set", inside, "up"]);
    };
    this.addNs(this.pub);
    plug(this.pub, "pub", "wan", [`${PUBLIC_IP}/24`, `${TURN_IP}/24`]);

    this.specs.forEach((spec, i) => {
      const k = i + 1;
      const router = `nl-${this.id}-r${k}`;
      const wan = `198.18.0.${10 + k}`;
      const isPublic = spec.nat === "none";
      const lanNet = isPublic ? `198.18.${k}.0/24` : `10.${k}.0.0/24`;
      const gateway = isPublic ? `198.18.${k}.1` : `10.${k}.0.1`;
      this.addNs(router);
      plug(router, `r${k}`, "wan", [`${wan}/24`]);
      run("ip", ["-n", router, "link", "add", "lan", "type", "bridge"]);
      run("ip", ["-n", router, "addr", "add", `${gateway}/24`, "dev", "lan"]);
      run("ip", ["-n", router, "link", "set", "lan", "up"]);
      this.exec(router, "sysctl", ["-qw", "net.ipv4.ip_forward=1"]);
      const ipt = (...a: string[]) => this.exec(router, "iptables", ["-w", ...a]);
      const lan = `10.${k}.0.0/24`;
      switch (spec.nat) {
        case "none":
          break;
        case "cone":
          ipt("-t", "nat", "-A", "POSTROUTING", "-s", lan, "-o", "wan", "-j", "MASQUERADE");
          break;
        case "symmetric":
          ipt("-t", "nat", "-A", "POSTROUTING", "-s", lan, "-o", "wan", "-j", "MASQUERADE", "--random-fully");
          break;
        case "udp-blocked":
          ipt("-A", "FORWARD", "-i", "lan", "-o", "wan", "-p", "udp", "-j", "DROP");
          ipt("-t", "nat", "-A", "POSTROUTING", "-s", lan, "-o", "wan", "-j", "MASQUERADE");
          break;
      }
      if (!isPublic) {
        ipt("-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP");
        // Like a home router's firewall: unsolicited packets to the router itself are dropped in INPUT, so their
        // conntrack entries are never confirmed. Without this, a peer's early hole-punching packet leaves an
        // UNREPLIED entry whose tuple clashes with the host's outgoing mapping, and MASQUERADE then picks a new
        // port: the cone behaves like a symmetric NAT for exactly the peer it wants to reach.
        ipt("-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP");
      }
      const site: NatSite = { index: k, nat: spec.nat, router, wan, lanNet, gateway, hosts: [] };
      const count = spec.hosts ?? 1;
      for (let h = 1; h <= count; h++) {
        const ns = `nl-${this.id}-s${k}h${h}`;
        this.addNs(ns);
        run("ip", ["-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", `h${h}`, "netns", router]);
        run("ip", ["-n", router, "link", "set", `h${h}`, "master", "lan", "up"]);
        const addr = isPublic ? `198.18.${k}.${10 + h}` : `10.${k}.0.${10 + h}`;
        run("ip", ["-n", ns, "addr", "add", `${addr}/24`, "dev", "uplink"]);
        run("ip", ["-n", ns, "link", "set", "uplink", "up"]);
        run("ip", ["-n", ns, "route", "add", "default", "via", gateway]);
        const name = `${spec.nat === "udp-blocked" ? "udpb" : spec.nat === "symmetric" ? "sym" : spec.nat}${k}${h > 1 ? String.fromCharCode(96 + h) : ""}`;
        site.hosts.push({ name, ns, addr, stateDir: join(this.root, name), site, pods: [] });
      }
      this.sites.push(site);
    });
    // Public ("none") sites are reachable from everywhere on the lab internet: routes in pub and every router.
    for (const s of this.sites) {
      if (s.nat !== "none") continue;
      for (const ns of [this.pub, ...this.sites.filter((o) => o !== s).map((o) => o.router)]) run("ip", ["-n", ns, "route", "add", s.lanNet, "via", s.wan]);
    }
  }

  private spawnIn(ns: string, cmd: string, args: string[], log: string, env?: NodeJS.ProcessEnv): ChildProcess {
    return spawnInNetns(ns, cmd, args, join(this.root, log), this.procs, env);
  }


  /**
   * coturn on TURN_IP:TURN_PORT, lab address only, REST shared-secret auth. Returns the secret.
   *
   * `--denied-peer-ip` for the private ranges is required here, not just good practice: the pub namespace has
   * no route to the sites' private LANs, so relaying a connectivity check to a peer's host candidate
   * (10.<site>.0.x) fails in sendto() with ENETUNREACH, and coturn 4.6 then tears down the whole allocation
   * ("closed (2nd stage) ... reason: general"). The clients' next requests land in a fresh session: libjuice
   * gets 438 Wrong nonce then 400 Bad Request, werift loops on stale nonce, and no relay pair ever succeeds.
   * Denied, CREATE_PERMISSION for those peers gets 403 and coturn never sends there (production coturn
   * configs deny the private ranges anyway, against relaying into the TURN host's own networks).
   */
  async startTurn(opts: { verbose?: boolean } = {}): Promise<string> {
    const secret = "turn-secret-" + suffix() + suffix();
    this.turnSecret = secret;
    // prettier-ignore
    const args = [
      "-n", "--listening-ip", TURN_IP, "--relay-ip", TURN_IP, "--listening-port", String(TURN_PORT),
      "--use-auth-secret", "--static-auth-secret", secret, "--realm", "weftnet",
      "--denied-peer-ip", "10.0.0.0-10.255.255.255", "--denied-peer-ip", "172.16.0.0-172.31.255.255",
      "--denied-peer-ip", "192.168.0.0-192.168.255.255", "--no-multicast-peers",
      "--no-tls", "--no-dtls", "--no-cli", "--no-rfc5780", "--no-stun-backward-compatibility",
      "--min-port", "49152", "--max-port", "65535", "--log-file", "stdout", "--simple-log",
      "--pidfile", join(this.root, "turnserver.pid"), "--userdb", join(this.root, "turndb.sqlite"),
    ];
    // stdbuf: coturn logs to a pipe block-buffered otherwise (nothing visible until it exits)
    this.turnProc = this.spawnIn(this.pub, "stdbuf", ["-oL", "turnserver", ...args, ...(opts.verbose || process.env.WEFTNET_TURN_VERBOSE ? ["--verbose"] : [])], "turn.log");
    await until(async () => (await this.sh(this.pub, "ss", ["-Hnlu", `sport = :${TURN_PORT}`])).stdout.includes(`${TURN_IP}:${TURN_PORT}`), 10_000, "coturn listening", () => this.log("turn.log"));
    return secret;
  }

  /** The signaling server on PUBLIC_IP:7000 with STUN on 3478 + 3479; TURN REST credentials when startTurn() ran first (or turn is given). */
  async startSignal(opts: { turn?: boolean; extra?: string[] } = {}): Promise<void> {
    const args = [CLI, "signal", "--listen", `${PUBLIC_IP}:${SIGNAL_PORT}`, "--stun-port", String(STUN_PORT), "--stun-alt-port", String(STUN_ALT_PORT), "--token", this.token, "--verbose", ...(opts.extra ?? [])];
    if (opts.turn ?? this.turnSecret !== undefined) {
      if (!this.turnSecret) throw new Error("startSignal({turn:true}) needs startTurn() first");
      const f = join(this.root, "turn-secret");
      writeFileSync(f, this.turnSecret + "\n", { mode: 0o600 });
      args.push("--turn-url", `turn:${TURN_IP}:${TURN_PORT}`, "--turn-secret-file", f);
    }
    this.signalProc = this.spawnIn(this.pub, process.execPath, args, "signal.log");
    await until(async () => {
      await this.sh(this.pub, "bash", ["-c", `exec 3<>/dev/tcp/${PUBLIC_IP}/${SIGNAL_PORT}`], 2000);
      return true;
    }, 15_000, "signaling server", () => this.log("signal.log"));
  }

  async stopSignal(): Promise<void> {
    await this.stopProc(this.signalProc);
  }

  startAgent(h: NatHost, extra: string[] = []): void {
    h.startedAt = Date.now();
    h.proc = this.spawnIn(h.ns, process.execPath, [CLI, "agent", "--signal", `ws://${PUBLIC_IP}:${SIGNAL_PORT}`, "--token", this.token, "--name", h.name, "--state-dir", h.stateDir, "--log-level", process.env.WEFTNET_LAB_LOG_LEVEL ?? "info", ...extra], `${h.name}.log`);
  }

  async stopAgent(h: NatHost): Promise<void> {
    await this.stopProc(h.proc);
  }

  private stopProc(p: ChildProcess | undefined): Promise<void> {
    return stopChild(p, 8_000);
  }

  log(file: string, lines = 40): string {
    try {
      return execFileSync("tail", ["-n", String(lines), join(this.root, file)], { encoding: "utf8" });
    } catch {
      return "";
    }
  }

  /** Logs of everything, for failure messages. */
  dump(): string {
    const files = ["signal.log", ...(this.turnProc ? ["turn.log"] : []), ...this.hosts.filter((h) => h.proc).map((h) => `${h.name}.log`)];
    return files.map((f) => `--- ${f}\n${this.log(f, 25)}`).join("\n");
  }

  status(h: NatHost): Promise<AgentStatus> {
    return apiRequest<AgentStatus>(apiSocketPath(h.stateDir), "GET", "/v1/status", undefined, 5000);
  }

  /** The peer entry of `b` in `a`'s status, when `a` lists it. */
  async peer(a: NatHost, b: NatHost): Promise<AgentStatus["peers"][number] | undefined> {
    return (await this.status(a)).peers.find((p) => p.name === b.name);
  }

  async cli(h: NatHost, args: string[], timeoutMs = 60_000): Promise<string> {
    const { stdout } = await this.sh(h.ns, process.execPath, [CLI, ...args, "--state-dir", h.stateDir], timeoutMs);
    return stdout;
  }

  /** netcheck --json; it exits 1 when a check fails (UDP blocked) and still prints its report. */
  async netcheck(h: NatHost, extra: string[] = []): Promise<NetcheckReport & { ok: boolean }> {
    try {
      return JSON.parse(await this.cli(h, ["netcheck", "--json", ...extra], 30_000)) as NetcheckReport & { ok: boolean };
    } catch (e) {
      const out = (e as { stdout?: string }).stdout;
      if (out?.trim().startsWith("{")) return JSON.parse(out) as NetcheckReport & { ok: boolean };
      throw e;
    }
  }

  async addPod(h: NatHost, name = `p${h.name}`): Promise<{ ip: string; name: string; host: NatHost }> {
    const pod = `nl-${this.id}-${name}`;
    h.pods.push(pod);
    const out = JSON.parse(await this.cli(h, ["pod", "add", pod, "--json"])) as { ip: string };
    return { ip: out.ip, name: pod, host: h };
  }

  /** One ping from a pod namespace; true when it came back. */
  /** One ping from a pod (`extra`: more ping flags, e.g. -s 1372 -M do for a full-size packet). */
  async podPing(pod: string, ip: string, waitS = 1, extra: string[] = []): Promise<boolean> {
    try {
      return (await this.sh(pod, "ping", ["-c", "1", "-W", String(waitS), ...extra, ip], (waitS + 4) * 1000)).stdout.includes("1 received");
    } catch {
      return false;
    }
  }

  /** Forget every NAT mapping of a site's router (a router reboot, as far as conntrack goes). */
  flushConntrack(site: NatSite): void {
    this.exec(site.router, "conntrack", ["-F"]);
  }

  close(): Promise<void> {
    return (this.closed ??= this.doClose());
  }

  private async doClose(): Promise<void> {
    await Promise.all(this.hosts.map((h) => this.stopAgent(h).catch(() => {})));
    await this.stopProc(this.signalProc).catch(() => {});
    await this.stopProc(this.turnProc).catch(() => {});
    for (const p of this.procs) {
      try {
        p.kill("SIGKILL");
      } catch {
        /* gone */
      }
    }
    for (const h of this.hosts)
      for (const pod of h.pods)
        try {
          run("ip", ["netns", "del", pod]);
        } catch {
          /* already gone */
        }
    for (const ns of this.namespaces.splice(0).reverse())
      try {
        run("ip", ["netns", "del", ns]);
      } catch {
        /* best effort */
      }
    if (this.rootDir && !process.env.WEFTNET_KEEP_LAB) rmSync(this.rootDir, { recursive: true, force: true });
  }
}

/** Candidate types of a peer's selected pair, e.g. "srflx->prflx"; "" when none reported. */
export function pairTypes(p: { selected?: { localType: string; remoteType: string } | null | undefined } | undefined): string {
  return p?.selected ? `${p.selected.localType}->${p.selected.remoteType}` : "";
}

export function usesRelay(p: { selected?: { localType: string; remoteType: string } | null | undefined } | undefined): boolean {
  return !!p?.selected && (p.selected.localType === "relay" || p.selected.remoteType === "relay");
}
