/**
 * The CNI commands. I/O comes in through PluginDeps (the agent's local API, agent/os/pod.ts, the
 * pending-release store), so the rules are unit-tested with fakes (test/unit/cni-plugin.test.ts) and
 * end to end with real agents (test/e2e/cni.test.ts).
 *
 * ADD    1. send releases left pending by an earlier DEL (and drop one for this pod id)
 *        2. allocate `cni/<containerId>/<ifName>` from the agent (idempotent: a retried ADD gets the
 *           same address; the agent puts the block's gateway on the bridge before it answers)
 *        3. addPod (same code as `weftnet pod add`): veth on the node bridge, address, default route
 *        If 3 fails, addPod has undone its own steps and the address is released again, so a failed ADD
 *        leaves nothing — except when the pod already exists with an address it had before this ADD: a
 *        repeated ADD whose pod passes CHECK returns the same result; one that does not fails and keeps
 *        the address (the runtime's DEL frees it).
 * DEL    delPod (idempotent; the netns may be gone), then free the address. Agent unreachable: the
 *        interface is still removed, DEL succeeds, and the release is kept pending (pending.ts).
 * CHECK  the address from prevResult is still allocated to this pod id, and checkPod finds the
 *        interfaces, address, route, bridge and MTU as ADD left them.
 * GC     (1.1) for every `cni/` allocation whose (containerID, ifname) is not in
 *        cni.dev/valid-attachments: delPod, then free. Assumes, like the spec, that the runtime does
 *        not run GC concurrently with ADD on the same network.
 * STATUS (1.1) ok when the agent answers, has its data plane and its IPAM can allocate; else 50.
 * VERSION supported versions.
 */
import type { Logger } from "../../src/log.js";
import type { checkPod as CheckPod, delPod as DelPod, addPod as AddPod } from "../os/pod.js";
import { podVethName } from "../os/pod.js";
import type { PendingStore } from "./pending.js";
import { CniCode, CniError, expectedFromPrevResult, LATEST_VERSION, parsePodId, podId as makePodId, result, SUPPORTED_VERSIONS, versionAtLeast, type AddOutcome, type CniEnv, type CniResult, type NetConf } from "./spec.js";

export interface IpamView {
  canAllocate: boolean;
  reason: string | null;
  allocations: { podId: string; ip: string }[];
}
/** What the agent's /v1/ipam/allocate returns (type only: the plugin does not load the IPAM driver). */
export type { PodAddress } from "../ipam.js";
import type { PodAddress } from "../ipam.js";

/** The agent's local API as the plugin uses it. Errors are WeftErrors with the agent's codes. */
export interface AgentClient {
  readonly socket: string;
  ipam(): Promise<IpamView>;
  dataplane(): Promise<{ bridge: string; mtu: number } | null>;
  allocate(podId: string, timeoutMs: number): Promise<PodAddress>;
  free(podId: string): Promise<{ released: boolean }>;
}

export interface PluginDeps {
  agent: AgentClient;
  addPod: typeof AddPod;
  delPod: typeof DelPod;
  checkPod: typeof CheckPod;
  /** MACs of an existing pod's two ends (repeated ADD). */
  macs(hostVeth: string, netnsPath: string, ifName: string): Promise<{ hostMac: string; mac: string }>;
  netnsExists(path: string): boolean;
  pending: PendingStore;
  log: Logger;
}

/** The agent is not there (down, restarting, wrong socket): errors a later retry may not see. */
export function agentUnreachable(e: unknown): boolean {
  const code = (e as { code?: unknown }).code;
  return code === "ERR_NO_AGENT" || code === "ERR_TIMEOUT" || code === "ERR_API";
}

/** Map an error from the agent to the CNI error the runtime sees. */
function agentError(e: unknown, socket: string, what: string): CniError {
  if (e instanceof CniError) return e;
  const code = (e as { code?: unknown }).code;
  const msg = (e as Error).message;
  if (agentUnreachable(e)) return new CniError(CniCode.TRY_AGAIN_LATER, `weftnet agent not reachable on ${socket}: ${msg}`, `is the weftnet agent running with this state dir? (${what})`, { cause: e });
  if (code === "ERR_IPAM_TIMEOUT" || code === "ERR_NOT_READY" || code === "ERR_EXHAUSTED") return new CniError(CniCode.TRY_AGAIN_LATER, `${what}: ${msg}`, String(code), { cause: e });
  return new CniError(CniCode.AGENT, `${what}: ${msg}`, typeof code === "string" ? code : undefined, { cause: e });
}

function podError(e: unknown, what: string): CniError {
  if (e instanceof CniError) return e;
  const stderr = (e as { stderr?: unknown }).stderr;
  return new CniError(CniCode.INTERFACE, `${what}: ${(e as Error).message}`, typeof stderr === "string" && stderr ? stderr.trim() : undefined, { cause: e });
}

/** Placeholder netns path for DEL/GC without one: delPod then only removes the host end. */
export const NO_NETNS = "/nonexistent/weftnet-cni-no-netns";

export class Plugin {
  constructor(private readonly d: PluginDeps) {}

  /** Send releases that an earlier DEL could not; stops at the first unreachable answer. */
  async flushPending(except?: string): Promise<void> {
    for (const id of this.d.pending.list()) {
      if (id === except) continue;
      try {
        await this.d.agent.free(id);
        this.d.pending.remove(id);
        this.d.log.info("sent a pending release", { podId: id });
      } catch (e) {
        if (agentUnreachable(e)) return;
        this.d.log.warn("pending release refused", { podId: id, err: e });
      }
    }
  }

  private async bridgeMtu(conf: NetConf): Promise<{ bridge: string; mtu: number }> {
    if (conf.bridge !== undefined && conf.mtu !== undefined) return { bridge: conf.bridge, mtu: conf.mtu };
    let dp: { bridge: string; mtu: number } | null;
    try {
      dp = await this.d.agent.dataplane();
    } catch (e) {
      throw agentError(e, this.d.agent.socket, "read the agent's data plane");
    }
    if (!dp) throw new CniError(CniCode.AGENT, "the weftnet agent runs without a data plane (--no-tun); pods need it");
    return { bridge: conf.bridge ?? dp.bridge, mtu: conf.mtu ?? dp.mtu };
  }

  async add(conf: NetConf, env: CniEnv): Promise<CniResult> {
    const containerId = env.containerId!;
    const ifName = env.ifName!;
    const netns = env.netns!;
    const id = makePodId(containerId, ifName);
    if (!this.d.netnsExists(netns)) throw new CniError(CniCode.CONTAINER_UNKNOWN, `network namespace ${netns} does not exist`, "the runtime must create the container's network namespace before ADD");
    this.d.pending.remove(id);
    await this.flushPending(id);
    const { bridge, mtu } = await this.bridgeMtu(conf);
    let had: boolean;
    try {
      had = (await this.d.agent.ipam()).allocations.some((a) => a.podId === id);
    } catch (e) {
      throw agentError(e, this.d.agent.socket, "read the agent's IPAM");
    }
    let addr: PodAddress;
    try {
      addr = await this.d.agent.allocate(id, conf.ipamTimeoutMs);
    } catch (e) {
      throw agentError(e, this.d.agent.socket, `allocate an address for ${id}`);
    }
    const spec = { netns: { path: netns }, ifName, podId: id, ip: addr.ip, prefixLen: addr.prefixLen, gateway: addr.gateway, bridge, mtu, logger: this.d.log };
    let outcome: AddOutcome;
    try {
      const r = await this.d.addPod(spec);
      outcome = { hostVeth: r.hostVeth, hostMac: r.hostMac, ifName: r.ifName, mac: r.mac, sandbox: netns, mtu: r.mtu, ip: r.ip, prefixLen: r.prefixLen, gateway: r.gateway };
    } catch (e) {
      const exists = (e as { code?: unknown }).code === "ERR_POD_EXISTS";
      if (exists && had) {
        // A repeated ADD: fine if the pod is exactly what this ADD would have made.
        const chk = await this.d.checkPod(spec).catch((ce: unknown) => ({ ok: false, problems: [(ce as Error).message] }));
        if (chk.ok) {
          const m = await this.d.macs(podVethName(id), netns, ifName).catch(() => ({ hostMac: "", mac: "" }));
          this.d.log.info("ADD repeated for an existing pod; returning its result", { podId: id });
          return result(conf.cniVersion, { hostVeth: podVethName(id), ...m, ifName, sandbox: netns, mtu, ip: addr.ip, prefixLen: addr.prefixLen, gateway: addr.gateway }, conf.dns);
        }
        throw new CniError(CniCode.INTERFACE, `pod ${id} exists but differs from what ADD makes: ${chk.problems.join("; ")}`, "DEL the container first");
      }
      await this.d.agent.free(id).catch((fe: unknown) => {
        if (agentUnreachable(fe)) this.d.pending.add(id);
        this.d.log.warn("could not release the address of a failed ADD", { podId: id, err: fe });
      });
      if ((e as { code?: unknown }).code === "ERR_POD_NO_NETNS") throw new CniError(CniCode.CONTAINER_UNKNOWN, (e as Error).message);
      throw podError(e, `could not set up ${ifName} in ${netns} (the address was released)`);
    }
    return result(conf.cniVersion, outcome, conf.dns);
  }

  async del(conf: NetConf, env: CniEnv): Promise<void> {
    const containerId = env.containerId!;
    const ifName = env.ifName!;
    const id = makePodId(containerId, ifName);
    await this.teardown(id, ifName, env.netns);
    await this.release(id);
    void conf;
  }

  /** Remove the interfaces of one attachment; a veth under our name that is not ours is left alone. */
  private async teardown(id: string, ifName: string, netns: string | undefined): Promise<void> {
    try {
      await this.d.delPod({ netns: { path: netns && this.d.netnsExists(netns) ? netns : NO_NETNS }, ifName, podId: id, logger: this.d.log });
    } catch (e) {
      if ((e as { code?: unknown }).code === "ERR_POD_NOT_OURS") {
        this.d.log.warn("not deleting an interface weftnet did not create", { podId: id, err: e });
        return;
      }
      throw podError(e, `could not remove the interfaces of ${id}`);
    }
  }

  /** Free the address now, or keep the release pending when the agent does not answer. */
  private async release(id: string): Promise<void> {
    try {
      await this.d.agent.free(id);
      this.d.pending.remove(id);
      await this.flushPending();
    } catch (e) {
      if (!agentUnreachable(e)) throw agentError(e, this.d.agent.socket, `release the address of ${id}`);
      try {
        this.d.pending.add(id);
        this.d.log.warn("agent not reachable: interface removed, address release kept pending", { podId: id, err: e });
      } catch (we) {
        this.d.log.warn("agent not reachable and the pending release could not be recorded; GC will free the address", { podId: id, err: we });
      }
    }
  }

  async check(conf: NetConf, env: CniEnv): Promise<void> {
    const ifName = env.ifName!;
    const netns = env.netns!;
    const id = makePodId(env.containerId!, ifName);
    const want = expectedFromPrevResult(conf.prevResult, ifName);
    if (!this.d.netnsExists(netns)) throw new CniError(CniCode.CONTAINER_UNKNOWN, `network namespace ${netns} does not exist`);
    let ipam: IpamView;
    try {
      ipam = await this.d.agent.ipam();
    } catch (e) {
      throw agentError(e, this.d.agent.socket, "read the agent's IPAM");
    }
    const mine = ipam.allocations.find((a) => a.podId === id);
    if (!mine) throw new CniError(CniCode.CHECK_FAILED, `the agent has no address allocated to ${id}`);
    if (mine.ip !== want.ip) throw new CniError(CniCode.CHECK_FAILED, `the agent allocated ${mine.ip} to ${id}, prevResult says ${want.ip}`);
    const { bridge, mtu } = await this.bridgeMtu(conf);
    let chk: { ok: boolean; problems: string[] };
    try {
      chk = await this.d.checkPod({ netns: { path: netns }, ifName, podId: id, ip: want.ip, prefixLen: want.prefixLen, gateway: want.gateway, bridge, mtu, logger: this.d.log });
    } catch (e) {
      throw podError(e, `could not check ${id}`);
    }
    if (!chk.ok) throw new CniError(CniCode.CHECK_FAILED, `pod ${id} is not as ADD left it: ${chk.problems.join("; ")}`, chk.problems.join("\n"));
  }

  async gc(conf: NetConf): Promise<void> {
    if (!conf.validAttachments) throw new CniError(CniCode.INVALID_NETCONF, "GC needs cni.dev/valid-attachments in the network configuration");
    const valid = new Set(conf.validAttachments.map((a) => makePodId(a.containerID, a.ifname)));
    let ipam: IpamView;
    try {
      ipam = await this.d.agent.ipam();
    } catch (e) {
      throw agentError(e, this.d.agent.socket, "read the agent's IPAM");
    }
    await this.flushPending();
    const errors: string[] = [];
    for (const a of ipam.allocations) {
      const p = parsePodId(a.podId);
      if (!p || valid.has(a.podId)) continue;
      try {
        await this.teardown(a.podId, p.ifName, undefined);
        await this.d.agent.free(a.podId);
        this.d.pending.remove(a.podId);
        this.d.log.info("GC released a stale attachment", { podId: a.podId, ip: a.ip });
      } catch (e) {
        errors.push(`${a.podId}: ${(e as Error).message}`);
      }
    }
    if (errors.length) throw new CniError(CniCode.IO_FAILURE, `GC could not release ${errors.length} stale attachment(s)`, errors.join("\n"));
  }

  async status(): Promise<void> {
    let ipam: IpamView;
    let dp: { bridge: string; mtu: number } | null;
    try {
      [ipam, dp] = await Promise.all([this.d.agent.ipam(), this.d.agent.dataplane()]);
    } catch (e) {
      throw new CniError(CniCode.NOT_AVAILABLE, `weftnet agent not reachable on ${this.d.agent.socket}: ${(e as Error).message}`, "start the weftnet agent (or fix stateDir/socket in the network configuration)");
    }
    if (!dp) throw new CniError(CniCode.NOT_AVAILABLE, "the weftnet agent runs without a data plane (--no-tun); pods need it");
    if (!ipam.canAllocate) throw new CniError(CniCode.NOT_AVAILABLE, `the weftnet agent cannot allocate addresses yet: ${ipam.reason ?? "IPAM not ready"}`);
  }
}

/** VERSION: answers whatever (or nothing) is on stdin, like libcni's skel. */
export function versionResult(): { cniVersion: string; supportedVersions: string[] } {
  return { cniVersion: LATEST_VERSION, supportedVersions: [...SUPPORTED_VERSIONS] };
}

/** GC and STATUS exist from 1.1.0 on (error 1 for an older config, as libcni's skel does). */
export function requireVersionFor(command: "GC" | "STATUS", conf: NetConf): void {
  if (!versionAtLeast(conf.cniVersion, "1.1.0")) throw new CniError(CniCode.INCOMPATIBLE_VERSION, `config version ${conf.cniVersion} does not allow ${command} (needs 1.1.0)`);
}
