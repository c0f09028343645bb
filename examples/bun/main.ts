/**
 * weftnet signaling on Bun: the runtime-neutral core (signaling/core) behind Bun.serve.
 *
 *   npm run build
 *   WEFTNET_TOKEN=... npx bun run dist/examples/bun/main.js
 *
 * Listens on $HOST:$PORT (default 0.0.0.0:7000); configuration from the environment
 * (signaling/core/config.ts). No STUN. Keepalive: Bun pings idle sockets and closes those silent for
 * $WEFTNET_IDLE_TIMEOUT_S (default 30 s); duplicate ids are settled with a ping of the holder, as on Node.
 */
import { createSignalApp } from "../../signaling/core/app.js";
import { hubOptionsFromEnv, joinKeyFromEnv } from "../../signaling/core/config.js";
import type { SignalSession } from "../../signaling/core/hub.js";
import { MAX_RELAY_BYTES, SIGNAL_PATH } from "../../src/wire/signal.js";

interface Data {
  ip: string;
  port: number;
  session?: SignalSession;
  pongs: Set<() => void>;
}
interface BunWs {
  data: Data;
  send(b: Uint8Array): number;
  close(code?: number, reason?: string): void;
  ping(): void;
  getBufferedAmount(): number;
  readonly readyState: number;
}
interface BunServer {
  upgrade(req: Request, opts: { data: Data }): boolean;
  requestIP(req: Request): { address: string; port: number } | null;
  readonly port: number;
  readonly hostname: string;
}
declare const Bun: {
  env: Record<string, string | undefined>;
  serve(opts: {
    port: number;
    hostname: string;
    fetch(req: Request, server: BunServer): Response | Promise<Response> | undefined;
    websocket: {
      maxPayloadLength: number;
      idleTimeout: number;
      sendPings: boolean;
      open(ws: BunWs): void;
      message(ws: BunWs, msg: string | Uint8Array): void;
      close(ws: BunWs): void;
      pong(ws: BunWs): void;
    };
  }): BunServer;
};

const env = Bun.env;
const joinKey = await joinKeyFromEnv(env);
const { app, hub } = createSignalApp({ joinKey, ...hubOptionsFromEnv(env), serverVersion: "weftnet-signal/0.2.0 (bun)", extraStats: () => ({ runtime: "bun" }) });

const server = Bun.serve({
  port: Number(env.PORT ?? 7000),
  hostname: env.HOST ?? "0.0.0.0",
  fetch(req, srv) {
    const url = new URL(req.url);
    if (url.pathname !== SIGNAL_PATH) return app.fetch(req);
    const peer = srv.requestIP(req);
    const ip = peer?.address ?? "unknown";
    const adm = hub.admission(ip);
    if (!adm.ok) {
      hub.countRefusal(adm.status);
      return Response.json({ error: adm.reason }, { status: adm.status });
    }
    if (srv.upgrade(req, { data: { ip, port: peer?.port ?? 0, pongs: new Set() } })) return undefined;
    return Response.json({ error: `${SIGNAL_PATH} is a WebSocket endpoint` }, { status: 426 });
  },
  websocket: {
    maxPayloadLength: MAX_RELAY_BYTES + 16 * 1024,
    idleTimeout: Number(env.WEFTNET_IDLE_TIMEOUT_S ?? 30),
    sendPings: true,
    open(ws) {
      ws.data.session = hub.open({
        remoteAddress: ws.data.ip,
        remotePort: ws.data.port,
        send: (b) => void ws.send(b),
        close: (code, reason) => ws.close(code, reason.slice(0, 123)),
        bufferedAmount: () => ws.getBufferedAmount(),
        probe: (timeoutMs) =>
          new Promise<boolean>((resolve) => {
            if (ws.readyState !== 1) return resolve(false);
            const done = (alive: boolean) => {
              clearTimeout(timer);
              ws.data.pongs.delete(onPong);
              resolve(alive);
            };
            const onPong = () => done(true);
            const timer = setTimeout(() => done(false), timeoutMs);
            ws.data.pongs.add(onPong);
            ws.ping();
          }),
      });
    },
    message(ws, msg) {
      ws.data.session?.receive(msg);
    },
    close(ws) {
      for (const p of [...ws.data.pongs]) p();
      ws.data.session?.closed();
    },
    pong(ws) {
      for (const p of [...ws.data.pongs]) p();
    },
  },
});
console.log(JSON.stringify({ msg: "weftnet signal listening", runtime: "bun", url: `ws://${server.hostname}:${server.port}`, port: server.port }));
