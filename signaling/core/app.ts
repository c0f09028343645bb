/**
 * The signaling server's HTTP side, as a hono app built by a factory (test it with `app.request()`).
 * Runtime-neutral: the same app serves Node (server.ts), a Cloudflare Durable Object, Deno and Bun.
 *
 *   GET /healthz    200 {ok:true, agents:N}                                   no auth
 *   GET /v1/nodes   200 {nodes:[{id,name,meta,addr,connectedAt}]}             admin credential
 *   GET /v1/stats   200 hub counters (bad frames, refusals, relays, limits)   admin credential
 *   GET /metrics    200 Prometheus text format (core/metrics.ts)              admin credential
 *                   401 {error}                                               missing or wrong credential
 *   POST /ui/v1/offer  {sdp, node?, proof?:{ts, mac}, invite?} -> {sdp, candidates, node}
 *                   a topology-page browser's WebRTC offer, handed to one agent (hub.introduceViewer).
 *                   It must hold a credential: proof = HMAC(join key, frame(VIEWER_OFFER_CTX, ts, sdp))
 *                   with ts within VIEWER_PROOF_WINDOW_MS of now (the page derives the join key from the
 *                   pasted token), or an invite signed with this server's invite key (src/wire/invite.ts),
 *                   then only agents that pin that key are asked. This check only keeps strangers from
 *                   making agents open links: the agent itself admits the viewer on the link, with the
 *                   token's *peer key* (which this server does not have) or the invite.
 *                   401 {error:{code,message}} no or a wrong credential, 503 no agent takes viewers, 504
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
import { WeftError } from "../../src/errors.js";
import { INVITE_CTX, inviteTimeProblem, parseInvite } from "../../src/wire/invite.js";
import { constantTimeEqual, deriveJoinKey, frameFields, toHex, webCryptoPort } from "./crypto.js";
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
  /** public key (32 bytes) of this server's viewer-invite key: invites it signed admit /ui viewers */
  viewerInvitePub?: Uint8Array;
}

/** Context of the /ui offer proof: HMAC(join key, frame(VIEWER_OFFER_CTX, String(ts), sdp)). */
export const VIEWER_OFFER_CTX = "weftnet/viewer-offer/v1";
export const VIEWER_PROOF_WINDOW_MS = 120_000;

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

  app.get("/v1/stats", requireAdmin, (c) => c.json({ ...hub.stats(), joinMs: hub.joinTimes(), ...(opts.extraStats?.() ?? {}) }));

  // STUN counters: given directly, or the `stun` entry the server merges into /v1/stats.
  const stunStats =
    opts.stunStats ??
    (() => {
      const s = opts.extraStats?.().stun;
      return typeof s === "object" && s !== null && "requests" in s ? (s as StunStats) : undefined;
    });
  app.get("/metrics", requireAdmin, (c) => c.body(renderSignalMetrics(hub, stunStats()), 200, { "content-type": METRICS_CONTENT_TYPE }));

  const crypto = opts.crypto ?? webCryptoPort();
  const clock = opts.clock;
  const now = opts.now ?? (clock ? () => clock.now() : () => Date.now());
  const invitePubHex = opts.viewerInvitePub ? toHex(opts.viewerInvitePub) : undefined;
  const refuse = (code: string, message: string) => ({ error: { code, message } });
  app.post("/ui/v1/offer", async (c) => {
    let body: { sdp?: unknown; node?: unknown; proof?: { ts?: unknown; mac?: unknown }; invite?: unknown };
    try {
      body = (await c.req.json()) as typeof body;
    } catch {
      return c.json(refuse("ERR_USAGE", "body must be JSON {sdp, proof|invite}"), 400);
    }
    const sdp = body?.sdp;
    if (typeof sdp !== "string" || !sdp.startsWith("v=0") || sdp.length > 32 * 1024) return c.json(refuse("ERR_USAGE", "sdp must be an SDP offer"), 400);
    const target = typeof body.node === "string" && body.node !== "" ? body.node.slice(0, 64) : undefined;
    let needMeta: [string, string] | undefined;
    if (body.invite !== undefined) {
      if (opts.viewerInvitePub === undefined) return c.json(refuse("ERR_BAD_INVITE", "this server does not issue viewer invites (no --invite-key-file)"), 401);
      let inv;
      try {
        inv = parseInvite(body.invite);
      } catch (e) {
        return c.json(refuse("ERR_BAD_INVITE", (e as Error).message), 401);
      }
      if (!(await crypto.verifyEd25519(opts.viewerInvitePub, frameFields(INVITE_CTX, inv.payload), inv.sig))) return c.json(refuse("ERR_BAD_INVITE", "the invite was not signed by this server"), 401);
      const late = inviteTimeProblem(inv, now());
      if (late !== undefined) return c.json(refuse("ERR_BAD_INVITE", late), 401);
      needMeta = ["ui-invite", invitePubHex!];
    } else {
      const ts = body.proof?.ts;
      const mac = body.proof?.mac;
      if (typeof ts !== "number" || typeof mac !== "string" || !/^[0-9a-f]{64}$/.test(mac)) return c.json(refuse("ERR_BAD_TOKEN", "the page must prove the cluster token (proof) or bring an invite"), 401);
      if (Math.abs(now() - ts) > VIEWER_PROOF_WINDOW_MS) return c.json(refuse("ERR_BAD_TOKEN", "the proof's time is off by more than 2 minutes (check this computer's clock)"), 401);
      const macBytes = new Uint8Array(32);
      for (let i = 0; i < 32; i++) macBytes[i] = parseInt(mac.slice(2 * i, 2 * i + 2), 16);
      if (!(await crypto.verifyHmac(opts.joinKey, frameFields(VIEWER_OFFER_CTX, String(ts), sdp), macBytes))) {
        log?.warn("refused a topology-page viewer: wrong cluster token", { addr: c.req.header("x-forwarded-for") ?? null });
        return c.json(refuse("ERR_BAD_TOKEN", "wrong cluster token"), 401);
      }
    }
    try {
      return c.json(await hub.introduceViewer(sdp, { ...(target ? { target } : {}), ...(needMeta ? { needMeta } : {}) }));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      const status = code === "ERR_NO_PEER" || code === "ERR_BUSY" ? 503 : code === "ERR_TIMEOUT" ? 504 : 502;
      return c.json(refuse(code, (e as Error).message), status);
    }
  });

  app.notFound((c) => c.json({ error: `no route ${c.req.method} ${new URL(c.req.url).pathname}` }, 404));
  app.onError((err, c) => {
    log?.error("http handler failed", { err, path: c.req.path });
    return c.json({ error: "internal error" }, 500);
  });

  return { app, hub };
}
