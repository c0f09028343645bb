/**
 * The tests the two WebRTC transports (werift, libdatachannel) share beyond the contract suite
 * (test/helpers/transport-contract.ts): their limits and drain, string messages from a misbehaving peer,
 * closing from either side and before connecting, and the UDP sockets they free. Called inside each
 * transport's describe() (test/integration/transport-werift.test.ts, transport-native.test.ts) with what
 * differs: the limits, how to send a string, how to count its UDP sockets.
 */
import { expect, it } from "vitest";
import { sdpFingerprint, type Transport, type TransportLink } from "../../src/mesh/transport.js";
import { connectPair, exchangeBothChannels, makeSide, sleep, until, within, type Side } from "./links.js";

interface WebrtcTransport extends Transport {
  readonly linkCount: number;
}

export interface WebrtcSuite<T extends WebrtcTransport> {
  /** two transports of the kind, created in the caller's beforeAll */
  transports(): { ta: T; tb: T };
  /** a fresh transport (loopback only), for the transport.close() test */
  create(): Promise<T>;
  limits: { maxMessageSize: number; packetsLowWater: number; packetsBufferLimit: number; controlBufferLimit: number };
  /** packets-channel sends of 8 KiB accepted before the buffer limit, at most (a bound: the loop cannot run away) */
  maxPacketsAccepted: number;
  /** the log lines of the transports' logger */
  logLines: string[];
  /** UDP sockets open in this process */
  udpSockets(): number;
  /** reach into the implementation and send a string message on control, as a non-weftnet peer could */
  sendString(link: TransportLink, s: string): void;
  /** the transport logs string messages it converts */
  logsStrings?: boolean;
  /** candidates the answerer gets before the offer: werift sends them at once, native offerers hold them until the answer */
  candidatesBeforeOffer: "some" | "none";
  /** prefix of the printed figures */
  label: string;
}

export function webrtcTransportTests<T extends WebrtcTransport>(s: WebrtcSuite<T>): void {
  it("knows its fingerprint before any link, and every SDP carries it", async () => {
    const { ta, tb } = s.transports();
    expect(ta.fingerprint.algorithm).toBe("sha-256");
    expect(ta.fingerprint.value).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
    expect(ta.fingerprint).not.toEqual(tb.fingerprint);
    const { a, b } = await connectPair(ta, tb);
    const offer = a.signals.find((x) => x.kind === "offer");
    const answer = b.signals.find((x) => x.kind === "answer");
    expect(offer && offer.kind === "offer" && sdpFingerprint(offer.sdp)).toEqual(ta.fingerprint);
    expect(answer && answer.kind === "answer" && sdpFingerprint(answer.sdp)).toEqual(tb.fingerprint);
    // A second link of the same transport uses the same certificate, in both roles.
    const { a: a2, b: b2 } = await connectPair(tb, ta);
    const offer2 = a2.signals.find((x) => x.kind === "offer");
    const answer2 = b2.signals.find((x) => x.kind === "answer");
    expect(offer2 && offer2.kind === "offer" && sdpFingerprint(offer2.sdp)).toEqual(tb.fingerprint);
    expect(answer2 && answer2.kind === "answer" && sdpFingerprint(answer2.sdp)).toEqual(ta.fingerprint);
    a.link.close();
    a2.link.close();
  });

  it("buffers candidates that arrive before the description, opens, and carries messages both ways on both channels", async () => {
    const { ta, tb } = s.transports();
    const { a, b, candidatesBeforeOffer } = await connectPair(ta, tb, true);
    expect(a.link.state).toBe("open");
    expect(b.link.state).toBe("open");
    if (s.candidatesBeforeOffer === "some") {
      // Candidates were really delivered before the offer on the answer side.
      expect(a.signals.findIndex((x) => x.kind === "candidate")).toBeLessThan(a.signals.findIndex((x) => x.kind === "offer"));
      expect(candidatesBeforeOffer).toBeGreaterThan(0);
    } else {
      // The offerer sends no candidate before the answer (link-base.ts: holdCandidatesUntilAnswer); the
      // answerer's candidates still reach it before the answer (connectPair's shuffle delays descriptions).
      expect(candidatesBeforeOffer).toBe(0);
    }
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
    const { ta, tb } = s.transports();
    const L = s.limits;
    const { a, b } = await connectPair(ta, tb);
    expect(a.link.send("control", new Uint8Array(L.maxMessageSize + 1))).toBe("too-big");
    expect(s.logLines.some((l) => l.includes("max message size"))).toBe(true);

    const chunk = new Uint8Array(8 * 1024);
    let accepted = 0;
    while (a.link.send("packets", chunk) === "ok") {
      accepted++;
      expect(accepted).toBeLessThan(s.maxPacketsAccepted);
    }
    expect(a.link.bufferedAmount("packets")).toBeGreaterThan(L.packetsLowWater);
    expect(a.link.bufferedAmount("packets")).toBeLessThanOrEqual(L.packetsBufferLimit);
    await until(() => a.drains.includes("packets"), 10_000, "drain");
    expect(a.link.bufferedAmount("packets")).toBeLessThanOrEqual(L.packetsLowWater);
    expect(a.link.send("packets", chunk)).toBe("ok");
    // Same on control with its larger limit.
    const cchunk = new Uint8Array(64 * 1024);
    let caccepted = 0;
    while (a.link.send("control", cchunk) === "ok") caccepted++;
    expect(caccepted * cchunk.length).toBeGreaterThanOrEqual(L.controlBufferLimit);
    await until(() => a.drains.includes("control"), 20_000, "control drain");
    expect(a.drains.filter((c) => c === "control").length).toBe(1);
    expect(b.messages.length).toBeGreaterThan(0);
    a.link.close();
  });

  it("delivers string messages from a misbehaving peer as bytes", async () => {
    const { ta, tb } = s.transports();
    const { a, b } = await connectPair(ta, tb);
    s.sendString(a.link, "héllo");
    await until(() => b.messages.length >= 1, 5000, "string message");
    expect(b.messages[0]?.data).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(b.messages[0]!.data).toString("utf8")).toBe("héllo");
    if (s.logsStrings) expect(s.logLines.some((l) => l.includes("string data-channel message"))).toBe(true);
    a.link.close();
  });

  it("close() on one side closes the other within a few seconds; onClose fires once", async () => {
    const { ta, tb } = s.transports();
    const { a, b } = await connectPair(ta, tb);
    const t0 = Date.now();
    a.link.close();
    a.link.close();
    expect(a.link.state).toBe("closed");
    expect(a.link.send("control", new Uint8Array(1))).toBe("closed");
    const reason = await within(b.closed, 3000, "remote close");
    console.log(`[measure] ${s.label}: remote noticed close after ${Date.now() - t0} ms (${reason})`);
    await sleep(200);
    expect(a.closes).toEqual(["closed locally"]);
    expect(b.closes.length).toBe(1);
    expect(b.link.state).toBe("closed");
    expect(b.link.send("control", new Uint8Array(1))).toBe("closed");
  });

  it("close() before connecting frees its sockets", async () => {
    const { ta } = s.transports();
    const before = s.udpSockets();
    const a = makeSide(ta, true, () => {});
    await a.link.start(); // gathers host candidates: opens UDP sockets
    await until(() => s.udpSockets() > before, 3000, "socket opened");
    a.link.close();
    expect(a.closes).toEqual(["closed locally"]);
    await until(() => s.udpSockets() <= before, 3000, "sockets freed");
    // A link closed before start() never opens anything.
    const c = makeSide(ta, true, () => {});
    c.link.close();
    await c.link.start();
    expect(c.signals).toEqual([]);
    expect(s.udpSockets()).toBe(before);
  });

  it("a link whose peer never answers can be closed cleanly", async () => {
    const { ta, tb } = s.transports();
    const before = s.udpSockets();
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
    await until(() => s.udpSockets() <= before, 3000, "sockets freed");
  });

  it("transport.close() closes its links and frees every socket", async () => {
    const before = s.udpSockets();
    const tc = await s.create();
    const td = await s.create();
    const { a, b } = await connectPair(tc, td);
    await tc.close();
    await td.close();
    expect(a.closes.length).toBe(1);
    expect(b.closes.length).toBe(1);
    expect(tc.linkCount).toBe(0);
    expect(() => tc.createLink({ initiator: true, iceServers: [], handlers: { onSignal() {}, onOpen() {}, onMessage() {}, onClose() {} } })).toThrow();
    await until(() => s.udpSockets() <= before, 3000, "sockets freed");
  });

  it("measures: 10 links in one process", async () => {
    const { ta, tb } = s.transports();
    const t0 = Date.now();
    const pairs = await Promise.all(Array.from({ length: 10 }, () => connectPair(ta, tb)));
    console.log(`[measure] ${s.label}: 10 links (20 peer connections, one process) open after ${Date.now() - t0} ms`);
    for (const p of pairs) p.a.link.close();
    await Promise.all(pairs.map((p) => within(p.b.closed, 5000, "close")));
  });
}
