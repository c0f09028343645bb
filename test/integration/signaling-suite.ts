/**
 * The signaling server over real sockets on 127.0.0.1: ws clients speaking the protocol with the
 * src/wire/signal.ts codec and src/identity.ts proofs, plain HTTP, and UDP STUN.
 *
 * One suite for every runtime the server ships for (test/helpers/signal-runtimes.ts): Node
 * (signaling-server.test.ts) and workerd, Deno, Bun (signaling-runtimes.test.ts). A test of a feature
 * an adapter does not have (STUN, sub-second keepalive, ping probe, payload cap) is skipped for it and
 * says why in its name.
 */
import { randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { WebSocket } from "ws";
import { stopAllTargets, type Runtime, type SignalTarget, type TargetOptions } from "../helpers/signal-runtimes.js";
import { CTX_HELLO, CTX_SDP, generateIdentity, joinKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { encodeMessage } from "../../src/wire/codec.js";
import { CLOSE_CODES, MAX_BAD_FRAMES, MAX_SIGNAL_BYTES, MAX_RELAY_BYTES, SIGNAL_PATH, decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";
import { encodeBindingRequest, parseBindingSuccess } from "../../src/wire/stun.js";

const TOKEN = "integration-token-0123456789";

type SignalServer = SignalTarget;
const servers: SignalServer[] = [];
const clients: Client[] = [];
const cleanups: (() => void)[] = [];

type Msg<T extends ServerMsg["t"]> = Extract<ServerMsg, { t: T }>;

class Client {
  readonly msgs: ServerMsg[] = [];
  private waiters: { t: string; resolve: (m: ServerMsg) => void }[] = [];
  private seen = 0;
  readonly closed: Promise<{ code: number; reason: string }>;
  readonly opened: Promise<void>;

  constructor(
    readonly ws: WebSocket,
  ) {
    clients.push(this);
    this.opened = new Promise((resolve, reject) => {
      ws.once("open", () => resolve());
      ws.once("error", reject);
    });
    this.closed = new Promise((resolve) => ws.once("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    ws.on("message", (data) => {
      const m = decodeServerMsg(data as Buffer);
      this.msgs.push(m);
      const i = this.waiters.findIndex((w) => w.t === m.t);
      if (i >= 0) {
        const [w] = this.waiters.splice(i, 1);
        this.seen = this.msgs.length;
        w!.resolve(m);
      }
    });
  }

  static async connect(server: SignalServer, wsOpts: { autoPong?: boolean } = {}): Promise<Client> {
    const c = new Client(new WebSocket(server.signalUrl, wsOpts));
    await c.opened;
    return c;
  }

  /** The next message of type t not yet consumed by an earlier next(). */
  next<T extends ServerMsg["t"]>(t: T, timeoutMs = 5_000): Promise<Msg<T>> {
    const hit = this.msgs.slice(this.seen).find((m) => m.t === t);
    if (hit) {
      this.seen = this.msgs.indexOf(hit, this.seen) + 1;
      return Promise.resolve(hit as Msg<T>);
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${t}; got ${this.msgs.map((m) => m.t).join(",")}`)), timeoutMs);
      this.waiters.push({ t, resolve: (m) => (clearTimeout(timer), resolve(m as Msg<T>)) });
    });
  }

  types(): string[] {
    return this.msgs.map((m) => m.t);
  }

  send(bytes: Uint8Array | string): void {
    this.ws.send(bytes, { binary: typeof bytes !== "string" });
  }
}

interface HelloOpts {
  token?: string;
  instance?: string;
  name?: string;
  id?: string;
  pub?: Uint8Array;
}

function helloFrame(idn: Identity, nonce: Uint8Array, o: HelloOpts = {}): Uint8Array {
  const id = o.id ?? idn.id;
  const instance = o.instance ?? "instance-1";
  return encodeSignal({
    t: "hello",
    id,
    pub: o.pub ?? idn.publicKey,
    name: o.name ?? `node-${idn.id.slice(0, 4)}`,
    instance,
    meta: { version: "test" },
    mac: tokenMac(joinKeyOf(o.token ?? TOKEN), CTX_HELLO, nonce, id, instance),
    sig: signFields(idn, CTX_HELLO, nonce, id, instance),
  });
}

/** Connect and send hello (does not wait for the answer). */
async function hello(server: SignalServer, idn: Identity, o: HelloOpts & { autoPong?: boolean } = {}): Promise<Client> {
  const c = await Client.connect(server, o.autoPong === undefined ? {} : { autoPong: o.autoPong });
  const ch = await c.next("challenge");
  expect(ch.nonce.byteLength).toBe(32);
  c.send(helloFrame(idn, ch.nonce, o));
  return c;
}

async function register(server: SignalServer, idn: Identity, o: HelloOpts & { autoPong?: boolean } = {}): Promise<{ c: Client; welcome: Msg<"welcome"> }> {
  const c = await hello(server, idn, o);
  const welcome = await c.next("welcome");
  return { c, welcome };
}

async function nodes(server: SignalServer): Promise<{ id: string; name: string; addr: string }[]> {
  const res = await fetch(server.url.replace(/^ws/, "http") + "/v1/nodes", { headers: { Authorization: `Bearer ${joinKeyOf(TOKEN)}` } });
  expect(res.status).toBe(200);
  return ((await res.json()) as { nodes: { id: string; name: string; addr: string }[] }).nodes;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function defineSignalingSuite(rt: Runtime): void {
  const runtime = rt;
  async function start(opts: Partial<TargetOptions> = {}): Promise<SignalServer> {
    const s = await runtime.start({ token: TOKEN, ...opts });
    servers.push(s);
    return s;
  }
  /** `it`, skipped with the reason in its name when the runtime's adapter lacks `cap`. */
  function itIf(cap: keyof Runtime["caps"] | "node", why: string) {
    const has = cap === "node" ? runtime.name === "node" : runtime.caps[cap];
    return (name: string, fn: () => Promise<void>, timeout?: number) => (has ? it(name, fn, timeout) : it.skip(`${name} [skipped on ${runtime.name}: ${why}]`, fn));
  }
  afterAll(() => stopAllTargets());
  afterEach(async () => {
    for (const c of clients.splice(0)) c.ws.terminate();
    for (const f of cleanups.splice(0)) f();
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });

describe(`signaling server (${rt.name})`, () => {
  it("registers two agents, announces presence and relays signals both ways", async () => {
    const server = await start();
    expect(server.port).toBeGreaterThan(0);
    const a = generateIdentity();
    const b = generateIdentity();
    const A = await register(server, a, { name: "alpha" });
    expect(A.welcome.you.id).toBe(a.id);
    // a Worker learns the client address from CF-Connecting-IP, which local workerd does not set
    expect(A.welcome.you.addr).toMatch(rt.name === "workerd" ? /^unknown$/ : /^127\.0\.0\.1:\d+$/);
    expect(A.welcome.peers).toEqual([]);
    expect(A.welcome.stunPort).toBe(0);

    const B = await register(server, b, { name: "beta" });
    expect(B.welcome.peers).toEqual([{ id: a.id, name: "alpha", pub: Buffer.from(a.publicKey), meta: { version: "test" } }]);
    const joined = await A.c.next("join");
    expect(joined.peer).toEqual({ id: b.id, name: "beta", pub: Buffer.from(b.publicKey), meta: { version: "test" } });

    const http = await fetch(server.url.replace(/^ws/, "http") + "/healthz");
    expect(await http.json()).toEqual({ ok: true, agents: 2 });
    expect((await nodes(server)).map((n) => n.name).sort()).toEqual(["alpha", "beta"]);

    const sdpFields = [a.id, b.id, "conn-1", "sha-256 AA:BB"] as const;
    const offer = { kind: "offer" as const, conn: "conn-1", sdp: "v=0\r\n", sig: signFields(a, CTX_SDP, ...sdpFields), mac: tokenMac(TOKEN, CTX_SDP, ...sdpFields) };
    A.c.send(encodeSignal({ t: "signal", to: b.id, data: offer }));
    const got = await B.c.next("signal");
    expect(got).toEqual({ t: "signal", from: a.id, data: { ...offer, sig: Buffer.from(offer.sig), mac: Buffer.from(offer.mac) } });

    const cand = { kind: "candidate" as const, conn: "conn-1", candidate: { candidate: "candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host", sdpMid: "0", sdpMLineIndex: 0 } };
    B.c.send(encodeSignal({ t: "signal", to: a.id, data: cand }));
    expect(await A.c.next("signal")).toEqual({ t: "signal", from: b.id, data: cand });

    B.c.ws.close();
    expect(await A.c.next("leave")).toEqual({ t: "leave", id: b.id });
    expect((await nodes(server)).map((n) => n.id)).toEqual([a.id]);
  });

  it("answers ERR_NO_PEER for an unknown destination and keeps the session", async () => {
    const server = await start();
    const A = await register(server, generateIdentity());
    const ghost = generateIdentity().id;
    A.c.send(encodeSignal({ t: "signal", to: ghost, data: { kind: "bye", conn: "x" } }));
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_NO_PEER", ref: ghost });
    expect(A.c.ws.readyState).toBe(WebSocket.OPEN);
  });

  it("refuses a wrong token with 4001 and registers nothing", async () => {
    const server = await start();
    const c = await hello(server, generateIdentity(), { token: "not-the-token" });
    const closed = await c.closed;
    expect(closed.code).toBe(CLOSE_CODES.BAD_TOKEN);
    expect(closed.reason).toMatch(/^bad token: /);
    expect(c.types()).toEqual(["challenge"]);
    expect(await nodes(server)).toEqual([]);
    expect((await server.stats()).badToken).toBe(1);
  });

  it("refuses an id that is not derived from the public key with 4002", async () => {
    const server = await start();
    const a = generateIdentity();
    const b = generateIdentity();
    // a's key, b's id: token proof and signature are valid, the id/key pairing is not
    const c = await hello(server, a, { id: b.id });
    const closed = await c.closed;
    expect(closed.code).toBe(CLOSE_CODES.BAD_IDENTITY);
    expect(closed.reason).toMatch(/not derived/);
    expect(await nodes(server)).toEqual([]);
  });

  it("refuses a bad hello signature with 4002", async () => {
    const server = await start();
    const a = generateIdentity();
    const c = await Client.connect(server);
    const ch = await c.next("challenge");
    const other = new Uint8Array(32); // a signature over another nonce
    const frame = encodeSignal({
      t: "hello",
      id: a.id,
      pub: a.publicKey,
      name: "x",
      instance: "i",
      meta: {},
      mac: tokenMac(joinKeyOf(TOKEN), CTX_HELLO, ch.nonce, a.id, "i"),
      sig: signFields(a, CTX_HELLO, other, a.id, "i"),
    });
    c.send(frame);
    expect((await c.closed).code).toBe(CLOSE_CODES.BAD_IDENTITY);
  });

  it("refuses a second live agent with the same identity (different instance) with 4009; the first stays", async () => {
    const server = await start({ probeTimeoutMs: 1_000 });
    const a = generateIdentity();
    const peer = await register(server, generateIdentity());
    const first = await register(server, a, { instance: "host-1", name: "first" });
    await peer.c.next("join");
    const dup = await hello(server, a, { instance: "host-2", name: "copy" });
    const closed = await dup.closed;
    expect(closed.code).toBe(CLOSE_CODES.DUPLICATE_ID);
    expect(closed.reason).toMatch(/two agents share one identity key/);
    expect(closed.reason).toMatch(/copied state dir\?/);
    expect(dup.types()).toEqual(["challenge"]);

    expect(first.c.ws.readyState).toBe(WebSocket.OPEN);
    expect((await nodes(server)).find((n) => n.id === a.id)?.name).toBe("first");
    // still routable
    peer.c.send(encodeSignal({ t: "signal", to: a.id, data: { kind: "bye", conn: "c" } }));
    expect(await first.c.next("signal")).toMatchObject({ from: peer.welcome.you.id });
    await sleep(50);
    expect(peer.c.types()).not.toContain("leave");
  });

  it("replaces the session when the same instance reconnects, without leave/join for the others", async () => {
    const server = await start();
    const a = generateIdentity();
    const peer = await register(server, generateIdentity());
    const old = await register(server, a, { instance: "same" });
    await peer.c.next("join");
    const fresh = await register(server, a, { instance: "same" });
    expect(fresh.welcome.peers.map((p) => p.id)).toEqual([peer.welcome.you.id]);
    const closed = await old.c.closed;
    expect(closed.code).toBe(CLOSE_CODES.REPLACED);
    await sleep(50);
    expect(peer.c.types()).toEqual(["challenge", "welcome", "join"]);
    expect((await nodes(server)).length).toBe(2);
    peer.c.send(encodeSignal({ t: "signal", to: a.id, data: { kind: "bye", conn: "c" } }));
    expect(await fresh.c.next("signal")).toMatchObject({ from: peer.welcome.you.id });
  });

  itIf("probe", "no server-side ping to probe the holder; a duplicate id is refused while its socket is open")("replaces a dead holder of the id (no pong) when a new instance arrives", async () => {
    const server = await start({ probeTimeoutMs: 200 });
    const a = generateIdentity();
    const peer = await register(server, generateIdentity());
    const stale = await register(server, a, { instance: "before-reboot", autoPong: false });
    await peer.c.next("join");
    const fresh = await register(server, a, { instance: "after-reboot" });
    expect(fresh.welcome.you.id).toBe(a.id);
    expect((await stale.c.closed).code).toBe(CLOSE_CODES.REPLACED);
    expect(await peer.c.next("leave")).toEqual({ t: "leave", id: a.id });
    expect((await peer.c.next("join")).peer.id).toBe(a.id);
    expect((await nodes(server)).length).toBe(2);
  });

  it("answers malformed, oversize, unknown-type and text frames with errors and keeps serving others", async () => {
    const server = await start();
    const a = generateIdentity();
    const b = generateIdentity();
    const A = await register(server, a);
    const B = await register(server, b);

    A.c.send(Uint8Array.of(0xc1, 0xff, 0x00)); // not msgpack
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_MALFORMED" });
    A.c.send(new Uint8Array(MAX_RELAY_BYTES + 100));
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_TOO_LARGE" });
    A.c.send(encodeMessage({ v: 1, t: "teleport", to: b.id }));
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_UNKNOWN_TYPE" });
    A.c.send(encodeMessage({ v: 1, t: "signal", to: "not-an-id", data: {} }));
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_INVALID" });
    A.c.send(encodeMessage({ v: 99, t: "signal" }));
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_VERSION" });
    A.c.send("hello as text");
    expect(await A.c.next("error")).toMatchObject({ code: "ERR_MALFORMED", msg: expect.stringMatching(/text frames/) });

    const st = (await server.stats());
    expect(st.badFrames).toBe(6);
    expect(st.badFramesByCode).toEqual({ ERR_MALFORMED: 2, ERR_TOO_LARGE: 1, ERR_UNKNOWN_TYPE: 1, ERR_INVALID: 1, ERR_VERSION: 1 });

    // both sessions still work
    A.c.send(encodeSignal({ t: "signal", to: b.id, data: { kind: "bye", conn: "c" } }));
    expect(await B.c.next("signal")).toMatchObject({ from: a.id });
    B.c.send(encodeSignal({ t: "signal", to: a.id, data: { kind: "bye", conn: "c" } }));
    expect(await A.c.next("signal")).toMatchObject({ from: b.id });
    expect(await nodes(server)).toHaveLength(2);
  });

  it("disconnects a client after MAX_BAD_FRAMES bad frames with PROTOCOL; others are told it left", async () => {
    const server = await start();
    const peer = await register(server, generateIdentity());
    const noisy = await register(server, generateIdentity());
    await peer.c.next("join");
    for (let i = 0; i < MAX_BAD_FRAMES + 5; i++) noisy.c.send(randomBytes(16));
    const closed = await noisy.c.closed;
    expect(closed.code).toBe(CLOSE_CODES.PROTOCOL);
    expect(noisy.c.types().filter((t) => t === "error")).toHaveLength(MAX_BAD_FRAMES);
    expect(await peer.c.next("leave")).toEqual({ t: "leave", id: noisy.welcome.you.id });
  });

  it("closes with PROTOCOL when the first valid message is not hello", async () => {
    const server = await start();
    const c = await Client.connect(server);
    await c.next("challenge");
    c.send(encodeSignal({ t: "signal", to: generateIdentity().id, data: { kind: "bye", conn: "c" } }));
    const closed = await c.closed;
    expect(closed.code).toBe(CLOSE_CODES.PROTOCOL);
    expect(closed.reason).toMatch(/expected hello/);
  });

  it("closes with HELLO_TIMEOUT when no hello arrives in time", async () => {
    const server = await start({ helloTimeoutMs: 150 });
    const c = await Client.connect(server);
    await c.next("challenge");
    const t0 = Date.now();
    const closed = await c.closed;
    expect(closed.code).toBe(CLOSE_CODES.HELLO_TIMEOUT);
    // workerd: the object closes the socket on time (counted below), but a close made outside an
    // incoming event reaches the client only when the object next goes idle (~10 s)
    expect(Date.now() - t0).toBeLessThan(rt.name === "workerd" ? 15_000 : 3_000);
    // (a Durable Object that went idle meanwhile was evicted, and its counters with it)
    const st = await server.stats();
    if (st.generation === undefined || st.generation === 1) expect(st.helloTimeouts).toBe(1);
  });

  itIf("fastPing", "keepalive is the runtime's own, in seconds")("terminates connections that stop answering pings", async () => {
    const server = await start({ pingIntervalMs: 80 });
    const peer = await register(server, generateIdentity());
    const mute = await register(server, generateIdentity(), { autoPong: false });
    await peer.c.next("join");
    expect(await peer.c.next("leave", 3_000)).toEqual({ t: "leave", id: mute.welcome.you.id });
    await sleep(300);
    expect(peer.c.ws.readyState).toBe(WebSocket.OPEN); // the answering one stays
  });

  it("answers 404 for WebSocket upgrades on other paths, and JSON 401 on /v1/nodes without token", async () => {
    const server = await start();
    const ws = new WebSocket(server.url + "/elsewhere");
    const status = await new Promise<number | undefined>((resolve) => {
      ws.once("unexpected-response", (_req, res) => resolve(res.statusCode));
      ws.once("open", () => resolve(101));
      ws.once("error", () => resolve(undefined));
    });
    ws.terminate();
    expect(status).toBe(404);
    const res = await fetch(server.url.replace(/^ws/, "http") + "/v1/nodes");
    expect(res.status).toBe(401);
    expect(await res.json()).toHaveProperty("error");
  });

  itIf("node", "graceful shutdown and port reuse of the Node process")("closes every session with SHUTDOWN and frees the port on close()", async () => {
    const server = await runtime.start({ token: TOKEN, stunPort: "ephemeral" });
    const A = await register(server, generateIdentity());
    await server.close();
    expect((await A.c.closed).code).toBe(CLOSE_CODES.SHUTDOWN);
    // both ports can be bound again
    const again = await start({ listen: { host: "127.0.0.1", port: server.port } });
    expect(again.port).toBe(server.port);
    const stunPort = server.node!.stunPort;
    const udp = createSocket("udp4");
    cleanups.push(() => udp.close());
    await new Promise<void>((resolve, reject) => {
      udp.once("error", reject);
      udp.bind(stunPort, "127.0.0.1", () => resolve());
    });
  });

  itIf("stun", "no UDP: agents take STUN from --ice-server or an agent's --stun-port")("STUN: answers a real Binding request with the client's address and ignores garbage", async () => {
    const target = await start({ stunPort: "ephemeral" });
    const server = target.node!;
    expect(server.stunPort).toBeGreaterThan(0);
    const A = await register(target, generateIdentity());
    expect(A.welcome.stunPort).toBe(server.stunPort);

    const udp = createSocket("udp4");
    cleanups.push(() => udp.close());
    await new Promise<void>((resolve) => udp.bind(0, "127.0.0.1", () => resolve()));
    const replies: Buffer[] = [];
    udp.on("message", (m) => replies.push(m));

    udp.send(Buffer.from("definitely not stun, just some garbage bytes"), server.stunPort, "127.0.0.1");
    udp.send(randomBytes(3), server.stunPort, "127.0.0.1");
    const tid = new Uint8Array(randomBytes(12));
    udp.send(encodeBindingRequest(tid, { fingerprint: true }), server.stunPort, "127.0.0.1");

    const deadline = Date.now() + 3_000;
    while (replies.length === 0 && Date.now() < deadline) await sleep(10);
    await sleep(50);
    expect(replies).toHaveLength(1);
    const r = parseBindingSuccess(replies[0]!);
    expect(r.ok).toBe(true);
    if (!r.ok) return;
    expect(Buffer.from(r.value.transactionId).equals(Buffer.from(tid))).toBe(true);
    expect(r.value.mapped).toEqual({ family: "IPv4", address: "127.0.0.1", port: udp.address().port });
    expect(server.stunStats()).toMatchObject({ requests: 1, responses: 1, dropped: 2 });
  });

  itIf("stun", "no UDP")("STUN on a dual-stack socket: IPv6 clients get IPv6, IPv4 clients get IPv4 (not ::ffff:)", async () => {
    const server = (await start({ listen: { host: "::", port: 0 }, stunPort: "ephemeral" })).node!;
    for (const [type, host] of [["udp6", "::1"], ["udp4", "127.0.0.1"]] as const) {
      const udp = createSocket(type);
      cleanups.push(() => udp.close());
      await new Promise<void>((resolve) => udp.bind(0, host, () => resolve()));
      const reply = new Promise<Buffer>((resolve) => udp.once("message", (m) => resolve(m)));
      udp.send(encodeBindingRequest(new Uint8Array(randomBytes(12))), server.stunPort, host);
      const r = parseBindingSuccess(await reply);
      expect(r.ok && r.value.mapped).toEqual({ family: type === "udp6" ? "IPv6" : "IPv4", address: host, port: udp.address().port });
    }
  });

  itIf("payloadCap", "the runtime has no WebSocket payload cap option; such frames get ERR_TOO_LARGE")("a frame above the ws payload cap closes only that connection (1009); the others are told it left", async () => {
    const server = await start();
    const peer = await register(server, generateIdentity());
    const big = await register(server, generateIdentity());
    await peer.c.next("join");
    big.c.send(new Uint8Array(MAX_SIGNAL_BYTES * 4));
    expect((await big.c.closed).code).toBe(1009);
    expect(await peer.c.next("leave")).toEqual({ t: "leave", id: big.welcome.you.id });
    expect(peer.c.ws.readyState).toBe(WebSocket.OPEN);
  });
});

describe(`data relay of last resort (${rt.name})`, () => {
  it("forwards opaque bytes between agents, up to MAX_RELAY_BYTES, and counts them", async () => {
    const server = await start();
    try {
      const a = generateIdentity();
      const b = generateIdentity();
      const A = await register(server, a);
      const B = await register(server, b);
      const payload = new Uint8Array(70_000).map((_, i) => i & 0xff);
      A.c.send(encodeSignal({ t: "relay", to: b.id, data: payload }));
      const got = await B.c.next("relay");
      expect(got.from).toBe(a.id);
      expect(Buffer.from(got.data).equals(Buffer.from(payload))).toBe(true);
      A.c.send(encodeSignal({ t: "relay", to: "ffffffffffffffff", data: new Uint8Array(10) }));
      expect(await A.c.next("error")).toMatchObject({ code: "ERR_NO_PEER" });
      const st = (await server.stats());
      expect(st).toMatchObject({ relayFrames: 1, relayBytes: 70_000, relayDropped: 1 });
    } finally {
      await server.close();
    }
  });

  it("gives relay links' control-channel frames a budget of their own: delivered while data is over its rate, counted apart", async () => {
    const server = await start({ relay: { rateBytesPerSec: 100_000 } });
    try {
      const a = generateIdentity();
      const b = generateIdentity();
      const A = await register(server, a);
      const B = await register(server, b);
      // relay link framing (agent/transport/relay.ts): [1 version][1 conn length][conn][1 channel 0 control / 1 packets]...
      const frame = (channel: number, n: number) => {
        const f = new Uint8Array(n);
        f.set([1, 3, 0x61, 0x62, 0x63, channel]);
        return f;
      };
      // 350 kB of packets against a 100 kB/s budget (burst 100 kB): some are refused however slowly they are processed
      for (let i = 0; i < 5; i++) A.c.send(encodeSignal({ t: "relay", to: b.id, data: frame(1, 70_000) }));
      expect(await A.c.next("error")).toMatchObject({ code: "ERR_RELAY_RATE" });
      for (let i = 0; i < 5; i++) A.c.send(encodeSignal({ t: "relay", to: b.id, data: frame(0, 100 + i) }));
      const control = () => B.c.msgs.filter((m): m is Msg<"relay"> => m.t === "relay" && m.data[5] === 0);
      const deadline = Date.now() + 10_000;
      while (control().length < 5 && Date.now() < deadline) await sleep(20);
      expect(control().map((m) => m.data.byteLength)).toEqual([100, 101, 102, 103, 104]);
      const st = await server.stats();
      expect(st).toMatchObject({ relayControlFrames: 5, relayControlBytes: 510, relayControlDropped: 0 });
      expect(st.relayDropped).toBeGreaterThanOrEqual(1);
      expect(st.relayFrames).toBe(5 + B.c.msgs.filter((m) => m.t === "relay" && m.data[5] === 1).length);
    } finally {
      await server.close();
    }
  });

  it("refuses to relay with --no-relay, and rate-limits per agent", async () => {
    const off = await start({ relay: { enabled: false } });
    try {
      const a = generateIdentity();
      const b = generateIdentity();
      const A = await register(off, a);
      await register(off, b);
      A.c.send(encodeSignal({ t: "relay", to: b.id, data: new Uint8Array(100) }));
      expect(await A.c.next("error")).toMatchObject({ code: "ERR_RELAY_DISABLED" });
      expect((await off.stats()).relayFrames).toBe(0);
    } finally {
      await off.close();
    }
    const slow = await start({ relay: { rateBytesPerSec: 100_000 } });
    try {
      const a = generateIdentity();
      const b = generateIdentity();
      const A = await register(slow, a);
      const B = await register(slow, b);
      for (let i = 0; i < 5; i++) A.c.send(encodeSignal({ t: "relay", to: b.id, data: new Uint8Array(49_000) }));
      expect(await A.c.next("error")).toMatchObject({ code: "ERR_RELAY_RATE" });
      await B.c.next("relay");
      await B.c.next("relay");
      // the hub counts each frame as it processes it: a slow runtime may still be on the last drops when the
      // first error arrives (seen on Deno: 2 dropped of 3 at the first read), so wait until all five are counted
      let st = await slow.stats();
      for (const deadline = Date.now() + 10_000; st.relayFrames + st.relayDropped < 5 && Date.now() < deadline; st = await slow.stats()) await new Promise((r) => setTimeout(r, 50));
      expect(st.relayFrames).toBe(2); // 100 kB burst: two 49 kB frames fit; a third would need ~470 ms of refill (slow runtimes process the five over time)
      expect(st.relayDropped).toBe(3);
    } finally {
      await slow.close();
    }
  });
});
}
