/**
 * One plugin run: environment + stdin in, stdout text + exit code out (main.ts does the process I/O).
 * Wires the real dependencies: the agent's API over its unix socket, agent/os/pod.ts, pending releases.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { createLogger } from "../../src/log.js";
import { apiRequest } from "../api-client.js";
import { execCommand } from "../os/exec.js";
import { addPod, checkPod, delPod } from "../os/pod.js";
import { API_SOCKET } from "../state.js";
import { FilePendingStore } from "./pending.js";
import { Plugin, requireVersionFor, versionResult, type AgentClient, type IpamView, type PodAddress } from "./plugin.js";
import { CniCode, CniError, errorJson, LATEST_VERSION, parseEnv, parseNetConf, SUPPORTED_VERSIONS, type NetConf } from "./spec.js";

function agentClient(conf: NetConf): AgentClient {
  const socket = conf.socket ?? join(conf.stateDir, API_SOCKET);
  return {
    socket,
    ipam: () => apiRequest<IpamView>(socket, "GET", "/v1/ipam", undefined, 10_000),
    dataplane: async () => (await apiRequest<{ dataplane: { bridge: string; mtu: number } | null }>(socket, "GET", "/v1/status", undefined, 10_000)).dataplane,
    allocate: (podId, timeoutMs) => apiRequest<PodAddress>(socket, "POST", "/v1/ipam/allocate", { podId, timeoutMs }, timeoutMs + 10_000),
    free: (podId) => apiRequest<{ released: boolean }>(socket, "POST", "/v1/ipam/free", { podId }, 10_000),
  };
}

async function macs(hostVeth: string, netnsPath: string, ifName: string): Promise<{ hostMac: string; mac: string }> {
  const read = async (file: string, args: string[]) => (JSON.parse((await execCommand(file, args)).stdout) as { address?: string }[])[0]?.address ?? "";
  return {
    hostMac: await read("ip", ["-j", "link", "show", "dev", hostVeth]),
    mac: await read("nsenter", [`--net=${netnsPath}`, "ip", "-j", "link", "show", "dev", ifName]),
  };
}

/** Run one command; returns what to print on stdout and the exit code. */
export async function run(env: NodeJS.ProcessEnv, stdin: string): Promise<{ stdout: string; code: number }> {
  // Errors answer in the config's version when stdin has a supported one, else in the latest.
  let version: string = LATEST_VERSION;
  try {
    const v = (JSON.parse(stdin) as { cniVersion?: unknown }).cniVersion;
    if (typeof v === "string" && (SUPPORTED_VERSIONS as readonly string[]).includes(v)) version = v;
  } catch {
    // reported below, by parseNetConf
  }
  try {
    const e = parseEnv(env);
    if (e.command === "VERSION") return { stdout: JSON.stringify(versionResult()), code: 0 };
    const conf = parseNetConf(stdin);
    version = conf.cniVersion;
    const log = createLogger({ level: conf.logLevel, component: "weftnet-cni", fields: { command: e.command, ...(e.containerId ? { containerId: e.containerId } : {}) } });
    const plugin = new Plugin({ agent: agentClient(conf), addPod, delPod, checkPod, macs, netnsExists: (p) => existsSync(p), pending: new FilePendingStore(conf.stateDir), log });
    switch (e.command) {
      case "ADD":
        return { stdout: JSON.stringify(await plugin.add(conf, e)), code: 0 };
      case "DEL":
        await plugin.del(conf, e);
        return { stdout: "", code: 0 };
      case "CHECK":
        await plugin.check(conf, e);
        return { stdout: "", code: 0 };
      case "GC":
        requireVersionFor("GC", conf);
        await plugin.gc(conf);
        return { stdout: "", code: 0 };
      case "STATUS":
        requireVersionFor("STATUS", conf);
        await plugin.status();
        return { stdout: "", code: 0 };
    }
  } catch (err) {
    const e = err instanceof CniError ? err : new CniError(CniCode.IO_FAILURE, (err as Error)?.message ?? String(err), (err as Error)?.stack);
    return { stdout: JSON.stringify(errorJson(version, e)), code: 1 };
  }
}
