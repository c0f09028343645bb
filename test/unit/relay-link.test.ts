// The relay link's sealing and replay counters, without root or a server: two relay transports whose
// RelayPorts hand frames to each other in memory (the signaling server only forwards opaque bytes).
import { describe, expect, it } from "vitest";
import { createRelayTransport, RELAY_BUFFER_LIMIT, RELAY_CONTROL_HEADROOM, RELAY_MAX_MESSAGE, type RelayPort, type RelayTransport } from "../../agent/transport/relay.js";
import type { ChannelName, LinkSignal, TransportLink } from "../../src/mesh/transport.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";
const tick = () => new Promise((r) => setImmediate(r));

function pair() {
  /** every frame that crossed the "server", in order: [from, to, bytes] */
  const frames: [string, string, Uint8Array][] = [];
  const t: Record<string, RelayTransport> = {};
  let buffered = 0;
  const port = (self: string): RelayPort => ({
    up: true,
    sendRelay(to, data) {
      frames.push([self, to, new Uint8Array(data)]);
      t[to]!.deliver(self, new Uint8Array(data));
      return true;
    },
    bufferedAmount: () => buffered,
  });
  t[A] = createRelayTransport({ selfId: A, token: "peer-key", port: port(A) });
  t[B] = createRelayTransport({ selfId: B, token: "peer-key", port: port(B) });
  const got: Record<string, [ChannelName, Uint8Array][]> = { [A]: [], [B]: [] };
  const closed: Record<string, string[]> = { [A]: [], [B]: [] };
  const drains: Record<string, ChannelName[]> = { [A]: [], [B]: [] };
  const links: Record<string, TransportLink> = {};
  const sig: Record<string, (s: LinkSignal) => void> = {};
  for (const [self, peer, initiator] of [
    [A, B, true],
    [B, A, false],
  ] as const) {
    links[self] = t[self]!.createLink({
      initiator,
      peer,
      conn: "c1",
      iceServers: [],
      handlers: {
        onSignal: (s) => sig[self]!(s),
        onOpen: () => {},
        onMessage: (ch, d) => got[self]!.push([ch, new Uint8Array(d)]),
        onClose: (r) => closed[self]!.push(r),
        onDrain: (ch) => drains[self]!.push(ch),
      },
    });
  }
  sig[A] = (s) => void links[B]!.handleSignal(s);
  sig[B] = (s) => void links[A]!.handleSignal(s);
  return { t, links, frames, got, closed, drains, setBuffered: (n: number) => (buffered = n) };
}

async function open() {
  const p = pair();
  await p.links[A]!.start();
  for (let i = 0; i < 5; i++) await tick();
  expect(p.links[A]!.state).toBe("open");
  expect(p.links[B]!.state).toBe("open");
  return p;
}

describe("relay link (memory port)", () => {
  it("agrees keys through the signed offer/answer and carries both channels both ways, sealed", async () => {
    const p = await open();
    const secret = new TextEncoder().encode("pod bytes that the server must not see");
    expect(p.links[A]!.send("packets", secret)).toBe("ok");
    expect(p.links[B]!.send("control", new Uint8Array([1, 2, 3]))).toBe("ok");
    expect(p.got[B]).toEqual([["packets", secret]]);
    expect(p.got[A]).toEqual([["control", new Uint8Array([1, 2, 3])]]);
    const onWire = p.frames[0]![2];
    expect(Buffer.from(onWire).includes(Buffer.from(secret))).toBe(false);
    expect(onWire.length).toBe(secret.length + 2 + 2 + 9 + 16); // header (conn "c1") + tag
  });

  it("drops and counts a tampered, a replayed and a reordered frame; state stays intact", async () => {
    const p = await open();
    p.links[A]!.send("packets", new Uint8Array([1]));
    p.links[A]!.send("packets", new Uint8Array([2]));
    const [first, second] = [p.frames[0]![2], p.frames[1]![2]];
    const bad0 = p.t[B]!.counters.badFrames;
    const tampered = new Uint8Array(second);
    tampered[tampered.length - 20]! ^= 1;
    p.t[B]!.deliver(A, tampered);
    p.t[B]!.deliver(A, second); // replay
    p.t[B]!.deliver(A, first); // reordered (older counter)
    expect(p.t[B]!.counters.badFrames - bad0).toBe(3);
    expect(p.got[B]!.map(([, d]) => d[0])).toEqual([1, 2]);
    p.links[A]!.send("packets", new Uint8Array([3]));
    expect(p.got[B]!.map(([, d]) => d[0])).toEqual([1, 2, 3]);
    // A frame from the wrong sender for this conn is refused too.
    p.t[B]!.deliver("cccccccccccccccc", p.frames.at(-1)![2]);
    expect(p.t[B]!.counters.badFrames - bad0).toBe(4);
    expect(p.links[B]!.state).toBe("open");
  });

  it("closes a link that keeps receiving bad frames", async () => {
    const p = await open();
    p.links[A]!.send("packets", new Uint8Array([1]));
    const replay = p.frames.at(-1)![2];
    for (let i = 0; i < 40; i++) p.t[B]!.deliver(A, replay);
    expect(p.links[B]!.state).toBe("failed");
    expect(p.closed[B]![0]).toMatch(/bad relay frames/);
  });

  it("typed send results: too-big, full then a drain, closed", async () => {
    const p = await open();
    expect(p.links[A]!.send("packets", new Uint8Array(RELAY_MAX_MESSAGE + 1))).toBe("too-big");
    // pod traffic that fills the socket leaves room for control messages (heartbeats, gossip)
    p.setBuffered(RELAY_BUFFER_LIMIT - RELAY_CONTROL_HEADROOM + 1);
    expect(p.links[A]!.send("packets", new Uint8Array(10))).toBe("full");
    expect(p.links[A]!.send("control", new Uint8Array(10))).toBe("ok");
    p.setBuffered(RELAY_BUFFER_LIMIT + 1);
    expect(p.links[A]!.send("control", new Uint8Array(10))).toBe("full");
    expect(p.links[A]!.send("packets", new Uint8Array(10))).toBe("full");
    p.setBuffered(0);
    for (let i = 0; i < 50 && !p.drains[A]!.includes("packets"); i++) await new Promise((r) => setTimeout(r, 5));
    expect(p.drains[A]).toContain("packets");
    expect(p.links[A]!.send("packets", new Uint8Array(10))).toBe("ok");
    p.links[A]!.close();
    expect(p.links[A]!.send("packets", new Uint8Array(10))).toBe("closed");
  });

  it("refuses an SDP whose key does not match its fingerprint", async () => {
    const p = pair();
    let offer: LinkSignal | undefined;
    const l = p.t[A]!.createLink({ initiator: true, peer: B, conn: "c2", iceServers: [], handlers: { onSignal: (s) => (offer = s), onOpen: () => {}, onMessage: () => {}, onClose: () => {} } });
    await l.start();
    await tick();
    // change the first byte (to 00, or 01 when it already was 00: 1 run in 256 sent the SDP unchanged and opened)
    const sdp = (offer as { sdp: string }).sdp.replace(/a=fingerprint:sha-256 (..)/, (_m, b: string) => `a=fingerprint:sha-256 ${b === "00" ? "01" : "00"}`);
    const closed: string[] = [];
    const b = p.t[B]!.createLink({ initiator: false, peer: A, conn: "c2", iceServers: [], handlers: { onSignal: () => {}, onOpen: () => {}, onMessage: () => {}, onClose: (r) => closed.push(r) } });
    await b.handleSignal({ kind: "offer", sdp });
    expect(b.state).toBe("failed");
    expect(closed[0]).toMatch(/valid key/);
  });
});
