/**
 * The Node signaling server under attack, on loopback: slowloris and silent TCP connections, a
 * connection flood from one address, a hello-less WebSocket flood, and a relay receiver that stops
 * reading while a sender floods it. Each attack must be cut off and counted, the server's queues must
 * stay bounded, and an honest agent must still register afterwards.
 */
import { connect, type Socket } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { WebSocket } from "ws";
import { startSignalServer, type SignalServer, type SignalServerOptions } from "../../signaling/server.js";
import { CTX_HELLO, generateIdentity, joinKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";

const TOKEN = "limits-test-token-0123456789abcdef";
const servers: SignalServer[] = [];
const sockets: (Socket | WebSocket)[] = [];

afterEach(async () => {
  for (const s of sockets.splice(0)) s instanceof WebSocket ? s.terminate() : s.destroy();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function start(opts: Partial<SignalServerOptions> = {}): Promise<SignalServer> {
  const s = await startSignalServer({ listen: { host: "127.0.0.1", port: 0 }, token: TOKEN, ...opts });
  servers.push(s);
  return s;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** When each raw socket closed: recorded from its creation, so a close that comes before the test looks is not missed. */
const closedAt = new WeakMap<Socket, Promise<number>>();

function tcp(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = connect(port, "127.0.0.1", () => resolve(s));
    closedAt.set(s, new Promise<number>((r) => s.once("close", () => r(Date.now()))));
    s.on("error", reject);
    sockets.push(s);
  });
}

async function member(server: SignalServer, idn: Identity = generateIdentity()): Promise<{ ws: WebSocket; msgs: ServerMsg[]; idn: Identity }> {
  const ws = new WebSocket(server.signalUrl);
  sockets.push(ws);
  const msgs: ServerMsg[] = [];
  const welcome = new Promise<void>((resolve, reject) => {
    ws.on("message", (d) => {
      const m = decodeServerMsg(d as Buffer);
      msgs.push(m);
      if (m.t === "challenge") {
        const key = joinKeyOf(TOKEN);
        ws.send(encodeSignal({ t: "hello", id: idn.id, pub: idn.publicKey, name: "n", instance: "i", meta: {}, mac: tokenMac(key, CTX_HELLO, m.nonce, idn.id, "i"), sig: signFields(idn, CTX_HELLO, m.nonce, idn.id, "i") }));
      }
      if (m.t === "welcome") resolve();
    });
    ws.once("close", (code) => reject(new Error(`closed ${code}`)));
    ws.once("error", reject);
  });
  await welcome;
  return { ws, msgs, idn };
}

describe("signaling server limits", () => {
  it("drops slowloris and silent TCP connections after the header timeout, and still serves", async () => {
    const server = await start({ headersTimeoutMs: 400 });
    const loris: Socket[] = [];
    for (let i = 0; i < 20; i++) loris.push(await tcp(server.port));
    const closed = loris.map((s) => closedAt.get(s)!);
    // half of them dribble a request header byte by byte, the other half say nothing at all
    const dribble = setInterval(() => {
      for (const s of loris.slice(0, 10)) if (!s.destroyed) s.write("X");
    }, 50);
    loris.slice(0, 10).forEach((s) => s.write("GET /v1/signal HTTP/1.1\r\nHost: x\r\nX-Slow: "));
    try {
      // the deadline is 400 ms; 15 s is the bound of a heavily loaded 2-core box, not a performance target
      const open = async () => {
        const st = (await (await fetch(`http://127.0.0.1:${server.port}/v1/stats`, { headers: { Authorization: `Bearer ${TOKEN}` } })).json()) as { idleDropped: number };
        return `open after 15 s: sockets ${loris.flatMap((s, i) => (s.destroyed ? [] : [i])).join(" ")}; server idleDropped ${st.idleDropped}`;
      };
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => void open().then((m) => reject(new Error(m)), reject), 15_000);
      });
      await Promise.race([Promise.all(closed), late]).finally(() => clearTimeout(timer));
    } finally {
      clearInterval(dribble);
    }
    const st = (await (await fetch(`http://127.0.0.1:${server.port}/v1/stats`, { headers: { Authorization: `Bearer ${TOKEN}` } })).json()) as { idleDropped: number };
    expect(st.idleDropped).toBeGreaterThanOrEqual(10);
    await member(server); // an honest agent registers
  });

  it("refuses a connection flood from one address beyond the per-IP cap (429) and the total cap (503)", async () => {
    const server = await start({ limits: { maxSessionsPerIp: 5, maxSessions: 8 }, helloTimeoutMs: 60_000 });
    const statuses: (number | "open")[] = [];
    for (let i = 0; i < 9; i++) {
      const ws = new WebSocket(server.signalUrl);
      sockets.push(ws);
      statuses.push(
        await new Promise<number | "open">((resolve) => {
          ws.once("open", () => resolve("open"));
          ws.once("unexpected-response", (_req, res) => resolve(res.statusCode ?? 0));
          ws.once("error", () => resolve(0));
        }),
      );
    }
    expect(statuses.filter((s) => s === "open")).toHaveLength(5);
    expect(statuses.filter((s) => s === 429)).toHaveLength(4);
    expect(server.hub.stats()).toMatchObject({ sessions: 5, refusedPerIp: 4 });
    // raw TCP connections from that address are capped too (per-IP cap + 16 for plain HTTP)
    const extra: Socket[] = [];
    for (let i = 0; i < 40; i++) extra.push(await tcp(server.port));
    await sleep(200);
    expect(extra.filter((s) => s.destroyed || s.readableEnded).length).toBeGreaterThanOrEqual(40 - 16);
  });

  it("closes hello-less WebSocket floods at the hello timeout", async () => {
    const server = await start({ helloTimeoutMs: 300 });
    const codes = await Promise.all(
      Array.from({ length: 30 }, () => {
        const ws = new WebSocket(server.signalUrl);
        sockets.push(ws);
        return new Promise<number>((resolve) => ws.once("close", (code) => resolve(code)));
      }),
    );
    expect(new Set(codes)).toEqual(new Set([4008]));
    expect(server.hub.stats()).toMatchObject({ sessions: 0, helloTimeouts: 30 });
  });

  it("a relay receiver that stops reading gets at most a few MiB queued; the rest is dropped and counted", async () => {
    const server = await start({ relay: { rateBytesPerSec: 1e9 }, limits: { relayRatePerIp: 1e9, relayRateGlobal: 1e9 } });
    const sender = await member(server);
    const receiver = await member(server);
    // the receiver stops reading its socket: the kernel buffers fill, then the server's queue
    (receiver.ws as unknown as { _socket: Socket })._socket.pause();
    const frame = encodeSignal({ t: "relay", to: receiver.idn.id, data: new Uint8Array(60_000) });
    const total = 40 * 1024 * 1024;
    for (let sent = 0; sent < total; sent += 60_000) {
      sender.ws.send(frame);
      if (sender.ws.bufferedAmount > 1_000_000) await sleep(5);
    }
    // wait until the server has processed everything the sender wrote
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      const st = server.hub.stats();
      if (st.relayFrames + st.relayDropped >= Math.floor(total / 60_000)) break;
      await sleep(50);
    }
    const st = server.hub.stats();
    expect(st.relayFrames + st.relayDropped).toBeGreaterThanOrEqual(Math.floor(total / 60_000));
    expect(st.relayDroppedByReason.congested ?? 0).toBeGreaterThan(0);
    // forwarded = 4 MiB server queue + what the kernel's socket buffers took, far below the 40 MiB sent
    expect(st.relayBytes).toBeLessThan(20 * 1024 * 1024);
    expect(sender.msgs.some((m) => m.t === "error" && m.code === "ERR_RELAY_CONGESTED")).toBe(true);
    // the sender's signaling still works and the server still admits agents
    await member(server);
  }, 60_000);
});
