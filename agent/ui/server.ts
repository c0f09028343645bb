/**
 * `weftnet agent --ui-listen HOST:PORT`: the live topology page and the HTTP introduction of a browser
 * viewer (agent/ui/viewer.ts).
 *   GET  /ui              the page (ui/index.html, built into dist/agent/ui/assets by `npm run build`)
 *   GET  /ui/app.js       its script (ui/app.ts bundled by esbuild)
 *   POST /ui/v1/offer     {sdp} -> {sdp, candidates, node}: this agent answers the browser's first link
 * Nothing here is privileged: the link carries data only after the browser proved the cluster
 * credential on it. Bind to 127.0.0.1 or a private address all the same.
 */
import { readFileSync } from "node:fs";
import type { Server } from "node:http";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createAdaptorServer } from "@hono/node-server";
import { Hono } from "hono";
import { WeftError } from "../../src/errors.js";
import type { ViewerHub } from "./viewer.js";

const ASSETS = join(dirname(fileURLToPath(import.meta.url)), "assets");

export function uiAsset(name: "index.html" | "app.js"): string {
  try {
    return readFileSync(join(ASSETS, name), "utf8");
  } catch {
    throw new WeftError("ERR_NO_UI", `the topology page is not built (${join(ASSETS, name)} missing): run npm run build`);
  }
}

/** Static routes of the page, for any hono app (the agent's, and the signaling server's /ui). */
export function mountUiAssets(app: Hono): void {
  app.get("/ui", (c) => c.html(uiAsset("index.html")));
  app.get("/ui/", (c) => c.html(uiAsset("index.html")));
  app.get("/favicon.ico", (c) => c.body(null, 204));
  app.get("/ui/app.js", (c) => c.body(uiAsset("app.js"), 200, { "content-type": "text/javascript; charset=utf-8", "cache-control": "no-cache" }));
}

export function createUiApp(hub: ViewerHub): Hono {
  const app = new Hono();
  app.get("/", (c) => c.redirect("/ui"));
  mountUiAssets(app);
  app.post("/ui/v1/offer", async (c) => {
    let body: unknown;
    try {
      body = await c.req.json();
    } catch {
      return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {sdp}" } }, 400);
    }
    const sdp = (body as { sdp?: unknown })?.sdp;
    if (typeof sdp !== "string") return c.json({ error: { code: "ERR_USAGE", message: "body must be JSON {sdp}" } }, 400);
    try {
      return c.json(await hub.accept(sdp));
    } catch (e) {
      const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
      return c.json({ error: { code, message: (e as Error).message } }, code === "ERR_USAGE" ? 400 : code === "ERR_BUSY" ? 503 : 500);
    }
  });
  return app;
}

export interface UiServer {
  url: string;
  close(): Promise<void>;
}

export async function startUiServer(listen: { host: string; port: number }, hub: ViewerHub): Promise<UiServer> {
  const server = createAdaptorServer({ fetch: createUiApp(hub).fetch }) as Server;
  await new Promise<void>((resolve, reject) => {
    server.once("error", (e) => reject(new WeftError("ERR_UI_LISTEN", `cannot serve the topology page on ${listen.host}:${listen.port}: ${e.message}`)));
    server.listen(listen.port, listen.host, () => resolve());
  });
  const port = (server.address() as { port: number }).port;
  const h = listen.host.includes(":") ? `[${listen.host}]` : listen.host;
  return {
    url: `http://${h}:${port}/ui`,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections?.();
      }),
  };
}
