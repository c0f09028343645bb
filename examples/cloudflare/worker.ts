/**
 * weftnet signaling on Cloudflare Workers: one Durable Object per cluster holds every agent's WebSocket
 * with the hibernation API, and runs the same runtime-neutral core as `weftnet signal`
 * (signaling/core: hub + hono app). See README.md beside this file.
 *
 *   Worker fetch  ->  the cluster's Durable Object (idFromName(WEFTNET_CLUSTER ?? "default"))
 *   DO fetch      ->  GET /v1/signal with Upgrade: websocket  -> ctx.acceptWebSocket (hibernatable)
 *                     anything else                          -> the hono app (/healthz, /v1/nodes, /v1/stats, /metrics)
 *   webSocketMessage / webSocketClose / webSocketError       -> the hub's session for that socket
 *
 * Hibernation: the hub asks each socket to persist a small snapshot (nonce, and once registered the
 * member: id, name, public key, meta, instance, address); it is kept as the socket's attachment. When the
 * object is evicted and woken again by a message, the constructor rebuilds every session from
 * ctx.getWebSockets() and their attachments, so presence survives without any agent noticing.
 *
 * No UDP on Workers: no STUN here (stunPort 0 in welcome). Agents take STUN from --ice-server or from an
 * agent started with --stun-port. There is no server-side WebSocket ping on Workers (the runtime answers
 * the agents' pings itself), so a duplicate id is refused while its holder's socket is open, and the
 * relay's per-receiver buffer check is unavailable (the per-agent, per-IP and global budgets apply).
 */
import { createSignalApp } from "../../signaling/core/app.js";
import { hubOptionsFromEnv, joinKeyFromEnv, type Env as ConfigEnv } from "../../signaling/core/config.js";
import type { Clock, SessionSnapshot, SignalHub, SignalSession, SignalSocket } from "../../signaling/core/hub.js";
import { SIGNAL_PATH } from "../../src/wire/signal.js";

// ---- the few Workers runtime types we use (no @cloudflare/workers-types dependency) -----------------
interface CfWebSocket {
  send(data: ArrayBuffer | ArrayBufferView | string): void;
  close(code?: number, reason?: string): void;
  serializeAttachment(value: unknown): void;
  deserializeAttachment(): unknown;
  readonly readyState: number;
}
interface DurableObjectState {
  storage: { setAlarm(at: number): Promise<void>; deleteAlarm(): Promise<void> };
  acceptWebSocket(ws: CfWebSocket, tags?: string[]): void;
  getWebSockets(tag?: string): CfWebSocket[];
  blockConcurrencyWhile<T>(fn: () => Promise<T>): Promise<T>;
}
interface DurableObjectStub {
  fetch(req: Request): Promise<Response>;
}
interface DurableObjectNamespace {
  idFromName(name: string): unknown;
  get(id: unknown): DurableObjectStub;
}
declare const WebSocketPair: { new (): { 0: CfWebSocket; 1: CfWebSocket } };

interface WorkerEnv {
  SIGNAL_ROOM: DurableObjectNamespace;
  WEFTNET_CLUSTER?: string;
}

/**
 * The hub's clock port on Durable Object alarms: a setTimeout armed in a fetch or WebSocket handler did
 * not fire in time under workerd once the handler returned (a 150 ms hello timeout fired after ~10 s),
 * an alarm does. Timers are not kept across hibernation; restore() re-arms the ones that matter.
 */
class AlarmClock implements Clock {
  private timers: { at: number; fn: () => void }[] = [];
  private armed = Infinity;
  constructor(private readonly storage: DurableObjectState["storage"]) {}
  now = () => Date.now();
  setTimer = (fn: () => void, ms: number) => {
    const t = { at: Date.now() + ms, fn };
    this.timers.push(t);
    this.arm();
    return t;
  };
  clearTimer = (h: unknown) => {
    this.timers = this.timers.filter((t) => t !== h);
  };
  /** the object's alarm() handler */
  fire(): void {
    this.armed = Infinity;
    const now = Date.now();
    const due = this.timers.filter((t) => t.at <= now);
    this.timers = this.timers.filter((t) => t.at > now);
    for (const t of due) t.fn();
    this.arm();
  }
  private arm(): void {
    if (this.timers.length === 0) return;
    const next = Math.min(...this.timers.map((t) => t.at));
    if (next >= this.armed) return;
    this.armed = next;
    void this.storage.setAlarm(next);
  }
}

/** How often this isolate constructed the object: > 1 means it was evicted (hibernated) and rebuilt. */
let constructions = 0;

const ATTACHMENT_MAX = 2048; // the runtime's limit for serializeAttachment

export class SignalRoom {
  private hub!: SignalHub;
  private app!: { fetch: (req: Request) => Response | Promise<Response> };
  private readonly sessions = new Map<CfWebSocket, SignalSession>();
  private readonly generation: number;
  private restored = 0;
  private readonly clock: AlarmClock;

  constructor(
    private readonly ctx: DurableObjectState,
    env: Record<string, unknown>,
  ) {
    this.generation = ++constructions;
    this.clock = new AlarmClock(ctx.storage);
    const strEnv: ConfigEnv = {};
    for (const [k, v] of Object.entries(env)) if (typeof v === "string") strEnv[k] = v;
    void ctx.blockConcurrencyWhile(async () => {
      const joinKey = await joinKeyFromEnv(strEnv);
      const { app, hub } = createSignalApp({
        joinKey,
        ...hubOptionsFromEnv(strEnv),
        clock: this.clock,
        serverVersion: "weftnet-signal/0.2.0 (workers)",
        extraStats: () => ({ runtime: "workerd", generation: this.generation, restoredSessions: this.restored }),
      });
      this.hub = hub;
      this.app = app;
      // Back from hibernation: every socket the runtime kept open becomes a session again.
      for (const ws of ctx.getWebSockets()) {
        const snap = ws.deserializeAttachment() as (SessionSnapshot & { ip?: string }) | null;
        if (snap === null || snap === undefined || !(snap.nonce instanceof Uint8Array)) {
          ws.close(1013, "server restarted; reconnect");
          continue;
        }
        this.sessions.set(ws, hub.restore(this.port(ws, snap.ip ?? "unknown"), snap));
        this.restored++;
      }
    });
  }

  private port(ws: CfWebSocket, ip: string): SignalSocket {
    return {
      remoteAddress: ip,
      send: (bytes) => ws.send(bytes),
      close: (code, reason) => {
        try {
          ws.close(code, reason.slice(0, 123));
        } catch {
          /* already closed */
        }
      },
      persist: (snap) => {
        let value: SessionSnapshot & { ip: string } = { ...snap, ip };
        // the attachment is capped at 2 KiB: a member with a large meta keeps its meta only in memory
        if (snap.member && JSON.stringify(snap.member.meta).length + 400 > ATTACHMENT_MAX) value = { ...value, member: { ...snap.member, meta: {} } };
        ws.serializeAttachment(value);
      },
    };
  }

  async fetch(req: Request): Promise<Response> {
    const url = new URL(req.url);
    if (url.pathname === SIGNAL_PATH && req.headers.get("upgrade")?.toLowerCase() === "websocket") {
      const ip = req.headers.get("cf-connecting-ip") ?? "unknown";
      const adm = this.hub.admission(ip);
      if (!adm.ok) {
        this.hub.countRefusal(adm.status);
        return Response.json({ error: adm.reason }, { status: adm.status });
      }
      const pair = new WebSocketPair();
      const server = pair[1];
      this.ctx.acceptWebSocket(server);
      this.sessions.set(server, this.hub.open(this.port(server, ip)));
      return new Response(null, { status: 101, webSocket: pair[0] } as ResponseInit);
    }
    if (url.pathname === SIGNAL_PATH) return Response.json({ error: `${SIGNAL_PATH} is a WebSocket endpoint` }, { status: 426 });
    return this.app.fetch(req);
  }

  alarm(): void {
    this.clock.fire();
  }

  webSocketMessage(ws: CfWebSocket, message: ArrayBuffer | string): void {
    const s = this.sessions.get(ws);
    if (s === undefined) {
      ws.close(1013, "unknown session; reconnect");
      return;
    }
    s.receive(message);
  }

  webSocketClose(ws: CfWebSocket, code: number, reason: string): void {
    this.sessions.get(ws)?.closed();
    this.sessions.delete(ws);
    try {
      ws.close(code === 1005 || code === 1006 ? 1000 : code, reason);
    } catch {
      /* already closed */
    }
  }

  webSocketError(ws: CfWebSocket): void {
    this.sessions.get(ws)?.closed();
    this.sessions.delete(ws);
  }
}

export default {
  async fetch(req: Request, env: WorkerEnv): Promise<Response> {
    const stub = env.SIGNAL_ROOM.get(env.SIGNAL_ROOM.idFromName(env.WEFTNET_CLUSTER ?? "default"));
    return stub.fetch(req);
  },
};
