/**
 * The signaling server's HTTP side, as a hono app built by a factory (test it with `app.request()`).
 * Runtime-neutral: the same app serves Node (server.ts), a Cloudflare Durable Object, Deno and Bun.
 *
 *   GET /healthz    200 {ok:true, agents:N}                                   no auth
 *   GET /v1/nodes   200 {nodes:[{id,name,meta,addr,connectedAt}]}             admin credential
 *   GET /v1/stats   200 hub counters (bad frames, refusals, relays, limits)   admin credential
 *   GET /metrics    200 Prometheus text format (core/metrics.ts)              admin credential
 *                   401 {error}                                               missing or wrong credential
 *
 * Credentials: the server holds the cluster's *join key* (HKDF of the token, core/crypto.ts), never the
 * token. The admin endpoints take `Authorization: Bearer X` where X is the admin token when one is
 * configured (--admin-token-file / WEFTNET_ADMIN_TOKEN; then nothing else), otherwise the cluster token
 * (checked by deriving its join key) or the join key itself.
 *
 * The WebSocket endpoint (SIGNAL_PATH) is not a hono route: each adapter upgrades in its own way and
 * hands connections to the SignalHub returned here (`admission(ip)` first).
 */
import { Hono, type MiddlewareHandler } from "hono";
import { type Logger } from "../../src/log.js";
import { constantTimeEqual, deriveJoinKey } from "./crypto.js";
import { SignalHub, type SignalHubOptions } from "./hub.js";
import { METRICS_CONTENT_TYPE, renderSignalMetrics, type StunStats } from "./metrics.js";

export interface SignalAppOptions extends SignalHubOptions {
  /** admin credential for /v1/nodes, /v1/stats, /metrics; absent = the cluster token or join key */
  adminToken?: string;
  logger?: Logger;
  /** use an existing hub instead of creating one */
  hub?: SignalHub;
  /** more counters merged into GET /v1/stats (the Node server adds the STUN responder's) */
  extraStats?: () => Record<string, unknown>;
  /** the STUN responder's counters for GET /metrics (default: the `stun` entry of extraStats) */
  stunStats?: () => StunStats | undefined;
}

/** Constant-time comparison of a presented credential with the expected one. */
export function tokenMatches(given: string, want: string): boolean {
  return constantTimeEqual(given, want);
}

/** Checks a presented Bearer credential: admin token if configured, else cluster token or join key. */
export function credentialChecker(joinKey: string, adminToken: string | undefined): (given: string) => Promise<boolean> {
  const derived = new Map<string, boolean>();
  return async (given) => {
    if (adminToken !== undefined) return constantTimeEqual(given, adminToken);
    if (constantTimeEqual(given, joinKey)) return true;
    let ok = derived.get(given);
    if (ok === undefined) {
      ok = constantTimeEqual(await deriveJoinKey(given), joinKey);
      if (derived.size > 64) derived.clear();
      derived.set(given, ok);
    }
    return ok;
  };
}

export function createSignalApp(opts: SignalAppOptions): { app: Hono; hub: SignalHub } {
  const hub = opts.hub ?? new SignalHub(opts);
  const log = opts.logger?.child("signal-http");
  const app = new Hono();
  const check = credentialChecker(opts.joinKey, opts.adminToken);

  const requireAdmin: MiddlewareHandler = async (c, next) => {
    const h = c.req.header("authorization") ?? "";
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    const what = opts.adminToken !== undefined ? "admin token" : "cluster token";
    if (m === null) return c.json({ error: `missing Authorization: Bearer <${what}>` }, 401);
    if (!(await check(m[1]!.trim()))) return c.json({ error: `wrong ${what}` }, 401);
    await next();
    return undefined;
  };

  app.get("/healthz", (c) => c.json({ ok: true, agents: hub.size }));

  app.get("/v1/nodes", requireAdmin, (c) =>
    c.json({
      nodes: hub.list().map((m) => ({ id: m.id, name: m.name, meta: m.meta, addr: m.addr, connectedAt: new Date(m.connectedAt).toISOString() })),
    }),
  );

  app.get("/v1/stats", requireAdmin, (c) => c.json({ ...hub.stats(), ...(opts.extraStats?.() ?? {}) }));

  // STUN counters: given directly, or the `stun` entry the server merges into /v1/stats.
  const stunStats =
    opts.stunStats ??
    (() => {
      const s = opts.extraStats?.().stun;
      return typeof s === "object" && s !== null && "requests" in s ? (s as StunStats) : undefined;
    });
  app.get("/metrics", requireAdmin, (c) => c.body(renderSignalMetrics(hub, stunStats()), 200, { "content-type": METRICS_CONTENT_TYPE }));

  app.notFound((c) => c.json({ error: `no route ${c.req.method} ${new URL(c.req.url).pathname}` }, 404));
  app.onError((err, c) => {
    log?.error("http handler failed", { err, path: c.req.path });
    return c.json({ error: "internal error" }, 500);
  });

  return { app, hub };
}
