/**
 * Across NAT (root): real agents and pods behind emulated NATs (nat-lab.ts). For each pair of site types
 * the pods ping each other and the path in `weftnet status --json` is what the NATs allow:
 *
 *   none-none, cone-cone, none-symmetric   direct (ICE host/srflx/prflx, never a relay)
 *   symmetric-symmetric                    never direct (a link-open timeout and more)
 *   TURN REST                              agents allocate at coturn with the credentials from welcome
 *   cone-symmetric, symmetric-symmetric    with coturn: a WebRTC link whose selected pair has a relay candidate
 *   symmetric + symmetric + none           the symmetric pair talks "via" the open site's agent
 *   netcheck                               none / cone / symmetric / UDP blocked per site
 *   udp-blocked                            needs the signaling server's relay (not built yet: todo)
 *   conntrack flushed mid-transfer         cone-cone and none-symmetric: a TCP stream between pods completes, same SHA-256
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { hasTool } from "../helpers/netns.js";
import { isRoot, NatLab, pairTypes, TURN_IP, until, usesRelay, type NatHost, type NatKind } from "./nat-lab.js";

const haveTurn = hasTool("turnserver");
const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping NAT e2e: needs root (network namespaces, iptables, TUN)");
if (isRoot && !haveTurn) console.warn("skipping the TURN cases: coturn is not installed (apt-get install coturn)");

/** Links that cannot form are abandoned after 15 s; a window longer than that shows they never came up. */
const NEVER_DIRECT_WINDOW_MS = 17_000;

d("netcheck in the NAT lab", () => {
  const lab = new NatLab([{ nat: "none" }, { nat: "cone" }, { nat: "symmetric" }, { nat: "udp-blocked" }]);
  beforeAll(async () => {
    await lab.setup();
    await lab.startSignal();
  }, 30_000);
  afterAll(() => lab.close(), 30_000);

  const want: Record<NatKind, string> = {
    none: "no NAT",
    cone: "endpoint-independent mapping (cone)",
    symmetric: "address/port-dependent mapping (symmetric)",
    "udp-blocked": "UDP blocked",
  };

  it("tells every site type apart with --stun (no agent needed)", async () => {
    for (const h of lab.hosts) {
      const r = await lab.netcheck(h, ["--stun", "198.18.0.1:3478", "--stun", "198.18.0.1:3479", "--timeout", "400"]);
      expect(r.verdict, `${h.name}: ${JSON.stringify(r)}`).toBe(want[h.site.nat]);
      if (h.site.nat === "udp-blocked") {
        expect(r.udp).toBe(false);
        expect(r.ok, "netcheck exits 1 with UDP blocked").toBe(false);
        expect(r.reflexive).toBeNull();
      } else {
        expect(r.udp).toBe(true);
        // the reflexive address is the host itself (none) or its router's WAN address (NAT)
        expect(r.reflexive!.split(":")[0]).toBe(h.site.nat === "none" ? h.addr : h.site.wan);
      }
      if (h.site.nat === "symmetric") expect(r.mappingVariesByDestination).toBe(true);
      if (h.site.nat === "cone") expect(r.mappingVariesByDestination).toBe(false);
    }
  }, 60_000);

  it("asks the running agent for the signaling server's STUN ports", async () => {
    const h = lab.sites.find((s) => s.nat === "symmetric")!.hosts[0]!;
    lab.startAgent(h, ["--no-tun"]);
    await until(async () => (await lab.status(h)).node.signal.stun?.altPort === 3479, 15_000, "agent registered", () => lab.dump());
    const r = await lab.netcheck(h);
    expect(r.probes.map((p) => p.target)).toEqual(["198.18.0.1:3478", "198.18.0.1:3479"]);
    expect(r.verdict).toBe(want.symmetric);
    const text = await lab.cli(h, ["netcheck"]);
    expect(text).toMatch(/verdict\s+address\/port-dependent mapping \(symmetric\)/);
  }, 40_000);
});

interface PairRun {
  lab: NatLab;
  a: NatHost;
  b: NatHost;
  pods: { ip: string; name: string; host: NatHost }[];
}

async function startPair(kinds: [NatKind, NatKind], opts: { turn?: boolean; agentArgs?: string[] } = {}): Promise<PairRun> {
  const lab = new NatLab(kinds.map((nat) => ({ nat })));
  await lab.setup();
  try {
    if (opts.turn) await lab.startTurn();
    await lab.startSignal();
    const [a, b] = lab.hosts as [NatHost, NatHost];
    lab.startAgent(a, opts.agentArgs);
    lab.startAgent(b, opts.agentArgs);
    await until(async () => (await lab.status(a)).node.signal.connected && (await lab.status(b)).node.signal.connected, 20_000, "both agents registered", () => lab.dump());
    const pods = [await lab.addPod(a), await lab.addPod(b)];
    return { lab, a, b, pods };
  } catch (e) {
    await lab.close();
    throw e;
  }
}

async function connected(r: PairRun, timeoutMs: number): Promise<void> {
  await until(async () => (await r.lab.peer(r.a, r.b))?.state === "connected" && (await r.lab.peer(r.b, r.a))?.state === "connected", timeoutMs, `${r.a.name} <-> ${r.b.name} connected`, () => r.lab.dump());
}

async function podsPing(r: PairRun, timeoutMs = 20_000): Promise<void> {
  const [p, q] = r.pods as [PairRun["pods"][0], PairRun["pods"][0]];
  await until(() => r.lab.podPing(p.name, q.ip), timeoutMs, `${p.name} -> ${q.ip}`, () => r.lab.dump());
  await until(() => r.lab.podPing(q.name, p.ip), timeoutMs, `${q.name} -> ${p.ip}`, () => r.lab.dump());
}

const results: string[] = [];
afterAll(() => {
  if (results.length) console.log(`NAT pairs:\n  ${results.join("\n  ")}`);
});

for (const [kinds, expectPath] of [
  [["none", "none"], "direct"],
  [["cone", "cone"], "direct"],
  [["none", "symmetric"], "direct"],
] as [[NatKind, NatKind], string][]) {
  d(`${kinds.join("-")}`, () => {
    let r: PairRun | undefined;
    afterAll(() => r?.lab.close(), 30_000);
    it(`pods ping each other over a ${expectPath} path without a relay`, async () => {
      r = await startPair(kinds);
      await connected(r, 25_000);
      await podsPing(r);
      // The first WebRTC attempt sometimes does not open within --connect-timeout on a busy box; the pair then
      // starts on the server's relay and must move to the direct path by itself (make-before-break upgrade,
      // probes every <= 5 s after a failure). What is asserted is where the pair settles; the time is printed.
      const t0 = Date.now();
      const lab = r.lab, ra = r.a, rb = r.b;
      const [pa, pb] = await until(async () => {
        const x = await lab.peer(ra, rb);
        const y = await lab.peer(rb, ra);
        return x?.path === "direct" && y?.path === "direct" ? ([x, y] as const) : undefined;
      }, 40_000, `${kinds.join("-")} settles on a direct path`, () => lab.dump());
      results.push(`${kinds.join("-")}: ${pa?.path} ${pairTypes(pa)} ${pa?.selected?.remoteAddress ?? ""} / ${pb?.path} ${pairTypes(pb)} (direct ${Date.now() - t0} ms after the first pod ping)`);
      expect(pa?.path).toBe("direct");
      expect(pb?.path).toBe("direct");
      expect(usesRelay(pa) || usesRelay(pb)).toBe(false);
      if (kinds.includes("none")) {
        // the open side is reached at its own (public lab) address
        const open = kinds[0] === "none" ? r.a : r.b;
        const other = open === r.a ? pb : pa;
        expect(other?.selected?.remoteAddress.split(":")[0]).toBe(open.addr);
      }
    }, 120_000);
  });
}

describe.skipIf(!isRoot || !haveTurn)("TURN REST credentials from the signaling server", () => {
  let r: PairRun | undefined;
  afterAll(() => r?.lab.close(), 30_000);
  it("agents behind symmetric NAT allocate relays at coturn with the credentials handed out in welcome", async () => {
    const lab = new NatLab([{ nat: "symmetric" }, { nat: "symmetric" }]);
    r = { lab, a: undefined as never, b: undefined as never, pods: [] };
    await lab.setup();
    await lab.startTurn({ verbose: true });
    await lab.startSignal();
    const [a, b] = lab.hosts as [NatHost, NatHost];
    r.a = a;
    r.b = b;
    lab.startAgent(a);
    lab.startAgent(b);
    const ids = await Promise.all([a, b].map(async (h) => (await until(() => lab.status(h), 15_000, `${h.name} status`)).node.id));
    // coturn recomputes HMAC-SHA1(secret, "<expiry>:<nodeId>"): a successful ALLOCATE proves the REST scheme end to end.
    await until(async () => ids.every((id) => new RegExp(`user <\\d+:${id}>: incoming packet ALLOCATE processed, success`).test(lab.log("turn.log", 5000))), 30_000, "both agents allocated at coturn", () => lab.dump());
    results.push(`TURN REST: both agents allocated relays at coturn (${ids.join(", ")})`);
  }, 60_000);
});

// Links through coturn: ICE picks a pair with a "relay" candidate on one end at least (the symmetric side's
// relayed address, or both when both ends are symmetric). It must be a WebRTC link (peers[].link "webrtc"):
// the signaling server's own relay (peers[].path "relay", used after a failed WebRTC attempt) does not count.
//
// Path MTU over TURN (link-base.ts limitFor): a relayed end's local limit is the route MTU toward coturn (1500 in
// the lab) + 31 (libdatachannel's wire overhead, IPv4) - 4 (ChannelData: libjuice relays all data that way) = 1527;
// an end that sends straight to the peer's relayed address has 1531. What lies behind coturn the probes find out
// (coturn fragments a datagram too big for its next hop). ICE may switch pairs until it nominates one, after the
// check ran (the link then fails and the next one is built for the new pair's limit).
// - cone-symmetric, --link-mtu auto (the uplink's 1500): every pair carries it: exactly 1500, "confirmed", and
//   no link failed its check (with TURN's overhead taken as 36 bytes, a relayed end got 1492 after a failed link,
//   in the runs where the relay pair happened to be selected when the check ran: 3 of 7);
// - symmetric-symmetric, --link-mtu 1600: above every limit, so the links are built for the selected pair's limit:
//   exactly 1524 on an end whose final pair is relayed locally (1527 rounded to a multiple of 4), 1528 or 1524 on
//   the other end (its own limit 1531, or the relayed end's result it was told).
for (const [kinds, linkMtu] of [
  [["cone", "symmetric"], undefined],
  [["symmetric", "symmetric"], 1600],
] as [[NatKind, NatKind], number | undefined][]) {
  describe.skipIf(!isRoot || !haveTurn)(`${kinds.join("-")} with TURN`, () => {
    let r: PairRun | undefined;
    afterAll(() => r?.lab.close(), 30_000);
    it(`the link forms through coturn (a relay candidate on a WebRTC link), pods ping at full size, path MTU ${linkMtu ? "at the selected pair's limit" : "1500"}`, async () => {
      r = await startPair(kinds, { turn: true, ...(linkMtu ? { agentArgs: ["--link-mtu", String(linkMtu)] } : {}) });
      const run = r;
      const viaTurn = async (x: NatHost, y: NatHost) => {
        const p = await run.lab.peer(x, y);
        return p?.state === "connected" && p.link === "webrtc" && usesRelay(p);
      };
      await until(async () => (await viaTurn(run.a, run.b)) && (await viaTurn(run.b, run.a)), 25_000, `${kinds.join("-")}: a WebRTC link through coturn`, () => run.lab.dump());
      await podsPing(run);
      // Full-size pod packets (pods at MTU 1400, Don't Fragment): a 1400-byte packet fills more than one SCTP
      // packet, so the link sends full-size packets through coturn; a link built above what its pair carries
      // would wedge here (EMSGSIZE: pmtu.ts).
      const [p, q] = run.pods as [PairRun["pods"][0], PairRun["pods"][0]];
      await until(() => run.lab.podPing(p.name, q.ip, 1, ["-s", "1372", "-M", "do"]), 20_000, `${p.name} -> ${q.ip} full size`, () => run.lab.dump());
      await until(() => run.lab.podPing(q.name, p.ip, 1, ["-s", "1372", "-M", "do"]), 20_000, `${q.name} -> ${p.ip} full size`, () => run.lab.dump());
      const pa = await run.lab.peer(run.a, run.b);
      const pb = await run.lab.peer(run.b, run.a);
      results.push(`${kinds.join("-")} + TURN: ${pa?.link} ${pairTypes(pa)} ${pa?.selected?.remoteAddress ?? ""} / ${pb?.link} ${pairTypes(pb)}`);
      for (const p of [pa, pb]) {
        expect(p?.link).toBe("webrtc");
        expect(p?.path).toBe("turn");
        expect(usesRelay(p), pairTypes(p)).toBe(true);
      }
      // the relayed end's address is coturn's relay address
      const relayed = [pa!.selected!, pb!.selected!].flatMap((s) => [s.localType === "relay" ? s.localAddress : "", s.remoteType === "relay" ? s.remoteAddress : ""]).filter(Boolean);
      expect(relayed.length).toBeGreaterThan(0);
      for (const addr of relayed) expect(addr.split(":")[0]).toBe(TURN_IP);
      const counters = await Promise.all([run.a, run.b].map(async (h) => (await run.lab.status(h)).pmtu));
      results.push(`${kinds.join("-")} + TURN${linkMtu ? ` (--link-mtu ${linkMtu})` : ""}: path MTU ${[pa, pb].map((p) => `${p?.pathMtu} ${p?.pmtuHow}`).join(" / ")} (${[pa, pb].map((p) => p?.selected?.localType).join(" / ")}); pmtu counters ${JSON.stringify(counters)}`);
      for (const p of [pa, pb]) {
        const desc = `${pairTypes(p)} ${p?.pmtuHow} ${JSON.stringify(counters)}`;
        if (!linkMtu) {
          expect(p?.pathMtu, desc).toBe(1500);
          expect(p?.pmtuHow, desc).toBe("confirmed");
        } else if (p?.selected?.localType === "relay") {
          expect(p?.pathMtu, desc).toBe(1524);
        } else {
          expect([1524, 1528], desc).toContain(p?.pathMtu);
        }
        if (linkMtu) expect(["route-limit", "peer"], desc).toContain(p?.pmtuHow);
      }
      if (!linkMtu) for (const c of counters) expect(c?.searches["local-limit"], JSON.stringify(counters)).toBe(0);
    }, 90_000);
  });
}

d("symmetric + symmetric + an open site", () => {
  let lab: NatLab | undefined;
  afterAll(() => lab?.close(), 30_000);
  it("the symmetric sites never link directly, and their pods talk via the open site's agent", async () => {
    lab = new NatLab([{ nat: "symmetric" }, { nat: "symmetric" }, { nat: "none" }]);
    await lab.setup();
    await lab.startSignal();
    const [s1, s2, open] = lab.hosts as [NatHost, NatHost, NatHost];
    for (const h of lab.hosts) lab.startAgent(h);
    const l0 = lab;
    for (const h of lab.hosts) await until(async () => (await l0.status(h)).node.signal.connected, 20_000, `${h.name} registered`, () => l0.dump());
    const p1 = await lab.addPod(s1);
    const p2 = await lab.addPod(s2);
    const l = lab;
    await until(async () => (await l.peer(s1, s2))?.path === `via ${open.name}` && (await l.peer(s2, s1))?.path === `via ${open.name}`, 40_000, "sym pair routes via the open site", () => l.dump());
    await until(() => l.podPing(p1.name, p2.ip), 20_000, "pod s1 -> s2", () => l.dump());
    await until(() => l.podPing(p2.name, p1.ip), 20_000, "pod s2 -> s1", () => l.dump());
    // Watch longer than the link-open timeout: the direct link between the symmetric sites never comes up.
    const t0 = Date.now();
    const seen = new Set<string>();
    while (Date.now() - t0 < NEVER_DIRECT_WINDOW_MS) {
      const p = await l.peer(s1, s2);
      seen.add(`${p?.state}/${p?.path}`);
      // a link may come up through the signaling server's relay (candidate types "relay"), never as a direct ICE pair
      expect(p?.state === "connected" && !usesRelay(p), `direct link ${pairTypes(p)}`).toBe(false);
      expect(p?.path).toBe(`via ${open.name}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    expect(await l.podPing(p1.name, p2.ip, 2)).toBe(true);
    const fwd = (await l.status(open)).dataplane?.forwarder.fwdFrames ?? 0;
    expect(fwd).toBeGreaterThan(0);
    results.push(`symmetric-symmetric (+ none): ${[...seen].join(", ")}; ${open.name} forwarded ${fwd} frames`);
  }, 120_000);
});

// Needs the signaling server's WebSocket relay (issue 5, part 3): the agent side is agent/transport/relay.ts.
// No other path can carry a UDP-blocked site's traffic (libjuice's ICE has no TURN over TCP).
const haveServerRelay = existsSync(join(process.cwd(), "dist", "agent", "transport", "relay.js"));
if (isRoot && !haveServerRelay) console.warn("skipping the udp-blocked case: the signaling server relay (agent/transport/relay.ts) is not built");
describe.skipIf(!isRoot || !haveServerRelay)("udp-blocked + cone", () => {
  let r: PairRun | undefined;
  afterAll(() => r?.lab.close(), 30_000);
  it("pods ping over the signaling server's relay", async () => {
    r = await startPair(["udp-blocked", "cone"]);
    await connected(r, 40_000);
    await podsPing(r);
    const pa = await r.lab.peer(r.a, r.b);
    results.push(`udp-blocked-cone: ${pa?.path} ${pairTypes(pa)}`);
    expect(pa?.path === "relay" || usesRelay(pa), `${pa?.path} ${pairTypes(pa)}`).toBe(true);
  }, 90_000);
});

// A router "reboot" as far as NAT goes: the NAT routers forget every mapping while a TCP stream runs between
// the pods. Packets from the peer that arrive before the host sends again are NEW at the router and dropped;
// the host's next packet maps afresh (same port behind a cone, a new random one behind a symmetric NAT). The stream must complete with every byte intact (end-to-end SHA-256),
// whether ICE keeps the pair alive or the mesh redials after heartbeat loss.
const haveConntrack = hasTool("conntrack");
if (isRoot && !haveConntrack) console.warn("skipping the conntrack flush case: conntrack is not installed (apt-get install conntrack)");
for (const FLUSH_KINDS of [
  ["cone", "cone"], // the host's next packet gets the same port back: ICE keeps the pair
  ["none", "symmetric"], // --random-fully maps to a new port: the old pair is dead, the mesh redials
] as [NatKind, NatKind][]) {
  describe.skipIf(!isRoot || !haveConntrack)(`${FLUSH_KINDS.join("-")}, conntrack flushed mid-transfer`, () => {
    let r: PairRun | undefined;
    afterAll(() => r?.lab.close(), 30_000);
    it("a TCP stream between the pods resumes and completes with the right hash", async () => {
      r = await startPair(FLUSH_KINDS);
      const run = r;
      await connected(run, 25_000);
      await podsPing(run);
      const [src, dst] = run.pods as [PairRun["pods"][0], PairRun["pods"][0]];
      const port = 5201;
      const total = 24 << 20; // 24 MiB at ~3 MiB/s: ~8 s, the flush lands in the middle
      // prettier-ignore
      const server = spawn("nsenter", [`--net=/run/netns/${dst.name}`, "--", process.execPath, "-e", `
        const h = require("crypto").createHash("sha256"); let n = 0;
        const s = require("net").createServer((c) => {
          c.on("data", (d) => { h.update(d); n += d.length; });
          c.on("end", () => { console.log(JSON.stringify({ n, hash: h.digest("hex") })); c.end(); s.close(); });
        });
        s.listen(${port}, "${dst.ip}", () => console.log("listening"));`], { stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      server.stdout!.on("data", (d: Buffer) => (out += d.toString()));
      server.stderr!.on("data", (d: Buffer) => (out += d.toString()));
      try {
        await until(async () => out.includes("listening"), 10_000, "stream server listening", () => out);
        // prettier-ignore
        const client = run.lab.sh(src.name, process.execPath, ["-e", `
          const { createHash, randomBytes } = require("crypto"); const h = createHash("sha256");
          const c = require("net").connect(${port}, "${dst.ip}");
          c.on("error", (e) => { console.error(e.message); process.exit(1); });
          c.on("connect", async () => {
            const t0 = Date.now(); let n = 0;
            while (n < ${total}) {
              const chunk = randomBytes(64 << 10); h.update(chunk); n += chunk.length;
              if (!c.write(chunk)) await new Promise((r) => c.once("drain", r));
              const ahead = n / (3 << 20) * 1000 - (Date.now() - t0);
              if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
            }
            c.end(() => console.log(JSON.stringify({ n, hash: h.digest("hex"), ms: Date.now() - t0 })));
          });`], 120_000);
        await new Promise((res) => setTimeout(res, 3_000));
        const before = await run.lab.peer(run.a, run.b);
        for (const s of run.lab.sites.filter((x) => x.nat !== "none")) {
          expect(Number((await run.lab.sh(s.router, "conntrack", ["-C"])).stdout.trim()), `${s.router} has NAT mappings to forget`).toBeGreaterThan(0);
          run.lab.flushConntrack(s);
        }
        const flushedAt = Date.now();
        const sent = JSON.parse((await client).stdout) as { n: number; hash: string; ms: number };
        await until(async () => out.includes('"hash"'), 60_000, "stream server got the end of the stream", () => out + run.lab.dump());
        const got = JSON.parse(out.split("\n").find((l) => l.includes('"hash"'))!) as { n: number; hash: string };
        const after = await run.lab.peer(run.a, run.b);
        const redialed = (after?.uptimeMs ?? 0) < Date.now() - flushedAt;
        results.push(`${FLUSH_KINDS.join("-")} conntrack flush: ${sent.n} bytes in ${sent.ms} ms, ${redialed ? "link redialed" : "same link kept"} (${pairTypes(before)} ${before?.selected?.remoteAddress ?? ""} -> ${after?.path} ${pairTypes(after)} ${after?.selected?.remoteAddress ?? ""})`);
        expect(got.n).toBe(total);
        expect(got.hash).toBe(sent.hash);
        expect(after?.state).toBe("connected");
        expect(await run.lab.podPing(src.name, dst.ip, 2)).toBe(true);
      } finally {
        server.kill("SIGKILL");
      }
    }, 120_000);
  });
}
