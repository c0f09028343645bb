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
import { connect, isIP } from "node:net";
import { networkInterfaces } from "node:os";
import { UsageError, WeftError } from "../src/errors.js";
import { WebSocket } from "ws";
import { encodeBindingRequest, parseBindingSuccess } from "../src/wire/stun.js";
import { decodeServerMsg } from "../src/wire/signal.js";
import { signalEndpoint } from "./signal-client.js";
import type { AgentStatus } from "./status.js";
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

/** `weftnet signal`'s default STUN port */
const DEFAULT_STUN = 3478;

export const NETCHECK_HELP = `Usage: weftnet netcheck [--signal URL] [--stun HOST:PORT ...] [--json] [--state-dir D] [--timeout MS]

Check what this host needs to join a mesh, and report its NAT behaviour:
  signaling  DNS, TCP, WebSocket upgrade and the server's first protocol message (its challenge) at
             --signal URL (else env WEFTNET_SIGNAL, else the running agent's server); also TCP over
             IPv6 when the server has an IPv6 address
  UDP        is UDP to the STUN server reachable, which public (reflexive) address does it see, and
             does the mapping vary by destination (symmetric NAT) or not (cone)
  IPv6       this host's global IPv6 addresses
STUN servers: --stun HOST:PORT (repeatable), else the ones the running agent uses (the signaling
server's STUN ports — the server needs --stun-alt-port to tell cone from symmetric —, its --ice-server
stun: URLs, or, with none of those, STUN servers other agents advertise with --stun-port), else port
${DEFAULT_STUN} of the --signal host. Each is printed with its source: --stun, flag (--ice-server),
signaling server, agent NAME. Exits 1 when a check fails (UDP blocked, signaling unreachable), 0 otherwise.

  --signal URL      signaling server to check, ws://HOST:PORT or wss://HOST:PORT
  --stun HOST:PORT  STUN server to probe, repeatable (replaces the agent's)
  --timeout MS      per attempt, 3 attempts per STUN server (default 700); signaling steps get 3000
  --json            {ok, signal:{ok, dns, tcp, websocket, hello, tcp6}, stun:{servers, source, sources:
                    [{server, source}]}, udp,
                    reflexive, mappingVariesByDestination, natted, verdict, detail, probes:[...], ipv6}
  --state-dir D     the agent's state dir (default: /var/lib/weftnet as root, else $XDG_STATE_HOME/weftnet)
`;

export async function runNetcheck(argv: string[]): Promise<number> {
  const { values } = parse("netcheck", argv, {
    json: { type: "boolean" },
    signal: { type: "string" },
    stun: { type: "string", multiple: true },
    timeout: { type: "string" },
    "state-dir": { type: "string" },
    help: { type: "boolean", short: "h" },
  });
  if (values.help) {
    process.stdout.write(NETCHECK_HELP);
    return 0;
  }
  const timeoutMs = positiveInt("netcheck", "--timeout", values.timeout, 700);
  let signalUrl = values.signal ?? (process.env.WEFTNET_SIGNAL?.trim() || undefined);
  let servers = values.stun ?? [];
  let source = servers.length ? "--stun" : "";
  /** per server: where it came from (flag, signaling server, agent NAME) */
  let sources: { server: string; source: string }[] = servers.map((server) => ({ server, source: "flag" }));
  let agentError: string | undefined;
  if (servers.length === 0 || signalUrl === undefined) {
    // Ask the running agent (if any) for its signaling server and the STUN servers it uses: the
    // server's STUN ports, --ice-server stun: URLs, or the STUN servers other agents advertise.
    try {
      const st = await apiRequest<AgentStatus>(apiSocketPath(values["state-dir"] ?? defaultStateDir()), "GET", "/v1/status", undefined, 5000);
      signalUrl ??= st.node.signal.url;
      const stun = st.node.signal.stun;
      const using = st.stun?.using ?? [];
      if (servers.length === 0 && using.length > 0) {
        sources = using.map((u) => ({ server: u.server, source: u.source }));
        servers = sources.map((u) => u.server);
        source = [...new Set(sources.map((u) => u.source))].join(", ");
      } else if (servers.length === 0 && stun && stun.port !== 0) {
        const h = stun.host.startsWith("[") ? stun.host : stun.host.includes(":") ? `[${stun.host}]` : stun.host;
        servers = [`${h}:${stun.port}`, ...(stun.altPort ? [`${h}:${stun.altPort}`] : [])];
        source = "signaling server";
        sources = servers.map((server) => ({ server, source }));
      }
    } catch (e) {
      agentError = (e as Error).message;
    }
  }
  if (servers.length === 0 && signalUrl !== undefined) {
    let host: string;
    try {
      host = new URL(signalEndpoint(signalUrl)).hostname;
    } catch (e) {
      throw new UsageError(`weftnet netcheck: ${(e as Error).message}`);
    }
    servers = [`${host}:${DEFAULT_STUN}`];
    source = `the default STUN port of the --signal host (the agent's server would tell its real ports)`;
    sources = [{ server: servers[0]!, source: "signaling server (default port)" }];
  }
  if (servers.length === 0) {
    throw new WeftError("ERR_NO_AGENT", `nothing to check: give --signal URL or --stun HOST:PORT${agentError ? ` (${agentError})` : ""}`);
  }
  const [signal, r] = await Promise.all([signalUrl !== undefined ? checkSignal(signalUrl, Math.max(timeoutMs, 3000)) : Promise.resolve(null), netcheck({ servers, timeoutMs })]);
  const ipv6 = { addresses: globalIPv6(), signal: signal?.tcp6 ?? null };
  const ok = r.udp && (signal === null || signal.ok);
  if (values.json) {
    process.stdout.write(JSON.stringify({ ok, signal, stun: { servers, source, sources }, ...r, ipv6 }, null, 2) + "\n");
    return ok ? 0 : 1;
  }
  const step = (name: string, c: CheckStep) => `  ${name.padEnd(10)} ${c.ok ? "ok    " : "FAILED"} ${c.detail}${c.ok && c.ms !== null && c.ms > 0 ? ` (${c.ms} ms)` : ""}`;
  const answered = r.probes.filter((p) => p.mapped).length;
  const lines = [
    ...(signal
      ? [`signaling   ${signal.url} ${signal.ok ? "reachable" : "NOT REACHABLE"}`, step("dns", signal.dns), step("tcp", signal.tcp), step("websocket", signal.websocket), step("hello", signal.hello), ""]
      : ["signaling   not checked (give --signal URL)", ""]),
    `STUN        ${sources.map((u) => `${u.server} (${u.source === "flag" ? "--stun" : u.source})`).join(", ")}`,
    `UDP         ${r.udp ? `yes (${answered} of ${r.probes.length} STUN addresses answered)` : "BLOCKED (no STUN answer)"}`,
    `reflexive   ${r.reflexive ?? "-"}`,
    `mapping     ${r.mappingVariesByDestination === null ? "unknown" : r.mappingVariesByDestination ? "varies by destination" : "same for every destination"}`,
    `verdict     ${r.verdict}`,
    `            ${r.detail}`,
    ...r.probes.map((p) => `  ${p.target.padEnd(24)} ${p.mapped ? `-> ${p.mapped} in ${p.rttMs} ms` : `no answer after ${p.attempts} attempts`}`),
    "",
    `IPv6        ${ipv6.addresses.length ? ipv6.addresses.join(", ") : "no global address"}${ipv6.signal ? `; signaling over IPv6: ${ipv6.signal.ok ? "ok" : `FAILED (${ipv6.signal.detail})`}` : ""}`,
  ];
  process.stdout.write(lines.join("\n") + "\n");
  return ok ? 0 : 1;
}

// ---- the signaling server: DNS, TCP, WebSocket upgrade, its first protocol message ----------------

export interface CheckStep {
  ok: boolean;
  /** what was found (addresses, times), or why it failed */
  detail: string;
  ms: number | null;
}

export interface SignalCheck {
  url: string;
  ok: boolean;
  dns: CheckStep;
  tcp: CheckStep;
  websocket: CheckStep;
  /** the server's first message (its challenge): it speaks weftnet's signaling protocol */
  hello: CheckStep;
  /** TCP over IPv6 to the server's AAAA address, when it has one */
  tcp6: CheckStep | null;
}

const skipped = (why: string): CheckStep => ({ ok: false, detail: `skipped: ${why}`, ms: null });

function tcpConnect(host: string, port: number, timeoutMs: number): Promise<CheckStep> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const done = (step: CheckStep) => {
      s.destroy();
      resolve(step);
    };
    s.setTimeout(timeoutMs, () => done({ ok: false, detail: `no answer from ${host}:${port} within ${timeoutMs} ms (filtered?)`, ms: null }));
    s.once("connect", () => done({ ok: true, detail: `connected to ${host.includes(":") ? `[${host}]` : host}:${port}`, ms: round1(performance.now() - t0) }));
    s.once("error", (e: NodeJS.ErrnoException) => done({ ok: false, detail: `${e.code ?? "error"}: ${e.message}`, ms: null }));
  });
}

function round1(x: number): number {
  return Math.round(x * 10) / 10;
}

/** Open the WebSocket and wait for the server's first message (a challenge); never sends a hello. */
function wsCheck(endpoint: string, timeoutMs: number): Promise<{ websocket: CheckStep; hello: CheckStep }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const ws = new WebSocket(endpoint, { handshakeTimeout: timeoutMs, maxPayload: 64 * 1024 });
    let upgraded: CheckStep | undefined;
    let timer: NodeJS.Timeout | undefined;
    const done = (r: { websocket: CheckStep; hello: CheckStep }) => {
      if (timer) clearTimeout(timer);
      ws.removeAllListeners();
      ws.on("error", () => {});
      ws.terminate();
      resolve(r);
    };
    ws.on("unexpected-response", (_req, res) => done({ websocket: { ok: false, detail: `HTTP ${res.statusCode} instead of a WebSocket upgrade (is this a weftnet signaling server? path ${new URL(endpoint).pathname})`, ms: null }, hello: skipped("no WebSocket") }));
    ws.on("error", (e: NodeJS.ErrnoException) => done({ websocket: upgraded ?? { ok: false, detail: `${e.code ? `${e.code}: ` : ""}${e.message}`, ms: null }, hello: upgraded ? { ok: false, detail: e.message, ms: null } : skipped("no WebSocket") }));
    ws.on("open", () => {
      upgraded = { ok: true, detail: `upgraded at ${endpoint}`, ms: round1(performance.now() - t0) };
      timer = setTimeout(() => done({ websocket: upgraded!, hello: { ok: false, detail: `no message from the server within ${timeoutMs} ms`, ms: null } }), timeoutMs);
    });
    ws.on("close", (code, reason) => done({ websocket: upgraded ?? { ok: false, detail: `closed (${code})`, ms: null }, hello: { ok: false, detail: `closed before its first message: ${code} ${reason.toString()}`, ms: null } }));
    ws.on("message", (raw: Buffer) => {
      let t: string;
      try {
        t = decodeServerMsg(raw).t;
      } catch (e) {
        done({ websocket: upgraded!, hello: { ok: false, detail: `the server's first message does not decode: ${(e as Error).message}`, ms: null } });
        return;
      }
      const ms = round1(performance.now() - t0);
      done({ websocket: upgraded!, hello: t === "challenge" ? { ok: true, detail: "the server sent its challenge (weftnet signaling protocol)", ms } : { ok: false, detail: `expected a challenge, got ${t}`, ms: null } });
    });
  });
}

export async function checkSignal(url: string, timeoutMs = 3000): Promise<SignalCheck> {
  let endpoint: string;
  try {
    endpoint = signalEndpoint(url);
  } catch (e) {
    throw new UsageError(`weftnet netcheck: ${(e as Error).message}`);
  }
  const u = new URL(endpoint);
  const host = u.hostname.replace(/^\[|\]$/g, "");
  const port = Number(u.port || (u.protocol === "wss:" ? 443 : 80));
  let addrs: { address: string; family: number }[] = [];
  let dns: CheckStep;
  const t0 = performance.now();
  if (isIP(host)) {
    addrs = [{ address: host, family: isIP(host) }];
    dns = { ok: true, detail: `${host} is an address (no lookup needed)`, ms: 0 };
  } else {
    try {
      addrs = await lookup(host, { all: true });
      dns = { ok: addrs.length > 0, detail: addrs.length ? `${host} -> ${addrs.map((a) => a.address).join(", ")}` : `${host} has no address`, ms: round1(performance.now() - t0) };
    } catch (e) {
      dns = { ok: false, detail: `cannot resolve ${host}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, ms: null };
    }
  }
  const v4 = addrs.find((a) => a.family === 4) ?? addrs[0];
  const v6 = addrs.find((a) => a.family === 6);
  const tcp = v4 ? await tcpConnect(v4.address, port, timeoutMs) : skipped("no address");
  const { websocket, hello } = tcp.ok ? await wsCheck(endpoint, timeoutMs) : { websocket: skipped("no TCP connection"), hello: skipped("no TCP connection") };
  const tcp6 = v6 && v6 !== v4 ? await tcpConnect(v6.address, port, timeoutMs) : null;
  return { url: endpoint, ok: dns.ok && tcp.ok && websocket.ok && hello.ok, dns, tcp, websocket, hello, tcp6 };
}

/** This host's global IPv6 addresses (no loopback, link-local or unique-local). */
export function globalIPv6(): string[] {
  const out: string[] = [];
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === "IPv6" && !a.internal && !/^(fe80|fc|fd)/i.test(a.address)) out.push(a.address);
  }
  return out;
}
