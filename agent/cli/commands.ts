/** `weftnet agent`, `weftnet status`, `weftnet ping`. */
import { setAnswerWait } from "../os/fd-reader.js";
import { SEGMENT_MODES, type SegmentMode } from "../../src/packet/gso-policy.js";
import v8 from "node:v8";
import { readFileSync } from "node:fs";
import { createLogger, type Logger } from "../../src/log.js";
import { CidrError, parseCidr } from "../../src/ipam/cidr.js";
import { aggregateCidrs } from "../../src/ipam/aggregate.js";
import { peerKeyOf } from "../../src/identity.js";
import { ViewerHub } from "../ui/viewer.js";
import { startUiServer, type UiServer } from "../ui/server.js";
import { loadInviteKey, mintInvite, parseInvitePub } from "../ui/invite.js";
import { UsageError, WeftError } from "../../src/errors.js";
import { DEFAULT_CLUSTER_RANGE } from "../../src/defaults.js";
import { parseStunAdvertise } from "../stun-server.js";
import { Agent, checkAdvertisedRoutes, type AgentStatus, type IceServer, type RouteStatus } from "../agent.js";
import { apiRequest } from "../api-client.js";
import { MAX_LINK_MTU } from "../transport/link-base.js";
import { DEFAULT_TOKEN_PATH, inClusterAvailable } from "../k8s.js";
import { apiSocketPath, defaultStateDir } from "../state.js";
import { loadOperatorKey, signRelease } from "./operator.js";
import { didYouMean, fmtBytes, fmtDuration, fmtRtt, LOG_OPTIONS, logOptions, parse, positiveInt, resolveToken, table, type Options } from "./util.js";

export const AGENT_HELP = `Usage: weftnet agent --signal URL (--token T | --token-file F) [options]

Run the node agent: register with the signaling server, build the WebRTC mesh with every other agent
and serve the local API on <state-dir>/agent.sock (used by status/ping).

Options:
  --config F            read options from JSON file F: {"signal": "ws://…", "token-file": "…",
                        "advertise-routes": ["…"], "no-relay": true, …} (keys are the long flag names);
                        flags on the command line win, then environment variables, then the file
  --signal URL[,URL..] signaling server(s), ws://HOST:PORT or wss://HOST:PORT (required; or env
                        WEFTNET_SIGNAL); several: one at a time, next on failure, back to the
                        first that answers
  --token T             cluster token (or --token-file F, or env WEFTNET_TOKEN)
  --token-file F        read the cluster token from file F
  --name N              node name shown to peers (default: hostname)
  --state-dir D         identity key and local API socket (default: /var/lib/weftnet as root,
                        else $XDG_STATE_HOME/weftnet)
  --no-tun              control plane only: no TUN device, bridge or routes, no root needed
  --iface NAME          TUN interface for the cluster range (default weft0)
  --bridge NAME         bridge for this node's pods (default weft-br0)
  --mtu N               MTU of the TUN, the bridge and pods (default 1400: fits one 1500-byte
                        datagram after DTLS/SCTP/UDP/IP overhead)
  --range CIDR          cluster pod range; the first agent's range becomes the mesh's, an agent with a
                        different one is refused (default 10.40.0.0/16)
  --block-size N        prefix length of the blocks nodes own (default 26: 64 addresses)
  --reclaim-after DUR   blocks of a node silent this long are taken over by exactly one heir
                        (default 10m; e.g. 90s, 10m, 1h)
  --transport T         WebRTC implementation: auto (default: native when node-datachannel loads,
                        else werift), werift (pure JS), native (libdatachannel, ~4x the throughput)
  --link-mtu N|auto     path MTU the native transport assumes between nodes, 1280..4096 (default auto:
                        this host's uplink MTU, e.g. 1500 on Ethernet, 4096 with jumbo frames). Larger
                        means fewer UDP datagrams: measured up to 2x the throughput. Each link above
                        1280 checks once open that such packets reach the peer; where they do not
                        (a smaller MTU on the way), that peer's links step down (4096 -> 1500 ->
                        1280) for an hour
  --connect-timeout DUR give up on a WebRTC attempt that has not opened after this long (default 10s);
                        after one such failure the link goes through the signaling server's relay
                        while WebRTC is retried in the background (backoff up to 5 min)
  --no-relay            never use the signaling server's relay (peers unreachable otherwise stay down)
  --no-bulk             no bulk link: pod traffic stays on WebRTC (default: a direct UDP fast path per
                        peer, negotiated over the mesh, used where it connects, WebRTC where not)
  --bulk-port N         UDP port of the bulk link (default 0: any free port; set one to allow it
                        through a firewall)
  --no-answer-wait      never wait on the CPU for the answer to an exchange the bulk link started
                        (default: up to 2x the peer's round trip, for peers within 2 ms, at most 2%
                        of the CPU; saves a cold wake-up per exchange). Env WEFTNET_ANSWER_WAIT=0
  --segment auto|always|off
                        cut TCP super-packets into MTU-sized packets before they go on a WebRTC
                        link, so one lost datagram costs one packet (default auto: from ~0.25%
                        observed loss on that link; always; off). The bulk link always does it
  --advertise-routes CIDR[,CIDR]
                        make this node the mesh's gateway for networks it can reach that the mesh does
                        not own (a home LAN, another cluster's pod range); refused when a prefix
                        overlaps the cluster range; when it overlaps another node's, both sides report
                        the conflict in status and other nodes install neither (see --accept-routes)
  --accept-routes CIDR[,CIDR]|all
                        install routes other nodes advertise only when they lie within these CIDRs
                        (or \`all\`); default none. Never installed: loopback, link-local/169.254 (cloud
                        metadata), this host's networks, the signaling/STUN/TURN servers' and peers'
                        addresses; overlapping offers from two nodes are reported, neither installed
  --snat-routes         masquerade mesh traffic to the advertised routes (else hosts there need a route
                        back to the cluster range via this node)
  --cluster NAME        cluster label shown to peers; \`weftnet status\` groups peers by it
  --ice-server URL      extra STUN/TURN server, repeatable: stun:HOST:PORT or
                        turn:USER:PASS@HOST:PORT (credentials may also come as turn:HOST:PORT?user=U&pass=P)
  --no-server-stun      do not use the signaling server's built-in STUN responder
  --stun-port N         serve STUN (RFC 5389 Binding) on UDP port N and advertise it through the mesh:
                        agents with no STUN of their own (a Workers signaling server) gather with it
  --stun-advertise IP[,IP]
                        the address(es) to advertise with --stun-port (default: the address the
                        signaling server sees this agent connect from)
  --loopback-only       ICE on 127.0.0.1 only (single-host demos and tests)
  --metrics-listen HOST:PORT
                        serve Prometheus metrics at http://HOST:PORT/metrics (off by default; no
                        auth: bind to 127.0.0.1 or a private address)
  --k8s-node-watch      watch the Kubernetes API's Node objects and release a deleted Node's address
                        blocks at once (the agent's --name must be the Node name); default on in a pod
                        (KUBERNETES_SERVICE_HOST set and a service-account token mounted); needs
                        get/list/watch on nodes. --no-k8s-node-watch turns it off
  --operator-key KEY|FILE
                        the operator's public key (64 hex, or the .pub file of \`weftnet keygen
                        --operator\`): \`weftnet ipam release\` must then carry the operator's signature,
                        and other nodes' force releases are accepted only with it. Without it, another
                        node's blocks are released only when this agent sees its Kubernetes Node
                        deleted itself (or the node hands them on as it leaves)
  --ui-listen HOST:PORT serve the live topology page at http://HOST:PORT/ui (off by default): the browser
                        joins the mesh as a viewer with the cluster token pasted into the page (it
                        routes nothing and carries no pod traffic) and keeps working without the
                        signaling server. Every agent takes viewers introduced by the mesh or by the
                        signaling server's /ui page, admitted with the cluster token
  --ui-invite-key HEX   also admit viewers holding an invite signed by this signaling server key (64
                        hex; \`weftnet signal --invite-key-file F\` prints it): read-only, until it expires
  --log-level L         debug | info | warn | error (default info: one line per peer up/down and path
                        change; env WEFTNET_LOG)
  --log-format F        auto | text | json (default auto: coloured text on a terminal, JSON lines
                        otherwise; env WEFTNET_LOG_FORMAT)
  --verbose             same as --log-level debug
  -h, --help            this help
`;

export const STATUS_HELP = `Usage: weftnet status [routes|ipam] [--active] [--blocks] [--json] [--state-dir D]

Show this node (its address blocks and pod count) and its peers: id, name, state, path (direct, turn,
relay, via NODE), RTT, bytes in/out, link uptime, and why a link is relayed. Peers that left show when
they were last seen; they are not counted in "peers x/y" and are forgotten 5 min after they left.
\`weftnet status routes\` shows the routing table: next hop per node (direct or via another agent).
\`weftnet status ipam\` shows the cluster range and, per owner, how many blocks and addresses it holds
(aggregated CIDRs), this node's allocations and pending block requests.
  --active        only peers with a live link
  --blocks        status ipam: every block with its owner too (long: a founder holds most of the range)
  --json          machine-readable output: {node:{id,name,blocks,blockCount,pods,...}, peers:[{id,name,
                  state,path,rttMs,lastSeenAgoMs,...}]}; status ipam --json: {range, owners:[...], ...}
  --state-dir D   the agent's state dir (default: /var/lib/weftnet as root, else $XDG_STATE_HOME/weftnet)
`;

export const PING_HELP = `Usage: weftnet ping NODE [--count N] [--timeout MS] [--json] [--state-dir D]

Measure the round-trip time to a peer over the mesh's control channel, and say which path each reply
took: direct, turn (through a TURN server) or relay (through the signaling server) over this node's own
link, or via NODE when there is none (forwarded along the route and timed over the whole path).
NODE is a node id, a unique id prefix, or a node name.
  -c, --count N     pings to send (default 3)
  --timeout MS      per-ping timeout in ms (default 3000)
  --json            print {id, name, rttMs: [...], path: [...], lost} (path per reply)
  --state-dir D     the agent's state dir
`;

function stunPortArg(v: string): number {
  const n = Number(v);
  if (!/^\d{1,5}$/.test(v) || n > 65535) throw new UsageError(`weftnet agent: --stun-port ${JSON.stringify(v)} must be a UDP port (0 = any free port)`);
  return n;
}

function stunAdvertiseArg(v: string, port: string | undefined): string[] {
  if (port === undefined) throw new UsageError("weftnet agent: --stun-advertise needs --stun-port");
  return parseStunAdvertise(v)!;
}

export function parseIceServer(url: string): IceServer {
  const m = /^(stuns?|turns?):(?:([^:@]+):([^@]+)@)?([^?]+)(\?.*)?$/.exec(url);
  if (!m) throw new UsageError(`weftnet agent: --ice-server ${JSON.stringify(url)} is not a stun:/turn: URL`);
  const [, scheme, user, pass, hostport, query] = m;
  const params = new URLSearchParams(query?.slice(1) ?? "");
  const username = user ?? params.get("user") ?? undefined;
  const credential = pass ?? params.get("pass") ?? undefined;
  params.delete("user");
  params.delete("pass");
  const rest = params.toString();
  const out: IceServer = { urls: `${scheme}:${hostport}${rest ? `?${rest}` : ""}` };
  if (scheme!.startsWith("turn") && (!username || !credential)) throw new UsageError(`weftnet agent: --ice-server ${url}: TURN needs a username and password`);
  if (username) out.username = decodeURIComponent(username);
  if (credential) out.credential = decodeURIComponent(credential);
  return out;
}

/**
 * The agent's GC setting. Under load the receiving agent allocates a Buffer per data-channel message
 * (node-datachannel copies each one out of libdatachannel), and V8 started incremental marking for a full
 * mark-compact ~3 times a second because of it, although those Buffers all die young and the old
 * generation hardly grows (measured with --trace-incremental-marking / --trace-gc). Without incremental
 * marking V8 does a major GC only when the old generation is really full (one in a whole iperf3 run),
 * as one pause of ~25 ms on the agent's ~20-40 MB heap; pod-to-pod throughput measured +12-15%.
 * Set before the agent allocates anything; NODE_OPTIONS naming incremental marking takes precedence.
 */
export function tuneAgentGc(): void {
  const own = /^--(no-)?incremental[-_]marking(=|$)/;
  if ((process.env.NODE_OPTIONS ?? "").split(/\s+/).some((a) => own.test(a)) || process.execArgv.some((a) => own.test(a))) return;
  v8.setFlagsFromString("--no-incremental-marking");
}

const AGENT_OPTIONS = {
    config: { type: "string" },
    signal: { type: "string" },
    token: { type: "string" },
    "token-file": { type: "string" },
    name: { type: "string" },
    "state-dir": { type: "string" },
    "no-tun": { type: "boolean" },
    iface: { type: "string" },
    bridge: { type: "string" },
    mtu: { type: "string" },
    "ice-server": { type: "string", multiple: true },
    "no-server-stun": { type: "boolean" },
    "stun-port": { type: "string" },
    "stun-advertise": { type: "string" },
    transport: { type: "string" },
    "link-mtu": { type: "string" },
    "connect-timeout": { type: "string" },
    "advertise-routes": { type: "string", multiple: true },
    "accept-routes": { type: "string", multiple: true },
    "snat-routes": { type: "boolean" },
    cluster: { type: "string" },
    "no-relay": { type: "boolean" },
    "no-bulk": { type: "boolean" },
    "bulk-port": { type: "string" },
    "no-answer-wait": { type: "boolean" },
    segment: { type: "string" },
    range: { type: "string" },
    "block-size": { type: "string" },
    "reclaim-after": { type: "string" },
    "loopback-only": { type: "boolean" },
    "metrics-listen": { type: "string" },
    "ui-listen": { type: "string" },
    "ui-invite-key": { type: "string" },
    "k8s-node-watch": { type: "boolean" },
    "no-k8s-node-watch": { type: "boolean" },
    "operator-key": { type: "string" },
    ...LOG_OPTIONS,
    help: { type: "boolean", short: "h" },
} as const satisfies Options;

type AgentValues = ReturnType<typeof parse<typeof AGENT_OPTIONS>>["values"];

/**
 * --config F: a JSON object of long flag names to values (string, boolean, or a list for repeatable
 * flags). Each key is checked like a flag; command-line flags win over the file.
 */
export function applyConfigFile(values: AgentValues, path: string, options: Options = AGENT_OPTIONS): AgentValues {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new UsageError(`weftnet agent: cannot read --config ${path}: ${(e as Error).message}`);
  }
  let conf: unknown;
  try {
    conf = JSON.parse(text);
  } catch (e) {
    throw new UsageError(`weftnet agent: --config ${path} is not valid JSON: ${(e as Error).message}`);
  }
  if (!conf || typeof conf !== "object" || Array.isArray(conf)) throw new UsageError(`weftnet agent: --config ${path} must hold a JSON object of flag names to values`);
  const out: Record<string, unknown> = { ...values };
  for (const [rawKey, v] of Object.entries(conf as Record<string, unknown>)) {
    const key = rawKey.replace(/^--/, "");
    const opt = options[key];
    if (!opt || key === "config" || key === "help") {
      const hint = didYouMean(key, Object.keys(options).filter((k) => k !== "config" && k !== "help"));
      throw new UsageError(`weftnet agent: --config ${path}: unknown option ${JSON.stringify(rawKey)}${hint ? ` (did you mean "${hint}"?)` : ""}`);
    }
    const bad = () => new UsageError(`weftnet agent: --config ${path}: "${key}" must be ${opt.type === "boolean" ? "true or false" : opt.multiple ? "a string or a list of strings" : "a string"}`);
    let val: unknown;
    if (opt.type === "boolean") {
      if (typeof v !== "boolean") throw bad();
      val = v;
    } else if (opt.multiple) {
      const list = typeof v === "string" ? [v] : Array.isArray(v) && v.every((x) => typeof x === "string") ? v : undefined;
      if (!list) throw bad();
      val = list;
    } else {
      if (typeof v !== "string" && typeof v !== "number") throw bad();
      val = String(v);
    }
    if (out[key] === undefined) out[key] = val;
  }
  return out as AgentValues;
}

export async function runAgent(argv: string[]): Promise<number> {
  let { values } = parse("agent", argv, AGENT_OPTIONS);
  if (values.help) {
    process.stdout.write(AGENT_HELP);
    return 0;
  }
  // Precedence: command-line flags, then the environment (WEFTNET_SIGNAL, WEFTNET_TOKEN, WEFTNET_LOG…), then --config.
  if (values.signal === undefined && process.env.WEFTNET_SIGNAL?.trim()) values = { ...values, signal: process.env.WEFTNET_SIGNAL.trim() };
  if (values.config !== undefined) values = applyConfigFile(values, values.config);
  if (!values.signal) throw new UsageError("weftnet agent: --signal URL is required (e.g. --signal ws://10.0.0.1:7000, or env WEFTNET_SIGNAL, or \"signal\" in --config)");
  const token = resolveToken("agent", values.token, values["token-file"]);
  if (!token) throw new UsageError("weftnet agent: a cluster token is required: --token T, --token-file F or env WEFTNET_TOKEN (printed by `weftnet signal` at first start)");
  const tun = !values["no-tun"];
  const transportKind = values.transport ?? "auto";
  if (transportKind !== "auto" && transportKind !== "werift" && transportKind !== "native") throw new UsageError(`weftnet agent: --transport must be auto, werift or native, got ${JSON.stringify(transportKind)}`);
  for (const f of ["iface", "bridge"] as const) {
    const v = values[f];
    if (v !== undefined && !/^[A-Za-z0-9_.-]{1,15}$/.test(v)) throw new UsageError(`weftnet agent: --${f} ${JSON.stringify(v)} is not a valid interface name (1-15 of A-Z a-z 0-9 _ . -)`);
  }
  let linkMtu: number | "auto" | undefined;
  if (values["link-mtu"] !== undefined && values["link-mtu"] !== "auto") {
    linkMtu = Number(values["link-mtu"]);
    if (!Number.isInteger(linkMtu) || linkMtu < 1280 || linkMtu > MAX_LINK_MTU) throw new UsageError(`weftnet agent: --link-mtu must be an integer between 1280 and ${MAX_LINK_MTU}, got ${JSON.stringify(values["link-mtu"])}`);
    if (transportKind === "werift") throw new UsageError("weftnet agent: --link-mtu applies to the native transport (werift sends fixed 1200-byte SCTP chunks)");
  }
  let bulkPort: number | undefined;
  if (values["bulk-port"] !== undefined) {
    bulkPort = Number(values["bulk-port"]);
    if (!Number.isInteger(bulkPort) || bulkPort < 0 || bulkPort > 65535) throw new UsageError(`weftnet agent: --bulk-port must be a UDP port 0..65535, got ${JSON.stringify(values["bulk-port"])}`);
    if (values["no-bulk"]) throw new UsageError("weftnet agent: --bulk-port and --no-bulk contradict each other");
  }
  const segment = values.segment ?? process.env.WEFTNET_SEGMENT;
  if (segment !== undefined && !(SEGMENT_MODES as readonly string[]).includes(segment)) throw new UsageError(`weftnet agent: --segment must be one of ${SEGMENT_MODES.join(", ")}, got ${JSON.stringify(segment)}`);
  if (values.segment !== undefined && !tun) throw new UsageError("weftnet agent: --segment configures the data plane; it makes no sense with --no-tun");
  let mtu: number | undefined;
  if (values.mtu !== undefined) {
    mtu = Number(values.mtu);
    if (!Number.isInteger(mtu) || mtu < 576 || mtu > 9000) throw new UsageError(`weftnet agent: --mtu must be an integer between 576 and 9000, got ${JSON.stringify(values.mtu)}`);
  }
  if (!tun && (values.iface !== undefined || values.bridge !== undefined || mtu !== undefined)) throw new UsageError("weftnet agent: --iface, --bridge and --mtu configure the data plane; they make no sense with --no-tun");
  if (values.name !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(values.name)) throw new UsageError(`weftnet agent: --name ${JSON.stringify(values.name)} must be 1-63 chars of letters, digits, '.', '_' or '-'`);
  const logOpts = logOptions("agent", values);
  const logger = createLogger({ ...logOpts, component: "agent" });
  const iceServers = (values["ice-server"] ?? []).map(parseIceServer);
  const stateDir = values["state-dir"] ?? defaultStateDir();
  const ipam: { range?: string; blockPrefix?: number; reclaimAfterMs?: number } = {};
  if (values.range !== undefined) {
    try {
      const c = parseCidr(values.range);
      if (c.prefix > 28) throw new CidrError(`prefix /${c.prefix} is too small for a cluster range (at most /28)`);
    } catch (e) {
      throw new UsageError(`weftnet agent: --range ${values.range}: ${(e as Error).message} (give an IPv4 CIDR like 10.40.0.0/16)`);
    }
    ipam.range = values.range;
  }
  if (values["block-size"] !== undefined) {
    const n = Number(values["block-size"].replace(/^\//, ""));
    if (!Number.isInteger(n) || n < 16 || n > 30) throw new UsageError(`weftnet agent: --block-size must be a prefix length between 16 and 30, got ${JSON.stringify(values["block-size"])}`);
    ipam.blockPrefix = n;
  }
  if (values["reclaim-after"] !== undefined) ipam.reclaimAfterMs = parseDuration("agent", "--reclaim-after", values["reclaim-after"]);
  if (values["ui-listen"] !== undefined && !/^(\[[0-9A-Fa-f:.]+\]|[^:[\]]+):\d{1,5}$/.test(values["ui-listen"])) throw new UsageError(`weftnet agent: --ui-listen ${JSON.stringify(values["ui-listen"])} must be HOST:PORT (e.g. 127.0.0.1:7080)`);
  const invitePub = values["ui-invite-key"] !== undefined ? parseInvitePub("weftnet agent: --ui-invite-key", values["ui-invite-key"]) : undefined;
  if (values["metrics-listen"] !== undefined && !/^(\[[0-9A-Fa-f:.]+\]|[^:[\]]+):\d{1,5}$/.test(values["metrics-listen"])) throw new UsageError(`weftnet agent: --metrics-listen ${JSON.stringify(values["metrics-listen"])} must be HOST:PORT (e.g. 127.0.0.1:9465)`);

  const advertiseRoutes = (values["advertise-routes"] ?? []).flatMap((v) => v.split(",")).map((v) => v.trim()).filter(Boolean);
  if (values["snat-routes"] && advertiseRoutes.length === 0) throw new UsageError("weftnet agent: --snat-routes needs --advertise-routes");
  if (advertiseRoutes.length && !tun) throw new UsageError("weftnet agent: --advertise-routes needs the data plane (not --no-tun)");
  try {
    checkAdvertisedRoutes(advertiseRoutes, ipam.range ?? DEFAULT_CLUSTER_RANGE);
  } catch (e) {
    throw new UsageError(`weftnet agent: ${(e as Error).message}`);
  }
  const acceptList = (values["accept-routes"] ?? []).flatMap((v) => v.split(",")).map((v) => v.trim()).filter(Boolean);
  let acceptRoutes: "all" | string[] | undefined;
  if (acceptList.includes("all")) {
    if (acceptList.length > 1) throw new UsageError("weftnet agent: --accept-routes all takes no CIDRs next to it");
    acceptRoutes = "all";
  } else if (acceptList.length) {
    for (const cidr of acceptList) {
      try {
        parseCidr(cidr);
      } catch {
        throw new UsageError(`weftnet agent: --accept-routes ${JSON.stringify(cidr)} is not an IPv4 CIDR like 192.168.1.0/24 (or \`all\`)`);
      }
    }
    acceptRoutes = acceptList;
  }
  if (acceptRoutes && !tun) throw new UsageError("weftnet agent: --accept-routes needs the data plane (not --no-tun)");
  if (values.cluster !== undefined && !/^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/.test(values.cluster)) throw new UsageError(`weftnet agent: --cluster ${JSON.stringify(values.cluster)} must be 1-63 chars of letters, digits, '.', '_' or '-'`);
  if (values["k8s-node-watch"] && values["no-k8s-node-watch"]) throw new UsageError("weftnet agent: --k8s-node-watch and --no-k8s-node-watch contradict each other");
  const inCluster = inClusterAvailable();
  if (values["k8s-node-watch"] && !inCluster) throw new UsageError(`weftnet agent: --k8s-node-watch needs to run in a Kubernetes pod: KUBERNETES_SERVICE_HOST set and a service-account token at ${DEFAULT_TOKEN_PATH} (automountServiceAccountToken: true)`);
  const k8sNodeWatch = !values["no-k8s-node-watch"] && (values["k8s-node-watch"] || inCluster);
  const timing = values["connect-timeout"] !== undefined ? { connectTimeoutMs: parseDuration("agent", "--connect-timeout", values["connect-timeout"]) } : undefined;
  tuneAgentGc();
  if (values["no-answer-wait"]) setAnswerWait(false);
  const agent = await Agent.start({
    ipam,
    ...(timing ? { timing } : {}),
    ...(values["no-relay"] ? { relay: false } : {}),
    bulk: tun && !values["no-bulk"],
    ...(bulkPort !== undefined ? { bulkPort } : {}),
    ...(segment !== undefined ? { segment: segment as SegmentMode } : {}),
    ...(advertiseRoutes.length ? { advertiseRoutes } : {}),
    ...(values["snat-routes"] ? { snatRoutes: true } : {}),
    ...(acceptRoutes ? { acceptRoutes } : {}),
    ...(values.cluster !== undefined ? { cluster: values.cluster } : {}),
    signal: values.signal,
    token,
    stateDir,
    tun,
    transportKind,
    ...(linkMtu !== undefined ? { linkMtu } : {}),
    ...(values.iface !== undefined ? { iface: values.iface } : {}),
    ...(values.bridge !== undefined ? { bridge: values.bridge } : {}),
    ...(mtu !== undefined ? { mtu } : {}),
    iceServers,
    useServerStun: !values["no-server-stun"],
    ...(values["stun-port"] !== undefined ? { stunPort: stunPortArg(values["stun-port"]) } : {}),
    ...(values["stun-advertise"] !== undefined ? { stunAdvertise: stunAdvertiseArg(values["stun-advertise"], values["stun-port"]) } : {}),
    logger,
    ...(values.name !== undefined ? { name: values.name } : {}),
    ...(values["loopback-only"] ? { werift: { loopbackOnly: true } } : {}),
    ...(values["metrics-listen"] !== undefined ? { metricsListen: values["metrics-listen"] } : {}),
    ...(k8sNodeWatch ? { k8sNodeWatch: {} } : {}),
    ...(values["operator-key"] ? { operatorKey: loadOperatorKey(values["operator-key"]) } : {}),
    // the signaling server introduces its /ui page's browsers only to agents that say they take viewers
    // (and, for invites, only to those pinning its invite key)
    meta: { ui: "1", ...(invitePub ? { "ui-invite": Buffer.from(invitePub).toString("hex") } : {}) },
  });
  process.stdout.write(`weftnet agent ${agent.name} (${agent.id}) started; state dir ${stateDir}; signaling ${agent.signal.endpoint}\n`);
  const stopWatch = watchPaths(agent, logger.child("mesh"));
  // Every agent answers topology-page viewers introduced through the mesh; --ui-listen also serves the page.
  const hub = new ViewerHub(agent, peerKeyOf(token), logger.child("ui"), () => iceServers, invitePub);
  // browsers of the signaling server's /ui page, introduced through the server
  agent.signal.onViewerOffer = (ref, sdp) =>
    void hub.accept(sdp).then(
      (a) => agent.signal.sendViewerAnswer({ ref, sdp: a.sdp, candidates: a.candidates }),
      (e: Error) => agent.signal.sendViewerAnswer({ ref, error: e.message.slice(0, 500) }),
    );
  let uiServer: UiServer | undefined;
  if (values["ui-listen"] !== undefined) {
    const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(values["ui-listen"])!;
    try {
      uiServer = await startUiServer({ host: m[1]!, port: Number(m[2]) }, hub);
    } catch (e) {
      hub.close();
      stopWatch();
      await agent.stop();
      throw e;
    }
    process.stdout.write(`topology page on ${uiServer.url}\n`);
  }
  if (agent.metrics) process.stdout.write(`metrics on ${agent.metrics.url}\n`);
  return await new Promise<number>((resolve) => {
    let done = false;
    const finish = async (code: number, why: string) => {
      if (done) return;
      done = true;
      stopWatch();
      hub.close();
      await uiServer?.close();
      await agent.stop().catch(() => {});
      process.stdout.write(`weftnet agent ${agent.name} stopped (${why})\n`);
      resolve(code);
    };
    // The agent logs a fatal error itself (one line: text on a terminal, JSON otherwise); no second line here.
    agent.onFatal((e) => void finish(1, e.code));
    agent.whenRegistered(10_000).catch((e: WeftError) => {
      if (e.code === "ERR_TIMEOUT") logger.warn("still not registered with the signaling server after 10 s; retrying with backoff", { url: agent.signal.endpoint });
    });
    process.once("SIGINT", () => void finish(0, "SIGINT"));
    process.once("SIGTERM", () => void finish(0, "SIGTERM"));
  });
}

/**
 * One info line per change of the route to a peer (direct <-> via another agent), checked every 2 s
 * from the router's table (cheap: no link stats). Peer up/down and relay -> WebRTC upgrades are logged
 * by the mesh itself.
 */
function watchPaths(agent: Agent, log: Logger): () => void {
  let last = new Map<string, { via: string; name: string }>();
  const t = setInterval(() => {
    const now = new Map(agent.routes().map((r) => [r.dst, { via: r.via, name: r.name }]));
    for (const [dst, r] of now) {
      const before = last.get(dst)?.via;
      if (before === r.via || (before === undefined && r.via === "direct")) continue;
      log.info("path changed", { peer: dst, peerName: r.name, from: before ?? "unreachable", to: r.via });
    }
    for (const [dst, r] of last) if (!now.has(dst) && r.via !== "direct") log.info("path changed", { peer: dst, peerName: r.name, from: r.via, to: "unreachable" });
    last = now;
  }, 2000);
  t.unref();
  return () => clearInterval(t);
}

export async function runStatus(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    "status",
    argv,
    { json: { type: "boolean" }, active: { type: "boolean" }, blocks: { type: "boolean" }, "state-dir": { type: "string" }, help: { type: "boolean", short: "h" } },
    true,
  );
  if (values.help) {
    process.stdout.write(STATUS_HELP);
    return 0;
  }
  const sock = apiSocketPath(values["state-dir"] ?? defaultStateDir());
  const section = positionals[0];
  if (positionals.length > 1 || (section !== undefined && section !== "routes" && section !== "ipam")) {
    const hint = section !== undefined ? didYouMean(section, ["routes", "ipam"]) : undefined;
    throw new UsageError(`weftnet status: unknown section ${JSON.stringify(positionals.join(" "))}${hint ? ` (did you mean \`weftnet status ${hint}\`?)` : " (try `weftnet status routes` or `weftnet status ipam`)"}`);
  }
  if (values.blocks && section !== "ipam") throw new UsageError("weftnet status: --blocks lists the address blocks of `weftnet status ipam`");
  if (values.active && section !== undefined) throw new UsageError("weftnet status: --active filters the peer list of `weftnet status`");
  const api = <T>(path: string) => apiRequest<T>(sock, "GET", path);
  if (section === "ipam") {
    const v = await api<IpamView>("/v1/ipam");
    const sum = summarizeIpam(v, !!values.blocks);
    process.stdout.write(values.json ? JSON.stringify(sum, null, 2) + "\n" : renderIpam(sum));
    return 0;
  }
  if (section === "routes") {
    const { routes } = await api<{ routes: RouteStatus[] }>("/v1/routes");
    if (values.json) process.stdout.write(JSON.stringify({ routes }, null, 2) + "\n");
    else {
      const rows = [["DESTINATION", "ID", "NEXT HOP", "VIA", "COST", "PATH"]];
      for (const r of routes) rows.push([r.name, r.dst, r.nextHopName, r.via, fmtRtt(r.costMs), r.path.join(" > ")]);
      process.stdout.write(routes.length ? table(rows) + "\n" : "(no routes yet)\n");
    }
    return 0;
  }
  const [st, ipam] = await Promise.all([api<AgentStatus>("/v1/status"), api<IpamView>("/v1/ipam").catch(() => undefined)]);
  const local = ipam ? localIpam(ipam) : undefined;
  if (values.active) st.peers = st.peers.filter((p) => p.state === "connected");
  if (values.json) {
    process.stdout.write(JSON.stringify(local ? { ...st, node: { ...st.node, ...local } } : st, null, 2) + "\n");
    return 0;
  }
  process.stdout.write(renderStatus(st, local));
  return 0;
}

/** This node's share of the IPAM: its blocks (aggregated), how many, and its pods. */
export function localIpam(v: IpamView): { blocks: string[]; blockCount: number; pods: number } {
  const mine = v.blocks.filter((b) => b.mine).map((b) => b.cidr);
  return { blocks: aggregateCidrs(mine), blockCount: mine.length, pods: v.allocations.length };
}

function listCidrs(cidrs: string[], max = 4): string {
  return cidrs.length <= max ? cidrs.join(", ") : `${cidrs.slice(0, max).join(", ")} +${cidrs.length - max} more`;
}

/** status peers[].pmtuHow in words (the NOTE column). */
const PMTU_HOW_TEXT: Record<string, string> = { confirmed: "confirmed", "route-limit": "route limit", "black-hole": "black hole", peer: "peer's search", default: "default, unchecked", fixed: "fixed", searching: "searching" };

export function renderStatus(st: AgentStatus, local?: { blocks: string[]; blockCount: number; pods: number }): string {
  const n = st.node;
  const head =
    `node      ${n.name} (${n.id})\n` +
    `version   ${n.version}, transport ${n.transport}, up ${fmtDuration(n.uptimeMs)}\n` +
    `signaling ${n.signal.url} ${n.signal.connected ? "connected" : "DISCONNECTED"}${n.signal.addr ? `, seen as ${n.signal.addr}` : ""}\n` +
    (st.pmtuFixed ? `path MTU  ${st.pmtuFixed}\n` : "") +
    (local ? `blocks    ${local.blockCount ? `${listCidrs(local.blocks)} (${local.blockCount} block${local.blockCount === 1 ? "" : "s"})` : "none yet"}, ${local.pods} pod${local.pods === 1 ? "" : "s"}\n` : "");
  const gone = st.peers.filter((p) => p.state === "gone").length;
  const live = st.peers.filter((p) => p.state !== "gone");
  const connected = live.filter((p) => p.state === "connected").length;
  const header = ["PEER", "ID", "STATE", "PATH", "RTT", "IN", "OUT", "UPTIME", "NOTE"];
  const row = (p: AgentStatus["peers"][number]) => [
    p.name,
    p.id,
    p.state,
    p.path === "none" ? "-" : p.linkType === "bulk" ? "bulk" : p.viaLink ? `${p.path} (${p.viaLink})` : p.path,
    fmtRtt(p.rttMs),
    fmtBytes(p.bytesIn),
    fmtBytes(p.bytesOut),
    fmtDuration(p.uptimeMs),
    p.state === "gone"
      ? `last seen ${p.lastSeenAgoMs === null || p.lastSeenAgoMs === undefined ? "never" : `${fmtDuration(p.lastSeenAgoMs)} ago`}${p.lastError ? `: ${p.lastError}` : ""}`
      : p.state !== "connected"
        ? (p.lastError ?? "")
        : p.linkType === "bulk"
          ? p.linkWhy
          : p.path === "relay"
            ? `through the signaling server: ${p.lastWebrtcError ?? "WebRTC did not connect"}`
            : p.selected
              ? `${p.selected.localType}->${p.selected.remoteType} ${p.selected.remoteAddress}${p.pathMtu ? ` mtu ${p.pathMtu}${p.pmtuHow ? ` (${PMTU_HOW_TEXT[p.pmtuHow] ?? p.pmtuHow})` : ""}` : p.pmtuHow === "fixed" ? " mtu fixed (werift)" : ""}`
              : "",
  ];
  // Group by cluster label when peers carry one (hybrid clusters).
  const clusters = [...new Set(st.peers.map((p) => p.meta.cluster ?? ""))].sort();
  const body =
    clusters.length <= 1 && !clusters[0]
      ? table([header, ...st.peers.map(row)])
      : clusters.map((c) => `cluster ${c || "(none)"}\n${table([header, ...st.peers.filter((p) => (p.meta.cluster ?? "") === c).map(row)])}`).join("\n\n");
  const withdrawn = st.routes?.conflicts.filter((c) => !c.kept) ?? [];
  const adv = st.routes?.advertised.length
    ? `routes    advertising ${st.routes.inForce.join(", ") || "(none in force)"}${st.routes.snat ? " with SNAT" : ""}${withdrawn.map((c) => `; ${c.route} WITHDRAWN: overlaps ${c.other} of ${c.nodeName}`).join("")}\n`
    : "";
  const goneNote = gone ? ` (${gone} gone, forgotten ${GONE_FORGET_MIN} min after they left)` : "";
  return `${head}${adv}peers     ${connected}/${live.length} connected${goneNote}\n\n${st.peers.length ? body : "(no peers yet)"}\n`;
}

/** src/mesh/peer.ts DEFAULT_TIMING.goneTtlMs, in minutes */
const GONE_FORGET_MIN = 5;

export const INVITE_HELP = `Usage: weftnet invite --invite-key-file F [--ttl DUR] [--url URL] [--json]

Mint a short-lived viewer invite for the live topology page at \`weftnet signal\`'s /ui. Whoever holds
it may watch the mesh until it expires: nodes, links (path, RTT, throughput, MTU, the why of relayed
links), address blocks and pod counts, and ping nodes, on the agents that pin the server's invite key
(\`weftnet agent --ui-invite-key HEX\`). It never admits a mesh member: no pod traffic, no gossip.
  --invite-key-file F   the signaling server's invite key (the file given to \`weftnet signal --invite-key-file\`)
  --ttl DUR             lifetime (default 15m, at most 24h; e.g. 90s, 15m, 2h)
  --url URL             the page, e.g. http://signal.example:7000/ui: prints URL#invite=... to open
  --json                print {invite, expires, url?}
`;

export async function runInvite(argv: string[]): Promise<number> {
  const { values } = parse("invite", argv, { "invite-key-file": { type: "string" }, ttl: { type: "string" }, url: { type: "string" }, json: { type: "boolean" }, help: { type: "boolean", short: "h" } });
  if (values.help) {
    process.stdout.write(INVITE_HELP);
    return 0;
  }
  if (values["invite-key-file"] === undefined) throw new UsageError("weftnet invite: --invite-key-file F is required (the key `weftnet signal --invite-key-file F` uses)");
  const ttlMs = values.ttl === undefined ? 15 * 60_000 : parseDuration("invite", "--ttl", values.ttl);
  if (ttlMs > 24 * 3600_000) throw new UsageError(`weftnet invite: --ttl must be at most 24h, got ${JSON.stringify(values.ttl)}`);
  let url: string | undefined;
  if (values.url !== undefined) {
    try {
      const u = new URL(values.url);
      if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error("not http(s)");
      if (u.pathname === "/" || u.pathname === "") u.pathname = "/ui";
      u.hash = "";
      url = u.toString();
    } catch {
      throw new UsageError(`weftnet invite: --url ${JSON.stringify(values.url)} must be the page's http(s):// URL, e.g. http://signal.example:7000/ui`);
    }
  }
  const { key } = loadInviteKey(values["invite-key-file"], false);
  const { invite, exp } = mintInvite(key, ttlMs);
  const link = url !== undefined ? `${url}#invite=${invite}` : undefined;
  if (values.json) process.stdout.write(`${JSON.stringify({ invite, expires: new Date(exp).toISOString(), ...(link ? { url: link } : {}) })}\n`);
  else process.stdout.write(`${link ?? invite}\n(viewer invite, expires ${new Date(exp).toISOString()})\n`);
  return 0;
}

export function parseDuration(cmd: string, flag: string, v: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)?$/.exec(v.trim());
  if (!m) throw new UsageError(`weftnet ${cmd}: ${flag} must be a duration like 90s, 10m or 1h, got ${JSON.stringify(v)}`);
  const n = Number(m[1]) * ({ ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as const)[(m[2] ?? "s") as "ms" | "s" | "m" | "h"];
  if (n < 1000) throw new UsageError(`weftnet ${cmd}: ${flag} must be at least 1s`);
  return Math.round(n);
}

export const IPAM_HELP = `Usage: weftnet ipam <command> [--state-dir D] [--json]

Commands:
  release NODE --operator-key-file F
                    force-release the blocks of a node that is gone for good (by id or name) and remove
                    it from the IPAM member list (also a member that owns no block), signed with the
                    operator key F (\`weftnet keygen --operator\`; env WEFTNET_OPERATOR_KEY_FILE):
                    every agent checks the signatures against its --operator-key before it accepts the
                    release, so no node can release another's blocks or remove another member. The mesh reclaims silent nodes'
                    unpinned blocks by itself after --reclaim-after; this is for operators who know
                    the node will not come back
  allocate POD      allocate (idempotently) an address for pod id POD on this node and print it
  free POD          release the address of pod id POD
See \`weftnet status ipam\` for the range, blocks and allocations.
`;

export async function runIpam(argv: string[]): Promise<number> {
  const { values, positionals } = parse("ipam", argv, { json: { type: "boolean" }, "state-dir": { type: "string" }, "operator-key-file": { type: "string" }, help: { type: "boolean", short: "h" } }, true);
  if (values.help) {
    process.stdout.write(IPAM_HELP);
    return 0;
  }
  const [sub, arg, ...extra] = positionals;
  if (!sub || !arg || extra.length) throw new UsageError("weftnet ipam: expected `release NODE`, `allocate POD` or `free POD`");
  const sock = apiSocketPath(values["state-dir"] ?? defaultStateDir());
  let out: unknown;
  switch (sub) {
    case "release": {
      const keyFile = values["operator-key-file"] ?? process.env.WEFTNET_OPERATOR_KEY_FILE;
      if (!keyFile) throw new UsageError("weftnet ipam release: give --operator-key-file F (the operator's private key from `weftnet keygen --operator`); agents accept a release only with its signature");
      out = await apiRequest(sock, "POST", "/v1/ipam/release-node", await signRelease(sock, arg, keyFile));
      if (!values.json) process.stdout.write(`released ${(out as { node: string }).node}: its blocks are free for other nodes and it is off the IPAM member list\n`);
      break;
    }
    case "allocate": {
      const a = await apiRequest<{ ip: string; prefixLen: number; gateway: string }>(sock, "POST", "/v1/ipam/allocate", { podId: arg }, 40_000);
      out = a;
      if (!values.json) process.stdout.write(`${a.ip}/${a.prefixLen} gateway ${a.gateway}\n`);
      break;
    }
    case "free":
      out = await apiRequest(sock, "POST", "/v1/ipam/free", { podId: arg });
      if (!values.json) process.stdout.write((out as { released: boolean }).released ? `released ${arg}\n` : `${arg} had no address\n`);
      break;
    default:
      throw new UsageError(`weftnet ipam: unknown command ${JSON.stringify(sub)}`);
  }
  if (values.json) process.stdout.write(JSON.stringify(out) + "\n");
  return 0;
}

type IpamView = {
  range: string;
  blockPrefix: number;
  canAllocate: boolean;
  reason: string | null;
  blocks: { cidr: string; owner: string; ownerName: string | null; reachable: boolean; free: number | null; mine: boolean; settling: boolean; kind: string }[];
  allocations: { podId: string; ip: string }[];
  pending: { to: string; sinceMs: number } | null;
  conflicts: { peer: string; code: string; message: string }[];
  ownership?: { lease: boolean; membersHeard: number; members: number; reason: string | null };
  reserved?: { cidr: string; owner: string; silentMs: number | null }[];
  /** the member list: who counts in every majority (heard within the lease window; blocks owned) */
  members?: { id: string; silentMs: number | null; heard?: boolean; blocks?: number }[];
  /** nodes removed from the member list (left, or seen gone) */
  removed?: string[];
};

export interface IpamOwnerSummary {
  id: string;
  name: string | null;
  mine: boolean;
  reachable: boolean;
  blocks: number;
  addresses: number;
  /** free addresses in its blocks, when known (this node's own) */
  free: number | null;
  settling: number;
  /** its blocks aggregated into the fewest CIDRs */
  cidrs: string[];
}

export interface IpamSummary {
  range: string;
  blockPrefix: number;
  canAllocate: boolean;
  reason: string | null;
  totalBlocks: number;
  unownedBlocks: number;
  owners: IpamOwnerSummary[];
  allocations: { podId: string; ip: string }[];
  pending: { to: string; sinceMs: number } | null;
  conflicts: { peer: string; code: string; message: string }[];
  /** why new blocks (grants, reclaims) wait, if they do — allocation from pinned blocks never does */
  ownership?: IpamView["ownership"];
  /** blocks of silent members kept for their pods */
  reserved?: IpamView["reserved"];
  /** the member list (who counts in every majority) and the nodes removed from it */
  members?: IpamView["members"];
  removed?: IpamView["removed"];
  /** only with --blocks */
  blocks?: IpamView["blocks"];
}

/** Per owner instead of per block: a founder holds ~all blocks of the range by design. */
export function summarizeIpam(v: IpamView, withBlocks = false): IpamSummary {
  const per = new Map<string, { s: IpamOwnerSummary; cidrs: string[] }>();
  const size = 2 ** (32 - v.blockPrefix);
  let unowned = 0;
  for (const b of v.blocks) {
    if (!b.owner) {
      unowned++;
      continue;
    }
    let e = per.get(b.owner);
    if (!e) {
      e = { s: { id: b.owner, name: b.ownerName, mine: b.mine, reachable: b.reachable, blocks: 0, addresses: 0, free: null, settling: 0, cidrs: [] }, cidrs: [] };
      per.set(b.owner, e);
    }
    e.s.blocks++;
    e.s.addresses += size;
    if (b.free !== null) e.s.free = (e.s.free ?? 0) + b.free;
    if (b.settling) e.s.settling++;
    e.cidrs.push(b.cidr);
  }
  const owners = [...per.values()].map((e) => ({ ...e.s, cidrs: aggregateCidrs(e.cidrs) }));
  owners.sort((a, b) => Number(b.mine) - Number(a.mine) || b.blocks - a.blocks || (a.name ?? a.id).localeCompare(b.name ?? b.id));
  return {
    range: v.range,
    blockPrefix: v.blockPrefix,
    canAllocate: v.canAllocate,
    reason: v.reason,
    totalBlocks: v.blocks.length,
    unownedBlocks: unowned,
    owners,
    allocations: v.allocations,
    pending: v.pending,
    conflicts: v.conflicts,
    ownership: v.ownership,
    reserved: v.reserved,
    members: v.members,
    removed: v.removed,
    ...(withBlocks ? { blocks: v.blocks } : {}),
  };
}

export function renderIpam(v: IpamSummary): string {
  let out = `range     ${v.range} (${v.totalBlocks} blocks of /${v.blockPrefix}, ${v.unownedBlocks} unowned)\nallocate  ${v.canAllocate ? "ready" : `not ready: ${v.reason ?? "unknown"}`}\n`;
  if (v.ownership) out += `blocks    ${v.ownership.reason ? `new blocks wait: ${v.ownership.reason}` : `new blocks can be granted/reclaimed (${v.ownership.membersHeard} of ${v.ownership.members} members heard)`}\n`;
  if (v.members?.length) {
    const names = new Map(v.owners.map((o) => [o.id, o.name]));
    const one = (m: NonNullable<IpamView["members"]>[number]) => {
      const notes = [...(m.heard === false ? [`not heard${m.silentMs !== null ? `, silent ${Math.round(m.silentMs / 1000)}s` : ""}`] : []), ...(m.blocks === 0 ? ["no block"] : [])];
      return `${names.get(m.id) ?? m.id.slice(0, 8)}${notes.length ? ` (${notes.join(", ")})` : ""}`;
    };
    out += `members   ${v.members.length} (majority ${Math.floor(v.members.length / 2) + 1}): ${v.members.map(one).join(", ")}${v.removed?.length ? `; removed: ${v.removed.map((r) => r.slice(0, 8)).join(", ")}` : ""}\n`;
  }
  if (v.reserved?.length) out += `reserved  ${v.reserved.length} block(s) of silent members kept for their pods (pinned; \`weftnet ipam release NODE\` if a node is gone for good)\n`;
  if (v.pending) out += `pending   block request to ${v.pending.to} for ${Math.round(v.pending.sinceMs / 1000)}s\n`;
  for (const c of v.conflicts) out += `CONFLICT  with ${c.peer}: ${c.message} (${c.code})\n`;
  const rows = [["OWNER", "ID", "REACHABLE", "BLOCKS", "ADDRESSES", "FREE", "CIDRS"]];
  for (const o of v.owners) {
    rows.push([`${o.name ?? "?"}${o.mine ? " (this node)" : ""}`, o.id, o.reachable ? "yes" : "NO", `${o.blocks}${o.settling ? ` (${o.settling} settling)` : ""}`, String(o.addresses), o.free === null ? "-" : String(o.free), listCidrs(o.cidrs, 3)]);
  }
  out += `\n${v.owners.length ? table(rows) : "(no blocks owned yet)"}\n`;
  if (v.blocks) {
    const brows = [["BLOCK", "OWNER", "ID", "REACHABLE", "FREE", "NOTE"]];
    for (const b of v.blocks.filter((x) => x.owner)) brows.push([b.cidr, b.ownerName ?? "?", b.owner, b.reachable ? "yes" : "NO", b.free === null ? "-" : String(b.free), [b.mine ? "this node" : "", b.kind === "p" ? "pinned" : "", b.settling ? "settling" : ""].filter(Boolean).join(", ")]);
    out += `\n${table(brows)}\n`;
  }
  if (v.allocations.length) out += `\n${table([["POD", "IP"], ...v.allocations.map((a) => [a.podId, a.ip])])}\n`;
  return out;
}

export const POD_HELP = `Usage: weftnet pod add NAME [--json] | weftnet pod del NAME  [--state-dir D]

add: create network namespace NAME with a veth (eth0) on the node bridge, an address from this node's
     IPAM blocks (allocated by pod id, kept across agent restarts), a default route and the overlay MTU;
     prints the address. Then e.g.: ip netns exec NAME ping <another pod's IP>
del: remove the namespace and its veth and release the address (succeeds when already gone).
Needs an agent running with the data plane (not --no-tun) and root.
`;

export async function runPod(argv: string[]): Promise<number> {
  const { values, positionals } = parse("pod", argv, { json: { type: "boolean" }, "state-dir": { type: "string" }, help: { type: "boolean", short: "h" } }, true);
  if (values.help) {
    process.stdout.write(POD_HELP);
    return 0;
  }
  const [sub, name, ...extra] = positionals;
  if (!sub || !name || extra.length || (sub !== "add" && sub !== "del")) throw new UsageError("weftnet pod: expected `add NAME` or `del NAME`");
  const sock = apiSocketPath(values["state-dir"] ?? defaultStateDir());
  if (sub === "add") {
    const p = await apiRequest<{ name: string; ip: string; prefixLen: number; gateway: string; hostVeth: string }>(sock, "POST", "/v1/pods", { name }, 60_000);
    process.stdout.write(values.json ? JSON.stringify(p) + "\n" : `${p.ip}\n`);
  } else {
    const r = await apiRequest<{ released: boolean }>(sock, "DELETE", `/v1/pods/${encodeURIComponent(name)}`, undefined, 30_000);
    process.stdout.write(values.json ? JSON.stringify(r) + "\n" : `deleted pod ${name}\n`);
  }
  return 0;
}

export async function runPing(argv: string[]): Promise<number> {
  const { values, positionals } = parse(
    "ping",
    argv,
    { count: { type: "string", short: "c" }, timeout: { type: "string" }, json: { type: "boolean" }, "state-dir": { type: "string" }, help: { type: "boolean", short: "h" } },
    true,
  );
  if (values.help) {
    process.stdout.write(PING_HELP);
    return 0;
  }
  if (positionals.length !== 1) throw new UsageError("weftnet ping: give exactly one NODE (id, id prefix or name)");
  const count = positiveInt("ping", "--count", values.count, 3);
  const timeoutMs = positiveInt("ping", "--timeout", values.timeout, 3000);
  const sock = apiSocketPath(values["state-dir"] ?? defaultStateDir());
  const replies: { rttMs: number; path: string }[] = [];
  let lost = 0;
  let target: { id: string; name: string } | undefined;
  let error: WeftError | undefined;
  for (let i = 0; i < count; i++) {
    try {
      const r = await apiRequest<{ id: string; name: string; rttMs: number; path?: string }>(sock, "POST", "/v1/ping", { node: positionals[0], timeoutMs }, timeoutMs + 2000);
      target = r;
      const path = r.path ?? "direct";
      replies.push({ rttMs: r.rttMs, path });
      if (!values.json) process.stdout.write(`reply from ${r.name} (${r.id}) ${path === "direct" || path === "none" ? "direct" : path}: time=${fmtRtt(r.rttMs)}\n`);
    } catch (e) {
      if (e instanceof WeftError && e.code === "ERR_TIMEOUT") {
        lost++;
        if (!values.json) process.stdout.write(`no reply: ${e.message}\n`);
      } else if (e instanceof WeftError && (e.code === "ERR_NOT_CONNECTED" || e.code === "ERR_NO_PEER")) {
        // Not a lost packet: the peer is gone or unknown. Say so once, not once per ping.
        lost = count - replies.length;
        error = e;
        break;
      } else throw e;
    }
    if (i + 1 < count) await new Promise((r) => setTimeout(r, 200));
  }
  if (values.json) {
    process.stdout.write(
      JSON.stringify({
        id: target?.id ?? null,
        name: target?.name ?? null,
        rttMs: replies.map((r) => r.rttMs),
        path: replies.map((r) => r.path),
        lost,
        ...(error ? { error: { code: error.code, message: error.message } } : {}),
      }) + "\n",
    );
  } else {
    if (error) {
      // Not linked directly: say where its traffic goes instead (a route via another agent), if anywhere.
      let why = error.message;
      if (error.code === "ERR_NOT_CONNECTED") {
        const routes = await apiRequest<{ routes: RouteStatus[] }>(sock, "GET", "/v1/routes").catch(() => ({ routes: [] as RouteStatus[] }));
        const r = routes.routes.find((x) => x.dst === positionals[0] || x.name === positionals[0] || x.dst.startsWith(positionals[0]!));
        why = r && r.via !== "direct" ? `not reached ${r.via} (route ${r.path.join(" > ")}): ${error.message}` : "not connected (gone or not linked yet; see `weftnet status`)";
      }
      process.stderr.write(`weftnet ping: ${positionals[0]}: ${why}\n`);
    }
    if (replies.length) {
      const sorted = replies.map((r) => r.rttMs).sort((a, b) => a - b);
      const paths = [...new Set(replies.map((r) => r.path))].join(", ");
      process.stdout.write(`${count} sent, ${replies.length} received, min/median/max ${fmtRtt(sorted[0])}/${fmtRtt(sorted[Math.floor(sorted.length / 2)])}/${fmtRtt(sorted[sorted.length - 1])}, path ${paths}\n`);
    }
  }
  return replies.length > 0 ? 0 : 1;
}
