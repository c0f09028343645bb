/**
 * Local API of the agent: HTTP (hono) on a unix socket in the state dir, mode 0600 — only the owner of
 * the state dir (root for a system agent) can talk to it. The CLI's client commands use it.
 *
 *   GET  /v1/status            -> AgentStatus (see agent.ts)
 *   GET  /v1/routes            -> {routes: RouteStatus[]} (next hop per node, from link-state routing)
 *   POST /v1/ping {node, timeoutMs?} -> {id, name, rttMs}
 * Errors: JSON {error: {code, message}} with 4xx/5xx.
 */
import { chmodSync, unlinkSync } from "node:fs";
import type { Server } from "node:http";
import { createAdaptorServer } from "@hono/node-server";
import { Hono } from "hono";
import { WeftError } from "../src/errors.js";
import type { Agent } from "./agent.js";

export interface ApiServer {
  close(): Promise<void>;
}

export function createApiApp(agent: Pick<Agent, "status" | "ping" | "routes">): Hono {
  const app = new Hono();
  app.get("/v1/status", async (c) => c.json(await agent.status()));
  app.get("/v1/routes", (c) => c.json({ routes: agent.routes() }));
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
      return c.json({ error: { code, message: (e as Error).message } }, code === "ERR_NO_PEER" ? 404 : code === "ERR_TIMEOUT" || code === "ERR_NOT_CONNECTED" ? 503 : 500);
    }
  });
  app.notFound((c) => c.json({ error: { code: "ERR_NOT_FOUND", message: `no such endpoint ${c.req.method} ${c.req.path}` } }, 404));
  app.onError((err, c) => c.json({ error: { code: "ERR_INTERNAL", message: err.message } }, 500));
  return app;
}

export async function startApiServer(socketPath: string, agent: Pick<Agent, "status" | "ping" | "routes">): Promise<ApiServer> {
  const app = createApiApp(agent);
  const server = createAdaptorServer({ fetch: app.fetch }) as Server;
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e) => reject(new WeftError("ERR_API", `cannot serve the local API on ${socketPath}: ${e.message}`)));
    server.listen(socketPath, () => resolve());
  });
  chmodSync(socketPath, 0o600);
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
