/**
 * `weftnet signal`: run the signaling server (matchmaker + STUN).
 * Called by agent/cli/main.ts as runSignal(process.argv.slice(3)); resolves with the exit code once the
 * server has stopped (SIGINT/SIGTERM) or failed to start.
 */
import { chmodSync, closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from "node:fs";
import { homedir, networkInterfaces } from "node:os";
import { join } from "node:path";
import { nanoid } from "nanoid";
import { UsageError, WeftError } from "../src/errors.js";
import { createLogger } from "../src/log.js";
import { LOG_OPTIONS, logOptions, parse } from "../agent/cli/util.js";
import { SIGNAL_PATH } from "../src/wire/signal.js";
import { DEFAULT_TURN_TTL_S, isTurnUrl } from "../src/wire/turn-rest.js";
import { startSignalServer, type SignalServer } from "./server.js";
import { deriveJoinKey } from "./core/crypto.js";
import { MIN_TOKEN_BITS, MIN_TOKEN_CHARS, tokenWeakness } from "./core/crypto.js";
import { DEFAULT_LIMITS, type SignalLimits } from "./core/hub.js";
import { loadInviteKey, pubHex } from "../agent/ui/invite.js";

export const DEFAULT_LISTEN = "0.0.0.0:7000";
export const DEFAULT_STUN_PORT = 3478;

export const SIGNAL_HELP = `Usage: weftnet signal [options]

Run the signaling server: agents register here, learn about each other and exchange WebRTC offers,
answers and candidates. It also answers STUN Binding requests on UDP so agents behind NAT learn their
public address. It holds presence only: after a restart agents re-register and everything is rebuilt.

Options:
  --listen HOST:PORT   HTTP + WebSocket address (default ${DEFAULT_LISTEN}; [::]:7000 for IPv6)
  --token T            cluster token agents must prove (visible in ps; prefer --token-file or the env);
                       the server keeps only its join key (HKDF), never the token
  --token-file F       read the cluster token from file F
  --join-key-file F    read the cluster's join key instead (\`weftnet join-key\` prints it): this
                       server then never sees the token at all
  --allow-weak-token   accept a token shorter than ${MIN_TOKEN_CHARS} characters or under ${MIN_TOKEN_BITS} bits (tests only)
  --admin-token-file F credential for /v1/nodes, /v1/stats and /metrics (or env WEFTNET_ADMIN_TOKEN);
                       without it they take the cluster token or the join key
  --invite-key-file F  this server's viewer-invite key (Ed25519 PEM, created with mode 0600 if missing):
                       \`weftnet invite --invite-key-file F\` mints short-lived read-only invites to the
                       topology page at /ui; agents honour them only with --ui-invite-key <its public key>
  --no-ui              do not serve the live topology page at /ui
  --max-sessions N     WebSocket sessions in total (default ${DEFAULT_LIMITS.maxSessions})
  --max-sessions-per-ip N  sessions from one source address (default ${DEFAULT_LIMITS.maxSessionsPerIp})
  --state-dir D        where a generated token is kept, mode 0700 (default /var/lib/weftnet-signal as
                       root, else $XDG_STATE_HOME/weftnet-signal or ~/.local/state/weftnet-signal)
  --stun-port N        UDP port of the STUN responder (default ${DEFAULT_STUN_PORT}; 0 disables it)
  --stun-alt-port N    a second STUN port (off by default): agents compare the two mappings to tell
                       symmetric NAT apart (\`weftnet netcheck\`)
  --relay-rate MBIT    per-agent rate limit of the data relay of last resort (default 100 Mbit/s)
  --no-relay           refuse to relay data: agents whose peers are unreachable by ICE, via another
                       agent or TURN stay disconnected from them
  --turn-url URL       TURN server handed to agents with REST credentials, repeatable
                       (turn:HOST:PORT[?transport=udp|tcp], turns:...); needs a shared secret
  --turn-secret-file F the TURN server's static-auth-secret (coturn use-auth-secret); or env
                       WEFTNET_TURN_SECRET
  --turn-ttl DUR       lifetime of handed-out TURN credentials (default 24h; e.g. 3600s, 90m, 24h)
  --log-level L        debug | info | warn | error (default info: joins, leaves, refusals; env WEFTNET_LOG)
  --log-format F       auto | text | json (default auto: coloured text on a terminal, JSON lines
                       otherwise; env WEFTNET_LOG_FORMAT)
  --verbose            same as --log-level debug
  -h, --help           show this help

Environment:
  WEFTNET_TOKEN        cluster token, used when neither --token nor --token-file is given
  WEFTNET_JOIN_KEY     join key, used when no token is given in any way
  WEFTNET_ADMIN_TOKEN  admin credential, used when --admin-token-file is not given
  WEFTNET_TURN_SECRET  TURN REST shared secret, used when --turn-secret-file is not given

Without any token a random one is generated on first start, stored in <state-dir>/token (mode 0600;
it is never printed) and reused afterwards. Join an agent with:
  weftnet agent --signal ws://HOST:PORT --token-file <copy of that file>

Endpoints: GET /healthz, GET /v1/nodes, /v1/stats, /metrics (Authorization: Bearer <admin token, or
cluster token / join key>), WebSocket ${SIGNAL_PATH}, the topology page GET /ui (its browser joins the
mesh as a read-only WebRTC viewer of the agents: with the cluster token pasted into the page, which this
server's code then sees, or with an invite) and POST /ui/v1/offer.
`;

export interface SignalCliIo {
  stdout?: (s: string) => void;
  stderr?: (s: string) => void;
  env?: NodeJS.ProcessEnv;
  /** stop the server when aborted (tests); SIGINT/SIGTERM always do */
  signal?: AbortSignal;
  /** called once the server listens (tests) */
  onListening?: (server: SignalServer) => void;
}

/** "HOST:PORT", "[v6]:PORT", ":PORT" or "PORT". */
export function parseListen(s: string): { host: string; port: number } {
  let host: string;
  let portStr: string;
  const v6 = /^\[([^\]]+)\]:(\d+)$/.exec(s);
  if (v6) {
    host = v6[1]!;
    portStr = v6[2]!;
  } else if (/^\d+$/.test(s)) {
    host = "0.0.0.0";
    portStr = s;
  } else {
    const i = s.lastIndexOf(":");
    if (i < 0 || s.indexOf(":") !== i) throw new UsageError(`--listen ${JSON.stringify(s)}: expected HOST:PORT (IPv6 as [ADDR]:PORT)`);
    host = s.slice(0, i) || "0.0.0.0";
    portStr = s.slice(i + 1);
  }
  return { host, port: parsePort(portStr, "--listen") };
}

export function parsePort(s: string, flag: string): number {
  if (!/^\d{1,5}$/.test(s) || Number(s) > 65535) throw new UsageError(`${flag} ${JSON.stringify(s)}: port must be a number from 0 to 65535`);
  return Number(s);
}

export function defaultStateDir(env: NodeJS.ProcessEnv = process.env, uid: number | undefined = process.getuid?.()): string {
  if (uid === 0) return "/var/lib/weftnet-signal";
  const xdg = env.XDG_STATE_HOME;
  if (xdg !== undefined && xdg.startsWith("/")) return join(xdg, "weftnet-signal");
  return join(env.HOME || homedir(), ".local", "state", "weftnet-signal");
}

/** Write a file atomically with mode 0600 (temp file in the same dir, fsync, rename). */
export function writeSecretFile(path: string, content: string): void {
  const tmp = `${path}.tmp-${process.pid}-${Date.now()}`;
  const fd = openSync(tmp, "wx", 0o600);
  try {
    writeSync(fd, content);
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    try {
      unlinkSync(tmp);
    } catch {
      /* already gone */
    }
    throw e;
  }
  closeSync(fd);
  chmodSync(tmp, 0o600);
  renameSync(tmp, path);
}

function readTokenFile(path: string, what: string): string {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new UsageError(`${what} ${path}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  const token = text.trim();
  if (token.length === 0) throw new UsageError(`${what} ${path} is empty`);
  return token;
}

/** Create the state dir (0700), or force an existing one to 0700: it holds the cluster token. */
export function ensurePrivateDir(dir: string): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if ((statSync(dir).mode & 0o777) !== 0o700) chmodSync(dir, 0o700);
}

/** Token stored in <stateDir>/token, generated on first use. */
export function loadOrCreateToken(stateDir: string): { token: string; path: string; created: boolean } {
  const path = join(stateDir, "token");
  let exists = true;
  try {
    statSync(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw new UsageError(`token file ${path}: ${(e as Error).message}`);
    exists = false;
  }
  if (exists) {
    try {
      ensurePrivateDir(stateDir);
      return { token: readTokenFile(path, "token file"), path, created: false };
    } catch (e) {
      throw new UsageError(`${(e as Error).message}; delete it to generate a new token`);
    }
  }
  try {
    ensurePrivateDir(stateDir);
    const token = nanoid(32);
    writeSecretFile(path, token + "\n");
    return { token, path, created: true };
  } catch (e) {
    throw new UsageError(`cannot store a generated token in ${stateDir}: ${(e as Error).message} (use --state-dir, --token or --token-file)`);
  }
}

function isWildcard(host: string): boolean {
  return host === "0.0.0.0" || host === "::" || host === "";
}

/** A guess at the address remote agents should dial when we listen on a wildcard. */
function publicHostGuess(host: string): string {
  if (!isWildcard(host)) return host.includes(":") ? `[${host}]` : host;
  for (const addrs of Object.values(networkInterfaces())) {
    for (const a of addrs ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  }
  return "<this-host>";
}

/** --turn-url (repeatable) + --turn-secret-file / WEFTNET_TURN_SECRET + --turn-ttl; undefined when no URL. */
export function parseTurn(values: { "turn-url"?: string[]; "turn-secret-file"?: string; "turn-ttl"?: string }, env: NodeJS.ProcessEnv): { urls: string[]; secret: string; ttlS: number } | undefined {
  const urls = values["turn-url"] ?? [];
  for (const u of urls) if (!isTurnUrl(u)) throw new UsageError(`--turn-url ${JSON.stringify(u)}: expected turn:HOST:PORT or turns:HOST:PORT (optionally ?transport=udp|tcp), without credentials`);
  let ttlS = DEFAULT_TURN_TTL_S;
  if (values["turn-ttl"] !== undefined) {
    const m = /^(\d+)(s|m|h)?$/.exec(values["turn-ttl"].trim());
    if (!m) throw new UsageError(`--turn-ttl ${JSON.stringify(values["turn-ttl"])}: expected a duration like 3600s, 90m or 24h`);
    ttlS = Number(m[1]) * ({ s: 1, m: 60, h: 3600 } as const)[(m[2] ?? "s") as "s" | "m" | "h"];
    if (ttlS < 60) throw new UsageError("--turn-ttl must be at least 60s");
  }
  if (urls.length === 0) {
    if (values["turn-secret-file"] !== undefined || values["turn-ttl"] !== undefined) throw new UsageError("--turn-secret-file and --turn-ttl need at least one --turn-url");
    return undefined;
  }
  let secret: string;
  if (values["turn-secret-file"] !== undefined) secret = readTokenFile(values["turn-secret-file"], "--turn-secret-file");
  else if (env.WEFTNET_TURN_SECRET !== undefined && env.WEFTNET_TURN_SECRET.trim() !== "") secret = env.WEFTNET_TURN_SECRET.trim();
  else throw new UsageError("--turn-url needs the TURN server's shared secret: --turn-secret-file F or env WEFTNET_TURN_SECRET");
  return { urls, secret, ttlS };
}

export async function runSignal(argv: string[], io: SignalCliIo = {}): Promise<number> {
  const out = io.stdout ?? ((s: string) => void process.stdout.write(s));
  const err = io.stderr ?? ((s: string) => void process.stderr.write(s));
  const env = io.env ?? process.env;

  let values: { "invite-key-file"?: string; "no-ui"?: boolean; listen?: string; token?: string; "token-file"?: string; "join-key-file"?: string; "allow-weak-token"?: boolean; "admin-token-file"?: string; "max-sessions"?: string; "max-sessions-per-ip"?: string; "state-dir"?: string; "stun-port"?: string; "stun-alt-port"?: string; "turn-url"?: string[]; "turn-secret-file"?: string; "turn-ttl"?: string; "relay-rate"?: string; "no-relay"?: boolean; "log-level"?: string; "log-format"?: string; verbose?: boolean; help?: boolean };
  let logOpts: ReturnType<typeof logOptions>;
  try {
    values = parse("signal", argv, {
        listen: { type: "string" },
        token: { type: "string" },
        "token-file": { type: "string" },
        "join-key-file": { type: "string" },
        "allow-weak-token": { type: "boolean" },
        "admin-token-file": { type: "string" },
        "invite-key-file": { type: "string" },
        "no-ui": { type: "boolean" },
        "max-sessions": { type: "string" },
        "max-sessions-per-ip": { type: "string" },
        "state-dir": { type: "string" },
        "stun-port": { type: "string" },
        "stun-alt-port": { type: "string" },
        "turn-url": { type: "string", multiple: true },
        "turn-secret-file": { type: "string" },
        "turn-ttl": { type: "string" },
        "relay-rate": { type: "string" },
        "no-relay": { type: "boolean" },
        ...LOG_OPTIONS,
        help: { type: "boolean", short: "h" },
    }).values;
    logOpts = logOptions("signal", values);
  } catch (e) {
    err(`${(e as Error).message.split("\n")[0]}\n`);
    return 2;
  }
  if (values.help) {
    out(SIGNAL_HELP);
    return 0;
  }

  let listen: { host: string; port: number };
  let stunPort: number;
  let stunAltPort = 0;
  let turn: { urls: string[]; secret: string; ttlS: number } | undefined;
  let relay: { enabled: boolean; rateBytesPerSec?: number } | undefined;
  let token: string | undefined;
  let joinKey: string | undefined;
  let adminToken: string | undefined;
  const limits: Partial<SignalLimits> = {};
  let tokenNote: string | undefined;
  let tokenPath: string | undefined;
  let inviteKey: ReturnType<typeof loadInviteKey> | undefined;
  try {
    listen = parseListen(values.listen ?? DEFAULT_LISTEN);
    stunPort = values["stun-port"] === undefined ? DEFAULT_STUN_PORT : parsePort(values["stun-port"], "--stun-port");
    if (values["stun-alt-port"] !== undefined) {
      stunAltPort = parsePort(values["stun-alt-port"], "--stun-alt-port");
      if (stunPort === 0 && stunAltPort !== 0) throw new UsageError("--stun-alt-port needs the STUN responder (--stun-port is 0)");
      if (stunAltPort !== 0 && stunAltPort === stunPort) throw new UsageError("--stun-alt-port must differ from --stun-port");
    }
    turn = parseTurn(values, env);
    if (values["relay-rate"] !== undefined) {
      const r = Number(values["relay-rate"]);
      if (!Number.isFinite(r) || r <= 0) throw new UsageError(`--relay-rate must be a positive number of Mbit/s per agent, got ${JSON.stringify(values["relay-rate"])}`);
      if (values["no-relay"]) throw new UsageError("--relay-rate makes no sense with --no-relay");
      relay = { enabled: true, rateBytesPerSec: (r * 1e6) / 8 };
    }
    if (values["no-relay"]) relay = { enabled: false };
    if ([values.token, values["token-file"], values["join-key-file"]].filter((x) => x !== undefined).length > 1) throw new UsageError("give one of --token, --token-file or --join-key-file");
    let fromUser = true;
    if (values.token !== undefined) {
      token = values.token.trim();
      if (token.length === 0) throw new UsageError("--token must not be empty");
    } else if (values["token-file"] !== undefined) {
      token = readTokenFile(values["token-file"], "--token-file");
    } else if (values["join-key-file"] !== undefined) {
      joinKey = readTokenFile(values["join-key-file"], "--join-key-file");
    } else if (env.WEFTNET_TOKEN !== undefined && env.WEFTNET_TOKEN.trim() !== "") {
      token = env.WEFTNET_TOKEN.trim();
    } else if (env.WEFTNET_JOIN_KEY !== undefined && env.WEFTNET_JOIN_KEY.trim() !== "") {
      joinKey = env.WEFTNET_JOIN_KEY.trim();
    } else {
      fromUser = false;
      const stateDir = values["state-dir"] ?? defaultStateDir(env);
      const t = loadOrCreateToken(stateDir);
      token = t.token;
      tokenNote = t.created
        ? `generated a cluster token and stored it in ${t.path} (mode 0600); it is not printed: copy that file to your agents`
        : `using the cluster token stored in ${t.path}`;
      tokenPath = t.path;
    }
    if (joinKey !== undefined && !/^[0-9a-f]{64}$/.test(joinKey)) throw new UsageError("the join key must be 64 lowercase hex characters (`weftnet join-key` prints it)");
    if (token !== undefined && fromUser && !values["allow-weak-token"]) {
      const weak = tokenWeakness(token);
      if (weak !== undefined) throw new UsageError(`weak cluster token: ${weak}; generate one with \`openssl rand -base64 24\` (or pass --allow-weak-token for tests)`);
    }
    if (values["admin-token-file"] !== undefined) adminToken = readTokenFile(values["admin-token-file"], "--admin-token-file");
    else if (env.WEFTNET_ADMIN_TOKEN !== undefined && env.WEFTNET_ADMIN_TOKEN.trim() !== "") adminToken = env.WEFTNET_ADMIN_TOKEN.trim();
    if (adminToken !== undefined && !values["allow-weak-token"] && tokenWeakness(adminToken) !== undefined) throw new UsageError(`weak admin token: ${tokenWeakness(adminToken)}`);
    if (values["invite-key-file"] !== undefined) {
      if (values["no-ui"]) throw new UsageError("--invite-key-file admits viewers of the /ui page, which --no-ui turns off");
      inviteKey = loadInviteKey(values["invite-key-file"], true);
    }
    for (const [flag, key] of [["max-sessions", "maxSessions"], ["max-sessions-per-ip", "maxSessionsPerIp"]] as const) {
      const v = values[flag];
      if (v === undefined) continue;
      if (!/^\d+$/.test(v) || Number(v) < 1) throw new UsageError(`--${flag} must be a positive integer, got ${JSON.stringify(v)}`);
      limits[key] = Number(v);
    }
  } catch (e) {
    err(`weftnet signal: ${(e as Error).message}\n`);
    return 2;
  }

  const logger = createLogger({ ...logOpts, component: "weftnet-signal" });
  let server: SignalServer;
  try {
    // Only the join key reaches the server; the token goes out of scope here.
    if (joinKey === undefined) joinKey = await deriveJoinKey(token!);
    token = undefined;
    server = await startSignalServer({ listen, joinKey, stunPort, logger, limits, ...(adminToken !== undefined ? { adminToken } : {}), ...(stunAltPort ? { stunAltPort } : {}), ...(turn ? { turn } : {}), ...(relay ? { relay } : {}), ...(inviteKey ? { viewerInvitePub: inviteKey.key.publicKey } : {}), ui: !values["no-ui"] });
  } catch (e) {
    err(`weftnet signal: ${(e as Error).message}\n`);
    return e instanceof WeftError && e.code === "ERR_USAGE" ? 2 : 1;
  }

  const stunText = (server.stunPort ? `STUN on udp/${server.stunPort}${server.stunAltPort ? ` and udp/${server.stunAltPort}` : ""}` : "STUN off") + (turn ? `, TURN credentials for ${turn.urls.join(" ")}` : "");
  out(`weftnet signal listening on ws://${listen.host.includes(":") ? `[${listen.host}]` : listen.host}:${server.port} (${stunText})\n`);
  if (tokenNote !== undefined) {
    out(`${tokenNote}\n`);
    out(`join agents with: weftnet agent --signal ws://${publicHostGuess(listen.host)}:${server.port} --token-file ${tokenPath}\n`);
  }
  if (!values["no-ui"]) out(`topology page on http://${publicHostGuess(listen.host)}:${server.port}/ui\n`);
  if (inviteKey) {
    const pub = pubHex(inviteKey.key);
    out(`viewer invites: ${inviteKey.created ? "created" : "using"} the invite key ${values["invite-key-file"]}; agents that accept its invites run with --ui-invite-key ${pub}\n`);
  }
  io.onListening?.(server);

  await new Promise<void>((resolve) => {
    let stopping = false;
    const cleanup = () => {
      process.off("SIGINT", onInt);
      process.off("SIGTERM", onTerm);
      io.signal?.removeEventListener("abort", onAbort);
    };
    const stop = (why: string) => {
      if (stopping) {
        if (why !== "abort") process.exit(130); // second Ctrl-C: do not wait any more
        return;
      }
      stopping = true;
      logger.info("shutting down", { why });
      server
        .close()
        .catch((e: unknown) => logger.error("shutdown failed", { err: e }))
        .finally(() => {
          cleanup();
          resolve();
        });
    };
    const onInt = () => stop("SIGINT");
    const onTerm = () => stop("SIGTERM");
    const onAbort = () => stop("abort");
    process.on("SIGINT", onInt);
    process.on("SIGTERM", onTerm);
    if (io.signal?.aborted) onAbort();
    else io.signal?.addEventListener("abort", onAbort, { once: true });
  });
  out("weftnet signal stopped\n");
  return 0;
}
