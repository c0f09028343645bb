/**
 * weftnet signaling on Deno: the runtime-neutral core (signaling/core) behind Deno.serve.
 *
 *   npm run build
 *   WEFTNET_TOKEN=... npx deno run --allow-net --allow-env --allow-read dist/examples/deno/main.js
 *
 * Listens on $HOST:$PORT (default 0.0.0.0:7000); configuration from the environment
 * (signaling/core/config.ts: WEFTNET_TOKEN or WEFTNET_JOIN_KEY, WEFTNET_ADMIN_TOKEN, limits...).
 * No STUN (agents use --ice-server or an agent's --stun-port). Keepalive: Deno pings idle sockets and
 * closes those that stay silent for $WEFTNET_IDLE_TIMEOUT_S (default 30 s).
 */
import { createSignalApp } from "../../signaling/core/app.js";
import { hubOptionsFromEnv, joinKeyFromEnv } from "../../signaling/core/config.js";
import type { SignalSocket } from "../../signaling/core/hub.js";
import { SIGNAL_PATH } from "../../src/wire/signal.js";

interface DenoWebSocket {
  binaryType: string;
  readonly readyState: number;
  readonly bufferedAmount: number;
  send(d: Uint8Array): void;
  close(code?: number, reason?: string): void;
  onopen: (() => void) | null;
  onmessage: ((e: { data: ArrayBuffer | string }) => void) | null;
  onclose: (() => void) | null;
  onerror: (() => void) | null;
}
interface DenoNs {
  env: { toObject(): Record<string, string> };
  serve(
    opts: { port: number; hostname: string; onListen?: (a: { port: number; hostname: string }) => void },
    handler: (req: Request, info: { remoteAddr: { hostname: string; port: number } }) => Response | Promise<Response>,
  ): { finished: Promise<void> };
  upgradeWebSocket(req: Request, opts?: { idleTimeout?: number }): { socket: DenoWebSocket; response: Response };
}
declare const Deno: DenoNs;

/** The WebSocket API allows only 1000 and 3000-4999 from a server's close(); others become 1000. */
export function closeWith(ws: { close(code?: number, reason?: string): void }, code: number, reason: string): void {
  try {
    ws.close(code, reason.slice(0, 123));
  } catch {
    try {
      ws.close(1000, reason.slice(0, 123));
    } catch {
      /* already closed */
    }
  }
}

const env = Deno.env.toObject();
const joinKey = await joinKeyFromEnv(env);
const { app, hub } = createSignalApp({ joinKey, ...hubOptionsFromEnv(env), serverVersion: "weftnet-signal/0.2.0 (deno)", extraStats: () => ({ runtime: "deno" }) });
const idleTimeout = Number(env.WEFTNET_IDLE_TIMEOUT_S ?? 30);

Deno.serve(
  {
    port: Number(env.PORT ?? 7000),
    hostname: env.HOST ?? "0.0.0.0",
    onListen: ({ port, hostname }) => console.log(JSON.stringify({ msg: "weftnet signal listening", runtime: "deno", url: `ws://${hostname}:${port}`, port })),
  },
  (req, info) => {
    const url = new URL(req.url);
    if (url.pathname !== SIGNAL_PATH) return app.fetch(req);
    if (req.headers.get("upgrade")?.toLowerCase() !== "websocket") return Response.json({ error: `${SIGNAL_PATH} is a WebSocket endpoint` }, { status: 426 });
    const { hostname: ip, port: remotePort } = info.remoteAddr; // (unreadable once upgraded)
    const adm = hub.admission(ip);
    if (!adm.ok) {
      hub.countRefusal(adm.status);
      return Response.json({ error: adm.reason }, { status: adm.status });
    }
    const { socket, response } = Deno.upgradeWebSocket(req, { idleTimeout });
    socket.binaryType = "arraybuffer";
    const port: SignalSocket = {
      remoteAddress: ip,
      remotePort,
      send: (b) => {
        if (socket.readyState === 1) socket.send(b);
      },
      // after the frames already queued (Deno aborts the connection when close overtakes pending sends)
      close: (code, reason) => void setTimeout(() => closeWith(socket, code, reason), 0),
      bufferedAmount: () => socket.bufferedAmount,
    };
    let session: ReturnType<typeof hub.open> | undefined;
    socket.onopen = () => {
      session = hub.open(port);
    };
    socket.onmessage = (e) => session?.receive(e.data);
    socket.onclose = () => session?.closed();
    socket.onerror = () => session?.closed();
    return response;
  },
);
