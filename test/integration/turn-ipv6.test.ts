/**
 * TURN over IPv6, for real: coturn listening on [::1] only (REST shared-secret credentials, as the
 * signaling server hands out and test/e2e/nat-lab.ts runs it), two native (libdatachannel) transports in this
 * process with iceTransportPolicy "relay", so the only path ICE may use is through the TURN server's relayed
 * addresses: A -> coturn [::1] (ChannelData over IPv6) -> A's allocation -> B's allocation -> coturn -> B. coturn relays
 * on 127.0.0.1 and ::1 (dual stack, as deployed); libjuice asks for no address family, so the relayed addresses are
 * IPv4 while every datagram between an agent and coturn is IPv6. The transports bind ICE to ::1: "relay" only
 * restricts the candidates they announce, and on one host a socket on 127.0.0.1 may reach the peer's relayed address
 * (or the peer's socket, learned as prflx) without coturn; a socket on ::1 cannot send to IPv4 at all, so every
 * datagram of the link goes to coturn over IPv6.
 * No root, no namespaces: everything is on IPv6 loopback. Skipped when turnserver, IPv6 loopback or
 * node-datachannel is missing.
 *
 * Path MTU arithmetic (agent/transport/native.ts NATIVE_WIRE_BELOW_MTU, link-base.ts limitFor/TURN_OVERHEAD):
 * a full-size packet of a link built for mtu M is a UDP payload of M - 59 bytes (SCTP M - 96 in a 37-byte DTLS
 * record); sent to the TURN server it gains ChannelData's 4-byte header, and on IPv6 the IP header is 40 bytes
 * (not IPv4's 20): M - 59 + 4 + 8 + 40 = M - 7 bytes of IPv6 packet toward the server. The relayed end's local
 * limit is therefore route MTU toward the server + 11 (v6) - 4 (ChannelData) = route + 7 (toward the server [::1],
 * not the IPv4 relayed address, which would say route + 31 - 4, 20 bytes too many); on loopback (65536) that is
 * 65543, far above any link MTU (at most MAX_LINK_MTU 4096), so the local limit does not bind: the link built
 * for 1400 sends its full-size probe (1400 - 124 bytes of message) through coturn and, acked, opens at 1400,
 * "confirmed". Where the IPv6 route toward the server is what binds is covered by test/unit/link-pair-change.test.ts.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { createWriteStream, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createNativeTransport, nativeAvailable, nativeLoadError, nativeMtuLimit, NATIVE_WIRE_BELOW_MTU, type NativeTransport } from "../../agent/transport/native.js";
import { PROBE_OVERHEAD, TURN_OVERHEAD } from "../../agent/transport/link-base.js";
import { kernelPathMtu } from "../../agent/os/route-mtu.js";
import { turnIceServers } from "../../src/wire/turn-rest.js";
import type { LinkSignal } from "../../src/mesh/transport.js";
import { makeSide, until, within, type Side } from "../helpers/links.js";
import { hasTool, stopChild } from "../helpers/netns.js";
import { coturnV6Args } from "../helpers/coturn.js";

const haveTurn = hasTool("turnserver");

/** A UDP port on [::1] that was free a moment ago (undefined: no IPv6 loopback here). */
async function freeV6Port(): Promise<number | undefined> {
  const s = createSocket({ type: "udp6", ipv6Only: true });
  try {
    return await new Promise<number | undefined>((resolve) => {
      s.once("error", () => resolve(undefined));
      s.bind(0, "::1", () => resolve(s.address().port));
    });
  } finally {
    s.close();
  }
}

const native = await nativeAvailable();
const probePort = await freeV6Port();
const skip = !haveTurn || probePort === undefined || !native;
if (skip) console.warn(`[skip] TURN over IPv6: ${!haveTurn ? "turnserver (coturn) not installed" : probePort === undefined ? "no IPv6 loopback ([::1])" : `node-datachannel did not load: ${nativeLoadError()}`}`);

/** One STUN Binding request to [::1]:port; true when anything answers within 500 ms. */
async function stunAnswers(port: number): Promise<boolean> {
  const s = createSocket({ type: "udp6", ipv6Only: true });
  try {
    return await new Promise<boolean>((resolve) => {
      const t = setTimeout(() => resolve(false), 500);
      s.once("message", () => {
        clearTimeout(t);
        resolve(true);
      });
      s.once("error", () => resolve(false));
      const req = Buffer.concat([Buffer.from([0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]), randomBytes(12)]);
      s.send(req, port, "::1");
    });
  } finally {
    s.close();
  }
}

/** "[::1]:5000" -> "::1", "127.0.0.1:5000" -> "127.0.0.1" */
const hostOf = (addr: string | undefined) => /^\[([^\]]+)\]:\d+$/.exec(addr ?? "")?.[1] ?? /^([^:]+):\d+$/.exec(addr ?? "")?.[1];

describe.skipIf(skip)("TURN over IPv6 (coturn on [::1], native transports, relay-only ICE)", () => {
  const MTU = 1400;
  let dir: string;
  let turn: ChildProcess | undefined;
  let port: number;
  const secret = "turn6-secret-" + randomBytes(8).toString("hex");
  const transports: NativeTransport[] = [];
  const turnLog = (lines = 30) => {
    try {
      return readFileSync(join(dir, "turn.log"), "utf8").split("\n").slice(-lines).join("\n");
    } catch {
      return "";
    }
  };

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "weft-turn6-"));
    // a port free now (the probe above's may be taken by the time coturn binds: take a fresh one)
    port = (await freeV6Port())!;
    const args = coturnV6Args(port, secret, dir);
    // setpriv --pdeathsig: coturn dies with this process even if afterAll never runs; stdbuf: line-buffered log
    turn = spawn("setpriv", ["--pdeathsig", "KILL", "stdbuf", "-oL", "turnserver", ...args], { stdio: ["ignore", "pipe", "pipe"] });
    const out = createWriteStream(join(dir, "turn.log"));
    turn.stdout!.pipe(out);
    turn.stderr!.pipe(out);
    await within(
      (async () => {
        while (!(await stunAnswers(port))) if (turn!.exitCode !== null) throw new Error(`coturn exited ${turn!.exitCode}`);
      })(),
      15_000,
      "coturn answering STUN on [::1]",
    ).catch((err: Error) => {
      throw new Error(`${err.message}\n${turnLog()}`);
    });
  }, 30_000);

  afterAll(async () => {
    await Promise.all(transports.map((t) => t.close()));
    await stopChild(turn, 5000);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("a link whose only path is the TURN relay opens over IPv6, carries full-size packets both ways, and is confirmed at its MTU", async () => {
    const ta = await createNativeTransport({ iceTransportPolicy: "relay", bindAddress: "::1", mtu: MTU });
    const tb = await createNativeTransport({ iceTransportPolicy: "relay", bindAddress: "::1", mtu: MTU });
    transports.push(ta, tb);
    const url = `turn:[::1]:${port}`;
    const now = Date.now();
    let a!: Side;
    let b!: Side;
    a = makeSide(ta, true, (sig: LinkSignal) => void b.link.handleSignal(sig), undefined, turnIceServers([url], secret, "node-a", now));
    b = makeSide(tb, false, (sig: LinkSignal) => void a.link.handleSignal(sig), undefined, turnIceServers([url], secret, "node-b", now));
    try {
      await a.link.start();
      const closedEarly = Promise.race([a.closed, b.closed]).then((r) => {
        throw new Error(`link closed before it opened: ${r}`);
      });
      await within(Promise.race([Promise.all([a.opened, b.opened]), closedEarly]), 30_000, "both links open through coturn");

      // Only relay candidates went out (the policy): every datagram of the link goes through coturn, which only
      // listens on [::1].
      for (const s of [...a.signals, ...b.signals]) if (s.kind === "candidate" && s.candidate) expect(s.candidate.candidate).toMatch(/ typ relay /);

      // The selected pair: relay on both ends, each address one of coturn's relayed addresses (not its listening
      // port). libjuice sends no REQUESTED-ADDRESS-FAMILY, so coturn hands out an IPv4 relayed address (RFC 6156's
      // default) although it is reached over IPv6 (an IPv6-only relay, --relay-ip ::1 alone, refuses it: 440).
      const [sa, sb] = await Promise.all([a.link.stats(), b.link.stats()]);
      for (const st of [sa, sb]) {
        expect(st.selected?.localType).toBe("relay");
        // the peer's relayed address, learned from its candidate or (its check came first) as peer-reflexive
        expect(["relay", "prflx"]).toContain(st.selected?.remoteType);
        expect(hostOf(st.selected?.localAddress)).toBe("127.0.0.1");
        expect(hostOf(st.selected?.remoteAddress)).toBe("127.0.0.1");
      }
      expect(sa.selected?.localAddress).toBe(sb.selected?.remoteAddress);
      expect(sb.selected?.localAddress).toBe(sa.selected?.remoteAddress);
      expect(sa.selected?.localAddress).not.toBe(sb.selected?.localAddress);

      // Path MTU (see the header): the relayed end's limit toward [::1] is route + 11 - 4; on loopback it does not
      // bind, so the probe decided and the link is confirmed at the MTU it was built for.
      const route = kernelPathMtu("::1");
      if (route !== undefined) {
        expect(nativeMtuLimit("::1")).toBe(route + NATIVE_WIRE_BELOW_MTU.v6);
        expect(route + NATIVE_WIRE_BELOW_MTU.v6 - TURN_OVERHEAD.v6).toBeGreaterThan(MTU);
      }
      for (const st of [sa, sb]) {
        expect(st.pathMtu).toBe(MTU);
        expect(st.pmtuHow).toBe("confirmed");
      }

      // Data both ways: a message that fills one full-size SCTP packet (the probe's size) on the packets channel,
      // and a 60 KB one (many full-size packets) on the control channel, byte for byte.
      const full = randomBytes(MTU - PROBE_OVERHEAD);
      const big = randomBytes(60_000);
      const before = [a.messages.length, b.messages.length];
      expect(a.link.send("packets", full)).toBe("ok");
      expect(b.link.send("packets", full)).toBe("ok");
      expect(a.link.send("control", big)).toBe("ok");
      expect(b.link.send("control", big)).toBe("ok");
      await until(() => a.messages.length >= before[0]! + 2 && b.messages.length >= before[1]! + 2, 15_000, "messages through the relay both ways");
      for (const s of [a, b]) {
        const got = s.messages.slice(s === a ? before[0] : before[1]);
        expect(got.filter((m) => m.channel === "packets").map((m) => Buffer.from(m.data).equals(full))).toEqual([true]);
        expect(got.filter((m) => m.channel === "control").map((m) => Buffer.from(m.data).equals(big))).toEqual([true]);
      }
      // and the links counted it (the relay pair above, on sockets bound to ::1, is the only path it could take)
      const [ea, eb] = await Promise.all([a.link.stats(), b.link.stats()]);
      expect(ea.bytesReceived).toBeGreaterThanOrEqual(60_000 + full.length);
      expect(eb.bytesReceived).toBeGreaterThanOrEqual(60_000 + full.length);
    } catch (err) {
      throw new Error(`${(err as Error).message}\n--- coturn log\n${turnLog()}`, { cause: err });
    } finally {
      a.link.close();
      b.link.close();
    }
  }, 60_000);
});
