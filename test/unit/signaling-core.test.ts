/**
 * The runtime-neutral signaling core (signaling/core/): no node: imports, its WebCrypto framing and
 * join key agree with src/identity.ts and the agent, presence batching, and the hub's limits
 * (session caps, slow consumers, relay congestion and budgets) through the in-memory socket port.
 */
import { readdirSync, readFileSync } from "node:fs";
import { join as pathJoin } from "node:path";
import { describe, expect, it } from "vitest";
import { deriveJoinKey, frameFields, webCryptoPort } from "../../signaling/core/crypto.js";
import { CONTROL_RELAY_QUEUE_HEADROOM, SignalHub, relayChannel, type SessionSnapshot, type SignalSession, type SignalSocket } from "../../signaling/core/hub.js";
import { ManualClock } from "../helpers/manual-clock.js";
import { joinKeyOf, CTX_HELLO, frame, generateIdentity, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { CLOSE_CODES, decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";

const TOKEN = "core-test-token-0123456789abcdef";
const KEY = joinKeyOf(TOKEN);

class MemSocket implements SignalSocket {
  readonly sent: ServerMsg[] = [];
  closedWith: { code: number; reason: string } | undefined;
  queued = 0;
  snapshot: SessionSnapshot | undefined;
  constructor(readonly remoteAddress = "192.0.2.1", readonly remotePort = 1000) {}
  send(b: Uint8Array): void {
    this.sent.push(decodeServerMsg(b));
  }
  close(code: number, reason: string): void {
    this.closedWith ??= { code, reason };
  }
  bufferedAmount(): number {
    return this.queued;
  }
  persist(s: SessionSnapshot): void {
    this.snapshot = s;
  }
  of<T extends ServerMsg["t"]>(t: T): Extract<ServerMsg, { t: T }>[] {
    return this.sent.filter((m) => m.t === t) as Extract<ServerMsg, { t: T }>[];
  }
}


async function settled(...s: SignalSession[]): Promise<void> {
  for (let i = 0; i < 400 && s.some((x) => x.state === "verifying"); i++) await new Promise((r) => setTimeout(r, 2));
}

function helloFor(idn: Identity, nonce: Uint8Array, instance = "i1", meta: Record<string, string> = {}): Uint8Array {
  return encodeSignal({ t: "hello", id: idn.id, pub: idn.publicKey, name: `n-${idn.id.slice(0, 4)}`, instance, meta, mac: tokenMac(KEY, CTX_HELLO, nonce, idn.id, instance), sig: signFields(idn, CTX_HELLO, nonce, idn.id, instance) });
}

async function join(hub: SignalHub, idn = generateIdentity(), ip = "192.0.2.1", meta: Record<string, string> = {}): Promise<{ sock: MemSocket; s: SignalSession; idn: Identity }> {
  const sock = new MemSocket(ip);
  const s = hub.open(sock);
  s.receive(helloFor(idn, sock.of("challenge")[0]!.nonce, "i1", meta));
  await settled(s);
  return { sock, s, idn };
}

describe("signaling core", () => {
  it("imports nothing from node: (runs on workerd, Deno, Bun)", () => {
    const dir = "signaling/core";
    for (const f of readdirSync(dir)) {
      const src = readFileSync(pathJoin(dir, f), "utf8");
      expect(src.match(/from\s+["']node:|require\(["']node:|from\s+["'](fs|net|dgram|crypto|os|http)["']/g), f).toBeNull();
    }
  });

  it("frames fields like src/identity.ts and derives the agent's join key", async () => {
    const nonce = new Uint8Array(32).fill(7);
    expect(Buffer.from(frameFields(CTX_HELLO, nonce, "abc", "é")).equals(frame(CTX_HELLO, nonce, "abc", "é"))).toBe(true);
    expect(await deriveJoinKey(TOKEN)).toBe(KEY);
    expect(KEY).toMatch(/^[0-9a-f]{64}$/);
    const idn = generateIdentity();
    const c = webCryptoPort();
    const data = frameFields(CTX_HELLO, nonce, idn.id);
    expect(await c.verifyEd25519(idn.publicKey, data, signFields(idn, CTX_HELLO, nonce, idn.id))).toBe(true);
    expect(await c.verifyEd25519(idn.publicKey, data, new Uint8Array(64))).toBe(false);
    expect(await c.verifyHmac(KEY, data, tokenMac(KEY, CTX_HELLO, nonce, idn.id))).toBe(true);
    expect(await c.verifyHmac(TOKEN, data, tokenMac(KEY, CTX_HELLO, nonce, idn.id))).toBe(false);
  });

  it("batches a burst of joins into presence frames; each member learns each peer exactly once", async () => {
    const clock = new ManualClock();
    const hub = new SignalHub({ joinKey: KEY, clock, presenceBatchMs: 20 });
    const early = await join(hub);
    const burst = [];
    for (let i = 0; i < 30; i++) burst.push(await join(hub));
    clock.advance(25);
    const all = [early, ...burst];
    for (const m of all) {
      const known = new Map<string, number>();
      const w = m.sock.of("welcome")[0]!;
      for (const p of w.peers) known.set(p.id, (known.get(p.id) ?? 0) + 1);
      for (const msg of m.sock.sent) {
        if (msg.t === "join") known.set(msg.peer.id, (known.get(msg.peer.id) ?? 0) + 1);
        if (msg.t === "presence") for (const p of msg.join) known.set(p.id, (known.get(p.id) ?? 0) + 1);
      }
      expect(known.size).toBe(all.length - 1);
      expect([...known.values()].every((n) => n === 1)).toBe(true);
      expect(known.has(m.idn.id)).toBe(false);
    }
    expect(early.sock.of("presence").length).toBeGreaterThan(0);
    // a burst of leaves: the survivor hears every one of them
    for (const m of burst) m.s.closed();
    clock.advance(25);
    const left = new Set<string>();
    for (const msg of early.sock.sent) {
      if (msg.t === "leave") left.add(msg.id);
      if (msg.t === "presence") for (const id of msg.leave) left.add(id);
    }
    expect(left.size).toBe(30);
    hub.closeAll();
  });

  it("past 500 members a flush is sent in slices: every member still learns every join and leave once, in order, and welcomes list exactly the others", async () => {
    const clock = new ManualClock();
    const hub = new SignalHub({ joinKey: KEY, clock, presenceBatchMs: 20, limits: { maxSessionsPerIp: 10_000, maxSessions: 10_000 } });
    const ms: Awaited<ReturnType<typeof join>>[] = [];
    for (let i = 0; i < 620; i++) ms.push(await join(hub));
    // no clock advance yet: the first window is pending; now a burst of joins and leaves while flushes slice
    clock.advance(100); // window fires: first slice sent, the rest on 0 ms timers
    const more: Awaited<ReturnType<typeof join>>[] = [];
    for (let i = 0; i < 5; i++) more.push(await join(hub)); // admitted mid-flush
    ms[3]!.s.closed();
    ms[700 % 620]!.s.closed(); // index 80
    for (let k = 0; k < 50; k++) clock.advance(100);
    const gone = new Set([ms[3]!.idn.id, ms[80]!.idn.id]);
    const live = [...ms, ...more].filter((m) => !gone.has(m.idn.id));
    for (const m of live) {
      const known = new Set<string>();
      for (const msg of m.sock.sent) {
        if (msg.t === "welcome") for (const p of msg.peers) known.add(p.id);
        if (msg.t === "join") known.add(msg.peer.id);
        if (msg.t === "presence") {
          for (const id of msg.leave) known.delete(id);
          for (const p of msg.join) {
            expect(known.has(p.id), "a peer announced twice").toBe(false);
            known.add(p.id);
          }
        }
        if (msg.t === "leave") known.delete(msg.id);
      }
      expect(known.size).toBe(live.length - 1);
      expect(known.has(m.idn.id)).toBe(false);
      for (const g of gone) expect(known.has(g)).toBe(false);
    }
    hub.closeAll();
  }, 60_000);

  it("a welcome with more peers than fit one frame continues in presence frames", async () => {
    const hub = new SignalHub({ joinKey: KEY });
    const meta = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`k${i}`, "x".repeat(250)])); // ~4 KiB per peer
    for (let i = 0; i < 40; i++) await join(hub, generateIdentity(), `198.51.100.${i}`, meta);
    const last = await join(hub, generateIdentity(), "203.0.113.9");
    const w = last.sock.of("welcome")[0]!;
    const rest = last.sock.of("presence").flatMap((p) => p.join);
    expect(w.peers.length).toBeGreaterThan(5);
    expect(w.peers.length).toBeLessThan(40);
    expect(new Set([...w.peers, ...rest].map((p) => p.id)).size).toBe(40);
    hub.closeAll();
  });

  it("caps sessions in total and per source IP (1013), and counts the refusals", async () => {
    const hub = new SignalHub({ joinKey: KEY, limits: { maxSessions: 5, maxSessionsPerIp: 3 } });
    const socks = [1, 2, 3, 4].map(() => new MemSocket("10.0.0.1"));
    for (const s of socks) hub.open(s);
    expect(socks.slice(0, 3).every((s) => s.closedWith === undefined)).toBe(true);
    expect(socks[3]!.closedWith?.code).toBe(CLOSE_CODES.TRY_AGAIN);
    expect(hub.admission("10.0.0.1")).toMatchObject({ ok: false, status: 429 });
    hub.open(new MemSocket("10.0.0.2"));
    hub.open(new MemSocket("10.0.0.3"));
    expect(hub.admission("10.0.0.4")).toMatchObject({ ok: false, status: 503 });
    const late = new MemSocket("10.0.0.4");
    hub.open(late);
    expect(late.closedWith?.code).toBe(CLOSE_CODES.TRY_AGAIN);
    expect(hub.stats()).toMatchObject({ sessions: 5, refusedFull: 1, refusedPerIp: 1 });
    hub.closeAll();
    expect(hub.stats().sessions).toBe(0);
    expect(hub.admission("10.0.0.1")).toEqual({ ok: true });
  });

  it("closes a slow consumer, drops relay frames to a congested receiver, and enforces per-IP and global relay budgets", async () => {
    const clock = new ManualClock();
    const hub = new SignalHub({ joinKey: KEY, clock, limits: { relayMaxBufferedBytes: 1000, maxBufferedBytes: 5000, relayRatePerIp: 3000, relayRateGlobal: 5000 }, relay: { rateBytesPerSec: 2000 } });
    const a = await join(hub, generateIdentity(), "10.1.0.1");
    const a2 = await join(hub, generateIdentity(), "10.1.0.1");
    const b = await join(hub, generateIdentity(), "10.2.0.1");
    const relay = (from: typeof a, n: number) => from.s.receive(encodeSignal({ t: "relay", to: b.idn.id, data: new Uint8Array(n) }));
    b.sock.queued = 2000; // b stopped reading
    relay(a, 100);
    expect(hub.stats().relayDroppedByReason).toEqual({ congested: 1 });
    expect(a.sock.of("error").at(-1)?.code).toBe("ERR_RELAY_CONGESTED");
    b.sock.queued = 0;
    relay(a, 1500); // a's own bucket 2000/s, its IP's 3000/s, global 5000/s
    relay(a2, 1600); // same IP: 1500 + 1600 > 3000 -> over the IP's budget
    expect(hub.stats().relayDroppedByReason).toEqual({ congested: 1, ip_rate: 1 });
    expect(b.sock.of("relay")).toHaveLength(1);
    clock.advance(1000); // every bucket full again
    const c = await join(hub, generateIdentity(), "10.3.0.1");
    const d = await join(hub, generateIdentity(), "10.4.0.1");
    relay(a, 1900);
    relay(c, 1900);
    relay(a2, 1000); // global: 5000 - 4800 = 200 left
    relay(d, 1500); // d's own and its IP's budget are fine; the server's is not
    expect(hub.stats().relayDroppedByReason).toEqual({ congested: 1, ip_rate: 1, global_rate: 1 });
    expect(b.sock.of("relay")).toHaveLength(4);
    // control messages to a receiver that does not read: closed as a slow consumer (1013), others told it left
    b.sock.queued = 10_000;
    a.s.receive(encodeSignal({ t: "signal", to: b.idn.id, data: { kind: "bye", conn: "x" } }));
    expect(b.sock.closedWith?.code).toBe(CLOSE_CODES.TRY_AGAIN);
    expect(hub.stats().slowConsumers).toBe(1);
    expect(a.sock.of("leave").map((l) => l.id)).toContain(b.idn.id);
    hub.closeAll();
  });

  it("gives relay links' control-channel frames a small budget of their own: delivered while data is refused, capped, counted apart", async () => {
    const clock = new ManualClock();
    const hub = new SignalHub({ joinKey: KEY, clock, limits: { relayMaxBufferedBytes: 1000, maxBufferedBytes: 1 << 30, relayControlRate: 600, relayControlRateGlobal: 1000 }, relay: { rateBytesPerSec: 2000 } });
    const a = await join(hub, generateIdentity(), "10.1.0.1");
    const a2 = await join(hub, generateIdentity(), "10.1.0.2");
    const b = await join(hub, generateIdentity(), "10.2.0.1");
    // a relay link frame: [1 version][1 conn length][conn][1 channel 0 control / 1 packets][8 counter] ... [16 tag]
    const relayFrame = (channel: number, n: number) => {
      const f = new Uint8Array(n);
      f.set([1, 3, 0x61, 0x62, 0x63, channel]);
      return f;
    };
    expect(relayChannel(relayFrame(0, 40))).toBe("control");
    expect(relayChannel(relayFrame(1, 40))).toBe("data");
    expect(relayChannel(Uint8Array.of(1, 3, 0x61, 0x62, 0x63))).toBe("data"); // too short to have a channel
    expect(relayChannel(Uint8Array.of(2, 0, 0, 0))).toBe("data"); // another framing version
    const send = (from: typeof a, channel: number, n: number) => from.s.receive(encodeSignal({ t: "relay", to: b.idn.id, data: relayFrame(channel, n) }));
    // a's data budget (2000/s) is used up by packets; its heartbeats still go through
    send(a, 1, 1900);
    send(a, 1, 1900);
    expect(hub.stats()).toMatchObject({ relayDropped: 1, relayDroppedByReason: { rate: 1 }, relayControlDropped: 0 });
    for (let i = 0; i < 5; i++) send(a, 0, 100);
    expect(b.sock.of("relay")).toHaveLength(6);
    expect(hub.stats()).toMatchObject({ relayControlFrames: 5, relayControlBytes: 500, relayFrames: 6, relayBytes: 2400 });
    // the control budget is a cap too: 600/s for a, and the data budget it would fall back to is spent
    send(a, 0, 200);
    expect(hub.stats()).toMatchObject({ relayControlDropped: 1, relayControlDroppedByReason: { rate: 1 }, relayDropped: 1 });
    // the server-wide control budget (1000/s, 500 left after a's): a2 takes the rest; past it, a2's control
    // frames use its data budget (2000/s), which then cannot take a 1950-byte packet
    send(a2, 0, 500);
    send(a2, 0, 100);
    expect(hub.stats()).toMatchObject({ relayControlFrames: 7, relayControlDropped: 1 });
    send(a2, 1, 1950);
    expect(hub.stats().relayDroppedByReason).toEqual({ rate: 2 });
    // a congested receiver: data refused at relayMaxBufferedBytes, control up to CONTROL_RELAY_QUEUE_HEADROOM more
    clock.advance(1000);
    b.sock.queued = 1500;
    send(a, 1, 100);
    send(a, 0, 100);
    expect(hub.stats().relayDroppedByReason).toEqual({ rate: 2, congested: 1 });
    expect(hub.stats().relayControlFrames).toBe(8);
    b.sock.queued = 1000 + CONTROL_RELAY_QUEUE_HEADROOM + 1;
    send(a, 0, 100);
    expect(hub.stats().relayControlDroppedByReason).toEqual({ rate: 1, congested: 1 });
    expect(b.sock.of("relay")).toHaveLength(9);
    hub.closeAll();
  });

  it("rebuilds presence from snapshots after hibernation: members silently, handshakes keep their nonce", async () => {
    const hub = new SignalHub({ joinKey: KEY });
    const a = await join(hub);
    const b = await join(hub);
    const pending = new MemSocket("10.9.9.9");
    hub.open(pending);
    const snaps = [a.sock.snapshot!, b.sock.snapshot!, pending.snapshot!];
    expect(snaps[0]!.member?.id).toBe(a.idn.id);
    expect(snaps[2]!.member).toBeUndefined();

    const fresh = new SignalHub({ joinKey: KEY });
    const sa = new MemSocket();
    const sb = new MemSocket();
    const sp = new MemSocket("10.9.9.9");
    const ra = fresh.restore(sa, snaps[0]!);
    fresh.restore(sb, snaps[1]!);
    const rp = fresh.restore(sp, snaps[2]!);
    expect(fresh.list().map((m) => m.id).sort()).toEqual([a.idn.id, b.idn.id].sort());
    expect(sa.sent).toEqual([]); // nothing re-sent to restored members
    ra.receive(encodeSignal({ t: "signal", to: b.idn.id, data: { kind: "bye", conn: "c" } }));
    expect(sb.of("signal")[0]?.from).toBe(a.idn.id);
    // the pending handshake completes against the nonce it was challenged with
    const c = generateIdentity();
    rp.receive(helloFor(c, snaps[2]!.nonce));
    await settled(rp);
    expect(sp.of("welcome")[0]?.peers.length).toBe(2);
    expect(sa.of("join")[0]?.peer.id).toBe(c.id);
    fresh.closeAll();
    hub.closeAll();
  });
});
