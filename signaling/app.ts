/**
 * The signaling server's HTTP side, as a hono app built by a factory (test it with `app.request()`).
 *
 *   GET /healthz    200 {ok:true, agents:N}                                   no auth
 *   GET /v1/nodes   200 {nodes:[{id,name,meta,addr,connectedAt}]}             Authorization: Bearer <join key>
 *                   401 {error}                                               missing or wrong token
 *   GET /v1/stats   200 hub counters (bad frames, refusals, relays)          Authorization: Bearer <join key>
 *   GET /metrics    200 Prometheus text format (signaling/metrics.ts)        Authorization: Bearer <join key>
 *
 * The WebSocket endpoint (SIGNAL_PATH) is not a hono route: server.ts handles the HTTP upgrade itself
 * and hands connections to the same SignalHub returned here.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { Hono, type MiddlewareHandler } from "hono";
import { type Logger } from "../src/log.js";
import { SignalHub, serverJoinKey, type SignalHubOptions } from "./hub.js";
import { createSignalMetrics } from "./metrics.js";
import type { StunStats } from "./stun.js";

export interface SignalAppOptions extends SignalHubOptions {
  logger?: Logger;
  now?: () => number;
  /** use an existing hub instead of creating one */
  hub?: SignalHub;
  /** more counters merged into GET /v1/stats (the server adds the STUN responder's) */
  extraStats?: () => Record<string, unknown>;
  /** the STUN responder's counters for GET /metrics (default: the `stun` entry of extraStats) */
  stunStats?: () => StunStats | undefined;
}

/** Constant-time token comparison (hash first so lengths never leak through timing). */
export function tokenMatches(given: string, want: string): boolean {
  const a = createHash("sha256").update(given, "utf8").digest();
  const b = createHash("sha256").update(want, "utf8").digest();
  return timingSafeEqual(a, b) && given.length === want.length;
}

export function createSignalApp(opts: SignalAppOptions): { app: Hono; hub: SignalHub } {
  const hub = opts.hub ?? new SignalHub(opts);
  // The HTTP API's Bearer credential is the join key (identity.ts splitToken), never the cluster token.
  const joinKey = serverJoinKey(opts);
  const log = opts.logger?.child("signal-http");
  const app = new Hono();

  const requireToken: MiddlewareHandler = async (c, next) => {
    const h = c.req.header("authorization") ?? "";
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    if (m === null) return c.json({ error: "missing Authorization: Bearer <join key>" }, 401);
    if (!tokenMatches(m[1]!.trim(), joinKey)) return c.json({ error: "wrong join key (weftnet join-key --token T prints it)" }, 401);
    await next();
    return undefined;
  };

  app.get("/healthz", (c) => c.json({ ok: true, agents: hub.size }));

  app.get("/v1/nodes", requireToken, (c) =>
    c.json({
      nodes: hub.list().map((m) => ({ id: m.id, name: m.name, meta: m.meta, addr: m.addr, connectedAt: new Date(m.connectedAt).toISOString() })),
    }),
  );

  app.get("/v1/stats", requireToken, (c) => c.json({ ...hub.stats(), ...(opts.extraStats?.() ?? {}) }));

  // STUN counters: given directly, or the `stun` entry the server merges into /v1/stats.
  const stunStats = opts.stunStats ?? (() => {
    const s = opts.extraStats?.().stun;
    return typeof s === "object" && s !== null && "requests" in s ? (s as StunStats) : undefined;
  });
  const metrics = createSignalMetrics({ hub, stunStats });
  app.get("/metrics", requireToken, async (c) => c.body(await metrics.scrape(), 200, { "content-type": metrics.contentType }));

  app.notFound((c) => c.json({ error: `no route ${c.req.method} ${new URL(c.req.url).pathname}` }, 404));
  app.onError((err, c) => {
    log?.error("http handler failed", { err, path: c.req.path });
    return c.json({ error: "internal error" }, 500);
  });

  return { app, hub };
}
