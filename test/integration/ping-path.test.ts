/**
 * `weftnet ping` names the path of every reply, parsed from the CLI's output (no snapshots), and `--json`
 * has it per reply: `direct` over the pair's own WebRTC link, `relay` through the signaling server, and
 * `via NODE` for a node this agent has no link to (the ping is forwarded along the route and timed over
 * the whole path, agent/ping.ts). Four real agents (werift on loopback) in this process; the WebRTC links
 * a–c and b–d never open (their signals are dropped), a refuses the relay, so a reaches c only via b or d
 * while b and d fall back to the relay. The CLI runs as a child process, asynchronously (a synchronous
 * spawn would stall the agents it talks to).
 */
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadOrCreateIdentity } from "../../agent/state.js";
import { createWeriftTransport } from "../../agent/transport/werift.js";
import type { Agent } from "../../agent/agent.js";
import { Cluster, startServer, testLogger, tmpDir, waitFor, withBlocked } from "../helpers/cluster.js";

const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const TOKEN = "ping-path-Wb9Yc4Hd6Jf0GsZq3v8Kp1Lm7Xr2Tn5";
const run = promisify(execFile);

/** `weftnet ARGS` (async): exit code, stdout, stderr. */
async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  try {
    const r = await run(process.execPath, [CLI, ...args], { env: { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "" }, timeout: 30_000 });
    return { code: 0, out: r.stdout, err: r.stderr };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === "number" ? x.code : -1, out: x.stdout ?? "", err: x.stderr ?? "" };
  }
}

describe("weftnet ping: the path of every reply", () => {
  let cluster: Cluster;
  const agents: Record<string, Agent> = {};
  const dirs: Record<string, string> = {};

  beforeAll(async () => {
    cluster = new Cluster(await startServer(TOKEN), TOKEN);
    const names = ["a", "b", "c", "d"] as const;
    const ids: Record<string, string> = {};
    for (const n of names) {
      dirs[n] = tmpDir(`weft-ping-${n}-`);
      cluster.dirs.push(dirs[n]);
      ids[n] = loadOrCreateIdentity(dirs[n]).identity.id;
    }
    const blocked: Record<string, string[]> = { a: ["c"], c: ["a"], b: ["d"], d: ["b"] };
    for (const n of names) {
      const transport = withBlocked(await createWeriftTransport({ logger: testLogger(), loopbackOnly: true }), new Set(blocked[n]!.map((x) => ids[x]!)));
      agents[n] = await cluster.agent(n, { stateDir: dirs[n], transport, ...(n === "a" ? { relay: false } : {}) });
    }
    const up = (x: string, y: string) => agents[x]!.mesh.connectedPeers().includes(ids[y]!);
    await waitFor(
      () => up("a", "b") && up("a", "d") && up("b", "c") && up("c", "d") && up("b", "d") && up("d", "b") && /^via (b|d)$/.test(agents.a!.routes().find((r) => r.dst === ids.c)?.via ?? ""),
      60_000,
      "a linked to b and d, c and d to b, b and d over the relay, a's route to c via b or d",
    );
  }, 90_000);

  afterAll(async () => {
    await cluster?.cleanup();
  }, 30_000);

  it("via NODE: a node without a link of our own is pinged along the route", async () => {
    const r = await cli(["ping", "c", "--count", "2", "--state-dir", dirs.a!]);
    expect(r.code, r.err + r.out).toBe(0);
    const replies = r.out.split("\n").filter((l) => l.startsWith("reply"));
    expect(replies).toHaveLength(2);
    for (const l of replies) expect(l).toMatch(/^reply from c \([0-9a-f]{16}\) via (b|d): time=(\d+\.\d{1,2}|\d+)ms$/);
    expect(r.out).toMatch(/^2 sent, 2 received, min\/median\/max \S+\/\S+\/\S+, path via (b|d)$/m);
    const js = JSON.parse((await cli(["ping", "c", "-c", "2", "--json", "--state-dir", dirs.a!])).out) as { name: string; rttMs: number[]; path: string[]; lost: number };
    expect(js.name).toBe("c");
    expect(js.path).toHaveLength(2);
    for (const p of js.path) expect(p).toMatch(/^via (b|d)$/);
    for (const t of js.rttMs) expect(t).toBeGreaterThan(0);
    expect(js.lost).toBe(0);
    // status says the same path for c, and what carries it to the hop: the hop's own link type, as status
    // shows it for the hop in the same answer (a–b and a–d are WebRTC links; this test runs no bulk link)
    const st = JSON.parse((await cli(["status", "--json", "--state-dir", dirs.a!])).out) as { peers: { name: string; path: string; linkType: string | null; viaLink: string | null; linkWhy: string }[] };
    const pc = st.peers.find((p) => p.name === "c")!;
    expect(pc.path).toMatch(/^via (b|d)$/);
    const hop = st.peers.find((p) => p.name === pc.path.slice(4))!;
    expect(hop.linkType).toBe("webrtc");
    expect(pc.viaLink).toBe("webrtc");
    expect(pc.linkWhy).toBe(`no direct link; routed ${pc.path} (webrtc), lowest measured RTT`);
    const table = (await cli(["status", "--state-dir", dirs.a!])).out;
    expect(table).toMatch(/^c\s+[0-9a-f]{16}\s+\S+\s+via (b|d) \(webrtc\)  /m);
  }, 60_000);

  it("direct and relay: the pair's own link", async () => {
    const direct = await cli(["ping", "b", "--count", "2", "--state-dir", dirs.a!]);
    expect(direct.code, direct.err).toBe(0);
    for (const l of direct.out.split("\n").filter((x) => x.startsWith("reply"))) expect(l).toMatch(/^reply from b \([0-9a-f]{16}\) direct: time=/);
    expect(direct.out).toMatch(/, path direct$/m);

    const relay = await cli(["ping", "d", "--count", "2", "--state-dir", dirs.b!]);
    expect(relay.code, relay.err).toBe(0);
    const lines = relay.out.split("\n").filter((x) => x.startsWith("reply"));
    expect(lines).toHaveLength(2);
    for (const l of lines) expect(l).toMatch(/^reply from d \([0-9a-f]{16}\) relay: time=(\d+\.\d{1,2}|\d+)ms$/);
    const js = JSON.parse((await cli(["ping", "d", "-c", "2", "--json", "--state-dir", dirs.b!])).out) as { path: string[] };
    expect(js.path).toEqual(["relay", "relay"]);
  }, 60_000);

  it("a node with neither a link nor a route: one clear line, exit 1", async () => {
    await agents.b!.stop();
    await agents.d!.stop();
    await waitFor(() => agents.a!.routes().every((r) => r.name !== "c"), 20_000, "a's route to c gone");
    const r = await cli(["ping", "c", "--count", "2", "--state-dir", dirs.a!]);
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/^weftnet ping: c: (not connected|no peer matches)/);
    expect(r.out.split("\n").filter((l) => l.startsWith("reply"))).toHaveLength(0);
  }, 60_000);
});
