/**
 * The CNI contract (spec 1.0.0 / 1.1.0, plus 0.4.0 results): versions, well-known error codes, the
 * environment, the network configuration this plugin accepts, and the result it prints. Pure: no I/O,
 * so every rule here has a unit test (test/unit/cni-spec.test.ts).
 *
 * Environment (per command, as the spec requires them):
 *   ADD, CHECK  CNI_COMMAND CNI_CONTAINERID CNI_NETNS CNI_IFNAME   (CNI_ARGS, CNI_PATH optional)
 *   DEL         CNI_COMMAND CNI_CONTAINERID CNI_IFNAME             (CNI_NETNS optional: it may be gone)
 *   GC, STATUS  CNI_COMMAND                                        (1.1.0 only)
 *   VERSION     CNI_COMMAND
 * CNI_PATH is never needed: this plugin does not delegate to other plugins (no IPAM plugin; addresses
 * come from the weftnet agent).
 *
 * Network configuration (stdin): the well-known cniVersion, name, type (the executable's file name:
 * "weftnet-cni", or "weftnet" if installed under that name), dns (echoed in the result), prevResult
 * (CHECK), runtimeConfig and args (ignored), cni.dev/valid-attachments (GC), and ours:
 *   stateDir       the agent's state dir (default /var/lib/weftnet); its socket is STATEDIR/agent.sock
 *   socket         the agent's API socket, if not STATEDIR/agent.sock
 *   bridge, mtu    override what the agent reports (GET /v1/status dataplane.bridge/mtu)
 *   ipamTimeoutMs  how long ADD waits for an address (default 30000; the agent retries while its IPAM
 *                  bootstraps or waits for a block)
 *   logLevel       debug|info|warn|error, JSON lines on stderr (default warn)
 * Other fields are ignored, as the spec allows.
 */
import { WeftError } from "../../src/errors.js";

export const SUPPORTED_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"] as const;
export type CniVersion = (typeof SUPPORTED_VERSIONS)[number];
export const LATEST_VERSION: CniVersion = "1.1.0";

/** Well-known error codes (spec "Error" section) and ours (100+). */
export const CniCode = {
  INCOMPATIBLE_VERSION: 1,
  UNSUPPORTED_FIELD: 2,
  CONTAINER_UNKNOWN: 3,
  INVALID_ENV: 4,
  IO_FAILURE: 5,
  DECODE_FAILURE: 6,
  INVALID_NETCONF: 7,
  TRY_AGAIN_LATER: 11,
  NOT_AVAILABLE: 50,
  NOT_AVAILABLE_LIMITED: 51,
  /** plugin specific: creating or removing the pod's interfaces failed */
  INTERFACE: 100,
  /** plugin specific: the agent refused the request (IPAM error) */
  AGENT: 101,
  /** plugin specific: CHECK found the pod different from its ADD result */
  CHECK_FAILED: 102,
} as const;

export class CniError extends WeftError {
  static override readonly name = "CniError";
  constructor(
    readonly cniCode: number,
    message: string,
    readonly details?: string,
    options?: { cause?: unknown },
  ) {
    super(`ERR_CNI_${cniCode}`, message, options);
  }
}

export type Command = "ADD" | "DEL" | "CHECK" | "VERSION" | "GC" | "STATUS";
const COMMANDS: readonly Command[] = ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"];

export interface CniEnv {
  command: Command;
  containerId?: string;
  netns?: string;
  ifName?: string;
  args?: string;
  path?: string;
}

/** Container ids as the spec defines them: alphanumeric first, then alphanumerics, _ . - */
const CONTAINER_ID_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;
const IFNAME_RE = /^[A-Za-z0-9_.-]{1,15}$/;

/** Read and validate the CNI_* variables for the command (error 4 when one is missing or bad). */
export function parseEnv(env: NodeJS.ProcessEnv): CniEnv {
  const raw = env.CNI_COMMAND;
  if (!raw) throw new CniError(CniCode.INVALID_ENV, "required env variable CNI_COMMAND is missing");
  if (!(COMMANDS as readonly string[]).includes(raw)) throw new CniError(CniCode.INVALID_ENV, `unknown CNI_COMMAND ${JSON.stringify(raw)}`, `supported: ${COMMANDS.join(", ")}`);
  const command = raw as Command;
  const need: Record<Command, string[]> = {
    ADD: ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
    CHECK: ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
    DEL: ["CNI_CONTAINERID", "CNI_IFNAME"],
    GC: [],
    STATUS: [],
    VERSION: [],
  };
  const missing = need[command].filter((k) => !env[k]);
  if (missing.length) throw new CniError(CniCode.INVALID_ENV, `required env variables [${missing.join(" ")}] missing for ${command}`);
  const out: CniEnv = { command };
  if (env.CNI_CONTAINERID) out.containerId = env.CNI_CONTAINERID;
  if (env.CNI_NETNS) out.netns = env.CNI_NETNS;
  if (env.CNI_IFNAME) out.ifName = env.CNI_IFNAME;
  if (env.CNI_ARGS) out.args = env.CNI_ARGS;
  if (env.CNI_PATH) out.path = env.CNI_PATH;
  if (need[command].length) {
    if (!CONTAINER_ID_RE.test(out.containerId!)) throw new CniError(CniCode.INVALID_ENV, `CNI_CONTAINERID ${JSON.stringify(out.containerId)} is not a valid container id (alphanumeric first, then letters, digits, _ . -)`);
    if (podId(out.containerId!, out.ifName ?? "eth0").length > 200) throw new CniError(CniCode.INVALID_ENV, `CNI_CONTAINERID is too long (${out.containerId!.length} chars; at most ${200 - 5 - out.ifName!.length})`);
    if (!IFNAME_RE.test(out.ifName!)) throw new CniError(CniCode.INVALID_ENV, `CNI_IFNAME ${JSON.stringify(out.ifName)} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)`);
    if (out.netns !== undefined && !out.netns.startsWith("/")) throw new CniError(CniCode.INVALID_ENV, `CNI_NETNS ${JSON.stringify(out.netns)} must be an absolute path`);
  }
  return out;
}

/** The agent's pod id for one attachment. A container id has no '/', so this splits back uniquely. */
export function podId(containerId: string, ifName: string): string {
  return `cni/${containerId}/${ifName}`;
}

/** Inverse of podId(); undefined for pod ids not made by the plugin (e.g. `pod/NAME`). */
export function parsePodId(id: string): { containerId: string; ifName: string } | undefined {
  const m = /^cni\/([A-Za-z0-9][A-Za-z0-9_.-]*)\/([A-Za-z0-9_.-]{1,15})$/.exec(id);
  return m ? { containerId: m[1]!, ifName: m[2]! } : undefined;
}

export interface Attachment {
  containerID: string;
  ifname: string;
}

export interface NetConf {
  cniVersion: CniVersion;
  name: string;
  type: string;
  stateDir: string;
  socket: string | undefined;
  bridge: string | undefined;
  mtu: number | undefined;
  ipamTimeoutMs: number;
  logLevel: "debug" | "info" | "warn" | "error";
  dns: Record<string, unknown> | undefined;
  prevResult: Record<string, unknown> | undefined;
  validAttachments: Attachment[] | undefined;
}

export const DEFAULT_STATE_DIR = "/var/lib/weftnet";
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]*$/;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Semver-ish order for the versions we compare ("1.1.0" >= "1.0.0"). */
export function versionAtLeast(v: string, min: string): boolean {
  const a = v.split(".").map(Number);
  const b = min.split(".").map(Number);
  for (let i = 0; i < 3; i++) {
    const x = a[i] ?? 0;
    const y = b[i] ?? 0;
    if (x !== y) return x > y;
  }
  return true;
}

/** Decode stdin (error 6), then check the fields (error 1 for the version, 7 for the rest). */
export function parseNetConf(stdin: string): NetConf {
  let raw: unknown;
  try {
    raw = JSON.parse(stdin);
  } catch (e) {
    throw new CniError(CniCode.DECODE_FAILURE, "network configuration on stdin is not valid JSON", (e as Error).message);
  }
  if (!isObject(raw)) throw new CniError(CniCode.DECODE_FAILURE, "network configuration on stdin must be a JSON object");
  const v = raw.cniVersion;
  if (typeof v !== "string" || v === "") throw new CniError(CniCode.INVALID_NETCONF, "network configuration has no cniVersion");
  if (!(SUPPORTED_VERSIONS as readonly string[]).includes(v)) throw new CniError(CniCode.INCOMPATIBLE_VERSION, `incompatible CNI versions: config is ${JSON.stringify(v)}, plugin supports ${JSON.stringify(SUPPORTED_VERSIONS)}`);
  const bad = (msg: string) => new CniError(CniCode.INVALID_NETCONF, msg);
  if (typeof raw.name !== "string" || !NAME_RE.test(raw.name)) throw bad("network configuration needs a name (alphanumeric first, then letters, digits, _ . -)");
  if (raw.type !== "weftnet" && raw.type !== "weftnet-cni") throw bad(`network configuration type is ${JSON.stringify(raw.type)}, this plugin is "weftnet-cni" (or "weftnet")`);
  const str = (k: string): string | undefined => {
    const x = raw[k as keyof typeof raw];
    if (x === undefined) return undefined;
    if (typeof x !== "string" || x === "") throw bad(`${k} must be a non-empty string`);
    return x;
  };
  const stateDir = str("stateDir") ?? DEFAULT_STATE_DIR;
  if (!stateDir.startsWith("/")) throw bad(`stateDir must be an absolute path, got ${JSON.stringify(stateDir)}`);
  const socket = str("socket");
  if (socket !== undefined && !socket.startsWith("/")) throw bad(`socket must be an absolute path, got ${JSON.stringify(socket)}`);
  const bridge = str("bridge");
  if (bridge !== undefined && !IFNAME_RE.test(bridge)) throw bad(`bridge ${JSON.stringify(bridge)} is not a valid interface name`);
  const int = (k: string, lo: number, hi: number): number | undefined => {
    const x = raw[k as keyof typeof raw];
    if (x === undefined) return undefined;
    if (typeof x !== "number" || !Number.isInteger(x) || x < lo || x > hi) throw bad(`${k} must be an integer in ${lo}..${hi}, got ${JSON.stringify(x)}`);
    return x;
  };
  const mtu = int("mtu", 576, 65535);
  const ipamTimeoutMs = int("ipamTimeoutMs", 0, 600_000) ?? 30_000;
  const logLevel = str("logLevel") ?? "warn";
  if (logLevel !== "debug" && logLevel !== "info" && logLevel !== "warn" && logLevel !== "error") throw bad(`logLevel must be debug, info, warn or error`);
  if (raw.dns !== undefined && !isObject(raw.dns)) throw bad("dns must be an object");
  if (raw.prevResult !== undefined && !isObject(raw.prevResult)) throw bad("prevResult must be an object");
  let validAttachments: Attachment[] | undefined;
  const va = raw["cni.dev/valid-attachments"];
  if (va !== undefined) {
    if (!Array.isArray(va)) throw bad("cni.dev/valid-attachments must be a list");
    validAttachments = va.map((a, i) => {
      if (!isObject(a) || typeof a.containerID !== "string" || typeof a.ifname !== "string") throw bad(`cni.dev/valid-attachments[${i}] must be {containerID, ifname}`);
      return { containerID: a.containerID, ifname: a.ifname };
    });
  }
  return {
    cniVersion: v as CniVersion,
    name: raw.name,
    type: raw.type,
    stateDir,
    socket,
    bridge,
    mtu,
    ipamTimeoutMs,
    logLevel,
    dns: raw.dns as Record<string, unknown> | undefined,
    prevResult: raw.prevResult as Record<string, unknown> | undefined,
    validAttachments,
  };
}

/** What ADD created, in the shape result() needs. */
export interface AddOutcome {
  hostVeth: string;
  hostMac: string;
  ifName: string;
  mac: string;
  sandbox: string;
  mtu: number;
  ip: string;
  prefixLen: number;
  gateway: string;
}

export interface CniResult {
  cniVersion: string;
  interfaces: { name: string; mac: string; sandbox?: string; mtu?: number }[];
  ips: { address: string; gateway: string; interface: number; version?: "4" }[];
  routes: { dst: string; gw?: string }[];
  dns: Record<string, unknown>;
}

/**
 * The ADD result: interfaces [host veth, container interface], one IPv4 address on the container
 * interface (index 1), a default route via the block's gateway, dns from the config (or {}).
 * 0.4.0 results carry ips[].version; interfaces[].mtu exists from 1.1.0 on.
 */
export function result(version: CniVersion, o: AddOutcome, dns: Record<string, unknown> | undefined): CniResult {
  const container: CniResult["interfaces"][number] = { name: o.ifName, mac: o.mac, sandbox: o.sandbox };
  const host: CniResult["interfaces"][number] = { name: o.hostVeth, mac: o.hostMac };
  if (versionAtLeast(version, "1.1.0")) {
    host.mtu = o.mtu;
    container.mtu = o.mtu;
  }
  const ip: CniResult["ips"][number] = { address: `${o.ip}/${o.prefixLen}`, gateway: o.gateway, interface: 1 };
  if (version === "0.4.0") ip.version = "4";
  return { cniVersion: version, interfaces: [host, container], ips: [ip], routes: [{ dst: "0.0.0.0/0", gw: o.gateway }], dns: dns ?? {} };
}

/** The spec's error object. */
export function errorJson(version: string, e: CniError): { cniVersion: string; code: number; msg: string; details?: string } {
  const out: { cniVersion: string; code: number; msg: string; details?: string } = { cniVersion: version, code: e.cniCode, msg: e.message };
  if (e.details) out.details = e.details;
  return out;
}

/**
 * The address CHECK expects, from prevResult: the IPv4 entry on the interface named ifName (in the
 * sandbox), else the only IPv4 entry. Error 7 when prevResult has none.
 */
export function expectedFromPrevResult(prev: Record<string, unknown> | undefined, ifName: string): { ip: string; prefixLen: number; gateway: string } {
  if (!prev) throw new CniError(CniCode.INVALID_NETCONF, "CHECK needs prevResult (the ADD result) in the network configuration");
  const ifaces = Array.isArray(prev.interfaces) ? (prev.interfaces as unknown[]) : [];
  const ips = Array.isArray(prev.ips) ? (prev.ips as unknown[]) : [];
  const v4 = ips.filter((x): x is { address: string; gateway?: string; interface?: number } => isObject(x) && typeof x.address === "string" && /^\d+\.\d+\.\d+\.\d+\/\d+$/.test(x.address));
  const onIf = v4.filter((x) => typeof x.interface === "number" && isObject(ifaces[x.interface]) && (ifaces[x.interface] as { name?: unknown }).name === ifName);
  const pick = onIf[0] ?? (v4.length === 1 ? v4[0] : undefined);
  if (!pick) throw new CniError(CniCode.INVALID_NETCONF, `prevResult has no IPv4 address for ${ifName}`);
  const [ip, len] = pick.address.split("/") as [string, string];
  const gateway = typeof pick.gateway === "string" ? pick.gateway : undefined;
  if (!gateway) throw new CniError(CniCode.INVALID_NETCONF, `prevResult's address ${pick.address} has no gateway`);
  return { ip, prefixLen: Number(len), gateway };
}
