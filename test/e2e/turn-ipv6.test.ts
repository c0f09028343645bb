/**
 * TURN over IPv6 where the IPv6 path MTU is what limits the link (root: a network namespace of its own).
 * In a fresh namespace (unshare --net, anonymous: no names shared with other labs) IPv6 on lo carries 1400-byte
 * packets (sysctl net.ipv6.conf.lo.mtu), IPv4 on lo 65536. coturn listens on [::1] only and relays on 127.0.0.1
 * and ::1; two native (libdatachannel) transports in one child process, both iceTransportPolicy "relay", built
 * for mtu 1500. libjuice asks for no address family, so the relayed addresses are IPv4 (127.0.0.1) while every
 * datagram between a link and coturn is IPv6 to [::1] (ICE bound to ::1: a socket on 127.0.0.1 could reach the peer's
 * IPv4 relayed address, or the peer itself as prflx, without coturn; see test/integration/turn-ipv6.test.ts).
 * Before the limit was read toward the TURN server (commit "TURN path MTU limit: toward the TURN server's own
 * address"), this test failed: both links searched a black hole and ended at 1280, not 1404.
 *
 * The arithmetic (agent/transport/native.ts NATIVE_WIRE_BELOW_MTU, link-base.ts limitFor and TURN_OVERHEAD): a
 * full-size packet of a link built for mtu M is an M - 59 byte UDP payload; relayed it gains ChannelData's 4 bytes,
 * and the IPv6 header is 40 (IPv4's 20): M - 59 + 4 + 8 + 40 = M - 7 bytes of IPv6 toward coturn. So the local limit
 * is 1400 + 11 - 4 = 1407, a multiple of 4 below: 1404. The first link (1500) fails its check at once with
 * route-limit 1404 (reading the limit toward the IPv4 relayed address would have said 65535 + 31 - 4 and sent
 * 1493-byte IPv6 packets with DF, which the kernel refuses: a black hole to search); the next link to that peer
 * is built for 1404, its full-size probe (1397 bytes of IPv6 to coturn) is acked, and it opens at 1404, route-limit.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { afterAll, describe, expect, it } from "vitest";
import { nativeAvailable } from "../../agent/transport/native.js";
import { PROBE_OVERHEAD } from "../../agent/transport/link-base.js";
import { turnIceServers } from "../../src/wire/turn-rest.js";
import { childInbox, transpiledChild } from "../helpers/transpiled-child.js";
import { hasTool, isRoot, stopChild } from "../helpers/netns.js";
import { coturnV6Args } from "../helpers/coturn.js";

const haveTurn = hasTool("turnserver");
const native = await nativeAvailable();
const skip = !isRoot || !haveTurn || !native;
if (skip) console.warn(`[skip] TURN over IPv6 path MTU: ${!isRoot ? "needs root (a network namespace)" : !haveTurn ? "turnserver (coturn) not installed" : "node-datachannel did not load"}`);

const V6_MTU = 1400;
const BUILT = 1500;
const PORT = 3478; // the namespace is new: nothing else listens in it

const CHILD = String.raw`
import { spawn } from "node:child_process";
import { createSocket } from "node:dgram";
import { randomBytes } from "node:crypto";
import { createWriteStream, readFileSync } from "node:fs";
import { join } from "node:path";
import { createNativeTransport } from "./agent/transport/native.js";

const cfg = JSON.parse(process.argv[2]);
const say = (m) => process.stdout.write(JSON.stringify(m) + "\n");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const turn = spawn("setpriv", ["--pdeathsig", "KILL", "stdbuf", "-oL", "turnserver", ...cfg.turnArgs], { stdio: ["ignore", "pipe", "pipe"] });
const out = createWriteStream(join(cfg.dir, "turn.log"));
turn.stdout.pipe(out);
turn.stderr.pipe(out);
const turnLog = () => { try { return readFileSync(join(cfg.dir, "turn.log"), "utf8").split("\n").slice(-25).join("\n"); } catch { return ""; } };
const stun = () => new Promise((resolve) => {
  const s = createSocket({ type: "udp6", ipv6Only: true });
  const done = (v) => { clearTimeout(t); s.close(); resolve(v); };
  const t = setTimeout(() => done(false), 300);
  s.once("message", () => done(true));
  s.once("error", () => done(false));
  s.send(Buffer.concat([Buffer.from([0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42]), randomBytes(12)]), cfg.port, "::1");
});

async function attempt(ta, tb, n) {
  const mk = (t, initiator, peer, iceServers, deliver) => {
    const side = { msgs: [], close: undefined };
    let open, closed;
    side.opened = new Promise((r) => (open = r));
    side.closed = new Promise((r) => (closed = r));
    side.link = t.createLink({ initiator, peer, conn: "c" + n, iceServers, handlers: {
      onSignal: (s) => deliver(s), onOpen: () => open(), onDrain: () => {},
      onMessage: (channel, d) => side.msgs.push({ channel, d: Buffer.from(d) }),
      onClose: (r) => { side.close = r; closed(r); },
    } });
    return side;
  };
  let a, b;
  a = mk(ta, true, "node-b", cfg.iceA, (s) => void b.link.handleSignal(s));
  b = mk(tb, false, "node-a", cfg.iceB, (s) => void a.link.handleSignal(s));
  await a.link.start();
  const how = await Promise.race([
    Promise.all([a.opened, b.opened]).then(() => "open"),
    Promise.race([a.closed, b.closed]).then(() => "closed"),
    sleep(30000).then(() => "timeout"),
  ]);
  const r = { t: "attempt" + n, how };
  if (how === "open") {
    const [sa, sb] = await Promise.all([a.link.stats(), b.link.stats()]);
    const full = randomBytes(sa.pathMtu - cfg.probeOverhead);
    const big = randomBytes(60000);
    r.sent = [a.link.send("packets", full), b.link.send("packets", full), a.link.send("control", big), b.link.send("control", big)];
    const t0 = Date.now();
    while ((a.msgs.length < 2 || b.msgs.length < 2) && Date.now() - t0 < 15000) await sleep(10);
    r.got = [a, b].map((s) => ({ packets: s.msgs.filter((m) => m.channel === "packets").map((m) => m.d.equals(full)), control: s.msgs.filter((m) => m.channel === "control").map((m) => m.d.equals(big)) }));
    r.fullSize = full.length;
    r.stats = [sa, sb];
  } else {
    // both ends decide on their own limit when their channels open: wait for both to end (the other one may
    // see the first one's close instead, then it has no fallback and the next attempt says so)
    await Promise.race([Promise.all([a.closed, b.closed]), sleep(10000)]);
    r.closes = [a.close, b.close];
    r.stats = await Promise.all([a.link.stats(), b.link.stats()]);
  }
  a.link.close();
  b.link.close();
  return r;
}

try {
  const t0 = Date.now();
  while (!(await stun())) {
    if (turn.exitCode !== null) throw new Error("coturn exited " + turn.exitCode + "\n" + turnLog());
    if (Date.now() - t0 > 15000) throw new Error("coturn not answering STUN on [::1]\n" + turnLog());
    await sleep(100);
  }
  const ta = await createNativeTransport({ iceTransportPolicy: "relay", bindAddress: "::1", mtu: cfg.mtu });
  const tb = await createNativeTransport({ iceTransportPolicy: "relay", bindAddress: "::1", mtu: cfg.mtu });
  for (let n = 1; n <= 2; n++) say(await attempt(ta, tb, n));
  say({ t: "pmtu", counters: [ta.pmtu(), tb.pmtu()] });
  await Promise.all([ta.close(), tb.close()]);
} catch (err) {
  say({ t: "error", message: String(err && err.stack || err) });
} finally {
  turn.kill("SIGTERM");
  say({ t: "done", turnLog: turnLog() });
}
`;

interface Stats {
  pathMtu?: number;
  pmtuHow?: string;
  selected?: { localType: string; localAddress: string; remoteType: string; remoteAddress: string };
}
interface Msg {
  t: string;
  how?: string;
  closes?: (string | undefined)[];
  stats?: Stats[];
  sent?: string[];
  got?: { packets: boolean[]; control: boolean[] }[];
  fullSize?: number;
  message?: string;
  turnLog?: string;
}

describe.skipIf(skip)("TURN over IPv6: the IPv6 route toward coturn limits the link (own network namespace)", () => {
  const child = transpiledChild("agent/transport/native.ts", CHILD, "weft-turn6-e2e-");
  let proc: ChildProcess | undefined;

  afterAll(async () => {
    await stopChild(proc, 5000);
    child.cleanup();
  });

  it(`links built for ${BUILT} through coturn on [::1] (IPv6 MTU ${V6_MTU}) end at route-limit ${V6_MTU + 11 - 4 - 3}, then open there and carry full-size packets`, async () => {
    const cwd = child.dir();
    const secret = "turn6-" + randomBytes(8).toString("hex");
    const url = `turn:[::1]:${PORT}`;
    const now = Date.now();
    const turnArgs = coturnV6Args(PORT, secret, cwd);
    const cfg = { dir: cwd, port: PORT, turnArgs, mtu: BUILT, probeOverhead: PROBE_OVERHEAD, iceA: turnIceServers([url], secret, "node-a", now), iceB: turnIceServers([url], secret, "node-b", now) };
    // setpriv --pdeathsig: the namespace's processes die with this one; unshare --net: a namespace of its own
    const script = `ip link set lo up && sysctl -q -w net.ipv6.conf.lo.mtu=${V6_MTU} && exec "$0" child.js "$1"`;
    proc = spawn("setpriv", ["--pdeathsig", "KILL", "unshare", "--net", "--", "sh", "-c", script, process.execPath, JSON.stringify(cfg)], { cwd, stdio: ["ignore", "pipe", "pipe"] });
    const inbox = childInbox<Msg>(proc);
    const first = await Promise.race([inbox.next("attempt1", 60_000), inbox.next("error", 60_000).then((m) => Promise.reject(new Error(m.message)))]);
    const second = await inbox.next("attempt2", 60_000);
    const done = await inbox.next("done", 30_000);
    const ctx = `\nattempt1 ${JSON.stringify(first)}\nattempt2 ${JSON.stringify(second)}\n--- coturn\n${done.turnLog}\n--- stderr\n${inbox.stderr.join("").slice(-3000)}`;

    // 1: the check ends at once on the local limit toward [::1]: 1400 + 11 - 4 = 1407 -> 1404
    expect(first.how, ctx).toBe("closed");
    expect(first.closes?.some((c) => /path MTU|1404/.test(c ?? "")), ctx).toBe(true);
    for (const st of first.stats ?? []) expect(st.pmtuHow === undefined || st.pmtuHow === "route-limit" || st.pmtuHow === "searching", ctx).toBe(true);

    // 2: built for 1404 (the peer's fallback), confirmed by its probe, opened on a relay pair (IPv4 relayed addresses)
    expect(second.how, ctx).toBe("open");
    for (const st of second.stats ?? []) {
      expect(st.pathMtu, ctx).toBe(V6_MTU + 11 - 4 - 3);
      expect(st.pmtuHow, ctx).toBe("route-limit");
      expect(st.selected?.localType, ctx).toBe("relay");
      expect(st.selected?.localAddress, ctx).toMatch(/^127\.0\.0\.1:\d+$/);
      expect(st.selected?.remoteAddress, ctx).toMatch(/^127\.0\.0\.1:\d+$/); // the peer's relayed address (relay or prflx)
    }
    expect(second.stats, ctx).toHaveLength(2);
    // full-size (one SCTP packet: 1404 - 124 bytes) and 60 KB messages both ways, byte for byte
    expect(second.fullSize, ctx).toBe(V6_MTU + 11 - 4 - 3 - PROBE_OVERHEAD);
    expect(second.sent, ctx).toEqual(["ok", "ok", "ok", "ok"]);
    expect(second.got, ctx).toEqual([
      { packets: [true], control: [true] },
      { packets: [true], control: [true] },
    ]);
  }, 150_000);
});
