/**
 * What `weftnet` prints, parsed (no snapshots): status, status ipam, ping, netcheck and the agent's logs
 * against a real signaling server and three agent processes on loopback; and one test per error message
 * an operator meets (wrong token, closed port, typos, bad flag values, no agent, --json errors).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { chmodSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { SignalServer } from "../../signaling/server.js";
import { startServer, tmpDir, waitFor } from "../helpers/cluster.js";

const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const TOKEN = "cli-output-8Kp1Lm7Xr2Tn5Wb9Yc4Hd6Jf0GsQz3v";

const run = (args: string[], env: Record<string, string> = {}, opts: { uid?: number; gid?: number } = {}) => {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "", WEFTNET_LOG: "", WEFTNET_LOG_FORMAT: "", ...env }, timeout: 30_000, ...opts });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

interface Proc {
  child: ChildProcess;
  out: () => string;
  err: () => string;
  exited: Promise<number | null>;
}

function start(args: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "", WEFTNET_LOG: "", WEFTNET_LOG_FORMAT: "", ...env } });
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  return { child, out: () => out, err: () => err, exited };
}

async function stop(p: Proc): Promise<void> {
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGTERM");
  await p.exited;
}

/** JSON log lines of a process (stderr, not a TTY: JSON by default). */
const logs = (p: Proc) =>
  p
    .err()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as { level: string; msg: string; component: string; [k: string]: unknown });

function closedPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

/** A row of a table printed by table(): split on runs of 2+ spaces. */
const cells = (line: string) => line.trim().split(/\s{2,}/);
const RTT_RE = /^(<1ms|\d+ms|\d+\.\d{1,2}ms|-)$/;

/** `weftnet signal` as its own process: the CLI calls below are synchronous and would stall an in-process server. */
async function startSignalProc(): Promise<{ p: Proc; url: string; stunPort: number }> {
  const p = start(["signal", "--listen", "127.0.0.1:0", "--stun-port", String(await closedPort()), "--token", TOKEN]);
  await waitFor(() => /listening on ws:\/\/127\.0\.0\.1:\d+ \(STUN on udp\/\d+\)/.test(p.out()) || p.child.exitCode !== null, 10_000, "signal listening");
  const m = /listening on (ws:\/\/127\.0\.0\.1:\d+) \(STUN on udp\/(\d+)\)/.exec(p.out());
  if (!m) throw new Error(`signal did not start: ${p.out()} ${p.err()}`);
  return { p, url: m[1]!, stunPort: Number(m[2]) };
}

describe("weftnet status / ping / netcheck / agent logs against a live mesh", () => {
  let server: { p: Proc; url: string; stunPort: number };
  const dirs: string[] = [];
  const agents: Record<string, Proc> = {};
  const dir = (n: string) => dirs[["a", "b", "c"].indexOf(n)]!;

  beforeAll(async () => {
    server = await startSignalProc();
    for (const n of ["a", "b", "c"]) {
      dirs.push(tmpDir(`weft-cliout-${n}-`));
      agents[n] = start(["agent", "--no-tun", "--loopback-only", "--signal", server.url, "--token", TOKEN, "--name", n, "--state-dir", dir(n)]);
    }
    // A full mesh (on a loaded box a WebRTC attempt can time out after 10 s; that pair then runs over the
    // relay, which is a path like any other here).
    await waitFor(() =>
      ["a", "b", "c"].every((n) => {
        const r = run(["status", "--json", "--state-dir", dir(n)]);
        if (r.code !== 0) return false;
        const st = JSON.parse(r.out) as { peers: { state: string }[] };
        return st.peers.filter((p) => p.state === "connected").length === 2;
      }), 50_000, "a full mesh");
  }, 70_000);

  afterAll(async () => {
    await Promise.all(Object.values(agents).map(stop));
    if (server) await stop(server.p);
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it("status: header with this node's blocks and pods, peers x/y, honest RTTs; --json has the same", () => {
    const r = run(["status", "--state-dir", dir("a")]);
    expect(r.code, r.err).toBe(0);
    const lines = r.out.split("\n");
    expect(lines[0]).toMatch(/^node\s+a \([0-9a-f]{16}\)$/);
    expect(lines.find((l) => l.startsWith("blocks"))).toMatch(/^blocks\s+(none yet|\d+\.\d+\.\d+\.\d+\/\d+.* \(\d+ blocks?\)), \d+ pods?$/);
    expect(lines.find((l) => l.startsWith("peers"))).toMatch(/^peers\s+2\/2 connected$/);
    const hi = lines.findIndex((l) => l.startsWith("PEER"));
    const header = cells(lines[hi]!);
    const rows = lines.slice(hi + 1).filter(Boolean).map(cells);
    expect(rows.map((c) => c[0]).sort()).toEqual(["b", "c"]);
    for (const row of rows) {
      expect(row[header.indexOf("STATE")]).toBe("connected");
      expect(row[header.indexOf("PATH")]).toMatch(/^(direct|bulk|turn|relay|via \S+( \((bulk|webrtc|turn|relay)\))?)$/);
      expect(row[header.indexOf("RTT")]).toMatch(RTT_RE);
      expect(row[header.indexOf("RTT")]).not.toMatch(/^\d+\.0ms$/); // no fake decimal on whole-ms values
    }
    const js = JSON.parse(run(["status", "--json", "--state-dir", dir("a")]).out) as { node: { blocks: string[]; blockCount: number; pods: number }; peers: { lastSeenAgoMs: number | null }[] };
    expect(Array.isArray(js.node.blocks)).toBe(true);
    expect(typeof js.node.pods).toBe("number");
    expect(js.peers.every((p) => typeof p.lastSeenAgoMs === "number")).toBe(true);
  });

  it("status ipam: one row per owner, JSON small; --blocks lists every block", async () => {
    await waitFor(() => (JSON.parse(run(["status", "ipam", "--json", "--state-dir", dir("a")]).out) as { totalBlocks: number }).totalBlocks > 0, 20_000, "the mesh's IPAM bootstrapped");
    // The text and the JSON are two calls: blocks may change hands between them while members pin their
    // reserves, so take a pair of calls that saw the same owners (a real mismatch never settles).
    type IpamJson = { owners: { id: string; blocks: number; cidrs: string[] }[]; blocks?: unknown[]; totalBlocks: number };
    let r = run(["status", "ipam", "--state-dir", dir("a")]);
    let js = {} as IpamJson;
    const ownerRows = () => r.out.split("\n").filter((l) => /\s[0-9a-f]{16}\s/.test(l));
    await waitFor(
      () => {
        r = run(["status", "ipam", "--state-dir", dir("a")]);
        js = JSON.parse(run(["status", "ipam", "--json", "--state-dir", dir("a")]).out) as IpamJson;
        return ownerRows().length === js.owners.length && js.owners.every((o) => r.out.includes(o.id));
      },
      20_000,
      "status ipam's owner rows match its JSON owners",
    );
    expect(r.code, r.err).toBe(0);
    expect(r.out).toMatch(/^range\s+10\.40\.0\.0\/16 \(1024 blocks of \/26, \d+ unowned\)$/m);
    expect(js.totalBlocks).toBe(1024);
    expect(js.blocks).toBeUndefined();
    expect(new Set(js.owners.map((o) => o.id)).size).toBe(js.owners.length);
    expect(ownerRows()).toHaveLength(js.owners.length);
    const full = JSON.parse(run(["status", "ipam", "--json", "--blocks", "--state-dir", dir("a")]).out) as { blocks: unknown[] };
    expect(full.blocks).toHaveLength(1024);
  }, 30_000);

  it("ping: every reply names its path; --json has path per reply", () => {
    const r = run(["ping", "b", "--count", "2", "--state-dir", dir("a")]);
    expect(r.code, r.err).toBe(0);
    const replies = r.out.split("\n").filter((l) => l.startsWith("reply"));
    expect(replies).toHaveLength(2);
    for (const l of replies) expect(l).toMatch(/^reply from b \([0-9a-f]{16}\) (direct|turn|relay|bulk|via \S+): time=(\d+\.\d{1,2}|\d+)ms$/);
    expect(r.out).toMatch(/^2 sent, 2 received, min\/median\/max \S+\/\S+\/\S+, path (direct|turn|relay|bulk)/m);
    const js = JSON.parse(run(["ping", "b", "-c", "2", "--json", "--state-dir", dir("a")]).out) as { rttMs: number[]; path: string[]; lost: number };
    expect(js.rttMs).toHaveLength(2);
    expect(js.path).toHaveLength(2);
    expect(js.lost).toBe(0);
  });

  it("agent logs: JSON lines when stderr is not a TTY, an info line per peer up", async () => {
    // (the synchronous CLI calls above keep this process from reading the agents' pipes meanwhile)
    await waitFor(() => new Set(logs(agents.a!).filter((l) => l.msg === "peer connected").map((l) => l.peerName)).size === 2, 5_000, "a's peer up lines");
    const up = logs(agents.a!).filter((l) => l.msg === "peer connected");
    expect(up.map((l) => l.peerName).sort()).toEqual(expect.arrayContaining(["b", "c"]));
    expect(up.every((l) => l.level === "info")).toBe(true);
  });

  it("netcheck: checks the signaling URL (DNS, TCP, WebSocket, hello) and says which STUN it used", () => {
    const r = run(["netcheck", "--json", "--state-dir", dir("a")]);
    expect(r.code, r.out + r.err).toBe(0);
    const js = JSON.parse(r.out) as { ok: boolean; signal: { ok: boolean; dns: { ok: boolean }; tcp: { ok: boolean }; websocket: { ok: boolean }; hello: { ok: boolean } }; stun: { servers: string[]; source: string; sources: { server: string; source: string }[] }; ipv6: { addresses: string[] } };
    expect(js.ok).toBe(true);
    expect(js.signal).toMatchObject({ ok: true, dns: { ok: true }, tcp: { ok: true }, websocket: { ok: true }, hello: { ok: true } });
    expect(js.stun.servers).toEqual([`127.0.0.1:${server.stunPort}`]);
    expect(js.stun.sources).toEqual([{ server: `127.0.0.1:${server.stunPort}`, source: "signaling server" }]);
    expect(Array.isArray(js.ipv6.addresses)).toBe(true);
    const text = run(["netcheck", "--state-dir", dir("a")]).out;
    expect(text).toMatch(/^STUN\s+127\.0\.0\.1:\d+ \(signaling server\)$/m);
    expect(text).toMatch(/^\s+hello\s+ok\s/m);
  });

  it("a peer that stops: stopped line, down line at the others, gone with last-seen, not counted; ping reports it once", async () => {
    await stop(agents.c!);
    expect(agents.c!.out()).toMatch(/^weftnet agent c stopped \(SIGTERM\)$/m);
    await waitFor(() => logs(agents.a!).some((l) => l.msg === "peer disconnected" && l.peerName === "c"), 10_000, "a logs c down");
    const down = logs(agents.a!).find((l) => l.msg === "peer disconnected" && l.peerName === "c")!;
    expect(down.level).toBe("info");
    let out = "";
    await waitFor(() => {
      out = run(["status", "--state-dir", dir("a")]).out;
      return /^c\s.*\sgone\s/m.test(out);
    }, 10_000, "c gone in a's status");
    expect(out).toMatch(/^peers\s+1\/1 connected \(1 gone, forgotten 5 min after they left\)$/m);
    expect(out).toMatch(/^c\s.*last seen \d+s ago: /m);
    const active = run(["status", "--active", "--state-dir", dir("a")]).out;
    expect(active).not.toMatch(/^c\s/m);
    expect(active).toMatch(/^b\s/m);

    const p = run(["ping", "c", "--state-dir", dir("a")]);
    expect(p.code).toBe(1);
    expect(p.out).toBe("");
    expect(p.err.trim().split("\n")).toHaveLength(1);
    expect(p.err).toMatch(/^weftnet ping: c: not connected/);
    const pj = JSON.parse(run(["ping", "c", "--json", "--state-dir", dir("a")]).out) as { rttMs: number[]; lost: number; error: { code: string } };
    expect(pj).toMatchObject({ rttMs: [], lost: 3, error: { code: "ERR_NOT_CONNECTED" } });
  }, 40_000);
});

describe("weftnet error messages, one line each", () => {
  let server: SignalServer;
  const dirs: string[] = [];
  const d = (p: string) => {
    const x = tmpDir(p);
    dirs.push(x);
    return x;
  };
  beforeAll(async () => {
    server = await startServer(TOKEN);
  });
  afterAll(async () => {
    await server?.close().catch(() => {});
    for (const x of dirs) rmSync(x, { recursive: true, force: true });
  });

  it("wrong token: exit 1 and exactly one error line (JSON when not a TTY, text with --log-format text)", async () => {
    for (const fmt of ["json", "text"]) {
      const p = start(["agent", "--no-tun", "--loopback-only", "--signal", server.url, "--token", "wrong", "--state-dir", d("weft-cli-tok-"), ...(fmt === "text" ? ["--log-format", "text"] : [])]);
      expect(await p.exited).toBe(1);
      const errLines = p.err().split("\n").filter((l) => /refused this agent/.test(l));
      expect(errLines, p.err()).toHaveLength(1);
      if (fmt === "json") expect(JSON.parse(errLines[0]!)).toMatchObject({ level: "error", code: "ERR_BAD_TOKEN" });
      else expect(errLines[0]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} ERROR agent\s+signaling server refused this agent: bad token/);
      expect(p.err()).not.toMatch(/\x1b\[/); // no colour codes into a pipe
      expect(p.out()).toMatch(/stopped \(ERR_BAD_TOKEN\)/);
    }
  }, 30_000);

  it("closed signaling port: an ECONNREFUSED warning at once, not after the 10 s registration timeout", async () => {
    const port = await closedPort();
    const p = start(["agent", "--no-tun", "--loopback-only", "--signal", `ws://127.0.0.1:${port}`, "--token", "t", "--state-dir", d("weft-cli-port-")]);
    try {
      await waitFor(() => logs(p).some((l) => l.level === "warn" && /ECONNREFUSED/.test(String(l.err))), 5_000, "ECONNREFUSED warning");
      expect(logs(p).filter((l) => /ECONNREFUSED/.test(String(l.err)) && l.level === "warn")).toHaveLength(1);
    } finally {
      await stop(p);
    }
  }, 20_000);

  it("agent: WEFTNET_SIGNAL and --config give the signaling URL; flags win over both", async () => {
    const [p1, p2] = [await closedPort(), await closedPort()];
    const conf = join(d("weft-cli-conf-"), "agent.json");
    writeFileSync(conf, JSON.stringify({ signal: `ws://127.0.0.1:${p2}`, token: "t", "no-tun": true, "loopback-only": true }));
    const cases: [string[], Record<string, string>, number][] = [
      [["agent", "--no-tun", "--loopback-only", "--token", "t"], { WEFTNET_SIGNAL: `ws://127.0.0.1:${p1}` }, p1],
      [["agent", "--config", conf], {}, p2],
      [["agent", "--config", conf, "--signal", `ws://127.0.0.1:${p1}`], {}, p1],
    ];
    for (const [args, env, port] of cases) {
      const p = start([...args, "--state-dir", d("weft-cli-env-")], env);
      try {
        await waitFor(() => /started; .* signaling ws:\/\/127\.0\.0\.1:(\d+)/.test(p.out()) || p.child.exitCode !== null, 10_000, "agent started");
        expect(p.out(), p.err()).toMatch(new RegExp(`signaling ws://127\\.0\\.0\\.1:${port}/`));
      } finally {
        await stop(p);
      }
    }
    writeFileSync(conf, JSON.stringify({ signl: "ws://x:1" }));
    expect(run(["agent", "--config", conf]).err).toMatch(/--config .*: unknown option "signl" \(did you mean "signal"\?\)/);
    writeFileSync(conf, JSON.stringify({ "no-relay": "yes" }));
    expect(run(["agent", "--config", conf]).err).toMatch(/"no-relay" must be true or false/);
  }, 40_000);

  it("typos get a suggestion, flag errors name the flag, no doubled prefix", () => {
    const cases: [string[], RegExp][] = [
      [["stauts"], /^weftnet: unknown command "stauts" \(did you mean `weftnet status`\?\)/],
      [["status", "--jsn"], /^weftnet status: unknown option --jsn \(did you mean --json\?\)/],
      [["status", "ipma"], /^weftnet status: unknown section "ipma" \(did you mean `weftnet status ipam`\?\)/],
      [["ping", "x", "--cont", "2"], /^weftnet ping: unknown option --cont \(did you mean --count\?\)/],
      [["signal", "--verbos"], /^weftnet signal: unknown option --verbos \(did you mean --verbose\?\)/],
      [["ping", "--count"], /^weftnet ping: --count needs a value/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--range", "10.40.0.0/33"], /^weftnet agent: --range 10\.40\.0\.0\/33: bad prefix length/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--range", "10.40.0.1/16"], /^weftnet agent: --range 10\.40\.0\.1\/16: .*host bits set/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--log-level", "loud"], /^weftnet agent: --log-level "loud" must be one of debug, info, warn, error/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--log-format", "xml"], /^weftnet agent: --log-format "xml" must be auto, text or json/],
      [["signal", "--log-level", "loud"], /^weftnet signal: --log-level "loud" must be one of/],
      [["netcheck", "--signal", "ftp://x"], /^weftnet netcheck: --signal must be a ws:\/\/ or wss:\/\/ URL/],
    ];
    for (const [args, re] of cases) {
      const r = run(args);
      expect(r.code, `${args.join(" ")}: ${r.err}`).toBe(2);
      expect(r.err.trim().split("\n"), args.join(" ")).toHaveLength(1);
      expect(r.err, args.join(" ")).toMatch(re);
      expect(r.err).not.toMatch(/weftnet: weftnet/);
    }
  });

  it("--json: errors are JSON on stdout too", () => {
    const r = run(["status", "--json", "--state-dir", d("weft-cli-json-")]);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.out)).toMatchObject({ error: { code: "ERR_NO_AGENT", message: expect.stringMatching(/no agent is running/) } });
    const u = run(["status", "--json", "--bogus"]);
    expect(u.code).toBe(2);
    expect(JSON.parse(u.out)).toMatchObject({ error: { code: "ERR_USAGE" } });
  });

  it("signal takes --log-level and --log-format", async () => {
    const p = start(["signal", "--listen", "127.0.0.1:0", "--stun-port", "0", "--token", TOKEN, "--log-level", "debug", "--log-format", "text"]);
    try {
      await waitFor(() => /listening on/.test(p.out()), 10_000, "signal listening");
    } finally {
      await stop(p);
    }
    expect(p.out()).toMatch(/^weftnet signal stopped$/m);
    expect(p.err()).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO  weftnet-signal\s+shutting down/m);
  }, 20_000);

  it("status as a non-root user, no agent of theirs: points at sudo and --state-dir", () => {
    if (process.getuid?.() !== 0) return; // needs root to run the CLI as another user
    const home = d("weft-cli-home-");
    chmodSync(home, 0o777);
    mkdirSync(join(home, "state"), { mode: 0o777 });
    const r = run(["status"], { HOME: home, XDG_STATE_HOME: join(home, "state") }, { uid: 65534, gid: 65534 });
    expect(r.code, r.err).toBe(1);
    expect(r.err.trim().split("\n")).toHaveLength(1);
    expect(r.err).toMatch(/no agent is running .*sudo.*--state-dir/);
  });
});
