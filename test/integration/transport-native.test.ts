/**
 * Real node-datachannel (libdatachannel) peers in one process, wired by passing signals directly (no
 * signaling server, no mocks); what every transport must do is in the contract suite (transport-contract.test.ts), what the
 * two WebRTC transports share beyond it in test/helpers/webrtc-transport-suite.ts (run here with libdatachannel's limits and
 * socket count); this file keeps libdatachannel's own: max-message-size, excludeAddress, MTU, plus interop with werift in both directions
 * and quick throughput figures (printed, not asserted).
 *
 * node-datachannel is an optional dependency: when it does not load, every test here is skipped with the reason.
 */
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNativeTransport, NATIVE_LIMITS, nativeAvailable, nativeLoadError, toNdcIceServers, type NativeTransport } from "../../agent/transport/native.js";
import { createWeriftTransport, type WeriftTransport } from "../../agent/transport/werift.js";
import { sdpFingerprint, type ChannelName } from "../../src/mesh/transport.js";
import { capturedLogger, connectPair, exchangeBothChannels, makeSide, sleep, until, within, type Side } from "../helpers/links.js";
import { webrtcTransportTests } from "../helpers/webrtc-transport-suite.js";

const available = await nativeAvailable();
if (!available) console.warn(`[skip] node-datachannel did not load, native transport tests skipped: ${nativeLoadError()}`);

const { logger, logLines } = capturedLogger();

/** UDP sockets open in this process, native (libjuice) or Node's: /proc/self/fd inodes found in /proc/net/udp{,6}. */
function udpSockets(): number {
  const inodes = new Set<string>();
  for (const f of ["/proc/net/udp", "/proc/net/udp6"]) {
    try {
      for (const line of readFileSync(f, "utf8").split("\n").slice(1)) {
        const inode = line.trim().split(/\s+/)[9];
        if (inode && inode !== "0") inodes.add(inode);
      }
    } catch {
      /* no IPv6 */
    }
  }
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`));
      if (m && inodes.has(m[1]!)) n++;
    } catch {
      /* fd closed meanwhile */
    }
  }
  return n;
}

/**
 * Pump 16 KiB messages on `packets` from a to b for `ms`: send until send() returns false, resume on onDrain.
 * Returns what b received.
 */
async function pump(a: Side, b: Side, ms: number, size = 16 * 1024): Promise<{ msgs: number; mbits: number; maxBuffered: number }> {
  const chunk = new Uint8Array(size).fill(0xab);
  let received = 0;
  let bytes = 0;
  b.onMessage = (ch, d) => {
    if (ch === "packets") {
      received++;
      bytes += d.byteLength;
    }
  };
  let stop = false;
  let maxBuffered = 0;
  const fill = () => {
    while (!stop && a.link.send("packets", chunk) === "ok") maxBuffered = Math.max(maxBuffered, a.link.bufferedAmount("packets"));
  };
  a.onDrain = (ch) => {
    if (ch === "packets") fill();
  };
  await sleep(50);
  const r0 = received;
  const b0 = bytes;
  const t0 = performance.now();
  fill();
  await sleep(ms);
  const secs = (performance.now() - t0) / 1000;
  const msgs = (received - r0) / secs;
  const mbits = ((bytes - b0) * 8) / secs / 1e6;
  stop = true;
  a.onDrain = undefined;
  b.onMessage = undefined;
  return { msgs: Math.round(msgs), mbits: Math.round(mbits), maxBuffered };
}

describe.skipIf(!available)("native transport (node-datachannel, loopback, one process)", () => {
  let ta: NativeTransport;
  let tb: NativeTransport;
  let baselineUdp = 0;

  beforeAll(async () => {
    baselineUdp = udpSockets();
    ta = await createNativeTransport({ logger, loopbackOnly: true });
    tb = await createNativeTransport({ logger, loopbackOnly: true });
  });

  afterAll(async () => {
    await ta?.close();
    await tb?.close();
  });

  webrtcTransportTests({
    label: "native",
    transports: () => ({ ta, tb }),
    create: () => createNativeTransport({ logger, loopbackOnly: true }),
    limits: NATIVE_LIMITS,
    maxPacketsAccepted: 10_000,
    logLines,
    udpSockets,
    // reach into node-datachannel to send a string, as a non-weftnet peer could
    sendString: (link, str) => (link as unknown as { dc: Record<ChannelName, { sendMessage(d: string): void }> }).dc.control.sendMessage(str),
    logsStrings: true,
    candidatesBeforeOffer: "none",
  });

  it("names itself and its library; a transport given the same PEM has the same fingerprint", async () => {
    console.log(`[info] libdatachannel ${ta.libraryVersion}`);
    expect(ta.name).toBe("native");
    const tc = await createNativeTransport({ logger, certificate: ta.certificate });
    expect(tc.fingerprint).toEqual(ta.fingerprint);
    await tc.close();
  });

  it("honours the remote's a=max-message-size", async () => {
    const small = await createNativeTransport({ logger, loopbackOnly: true, limits: { maxMessageSize: 65536 } });
    try {
      const { a, b } = await connectPair(ta, small);
      const answer = b.signals.find((s) => s.kind === "answer");
      expect(answer && answer.kind === "answer" && /^a=max-message-size:65536\s*$/m.test(answer.sdp)).toBe(true);
      expect(a.link.send("control", new Uint8Array(65536))).toBe("ok");
      expect(a.link.send("control", new Uint8Array(65537))).toBe("too-big");
      // The other way round, ours (1 MiB) applies... capped by b's own limit.
      expect(b.link.send("control", new Uint8Array(65537))).toBe("too-big");
      await until(() => b.messages.length >= 1, 5000, "64 KiB message");
      expect(b.messages[0]?.data.byteLength).toBe(65536);
      a.link.close();
    } finally {
      await small.close();
    }
  });

  it("excludeAddress: matching candidates are neither sent nor used", async () => {
    const te = await createNativeTransport({ logger, loopbackOnly: true, excludeAddress: (ip) => ip === "127.0.0.1" });
    try {
      let b!: Side;
      const a = makeSide(te, true, (sig) => void b.link.handleSignal(sig));
      b = makeSide(tb, false, (sig) => void a.link.handleSignal(sig));
      await a.link.start();
      await sleep(1500);
      const sent = a.signals.filter((s) => s.kind === "candidate" && s.candidate !== null);
      expect(sent).toEqual([]);
      const offer = a.signals.find((s) => s.kind === "offer");
      expect(offer && offer.kind === "offer" && /^a=candidate:/m.test(offer.sdp)).toBe(false);
      // b's 127.0.0.1 candidates are ignored too, so nothing can pair.
      expect(a.link.state).toBe("connecting");
      a.link.close();
      b.link.close();
    } finally {
      await te.close();
    }
  });

  it("fresh pairs open on the first attempt when the answer arrives after the answerer's ICE checks", async () => {
    // A signaling hop delays the answer (here 40 ms) while the answerer already knows the offerer's
    // candidates: without holding the offerer's candidates until the answer (link-base.ts), the answerer's
    // ICE connects first, its ClientHello waits at the offerer, and libdatachannel checks the client
    // certificate before it records the answer: "certificate verify failed" for about half the pairs.
    const N = 8;
    const results = await Promise.all(
      Array.from({ length: N }, async () => {
        let a!: Side;
        let b!: Side;
        let sentBeforeAnswer = -1;
        a = makeSide(ta, true, (sig) => void b.link.handleSignal(sig));
        b = makeSide(tb, false, (sig) => {
          if (sig.kind === "answer")
            setTimeout(() => {
              sentBeforeAnswer = a.signals.length;
              void a.link.handleSignal(sig);
            }, 40);
          else void a.link.handleSignal(sig);
        });
        await a.link.start();
        const outcome = await Promise.race([Promise.all([a.opened, b.opened]).then(() => "open"), a.closed.then((r) => `a closed: ${r}`), b.closed.then((r) => `b closed: ${r}`), sleep(15_000).then(() => "no open within 15 s")]);
        a.link.close();
        b.link.close();
        // The mechanism itself: the offer carries no candidates and none is sent before the answer is applied.
        const offer = a.signals[0];
        expect(offer?.kind === "offer" && /^a=candidate:/m.test(offer.sdp)).toBe(false);
        expect(a.signals.slice(0, sentBeforeAnswer).filter((x) => x.kind === "candidate")).toEqual([]);
        expect(a.signals.slice(sentBeforeAnswer).some((x) => x.kind === "candidate" && x.candidate !== null)).toBe(true);
        return outcome;
      }),
    );
    console.log(`[measure] native: ${results.filter((r) => r === "open").length}/${N} fresh pairs opened on the first attempt (answer delayed 40 ms)`);
    expect(results).toEqual(Array.from({ length: N }, () => "open"));
  });

  it("converts ICE server URLs (TURN over TCP/TLS skipped: libjuice relays over UDP only)", () => {
    expect(
      toNdcIceServers([
        { urls: "stun:stun.example.org" },
        { urls: ["turn:[2001:db8::1]:3479?transport=udp", "turn:relay.example.org?transport=tcp", "turns:relay.example.org"], username: "u", credential: "p" },
        { urls: "turn:10.0.0.1" },
        { urls: "http://nope" },
      ]),
    ).toEqual([
      { hostname: "stun.example.org", port: 3478 },
      { hostname: "2001:db8::1", port: 3479, username: "u", password: "p", relayType: "TurnUdp" },
    ]);
  });

  it("measures: 16 KiB messages on packets, native -> native", async () => {
    const { a, b } = await connectPair(ta, tb);
    const r = await pump(a, b, 3000);
    console.log(`[measure] native->native packets 16 KiB: ${r.msgs} msg/s, ${r.mbits} Mbit/s (max bufferedAmount ${r.maxBuffered})`);
    expect(r.maxBuffered).toBeLessThanOrEqual(NATIVE_LIMITS.packetsBufferLimit);
    a.link.close();
    await within(b.closed, 3000, "close");
  });

  it("mtu: a larger path MTU carries the same bytes in far fewer, larger UDP datagrams", async () => {
    // UDP datagrams this network namespace sent (both directions of a loopback link are ours).
    const outDatagrams = () => {
      const lines = readFileSync("/proc/net/snmp", "utf8").split("\n").filter((l) => l.startsWith("Udp:"));
      const [names, values] = lines.map((l) => l.trim().split(/\s+/)) as [string[], string[]];
      return Number(values[names.indexOf("OutDatagrams")]);
    };
    // 2 MiB over the reliable control channel (no loss can change the count), respecting backpressure.
    const transfer = async (a: Side, b: Side) => {
      const total = 2 << 20;
      const chunk = new Uint8Array(32 * 1024).fill(0x5a);
      let got = 0;
      b.onMessage = (ch, d) => {
        if (ch === "control") got += d.byteLength;
      };
      const d0 = outDatagrams();
      let sent = 0;
      const fill = () => {
        while (sent < total && a.link.send("control", chunk) === "ok") sent += chunk.byteLength;
      };
      a.onDrain = (ch) => ch === "control" && fill();
      fill();
      await until(() => got >= total, 20_000, "2 MiB received");
      const datagrams = outDatagrams() - d0;
      a.onDrain = undefined;
      b.onMessage = undefined;
      return datagrams;
    };
    const big = await Promise.all([createNativeTransport({ logger, loopbackOnly: true, mtu: 4096 }), createNativeTransport({ logger, loopbackOnly: true, mtu: 4096 })]);
    try {
      const dflt = await connectPair(ta, tb);
      const jumbo = await connectPair(big[0], big[1]);
      const nDefault = await transfer(dflt.a, dflt.b);
      const nJumbo = await transfer(jumbo.a, jumbo.b);
      console.log(`[measure] native 2 MiB: ${nDefault} UDP datagrams at the default MTU (1280), ${nJumbo} at mtu 4096`);
      // 1172- vs 3988-byte SCTP packets: ~3.4x fewer data packets (and SACKs); allow for heartbeats and noise.
      expect(nDefault).toBeGreaterThan(1500);
      expect(nJumbo).toBeLessThan(nDefault * 0.5);
      dflt.a.link.close();
      jumbo.a.link.close();
      await Promise.all([within(dflt.b.closed, 5000, "close"), within(jumbo.b.closed, 5000, "close")]);
    } finally {
      await Promise.all(big.map((t) => t.close()));
    }
  });

  it("leaves no UDP sockets behind", async () => {
    // closed links free their sockets asynchronously (channel close, 20 ms grace, pc.close on libdatachannel's threads)
    await until(() => udpSockets() === baselineUdp, 5000, "every UDP socket freed").catch(() => {});
    expect(udpSockets()).toBe(baselineUdp);
  });
});

describe.skipIf(!available)("native <-> werift interop (loopback, one process)", () => {
  let tn: NativeTransport;
  let tw: WeriftTransport;

  beforeAll(async () => {
    tn = await createNativeTransport({ logger, loopbackOnly: true });
    tw = await createWeriftTransport({ logger, loopbackOnly: true });
  });

  afterAll(async () => {
    await tn?.close();
    await tw?.close();
  });

  for (const dir of ["werift offerer -> native answerer", "native offerer -> werift answerer"] as const) {
    const nativeOffers = dir.startsWith("native");
    it(`${dir}: candidates buffered, both channels both ways, fingerprints, 200 KiB control, close propagates`, async () => {
      const [to, ta] = nativeOffers ? [tn, tw] : [tw, tn];
      const { a, b, candidatesBeforeOffer } = await connectPair(to, ta, true);
      // a native offerer holds its candidates until the answer (link-base.ts); werift trickles them early
      if (nativeOffers) expect(candidatesBeforeOffer).toBe(0);
      else expect(candidatesBeforeOffer).toBeGreaterThan(0);
      const offer = a.signals.find((s) => s.kind === "offer");
      const answer = b.signals.find((s) => s.kind === "answer");
      expect(offer && offer.kind === "offer" && sdpFingerprint(offer.sdp)).toEqual(to.fingerprint);
      expect(answer && answer.kind === "answer" && sdpFingerprint(answer.sdp)).toEqual(ta.fingerprint);
      await exchangeBothChannels(a, b);

      // 200 KiB control message each way (both sides advertise 1 MiB).
      const big = new Uint8Array(200 * 1024).map((_, i) => (i * 7) & 0xff);
      a.messages.length = 0;
      b.messages.length = 0;
      expect(a.link.send("control", big)).toBe("ok");
      expect(b.link.send("control", big)).toBe("ok");
      await until(() => a.messages.length >= 1 && b.messages.length >= 1, 15_000, "200 KiB both ways");
      expect(Buffer.from(a.messages[0]!.data).equals(Buffer.from(big))).toBe(true);
      expect(Buffer.from(b.messages[0]!.data).equals(Buffer.from(big))).toBe(true);

      const nativeSide = nativeOffers ? a : b;
      const stats = await nativeSide.link.stats();
      expect(stats.selected?.localAddress).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(stats.selected?.remoteAddress).toMatch(/^127\.0\.0\.1:\d+$/);

      // Close from the native side on one direction, from the werift side on the other.
      const closer = nativeOffers ? b : a; // the werift side closes when native offered, and vice versa
      const other = closer === a ? b : a;
      const t0 = Date.now();
      closer.link.close();
      const reason = await within(other.closed, 3000, "remote close");
      console.log(`[measure] ${dir}: ${closer === a ? "offerer" : "answerer"} closed, remote noticed after ${Date.now() - t0} ms (${reason})`);
      await sleep(100);
      expect(closer.closes.length).toBe(1);
      expect(other.closes.length).toBe(1);
    });

    it(`${dir}: the other side's close propagates too`, async () => {
      const [to, ta] = nativeOffers ? [tn, tw] : [tw, tn];
      const { a, b } = await connectPair(to, ta);
      const closer = nativeOffers ? a : b; // the native side closes this time
      const other = closer === a ? b : a;
      const t0 = Date.now();
      closer.link.close();
      const reason = await within(other.closed, 3000, "remote close");
      console.log(`[measure] ${dir}: native side closed, werift noticed after ${Date.now() - t0} ms (${reason})`);
      expect(other.closes.length).toBe(1);
    });
  }

  it("measures: 16 KiB messages on packets, native <-> werift", async () => {
    for (const nativeSends of [true, false]) {
      const { a, b } = nativeSends ? await connectPair(tn, tw) : await connectPair(tw, tn);
      const r = await pump(a, b, 3000);
      console.log(`[measure] ${nativeSends ? "native->werift" : "werift->native"} packets 16 KiB: ${r.msgs} msg/s, ${r.mbits} Mbit/s (max bufferedAmount ${r.maxBuffered})`);
      a.link.close();
      await within(b.closed, 3000, "close");
    }
  });
});
