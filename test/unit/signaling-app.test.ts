import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { createSignalApp, tokenMatches } from "../../signaling/app.js";
import type { SignalSession, SignalSocket } from "../../signaling/hub.js";
import { joinKeyOf, CTX_HELLO, generateIdentity, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { decodeEnvelope, encodeMessage } from "../../src/wire/codec.js";
import { CLOSE_CODES, MAX_SIGNAL_BYTES, decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";

const TOKEN = "s3cret-token-for-tests";
const JOIN_KEY = joinKeyOf(TOKEN);

/** The hub checks hellos with WebCrypto (async): wait until the session left "verifying". */
async function settled(...sessions: SignalSession[]): Promise<void> {
  for (let i = 0; i < 200 && sessions.some((s) => s.state === "verifying"); i++) await new Promise((r) => setTimeout(r, 5));
}

/** An in-memory connection that records what the hub sends (the hub's socket port). */
class MemorySocket implements SignalSocket {
  readonly sent: ServerMsg[] = [];
  readonly raw: Uint8Array[] = [];
  closedWith: { code: number; reason: string } | undefined;
  constructor(
    readonly remoteAddress = "192.0.2.10",
    readonly remotePort = 40000,
  ) {}
  send(bytes: Uint8Array): void {
    this.raw.push(bytes);
    this.sent.push(decodeServerMsg(bytes));
  }
  close(code: number, reason: string): void {
    this.closedWith = { code, reason };
  }
  last<T extends ServerMsg["t"]>(t: T): Extract<ServerMsg, { t: T }> | undefined {
    return this.sent.filter((m) => m.t === t).at(-1) as Extract<ServerMsg, { t: T }> | undefined;
  }
}

function hello(idn: Identity, nonce: Uint8Array, opts: { token?: string; instance?: string; name?: string } = {}): Uint8Array {
  const instance = opts.instance ?? "inst-1";
  return encodeSignal({
    t: "hello",
    id: idn.id,
    pub: idn.publicKey,
    name: opts.name ?? "node",
    instance,
    meta: { v: "test" },
    mac: tokenMac(joinKeyOf(opts.token ?? TOKEN), CTX_HELLO, nonce, idn.id, instance),
    sig: signFields(idn, CTX_HELLO, nonce, idn.id, instance),
  });
}

function setup(now = 1_700_000_000_000) {
  const { app, hub } = createSignalApp({ joinKey: JOIN_KEY, now: () => now, helloTimeoutMs: 60_000 });
  const join = async (idn: Identity, opts: { token?: string; instance?: string; name?: string } = {}) => {
    const sock = new MemorySocket();
    const session = hub.open(sock);
    const ch = sock.last("challenge")!;
    session.receive(hello(idn, ch.nonce, opts));
    await settled(session);
    return { sock, session };
  };
  return { app, hub, join };
}

describe("signaling app (HTTP)", () => {
  it("GET /healthz needs no token", async () => {
    const { app, hub, join } = setup();
    let res = await app.request("/healthz");
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ ok: true, agents: 0 });
    await join(generateIdentity());
    res = await app.request("/healthz");
    expect(await res.json()).toEqual({ ok: true, agents: 1 });
    hub.closeAll();
  });

  it("GET /v1/nodes answers 401 JSON without or with a wrong token", async () => {
    const { app } = setup();
    const variants: Record<string, string>[] = [{}, { Authorization: "Bearer nope" }, { Authorization: `Basic ${TOKEN}` }, { Authorization: `Bearer ${TOKEN}x` }];
    for (const headers of variants) {
      const res = await app.request("/v1/nodes", { headers });
      expect(res.status).toBe(401);
      const body = (await res.json()) as { error: string };
      expect(typeof body.error).toBe("string");
    }
  });

  it("GET /v1/nodes lists registered agents with the right token", async () => {
    const { app, hub, join } = setup();
    const a = generateIdentity();
    const b = generateIdentity();
    await join(a, { name: "alpha" });
    await join(b, { name: "beta" });
    await join(generateIdentity(), { token: "wrong" }); // refused, must not show up
    const res = await app.request("/v1/nodes", { headers: { Authorization: `Bearer ${TOKEN}` } });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { nodes: { id: string; name: string; meta: unknown; addr: string; connectedAt: string }[] };
    expect(body.nodes.map((n) => n.id).sort()).toEqual([a.id, b.id].sort());
    const alpha = body.nodes.find((n) => n.id === a.id)!;
    expect(alpha).toEqual({ id: a.id, name: "alpha", meta: { v: "test" }, addr: "192.0.2.10:40000", connectedAt: new Date(1_700_000_000_000).toISOString() });
    hub.closeAll();
  });

  it("unknown routes are JSON 404s", async () => {
    const { app } = setup();
    const res = await app.request("/nope");
    expect(res.status).toBe(404);
    expect(await res.json()).toHaveProperty("error");
  });

  it("tokenMatches compares exactly", () => {
    expect(tokenMatches("abc", "abc")).toBe(true);
    expect(tokenMatches("abc", "abd")).toBe(false);
    expect(tokenMatches("abc", "abcd")).toBe(false);
    expect(tokenMatches("", "abc")).toBe(false);
  });
});

describe("signaling hub (in-memory port)", () => {
  it("registers, announces, relays verbatim and forgets on close", async () => {
    const { hub, join } = setup();
    const a = generateIdentity();
    const b = generateIdentity();
    const A = await join(a);
    expect(A.sock.last("welcome")).toMatchObject({ you: { id: a.id, addr: "192.0.2.10:40000" }, peers: [], stunPort: 0 });
    const B = await join(b);
    expect(B.sock.last("welcome")!.peers.map((p) => p.id)).toEqual([a.id]);
    expect(A.sock.last("join")!.peer.id).toBe(b.id);

    // unknown fields inside data pass through untouched (newer agents may add them)
    const data = { kind: "bye", conn: "c1", extra: "future-field" };
    A.session.receive(encodeSignal({ t: "signal", to: b.id, data: data as never }));
    expect(B.sock.last("signal")).toMatchObject({ from: a.id, data: { kind: "bye", conn: "c1" } });
    expect(decodeEnvelope(B.sock.raw.at(-1)!, MAX_SIGNAL_BYTES)).toEqual({ v: 1, t: "signal", from: a.id, data });

    A.session.closed();
    expect(B.sock.last("leave")).toEqual({ t: "leave", id: a.id });
    expect(hub.size).toBe(1);
    hub.closeAll();
    expect(B.sock.closedWith?.code).toBe(CLOSE_CODES.SHUTDOWN);
  });

  it("closes with PROTOCOL after MAX_BAD_FRAMES and counts them", async () => {
    const { hub, join } = setup();
    const A = await join(generateIdentity());
    for (let i = 0; i < 25; i++) A.session.receive(Uint8Array.of(0xc1));
    expect(A.sock.closedWith?.code).toBe(CLOSE_CODES.PROTOCOL);
    expect(A.sock.sent.filter((m) => m.t === "error")).toHaveLength(20);
    expect(hub.stats().badFrames).toBe(20);
    expect(hub.stats().badFramesByCode).toEqual({ ERR_MALFORMED: 20 });
    expect(hub.size).toBe(0);
  });

  it("a dead holder of an id is replaced by a new instance when the probe fails", async () => {
    const { hub } = setup();
    const a = generateIdentity();
    const deadSock = Object.assign(new MemorySocket(), { probe: async () => false });
    const s1 = hub.open(deadSock);
    s1.receive(hello(a, deadSock.last("challenge")!.nonce, { instance: "old" }));
    await settled(s1);
    const other = new MemorySocket();
    const s2 = hub.open(other);
    s2.receive(hello(generateIdentity(), other.last("challenge")!.nonce));
    const fresh = new MemorySocket();
    await settled(s2);
    const s3 = hub.open(fresh);
    s3.receive(hello(a, fresh.last("challenge")!.nonce, { instance: "new" }));
    await settled(s3);
    await new Promise((r) => setTimeout(r, 0));
    expect(deadSock.closedWith?.code).toBe(CLOSE_CODES.REPLACED);
    expect(fresh.last("welcome")?.you.id).toBe(a.id);
    expect(other.sent.map((m) => m.t)).toEqual(["challenge", "welcome", "leave", "join"]);
    hub.closeAll();
  });

  it("fuzz: no input makes a session fail internally (only error frames or protocol closes)", async () => {
    const { hub, join } = setup();
    const a = generateIdentity();
    const b = generateIdentity();
    await join(b);
    const value = fc.oneof(fc.anything(), fc.uint8Array({ maxLength: 40 }), fc.constantFrom(a.id, b.id, "x"));
    const wireMap = fc
      .record({ v: fc.oneof(fc.constant(1), fc.integer()), t: fc.constantFrom("hello", "signal", "join", "") }, { requiredKeys: ["t"] })
      .chain((base) =>
        fc.record({ to: value, data: fc.oneof(value, fc.dictionary(fc.constantFrom("kind", "conn", "sdp", "candidate"), value)), id: value, pub: value, mac: value, sig: value, name: value, instance: value, meta: value }, { requiredKeys: [] }).map((rest) => ({ ...rest, ...base })),
      );
    const frame = fc.oneof(
      fc.uint8Array({ maxLength: 300 }),
      wireMap.map((m) => {
        try {
          return encodeMessage(m as never);
        } catch {
          return new Uint8Array(0);
        }
      }),
      fc.string(),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(frame, { maxLength: 30 }), fc.boolean(), async (frames, registered) => {
        const { sock, session } = registered ? await join(a) : (() => {
          const sock = new MemorySocket();
          return { sock, session: hub.open(sock) };
        })();
        for (const f of frames) session.receive(f);
        await settled(session);
        expect(sock.closedWith?.code ?? 0).not.toBe(1011);
        session.closed();
      }),
      { numRuns: 300 },
    );
    expect(hub.size).toBe(1);
    hub.closeAll();
  });
});
