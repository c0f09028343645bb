/**
 * Local API of the agent: HTTP (hono) on a unix socket in the state dir, mode 0600 — only the owner of
 * the state dir (root for a system agent) can talk to it. The CLI's client commands use it.
 *
 *   GET  /v1/status            -> AgentStatus (see agent.ts)
 *   GET  /v1/routes            -> {routes: RouteStatus[]} (next hop per node, from link-state routing)
 *   POST /v1/ping {node, timeoutMs?} -> {id, name, rttMs}
 *   GET  /v1/ipam              -> IPAM status (range, blocks with owners, allocations, pending)
 *   POST /v1/ipam/allocate {podId, timeoutMs?} -> {podId, ip, prefixLen, gateway, block} (idempotent)
 *   POST /v1/ipam/free {podId} -> {released}
 *   POST /v1/pods {name}       -> PodInfo (netns NAME, veth on the bridge, IP from this node's blocks)
 *   DELETE /v1/pods/NAME       -> {released}
 *   POST /v1/ipam/release-node {node, sigs?, remove?} -> {node}   (operator: force-release a gone node's blocks
 *                              and remove it from the IPAM members; sigs: [[block, hex signature]] and remove:
 *                              hex signature of the removal, by the operator key, see `weftnet ipam release`)
 * Errors: JSON {error: {code, message}} with 4xx/5xx.
 */
import { chmodSync, unlinkSync } from "node:fs";
import type { Server } from "node:http";
import { createAdaptorServer } from "@hono/node-server";
import { Hono } from "hono";
import { WeftError } from "../src/errors.js";
import type { PodInfo } from "./pods.js";
import type { PodAddress } from "./ipam.js";
import type { AgentView, PeerPath } from "./status.js";

export interface ApiServer {
  close(): Promise<void>;
}

/** What the local API serves: the read-only view plus the operations it exposes. */
export interface ApiAgent extends Pick<AgentView, "status" | "routes" | "ipamStatus"> {
  ping(target: string, timeoutMs?: number): Promise<{ id: string; name: string; rttMs: number; path: PeerPath }>;
  allocate(podId: string, timeoutMs?: number, signal?: AbortSignal): Promise<PodAddress>;
  release(podId: string): boolean;
  ipamRelease(target: string, sigs?: Map<number, Uint8Array>, remove?: Uint8Array): { node: string };
  addPod(name: string): Promise<PodInfo>;
  delPod(name: string): Promise<{ released: boolean }>;
}

function errorStatus(code: string): 400 | 403 | 404 | 409 | 500 | 503 {
  if (code === "ERR_USAGE" || code === "ERR_NO_DATAPLANE" || code.startsWith("ERR_POD_INPUT")) return 400;
  if (code === "ERR_FORBIDDEN") return 403;
  if (code === "ERR_NO_PEER" || code === "ERR_NOT_FOUND") return 404;
  if (code === "ERR_EXISTS") return 409;
  if (code === "ERR_TIMEOUT" || code === "ERR_BUSY" || code === "ERR_NOT_CONNECTED" || code === "ERR_IPAM_TIMEOUT" || code === "ERR_NOT_READY") return 503;
  return 500;
}

async function jsonBody(c: { req: { json(): Promise<unknown> } }): Promise<Record<string, unknown> | undefined> {
  try {
    const b = await c.req.json();
    return b && typeof b === "object" && !Array.isArray(b) ? (b as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

const POD_ID_RE = /^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$/;

export function createApiApp(agent: ApiAgent): Hono {
  const app = new Hono();
  app.get("/v1/status", async (c) => c.json(await agent.status()));
  app.get("/v1/routes", (c) => c.json({ routes: agent.routes() }));
  app.get("/v1/ipam", (c) => c.json(agent.ipamStatus()));
  app.post("/v1/ipam/allocate", async (c) => {
    const b = await jsonBody(c);
    if (!b || typeof b.podId !== "string" || !POD_ID_RE.test(b.podId)) return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {podId} (1-200 chars: letters, digits, . _ : / -)" } }, 400);
    try {
      // the request's signal aborts when the caller closes the connection (it gave up): nothing is kept then
      return c.json(await agent.allocate(b.podId, typeof b.timeoutMs === "number" ? Math.min(Math.max(b.timeoutMs, 0), 120_000) : 30_000, c.req.raw.signal));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, errorStatus(code));
    }
  });
  app.post("/v1/ipam/free", async (c) => {
    const b = await jsonBody(c);
    if (!b || typeof b.podId !== "string" || !POD_ID_RE.test(b.podId)) return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {podId}" } }, 400);
    return c.json({ released: agent.release(b.podId) });
  });
  app.post("/v1/pods", async (c) => {
    const b = await jsonBody(c);
    if (!b || typeof b.name !== "string") return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {name}" } }, 400);
    try {
      return c.json(await agent.addPod(b.name));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, errorStatus(code));
    }
  });
  app.delete("/v1/pods/:name", async (c) => {
    try {
      return c.json(await agent.delPod(c.req.param("name")));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, errorStatus(code));
    }
  });
  app.post("/v1/ipam/release-node", async (c) => {
    const b = await jsonBody(c);
    const sigs = new Map<number, Uint8Array>();
    const raw = b?.sigs ?? [];
    const okSigs = Array.isArray(raw) && raw.length <= 65536 && raw.every((x) => Array.isArray(x) && Number.isInteger(x[0]) && typeof x[1] === "string" && /^[0-9a-f]{128}$/.test(x[1]));
    const okRemove = b?.remove === undefined || (typeof b.remove === "string" && /^[0-9a-f]{128}$/.test(b.remove));
    if (!b || typeof b.node !== "string" || b.node.length > 128 || !okSigs || !okRemove) return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {node, sigs?: [[block, 128 hex chars]], remove?: 128 hex chars}" } }, 400);
    for (const [i, h] of raw as [number, string][]) sigs.set(i, new Uint8Array(Buffer.from(h, "hex")));
    const remove = typeof b.remove === "string" ? new Uint8Array(Buffer.from(b.remove, "hex")) : undefined;
    try {
      return c.json(agent.ipamRelease(b.node, sigs, remove));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, errorStatus(code));
    }
  });
  app.post("/v1/ping", async (c) => {
    let body: unknown;
    try {
      body = await c.req.json();
    } catch {
      return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {node}" } }, 400);
    }
    const b = body as { node?: unknown; timeoutMs?: unknown };
    if (typeof b.node !== "string" || b.node.length === 0 || b.node.length > 128) return c.json({ error: { code: "ERR_USAGE", message: "field node must be a node id or name" } }, 400);
    const timeoutMs = typeof b.timeoutMs === "number" && b.timeoutMs > 0 && b.timeoutMs <= 60_000 ? b.timeoutMs : 3000;
    try {
      return c.json(await agent.ping(b.node, timeoutMs));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, code === "ERR_NO_PEER" ? 404 : code === "ERR_TIMEOUT" || code === "ERR_BUSY" || code === "ERR_NOT_CONNECTED" ? 503 : 500);
    }
  });
  app.notFound((c) => c.json({ error: { code: "ERR_NOT_FOUND", message: `no such endpoint ${c.req.method} ${c.req.path}` } }, 404));
  app.onError((err, c) => c.json({ error: { code: "ERR_INTERNAL", message: err.message } }, 500));
  return app;
}

export async function startApiServer(socketPath: string, agent: ApiAgent): Promise<ApiServer> {
  const app = createApiApp(agent);
  const server = createAdaptorServer({ fetch: app.fetch }) as Server;
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e) => reject(new WeftError("ERR_API", `cannot serve the local API on ${socketPath}: ${e.message}`)));
    // Create the socket 0600 from the start (umask 077 around bind): a chmod after listen leaves a window
    // in which any local user may connect. process.umask is process-wide, but nothing else runs between
    // the two calls (listen binds synchronously in this tick).
    const old = process.umask(0o077);
    try {
      server.listen(socketPath, () => resolve());
    } finally {
      process.umask(old);
    }
  });
  chmodSync(socketPath, 0o600); // belt and braces: the mode is already 0600
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections?.();
        try {
          unlinkSync(socketPath);
        } catch {
          // already gone
        }
      }),
  };
}
