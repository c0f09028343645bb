/**
 * Agents serving STUN (issue 13 item 4): the topology record's signed `stun` field, which STUN servers
 * an agent uses (stunPlan), the responder's rate limits, and the responder itself on a real UDP socket
 * (malformed datagrams counted and dropped, no amplification beyond the documented ratio).
 */
import { randomBytes } from "node:crypto";
import { createSocket, type Socket } from "node:dgram";
import { afterEach, describe, expect, it } from "vitest";
import { agentStun, ownStun, parseStunAdvertise, stunOfIce, stunPlan } from "../../agent/stun-server.js";
import { startStunServer, StunRateLimiter, DEFAULT_STUN_LIMITS, type StunServer } from "../../signaling/stun.js";
import { generateIdentity } from "../../src/identity.js";
import { canonicalStunAddress, decodeTopologyMessage, encodeTopologyMessages, recordKey, signTopologyRecord, Topology, verifyTopologyRecord, type TopologyRecord } from "../../src/mesh/topology.js";
import { encodeBindingRequest, parseBindingSuccess } from "../../src/wire/stun.js";

const T0 = 1_700_000_000_000;

describe("topology record: stun", () => {
  it("is signed, round-trips the wire, and a record without it keeps its old content key", () => {
    const X = generateIdentity();
    const plain: TopologyRecord = { node: X.id, seq: T0, links: [], prefixes: ["10.40.0.0/26"], updatedAt: T0 };
    // the key of a record without stun is exactly the pre-field key (old signatures stay valid)
    expect(recordKey(plain)).toBe(JSON.stringify([X.id, T0, [], ["10.40.0.0/26"], T0]));
    const withStun = signTopologyRecord(X, { ...plain, stun: ["192.0.2.7:3478"] });
    expect(verifyTopologyRecord(withStun)).toBe(true);
    const [back] = decodeTopologyMessage(encodeTopologyMessages([withStun])[0]);
    expect(back!.stun).toEqual(["192.0.2.7:3478"]);
    expect(verifyTopologyRecord(back!)).toBe(true);
    // stripping, changing or adding a stun entry breaks the signature
    expect(verifyTopologyRecord({ ...withStun, stun: undefined } as TopologyRecord)).toBe(false);
    expect(verifyTopologyRecord({ ...withStun, stun: ["192.0.2.8:3478"] })).toBe(false);
    const old = signTopologyRecord(X, plain);
    expect(verifyTopologyRecord({ ...old, stun: ["192.0.2.7:3478"] })).toBe(false);
    // an old decoder (no 8th element) sees a plain record; the signature then does not match: refused, not misread
    const tuple = (encodeTopologyMessages([withStun])[0]!.recs[0] as unknown[]).slice(0, 7);
    const [asOld] = decodeTopologyMessage({ v: 1, t: "recs", recs: [tuple] });
    expect(asOld!.stun).toBeUndefined();
    expect(verifyTopologyRecord(asOld!)).toBe(false);
  });

  it("refuses malformed stun lists from the wire", () => {
    const X = generateIdentity();
    const base = [X.id, T0, [], [], T0, null, null];
    for (const bad of [["localhost:3478"], ["192.0.2.1"], ["192.0.2.1:0"], ["192.0.2.1:70000"], ["192.0.2.1:03478"], ["[2001:DB8::1]:3478"], ["1.2.3.4:1", "1.2.3.4:1"], ["1.1.1.1:1", "1.1.1.2:1", "1.1.1.3:1", "1.1.1.4:1", "1.1.1.5:1"], "1.2.3.4:1", [7]]) {
      expect(() => decodeTopologyMessage({ v: 1, t: "recs", recs: [[...base, bad]] }), JSON.stringify(bad)).toThrow();
    }
    expect(canonicalStunAddress("[2001:db8::1]:3478")).toBe("[2001:db8::1]:3478");
    expect(canonicalStunAddress("10.0.0.1:3478")).toBe("10.0.0.1:3478");
  });

  it("setLocal re-originates when the advertised STUN changes, and a peer's Topology accepts it", () => {
    const X = generateIdentity();
    const Y = generateIdentity();
    const x = new Topology(X.id, { identity: X });
    const y = new Topology(Y.id, { identity: Y });
    const r1 = x.setLocal([], [], T0);
    expect(r1?.stun).toBeUndefined();
    expect(x.setLocal([], [], T0 + 1)).toBeUndefined();
    const r2 = x.setLocal([], [], T0 + 2, ["198.51.100.4:3478"]);
    expect(r2?.stun).toEqual(["198.51.100.4:3478"]);
    expect(x.setLocal([], [], T0 + 3, ["198.51.100.4:3478"])).toBeUndefined();
    const { delta, rejected } = y.mergeDetailed(decodeTopologyMessage(encodeTopologyMessages([r2!])[0]), T0 + 4);
    expect(rejected).toEqual([]);
    expect(delta).toHaveLength(1);
    expect(y.get(X.id)?.stun).toEqual(["198.51.100.4:3478"]);
    expect(() => x.setLocal([], [], T0 + 5, ["not-an-address"])).toThrow(/STUN/);
  });
});

describe("which STUN servers an agent uses", () => {
  const rec = (node: string, stun?: string[]): TopologyRecord => ({ node, seq: 1, links: [], prefixes: [], ...(stun ? { stun } : {}) });
  const A = "000000000000000a";
  const B = "000000000000000b";
  const C = "000000000000000c";
  const names: Record<string, string> = { [A]: "alpha", [B]: "bravo" };

  it("own STUN wins; with none, up to two agents' (one per agent first, IPv4 first, never our own)", () => {
    const records = [rec(C, ["[2001:db8::c]:3478", "192.0.2.12:3478"]), rec(A, ["192.0.2.10:3478", "192.0.2.11:3478"]), rec(B)];
    expect(agentStun(records, B, (id) => names[id])).toEqual([
      { server: "192.0.2.10:3478", source: "agent alpha", node: A },
      { server: "192.0.2.12:3478", source: `agent ${C}`, node: C },
    ]);
    expect(agentStun(records, A, (id) => names[id]).map((u) => u.server)).toEqual(["192.0.2.12:3478", "[2001:db8::c]:3478"]);
    const own = ownStun({ useServerStun: true, serverHost: "sig.example", stunPort: 3478, stunAltPort: 3479, flagIce: [{ urls: "stun:stun.example:19302" }, { urls: "turn:t.example", username: "u", credential: "p" }], serverIce: [] });
    expect(own).toEqual([
      { server: "sig.example:3478", source: "signaling server" },
      { server: "sig.example:3479", source: "signaling server" },
      { server: "stun.example:19302", source: "flag" },
    ]);
    expect(stunPlan(own, records, B, (id) => names[id])).toEqual(own);
    // a Workers server (stunPort 0), no flags: the agents'
    const none = ownStun({ useServerStun: true, serverHost: "w.example", stunPort: 0, stunAltPort: 0, flagIce: [], serverIce: [{ urls: ["turn:t.example:3478"] }] });
    expect(none).toEqual([]);
    expect(stunPlan(none, records, B, (id) => names[id]).map((u) => u.source)).toEqual(["agent alpha", `agent ${C}`]);
    expect(stunOfIce([{ urls: "stun:[2001:db8::1]" }], "flag")).toEqual([{ server: "[2001:db8::1]:3478", source: "flag" }]);
  });

  it("--stun-advertise takes IP literals only", () => {
    expect(parseStunAdvertise("203.0.113.9, 2001:db8::9")).toEqual(["203.0.113.9", "2001:db8::9"]);
    expect(() => parseStunAdvertise("stun.example")).toThrow(/not an IP/);
    expect(() => parseStunAdvertise("")).toThrow();
  });
});

describe("STUN rate limits", () => {
  it("per source: the burst, then the refill rate; other sources unaffected; the table is bounded", () => {
    const l = new StunRateLimiter({ ...DEFAULT_STUN_LIMITS, perSourceRate: 10, perSourceBurst: 5, maxSources: 3 }, 0);
    let ok = 0;
    for (let i = 0; i < 50; i++) if (l.take("a", 0)) ok++;
    expect(ok).toBe(5);
    expect(l.take("b", 0)).toBe(true);
    expect(l.take("a", 100)).toBe(true); // 100 ms at 10/s: one token
    expect(l.take("a", 100)).toBe(false);
    for (const s of ["c", "d", "e"]) l.take(s, 200);
    expect(l.sources).toBe(3);
  });

  it("in total: rotating sources cannot exceed the total rate", () => {
    const l = new StunRateLimiter({ ...DEFAULT_STUN_LIMITS, totalRate: 100, totalBurst: 10 }, 0);
    let ok = 0;
    for (let i = 0; i < 1000; i++) if (l.take(`s${i}`, 0)) ok++;
    expect(ok).toBe(10);
    ok = 0;
    for (let i = 0; i < 1000; i++) if (l.take(`t${i}`, 1000)) ok++; // one second later: the burst again (capped)
    expect(ok).toBe(10);
  });
});

describe("STUN responder on a real socket", () => {
  let srv: StunServer | undefined;
  let client: Socket | undefined;
  afterEach(async () => {
    client?.close();
    client = undefined;
    await srv?.close();
    srv = undefined;
  });

  it("counts and drops malformed datagrams, answers valid ones no larger than ~2x, rate-limits one source", async () => {
    srv = await startStunServer({ host: "127.0.0.1", port: 0, limits: { perSourceRate: 1, perSourceBurst: 5 } });
    const c = (client = createSocket("udp4"));
    const answers: Buffer[] = [];
    c.on("message", (m) => answers.push(m));
    await new Promise<void>((r) => c.bind(0, "127.0.0.1", () => r()));
    const send = (b: Uint8Array) => new Promise<void>((r) => c.send(b, srv!.port, "127.0.0.1", () => r()));
    const junk = [Buffer.alloc(3), Buffer.from("GET / HTTP/1.1\r\n\r\n"), Buffer.concat([encodeBindingRequest(new Uint8Array(12)), Buffer.alloc(4)]), Buffer.alloc(1400, 0xff)];
    for (const j of junk) await send(j);
    const tid = new Uint8Array(randomBytes(12));
    await send(encodeBindingRequest(tid));
    const deadline = Date.now() + 10_000;
    while ((answers.length < 1 || srv.stats().dropped < junk.length) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(srv.stats().dropped).toBe(junk.length);
    expect(answers).toHaveLength(1);
    const a = parseBindingSuccess(answers[0]!);
    expect(a.ok && a.value.mapped.address).toBe("127.0.0.1");
    expect(answers[0]!.byteLength).toBeLessThanOrEqual(2 * 20); // a 20-byte request, a 32-byte answer
    // a flood from one source: the burst (5, one used) is answered, the rest counted as rate-limited
    for (let i = 0; i < 30; i++) await send(encodeBindingRequest(new Uint8Array(randomBytes(12)), { fingerprint: true }));
    while (srv.stats().requests + (srv.stats().droppedByReason["rate-limited"] ?? 0) < 31 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    const st = srv.stats();
    expect(st.requests).toBeLessThanOrEqual(5 + 2); // burst plus what a slow box refilled at 1/s
    expect(st.droppedByReason["rate-limited"]).toBeGreaterThanOrEqual(30 - 6);
    expect(st.bytesOut).toBeLessThanOrEqual(2 * st.bytesIn);
    expect(srv.answeredFrom("127.0.0.1")).toBe(st.requests);
  });
});
