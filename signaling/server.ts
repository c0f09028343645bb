/**
 * The Node adapter of the signaling core: the hono app (core/app.ts) on @hono/node-server, a `ws`
 * WebSocketServer on SIGNAL_PATH feeding the SignalHub (core/hub.ts), and the STUN responder (stun.ts)
 * on UDP. Everything Node-specific about the server lives here and in stun.ts and cli.ts.
 *
 * Transport-level limits (the hub's own are in core/hub.ts): an HTTP request's headers must be complete
 * within headersTimeoutMs (slowloris), a connection that sends nothing is dropped after the same time,
 * TCP connections per source IP are capped (maxSessionsPerIp + 16 for plain HTTP), and the WebSocket
 * upgrade is refused with 503/429 before the handshake when the hub is full.
 *
 * The ws adapter owns keepalive: a ws-level ping every pingIntervalMs (15 s); a connection that missed
 * 2 pongs is terminated, which the hub sees as a close (leave broadcast). It also implements the hub's
 * liveness probe (ping, wait for the pong) used to settle duplicate-id claims.
 */
import type { IncomingMessage, Server } from "node:http";
import type { Duplex } from "node:stream";
import { createAdaptorServer } from "@hono/node-server";
import { WebSocket, WebSocketServer, type RawData } from "ws";
import { WeftError } from "../src/errors.js";
import { silentLogger, type Logger } from "../src/log.js";
import { CLOSE_CODES, MAX_RELAY_BYTES, SIGNAL_PATH } from "../src/wire/signal.js";
import { mountUiAssets } from "../agent/ui/server.js";
import { createSignalApp } from "./core/app.js";
import { deriveJoinKey } from "./core/crypto.js";
import type { SignalHub, SignalLimits, SignalSocket } from "./core/hub.js";
import { DEFAULT_TURN_TTL_S, turnIceServers } from "../src/wire/turn-rest.js";
import { startStunServer, type StunServer, type StunStats } from "./stun.js";
import type { Socket } from "node:net";

export const DEFAULT_PING_INTERVAL_MS = 15_000;
export const MISSED_PONGS_LIMIT = 2;
/** ws drops frames above this itself (close 1009); between MAX_RELAY_BYTES and this we answer ERR_TOO_LARGE. */
export const WS_MAX_PAYLOAD = MAX_RELAY_BYTES + 16 * 1024;
export const DEFAULT_HEADERS_TIMEOUT_MS = 10_000;
/** Joins and leaves within this window go out as one `presence` frame per member. */
export const DEFAULT_PRESENCE_BATCH_MS = 20;

export interface SignalServerOptions {
  listen: { host: string; port: number };
  /** the cluster token: only its join key is derived and kept (give joinKey instead to never see it) */
  token?: string;
  /** the cluster's join key (hex, see core/crypto.ts deriveJoinKey) */
  joinKey?: string;
  /** credential for /v1/nodes, /v1/stats and /metrics; absent = the cluster token or join key */
  adminToken?: string;
  /** session caps, slow-consumer and relay budgets (core/hub.ts DEFAULT_LIMITS) */
  limits?: Partial<SignalLimits>;
  /** headers of an HTTP request (and the first bytes of a connection) must arrive within this; default 10 s */
  headersTimeoutMs?: number;
  presenceBatchMs?: number;
  /** UDP port for STUN: a number binds it (0 or undefined = no STUN), "ephemeral" binds a free port (tests). */
  stunPort?: number | "ephemeral";
  /** a second STUN port on the same host ("ephemeral" = any free port), announced in `welcome` so agents can tell symmetric NAT (netcheck) */
  stunAltPort?: number | "ephemeral";
  /** TURN REST: each agent gets {urls, username "<expiry>:<id>", credential} in `welcome` (see src/wire/turn-rest.ts) */
  turn?: { urls: string[]; secret: string; ttlS?: number };
  /** data relay of last resort (default on, 100 Mbit/s per agent) */
  relay?: { enabled?: boolean; rateBytesPerSec?: number };
  logger?: Logger;
  helloTimeoutMs?: number;
  probeTimeoutMs?: number;
  pingIntervalMs?: number;
  now?: () => number;
  /** public key of the viewer-invite key: invites signed with it admit /ui viewers (src/wire/invite.ts) */
  viewerInvitePub?: Uint8Array;
  /** serve the live topology page at /ui (default true; its assets are built by npm run build) */
  ui?: boolean;
}

export interface SignalServer {
  /** base URL agents are given: `weftnet agent --signal <url>` (wildcard hosts shown as loopback) */
  readonly url: string;
  /** the WebSocket endpoint: url + SIGNAL_PATH */
  readonly signalUrl: string;
  readonly host: string;
  readonly port: number;
  /** bound STUN port, 0 when STUN is off */
  readonly stunPort: number;
  /** bound second STUN port, 0 when none */
  readonly stunAltPort: number;
  readonly hub: SignalHub;
  /** STUN responder counters (undefined when STUN is off) */
  stunStats(): StunStats | undefined;
  close(): Promise<void>;
}

function urlHost(host: string): string {
  if (host === "" || host === "0.0.0.0") return "127.0.0.1";
  if (host === "::") return "[::1]";
  return host.includes(":") ? `[${host}]` : host;
}

/** WebSocket close reasons are limited to 123 bytes of UTF-8. */
export function clampReason(reason: string): string {
  let r = reason;
  while (Buffer.byteLength(r, "utf8") > 123) r = r.slice(0, -1);
  return r;
}

function toBytes(data: RawData): Uint8Array {
  if (Array.isArray(data)) return Buffer.concat(data);
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  return data;
}

export async function startSignalServer(opts: SignalServerOptions): Promise<SignalServer> {
  const log = opts.logger ?? silentLogger;
  const pingIntervalMs = opts.pingIntervalMs ?? DEFAULT_PING_INTERVAL_MS;

  let joinKey = opts.joinKey;
  if (joinKey === undefined) {
    if (opts.token === undefined || opts.token === "") throw new WeftError("ERR_USAGE", "the signaling server needs the cluster token or its join key");
    joinKey = await deriveJoinKey(opts.token);
  }

  let stun: StunServer | undefined;
  if (opts.stunPort !== undefined && opts.stunPort !== 0) {
    const port = opts.stunPort === "ephemeral" ? 0 : opts.stunPort;
    try {
      stun = await startStunServer({ host: opts.listen.host, port, logger: log.child("stun") });
    } catch (e) {
      throw new WeftError("ERR_LISTEN", `cannot bind STUN on udp ${opts.listen.host}:${port}: ${(e as Error).message}`, { cause: e });
    }
  }

  let stunAlt: StunServer | undefined;
  if (stun && opts.stunAltPort !== undefined && opts.stunAltPort !== 0) {
    const port = opts.stunAltPort === "ephemeral" ? 0 : opts.stunAltPort;
    try {
      stunAlt = await startStunServer({ host: opts.listen.host, port, logger: log.child("stun-alt") });
    } catch (e) {
      await stun.close();
      throw new WeftError("ERR_LISTEN", `cannot bind the second STUN port on udp ${opts.listen.host}:${port}: ${(e as Error).message}`, { cause: e });
    }
  }
  const turn = opts.turn && opts.turn.urls.length > 0 ? opts.turn : undefined;
  const headersTimeoutMs = opts.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS;
  const hubOpts = {
    joinKey: joinKey,
    ...(opts.adminToken !== undefined ? { adminToken: opts.adminToken } : {}),
    ...(opts.limits ? { limits: opts.limits } : {}),
    presenceBatchMs: opts.presenceBatchMs ?? DEFAULT_PRESENCE_BATCH_MS,
    logger: log.child("signal"),
    stunPort: stun?.port ?? 0,
    stunAltPort: stunAlt?.port ?? 0,
    ...(opts.relay ? { relay: opts.relay } : {}),
    ...(turn ? { iceServersFor: (id: string) => turnIceServers(turn.urls, turn.secret, id, Date.now(), turn.ttlS ?? DEFAULT_TURN_TTL_S) } : {}),
    ...(opts.helloTimeoutMs !== undefined ? { helloTimeoutMs: opts.helloTimeoutMs } : {}),
    ...(opts.probeTimeoutMs !== undefined ? { probeTimeoutMs: opts.probeTimeoutMs } : {}),
    ...(opts.now !== undefined ? { now: opts.now } : {}),
    ...(opts.viewerInvitePub !== undefined ? { viewerInvitePub: opts.viewerInvitePub } : {}),
    extraStats: () => ({ tcpRefused, idleDropped, ...(stun ? { stun: stun.stats() } : {}), ...(stunAlt ? { stunAlt: stunAlt.stats() } : {}) }),
  };
  const { app, hub } = createSignalApp(hubOpts);
  if (opts.ui !== false) mountUiAssets(app);
  const server = createAdaptorServer({
    fetch: app.fetch,
    serverOptions: { headersTimeout: headersTimeoutMs, requestTimeout: Math.max(30_000, headersTimeoutMs), connectionsCheckingInterval: Math.min(1_000, headersTimeoutMs) },
  }) as Server;
  const limits = hub.limits;
  server.maxConnections = limits.maxSessions + 256;
  // TCP connections per source IP, and a first-byte deadline for connections that never send anything.
  const tcpPerIp = new Map<string, number>();
  const tcpCap = limits.maxSessionsPerIp + 16;
  let tcpRefused = 0;
  let idleDropped = 0;
  server.on("connection", (sock: Socket) => {
    const ip = sock.remoteAddress ?? "unknown";
    const n = (tcpPerIp.get(ip) ?? 0) + 1;
    if (n > tcpCap) {
      tcpRefused++;
      sock.destroy();
      return;
    }
    tcpPerIp.set(ip, n);
    sock.once("close", () => {
      const left = (tcpPerIp.get(ip) ?? 1) - 1;
      if (left <= 0) tcpPerIp.delete(ip);
      else tcpPerIp.set(ip, left);
    });
    // The first request's headers must be complete within headersTimeoutMs (Node's own headersTimeout does
    // not fire for a connection that dribbles its first header slowly enough).
    const deadline = setTimeout(() => {
      idleDropped++;
      sock.destroy();
    }, headersTimeoutMs);
    deadline.unref();
    firstRequest.set(sock, deadline);
    sock.once("close", () => clearTimeout(deadline));
  });
  const firstRequest = new WeakMap<Socket, ReturnType<typeof setTimeout>>();
  const headersDone = (sock: Socket) => {
    const t = firstRequest.get(sock);
    if (t !== undefined) clearTimeout(t);
    firstRequest.delete(sock);
  };
  server.on("request", (req: IncomingMessage) => headersDone(req.socket));
  const wss = new WebSocketServer({ noServer: true, maxPayload: WS_MAX_PAYLOAD, perMessageDeflate: false });
  const missed = new Map<WebSocket, number>();
  let closing = false;

  const attach = (ws: WebSocket, req: IncomingMessage) => {
    const pongWaiters = new Set<() => void>();
    missed.set(ws, 0);
    const port: SignalSocket = {
      remoteAddress: req.socket.remoteAddress ?? "unknown",
      ...(req.socket.remotePort !== undefined ? { remotePort: req.socket.remotePort } : {}),
      send: (bytes) => {
        if (ws.readyState === WebSocket.OPEN) ws.send(bytes, { binary: true });
      },
      bufferedAmount: () => ws.bufferedAmount,
      close: (code, reason) => {
        if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close(code, clampReason(reason));
        // a peer that never answers the close handshake does not keep the socket
        setTimeout(() => ws.terminate(), 2_000).unref();
      },
      probe: (timeoutMs) =>
        new Promise<boolean>((resolve) => {
          if (ws.readyState !== WebSocket.OPEN) return resolve(false);
          const done = (alive: boolean) => {
            clearTimeout(timer);
            pongWaiters.delete(onPong);
            resolve(alive);
          };
          const onPong = () => done(true);
          const timer = setTimeout(() => done(false), timeoutMs);
          pongWaiters.add(onPong);
          try {
            ws.ping();
          } catch {
            done(false);
          }
        }),
    };
    const session = hub.open(port);
    ws.on("message", (data, isBinary) => session.receive(isBinary ? toBytes(data) : toBytes(data).toString()));
    ws.on("pong", () => {
      missed.set(ws, 0);
      for (const w of [...pongWaiters]) w();
    });
    ws.on("error", (e) => log.debug("signal socket error", { err: e, addr: port.remoteAddress }));
    ws.on("close", () => {
      missed.delete(ws);
      for (const w of [...pongWaiters]) w(); // settle pending probes; readyState is CLOSED now
      session.closed();
    });
  };

  const refuse = (socket: Duplex, status: string, body: string) => {
    socket.on("error", () => {});
    socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  };

  server.on("upgrade", (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    headersDone(req.socket);
    const path = (req.url ?? "").split("?")[0];
    if (path !== SIGNAL_PATH) return refuse(socket, "404 Not Found", JSON.stringify({ error: `no WebSocket endpoint at ${path}; use ${SIGNAL_PATH}` }));
    if (closing) return refuse(socket, "503 Service Unavailable", JSON.stringify({ error: "server shutting down" }));
    const adm = hub.admission(req.socket.remoteAddress ?? "unknown");
    if (!adm.ok) {
      hub.countRefusal(adm.status);
      return refuse(socket, adm.status === 503 ? "503 Service Unavailable" : "429 Too Many Requests", JSON.stringify({ error: adm.reason }));
    }
    wss.handleUpgrade(req, socket, head, (ws) => attach(ws, req));
  });
  server.on("clientError", (_e, socket) => {
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
    else socket.destroy();
  });

  const keepalive = setInterval(() => {
    for (const ws of wss.clients) {
      const n = missed.get(ws) ?? 0;
      if (n >= MISSED_PONGS_LIMIT) {
        log.info("terminating signal connection that missed pongs", { missed: n });
        ws.terminate();
        continue;
      }
      missed.set(ws, n + 1);
      try {
        ws.ping();
      } catch {
        ws.terminate();
      }
    }
  }, pingIntervalMs);
  keepalive.unref();

  try {
    await new Promise<void>((resolve, reject) => {
      const onErr = (e: Error) => reject(e);
      server.once("error", onErr);
      server.listen(opts.listen.port, opts.listen.host, () => {
        server.off("error", onErr);
        resolve();
      });
    });
  } catch (e) {
    clearInterval(keepalive);
    await stun?.close();
    await stunAlt?.close();
    throw new WeftError("ERR_LISTEN", `cannot listen on tcp ${opts.listen.host}:${opts.listen.port}: ${(e as Error).message}`, { cause: e });
  }
  server.on("error", (e) => log.error("http server error", { err: e }));

  const addr = server.address();
  const port = typeof addr === "object" && addr !== null ? addr.port : opts.listen.port;
  const url = `ws://${urlHost(opts.listen.host)}:${port}`;

  let closed: Promise<void> | undefined;
  const close = async () => {
    closing = true;
    clearInterval(keepalive);
    hub.closeAll(CLOSE_CODES.SHUTDOWN, "server shutting down");
    const deadline = Date.now() + 1_000;
    while (wss.clients.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const ws of wss.clients) ws.terminate();
    await new Promise<void>((resolve) => wss.close(() => resolve()));
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    await stun?.close();
    await stunAlt?.close();
  };

  return {
    url,
    signalUrl: url + SIGNAL_PATH,
    host: opts.listen.host,
    port,
    stunPort: stun?.port ?? 0,
    stunAltPort: stunAlt?.port ?? 0,
    hub,
    stunStats: () => stun?.stats(),
    close: () => (closed ??= close()),
  };
}
