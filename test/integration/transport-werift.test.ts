/**
 * Real werift peers in one process, wired by passing signals directly (no signaling server, no mocks).
 * What every transport must do is in the contract suite (transport-contract.test.ts); this file keeps
 * what is werift's own: its limits, string messages, sockets, timings.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createWeriftTransport, WERIFT_LIMITS, type WeriftTransport } from "../../agent/transport/werift.js";
import { sdpFingerprint, type ChannelName } from "../../src/mesh/transport.js";
import { capturedLogger, connectPair, exchangeBothChannels, makeSide, sleep, until, within, type Side } from "../helpers/links.js";

const { logger, logLines } = capturedLogger();

const udpHandles = () => process.getActiveResourcesInfo().filter((r) => r === "UDPWrap").length;

describe("werift transport (loopback, one process)", () => {
  let ta: WeriftTransport;
  let tb: WeriftTransport;
  let baselineUdp = 0;

  beforeAll(async () => {
    baselineUdp = udpHandles();
    ta = await createWeriftTransport({ logger, loopbackOnly: true });
    tb = await createWeriftTransport({ logger, loopbackOnly: true });
  });

  afterAll(async () => {
    await ta?.close();
    await tb?.close();
  });

  it("knows its fingerprint before any link, and every SDP carries it", async () => {
    expect(ta.fingerprint.algorithm).toBe("sha-256");
    expect(ta.fingerprint.value).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    expect(ta.fingerprint).not.toEqual(tb.fingerprint);
    const { a, b } = await connectPair(ta, tb);
    const offer = a.signals.find((s) => s.kind === "offer");
    const answer = b.signals.find((s) => s.kind === "answer");
    expect(offer && offer.kind === "offer" && sdpFingerprint(offer.sdp)).toEqual(ta.fingerprint);
    expect(answer && answer.kind === "answer" && sdpFingerprint(answer.sdp)).toEqual(tb.fingerprint);
    // A second link of the same transport uses the same certificate.
    const { a: a2 } = await connectPair(ta, tb);
    const offer2 = a2.signals.find((s) => s.kind === "offer");
    expect(offer2 && offer2.kind === "offer" && sdpFingerprint(offer2.sdp)).toEqual(ta.fingerprint);
    a.link.close();
    a2.link.close();
  });

  it("buffers candidates that arrive before the description, opens, and carries messages both ways on both channels", async () => {
    const { a, b, candidatesBeforeOffer } = await connectPair(ta, tb, true);
    expect(a.link.state).toBe("open");
    expect(b.link.state).toBe("open");
    // Candidates were really delivered before the offer on the answer side.
    expect(a.signals.findIndex((s) => s.kind === "candidate")).toBeLessThan(a.signals.findIndex((s) => s.kind === "offer"));
    expect(candidatesBeforeOffer).toBeGreaterThan(0);

    await exchangeBothChannels(a, b);

    const stats = await a.link.stats();
    expect(stats.bytesSent).toBe(5);
    expect(stats.bytesReceived).toBe(5);
    expect(stats.selected?.localAddress).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(stats.selected?.remoteAddress).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(stats.selected?.localType).toBe("host");
    a.link.close();
  });

  it("refuses oversized messages and messages over the buffer limit, then reports drain", async () => {
    const { a, b } = await connectPair(ta, tb);
    expect(a.link.send("control", new Uint8Array(WERIFT_LIMITS.maxMessageSize + 1))).toBe("too-big");
    expect(logLines.some((l) => l.includes("max message size"))).toBe(true);

    const chunk = new Uint8Array(8 * 1024);
    let accepted = 0;
    while (a.link.send("packets", chunk) === "ok") {
      accepted++;
      expect(accepted).toBeLessThan(1000);
    }
    expect(a.link.bufferedAmount("packets")).toBeGreaterThan(WERIFT_LIMITS.packetsLowWater);
    expect(a.link.bufferedAmount("packets")).toBeLessThanOrEqual(WERIFT_LIMITS.packetsBufferLimit);
    await until(() => a.drains.includes("packets"), 10_000, "drain");
    expect(a.link.bufferedAmount("packets")).toBeLessThanOrEqual(WERIFT_LIMITS.packetsLowWater);
    expect(a.link.send("packets", chunk)).toBe("ok");
    // Same on control with its larger limit.
    const cchunk = new Uint8Array(64 * 1024);
    let caccepted = 0;
    while (a.link.send("control", cchunk) === "ok") caccepted++;
    expect(caccepted * cchunk.length).toBeGreaterThanOrEqual(WERIFT_LIMITS.controlBufferLimit);
    await until(() => a.drains.includes("control"), 20_000, "control drain");
    expect(b.messages.length).toBeGreaterThan(0);
    a.link.close();
  });

  it("delivers string messages from a misbehaving peer as bytes", async () => {
    const { a, b } = await connectPair(ta, tb);
    // Reach into werift to send a string, as a non-weftnet peer could.
    (a.link as unknown as { dc: Record<ChannelName, { send(d: string): void }> }).dc.control.send("héllo");
    await until(() => b.messages.length >= 1, 5000, "string message");
    expect(b.messages[0]?.data).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(b.messages[0]!.data).toString("utf8")).toBe("héllo");
    a.link.close();
  });

  it("close() on one side closes the other within a few seconds; onClose fires once", async () => {
    const { a, b } = await connectPair(ta, tb);
    const t0 = Date.now();
    a.link.close();
    a.link.close();
    expect(a.link.state).toBe("closed");
    expect(a.link.send("control", new Uint8Array(1))).toBe("closed");
    const reason = await within(b.closed, 3000, "remote close");
    console.log(`[measure] remote noticed close after ${Date.now() - t0} ms (${reason})`);
    await sleep(200);
    expect(a.closes).toEqual(["closed locally"]);
    expect(b.closes.length).toBe(1);
    expect(b.link.state).toBe("closed");
    expect(b.link.send("control", new Uint8Array(1))).toBe("closed");
  });

  it("close() before connecting frees its sockets", async () => {
    const before = udpHandles();
    const a = makeSide(ta, true, () => {});
    await a.link.start(); // gathers host candidates: opens UDP sockets
    expect(udpHandles()).toBeGreaterThan(before);
    a.link.close();
    expect(a.closes).toEqual(["closed locally"]);
    await until(() => udpHandles() <= before, 3000, "sockets freed");
    // A link closed before start() never opens anything.
    const c = makeSide(ta, true, () => {});
    c.link.close();
    await c.link.start();
    expect(c.signals).toEqual([]);
    expect(udpHandles()).toBe(before);
  });

  it("a link whose peer never answers can be closed cleanly", async () => {
    const before = udpHandles();
    let b!: Side;
    const a = makeSide(ta, true, (sig) => void b.link.handleSignal(sig));
    b = makeSide(tb, false, () => {}); // answers go nowhere
    await a.link.start();
    await sleep(1000);
    expect(a.link.state).toBe("connecting");
    a.link.close();
    b.link.close();
    expect(a.closes.length).toBe(1);
    expect(b.closes.length).toBe(1);
    await until(() => udpHandles() <= before, 3000, "sockets freed");
  });

  it("transport.close() closes its links and frees every socket", async () => {
    const tc = await createWeriftTransport({ logger, loopbackOnly: true });
    const td = await createWeriftTransport({ logger, loopbackOnly: true });
    const { a, b } = await connectPair(tc, td);
    await tc.close();
    await td.close();
    expect(a.closes.length).toBe(1);
    expect(b.closes.length).toBe(1);
    expect(tc.linkCount).toBe(0);
    expect(() => tc.createLink({ initiator: true, iceServers: [], handlers: { onSignal() {}, onOpen() {}, onMessage() {}, onClose() {} } })).toThrow();
  });

  it("measures: 10 links in one process", async () => {
    const t0 = Date.now();
    const pairs = await Promise.all(Array.from({ length: 10 }, () => connectPair(ta, tb)));
    const ms = Date.now() - t0;
    console.log(`[measure] 10 links (20 peer connections, one process) open after ${ms} ms`);
    for (const p of pairs) p.a.link.close();
    await Promise.all(pairs.map((p) => within(p.b.closed, 5000, "close")));
  });

  it("leaves no UDP sockets behind", async () => {
    await sleep(300);
    expect(udpHandles()).toBe(baselineUdp);
  });
});
