/**
 * `weftnet netcheck`: what NAT is this host behind? Asks STUN Binding requests from ONE local UDP socket
 * to every STUN address it knows (by default the signaling server's two STUN ports, learned from the
 * running agent's local API; or --stun HOST:PORT, repeatable) and compares what comes back:
 *
 *   nothing answers (each request retried)          -> "UDP blocked"
 *   a mapped address is one of this host's addresses -> "no NAT"
 *   different mappings for different destinations   -> "address/port-dependent mapping (symmetric)"
 *   the same mapping for every destination (>= 2)   -> "endpoint-independent mapping (cone)"
 *   only one destination answered                   -> "NAT, mapping behaviour unknown" (give a 2nd STUN address)
 *
 * Two ports on one server are enough for the NATs this is for: Linux MASQUERADE keeps the source port
 * for every destination (cone), --random-fully and most CGNATs pick a new port per destination
 * (symmetric). Filtering behaviour (restricted vs full cone) is not probed: it needs a server that
 * answers from another address, which the signaling server does not have.
 *
 * The verdict logic (netcheckVerdict) is pure; the probing is a thin dgram loop.
 */
import { randomBytes } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { networkInterfaces } from "node:os";
import { UsageError, WeftError } from "../src/errors.js";
import { encodeBindingRequest, parseBindingSuccess } from "../src/wire/stun.js";
import type { AgentStatus } from "./agent.js";
import { apiRequest } from "./api-client.js";
import { parse, positiveInt } from "./cli/util.js";
import { apiSocketPath, defaultStateDir } from "./state.js";

export type NetcheckVerdict =
  | "no NAT"
  | "endpoint-independent mapping (cone)"
  | "address/port-dependent mapping (symmetric)"
  | "UDP blocked"
  | "NAT, mapping behaviour unknown";

export interface ProbeResult {
  /** the STUN server as given, HOST:PORT */
  server: string;
  /** the address we sent to, IP:PORT */
  target: string;
  /** XOR-MAPPED-ADDRESS as IP:PORT, null when no answer came */
  mapped: string | null;
  rttMs: number | null;
  attempts: number;
}

export interface NetcheckReport {
  udp: boolean;
  /** the first mapped address seen (what peers would see), null when UDP is blocked */
  reflexive: string | null;
  /** true: symmetric; false: same mapping everywhere; null: could not tell (fewer than 2 answers) */
  mappingVariesByDestination: boolean | null;
  natted: boolean | null;
  verdict: NetcheckVerdict;
  /** why, in one line */
  detail: string;
  localPort: number;
  localAddresses: string[];
  probes: ProbeResult[];
}

function splitHostPort(s: string): { host: string; port: number } | undefined {
  const v6 = /^\[([^\]]+)\]:(\d{1,5})$/.exec(s);
  if (v6) return { host: v6[1]!, port: Number(v6[2]) };
  const m = /^([^:\s]+):(\d{1,5})$/.exec(s);
  if (!m || Number(m[2]) > 65535 || Number(m[2]) === 0) return undefined;
  return { host: m[1]!, port: Number(m[2]) };
}

/** Pure: the verdict from the probes of one socket. */
export function netcheckVerdict(input: { localAddresses: readonly string[]; localPort: number; probes: readonly Pick<ProbeResult, "target" | "mapped">[] }): Omit<NetcheckReport, "localPort" | "localAddresses" | "probes"> {
  const answered = input.probes.filter((p) => p.mapped !== null);
  if (answered.length === 0) {
    return { udp: false, reflexive: null, mappingVariesByDestination: null, natted: null, verdict: "UDP blocked", detail: `no STUN answer from ${input.probes.length} address(es): outbound UDP is blocked or the server is unreachable over UDP` };
  }
  const reflexive = answered[0]!.mapped!;
  const mappings = new Set(answered.map((p) => p.mapped!));
  const varies = answered.length >= 2 ? mappings.size > 1 : null;
  const local = new Set(input.localAddresses);
  const hostOf = (a: string) => splitHostPort(a)?.host ?? a;
  const portOf = (a: string) => splitHostPort(a)?.port;
  const untranslated = answered.every((p) => local.has(hostOf(p.mapped!)) && portOf(p.mapped!) === input.localPort);
  if (untranslated) return { udp: true, reflexive, mappingVariesByDestination: varies, natted: false, verdict: "no NAT", detail: `STUN sees this host's own address ${reflexive}` };
  if (varies === true) {
    return { udp: true, reflexive, mappingVariesByDestination: true, natted: true, verdict: "address/port-dependent mapping (symmetric)", detail: `one local socket was seen as ${[...mappings].join(", ")} by ${answered.map((p) => p.target).join(", ")}: direct links to other NATed peers need a relay or a peer in between` };
  }
  if (varies === false) {
    return { udp: true, reflexive, mappingVariesByDestination: false, natted: true, verdict: "endpoint-independent mapping (cone)", detail: `one local socket was seen as ${reflexive} by ${answered.length} destinations: hole punching works with every peer not behind symmetric NAT` };
  }
  return { udp: true, reflexive, mappingVariesByDestination: null, natted: true, verdict: "NAT, mapping behaviour unknown", detail: `only ${answered[0]!.target} answered (seen as ${reflexive}); a second STUN address (signal --stun-alt-port, or netcheck --stun twice) tells cone from symmetric` };
}

function localIPv4s(): string[] {
  const out: string[] = [];
  for (const addrs of Object.values(networkInterfaces())) for (const a of addrs ?? []) if (a.family === "IPv4") out.push(a.address);
  return out;
}

/** Send Binding requests from `sock` to host:port until one is answered or `attempts` ran out. */
async function probe(sock: Socket, server: string, host: string, port: number, timeoutMs: number, attempts: number): Promise<ProbeResult> {
  const target = `${host.includes(":") ? `[${host}]` : host}:${port}`;
  const tid = new Uint8Array(randomBytes(12));
  const req = encodeBindingRequest(tid);
  const key = Buffer.from(tid).toString("hex");
  let tries = 0;
  return await new Promise<ProbeResult>((resolve) => {
    let t0 = 0;
    let timer: NodeJS.Timeout | undefined;
    const onMsg = (msg: Buffer, rinfo: { address: string; port: number }) => {
      const r = parseBindingSuccess(msg);
      if (!r.ok || Buffer.from(r.value.transactionId).toString("hex") !== key) return;
      if (rinfo.port !== port) return;
      const m = r.value.mapped;
      finish({ server, target, mapped: m.family === "IPv6" ? `[${m.address}]:${m.port}` : `${m.address}:${m.port}`, rttMs: Math.round((performance.now() - t0) * 10) / 10, attempts: tries });
    };
    const finish = (res: ProbeResult) => {
      if (timer) clearTimeout(timer);
      sock.off("message", onMsg);
      resolve(res);
    };
    const send = () => {
      if (tries >= attempts) return finish({ server, target, mapped: null, rttMs: null, attempts: tries });
      tries++;
      t0 = performance.now();
      sock.send(req, port, host, () => {});
      timer = setTimeout(send, timeoutMs);
    };
    sock.on("message", onMsg);
    send();
  });
}

export interface NetcheckOptions {
  servers: string[];
  /** per attempt (default 700 ms) */
  timeoutMs?: number;
  /** attempts per server (default 3) */
  attempts?: number;
}

export async function netcheck(opts: NetcheckOptions): Promise<NetcheckReport> {
  if (opts.servers.length === 0) throw new UsageError("netcheck needs at least one STUN server");
  const targets: { server: string; host: string; port: number }[] = [];
  for (const s of opts.servers) {
    const hp = splitHostPort(s);
    if (!hp) throw new UsageError(`weftnet netcheck: --stun ${JSON.stringify(s)} must be HOST:PORT`);
    let host = hp.host;
    if (!isIP(host)) {
      try {
        host = (await lookup(host, { family: 4 })).address;
      } catch (e) {
        throw new WeftError("ERR_RESOLVE", `cannot resolve STUN host ${hp.host}: ${(e as Error).message}`);
      }
    }
    targets.push({ server: s, host, port: hp.port });
  }
  const v6 = targets.every((t) => isIP(t.host) === 6);
  const sock = createSocket(v6 ? "udp6" : "udp4");
  sock.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    sock.once("error", reject);
    sock.bind(0, () => {
      sock.off("error", reject);
      resolve();
    });
  });
  try {
    const probes: ProbeResult[] = [];
    // One at a time: the destinations must see the same local socket, and the order keeps reports stable.
    for (const t of targets) probes.push(await probe(sock, t.server, t.host, t.port, opts.timeoutMs ?? 700, opts.attempts ?? 3));
    const localPort = sock.address().port;
    const localAddresses = localIPv4s();
    return { ...netcheckVerdict({ localAddresses, localPort, probes }), localPort, localAddresses, probes };
  } finally {
    sock.close();
  }
}

export const NETCHECK_HELP = `Usage: weftnet netcheck [--json] [--stun HOST:PORT ...] [--state-dir D] [--timeout MS]

Report this host's NAT behaviour: is UDP to the STUN server reachable, which public (reflexive)
address does it see, and does the mapping vary by destination (symmetric NAT) or not (cone).
By default it asks the running agent for the signaling server's STUN ports (the server needs
--stun-alt-port to tell cone from symmetric); --stun HOST:PORT (repeatable) works without an agent.

  --stun HOST:PORT  STUN server to probe, repeatable (replaces the agent's)
  --timeout MS      per attempt, 3 attempts per server (default 700)
  --json            {udp, reflexive, mappingVariesByDestination, natted, verdict, detail, probes:[...]}
  --state-dir D     the agent's state dir (default: /var/lib/weftnet as root, else $XDG_STATE_HOME/weftnet)
`;

export async function runNetcheck(argv: string[]): Promise<number> {
  const { values } = parse("netcheck", argv, { json: { type: "boolean" }, stun: { type: "string", multiple: true }, timeout: { type: "string" }, "state-dir": { type: "string" }, help: { type: "boolean", short: "h" } });
  if (values.help) {
    process.stdout.write(NETCHECK_HELP);
    return 0;
  }
  const timeoutMs = positiveInt("netcheck", "--timeout", values.timeout, 700);
  let servers = values.stun ?? [];
  if (servers.length === 0) {
    const sock = apiSocketPath(values["state-dir"] ?? defaultStateDir());
    let st: AgentStatus;
    try {
      st = await apiRequest<AgentStatus>(sock, "GET", "/v1/status", undefined, 5000);
    } catch (e) {
      throw new WeftError("ERR_NO_AGENT", `${(e as Error).message}; or give the STUN server with --stun HOST:PORT`);
    }
    const stun = st.node.signal.stun;
    if (!stun || stun.port === 0) throw new WeftError("ERR_NO_STUN", "the agent knows no STUN port of its signaling server (not registered yet, or the server runs with --stun-port 0); give --stun HOST:PORT");
    const h = stun.host.startsWith("[") ? stun.host : stun.host.includes(":") ? `[${stun.host}]` : stun.host;
    servers = [`${h}:${stun.port}`, ...(stun.altPort ? [`${h}:${stun.altPort}`] : [])];
  }
  const r = await netcheck({ servers, timeoutMs });
  if (values.json) {
    process.stdout.write(JSON.stringify(r, null, 2) + "\n");
    return 0;
  }
  const answered = r.probes.filter((p) => p.mapped).length;
  const lines = [
    `UDP         ${r.udp ? `yes (${answered} of ${r.probes.length} STUN addresses answered)` : "BLOCKED (no STUN answer)"}`,
    `reflexive   ${r.reflexive ?? "-"}`,
    `mapping     ${r.mappingVariesByDestination === null ? "unknown" : r.mappingVariesByDestination ? "varies by destination" : "same for every destination"}`,
    `verdict     ${r.verdict}`,
    `            ${r.detail}`,
    "",
    ...r.probes.map((p) => `  ${p.target.padEnd(24)} ${p.mapped ? `-> ${p.mapped} in ${p.rttMs} ms` : `no answer after ${p.attempts} attempts`}`),
  ];
  process.stdout.write(lines.join("\n") + "\n");
  return 0;
}
