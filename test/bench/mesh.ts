/**
 * npm run bench:mesh -- --agents N [--runs R] [--transport werift|native|auto]
 * Starts a signaling server and N agent processes (real `weftnet agent`, werift on loopback), measures the
 * time from launch to a full mesh (N*(N-1)/2 links up, seen from every agent's local API) and each
 * agent's RSS once meshed and after 5 s idle. Prints figures; never fails on a time.
 */
import type { ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { apiRequest } from "../../agent/api-client.js";
import { apiSocketPath } from "../../agent/state.js";
import { children, freePort, spawnCli, stopAll } from "./util.js";

const { values } = parseArgs({ options: { agents: { type: "string", default: "8" }, runs: { type: "string", default: "1" }, transport: { type: "string", default: "werift" } } });
const N = Number(values.agents);
const RUNS = Number(values.runs);
if (!Number.isInteger(N) || N < 2 || !Number.isInteger(RUNS) || RUNS < 1) {
  process.stderr.write("usage: npm run bench:mesh -- --agents N (N >= 2) [--runs R]\n");
  process.exit(2);
}
const rssMiB = (pid: number) => {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) / 1024 : NaN;
};
const stats = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return { min: s[0]!, median: s[Math.floor(s.length / 2)]!, max: s[s.length - 1]! };
};

async function once(run: number): Promise<{ meshMs: number; rss: number[]; rssIdle: number[] }> {
  const root = mkdtempSync(join(tmpdir(), "weft-bench-"));
  const port = await freePort();
  const stun = await freePort();
  const token = "bench-token-" + Math.random().toString(36).slice(2);
  const server = spawnCli(["signal", "--listen", `127.0.0.1:${port}`, "--stun-port", String(stun), "--token", token]);
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(`http://127.0.0.1:${port}/healthz`)).ok) break;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  const t0 = performance.now();
  const agents: ChildProcess[] = [];
  for (let i = 0; i < N; i++) {
    agents.push(spawnCli(["agent", "--signal", `ws://127.0.0.1:${port}`, "--token", token, "--name", `n${i}`, "--state-dir", join(root, `n${i}`), "--no-tun", "--loopback-only", "--transport", values.transport!]));
  }
  let meshMs = NaN;
  for (;;) {
    const counts = await Promise.all(
      agents.map((_, i) =>
        apiRequest<{ peers: { state: string }[] }>(apiSocketPath(join(root, `n${i}`)), "GET", "/v1/status", undefined, 5000).then(
          (s) => s.peers.filter((p) => p.state === "connected").length,
          () => 0,
        ),
      ),
    );
    const links = counts.reduce((a, b) => a + b, 0) / 2;
    if (counts.every((c) => c === N - 1)) {
      meshMs = performance.now() - t0;
      break;
    }
    if (performance.now() - t0 > 120_000) {
      process.stderr.write(`run ${run}: no full mesh after 120 s (${links}/${(N * (N - 1)) / 2} links)\n`);
      break;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const rss = agents.map((a) => rssMiB(a.pid!));
  const counters = await Promise.all(agents.map((_, i) => apiRequest<{ counters: { dials: number; connectTimeouts: number; relayLinks: number } }>(apiSocketPath(join(root, `n${i}`)), "GET", "/v1/status").then((s) => s.counters)));
  const dials = counters.reduce((a, c) => a + c.dials, 0);
  const timeouts = counters.reduce((a, c) => a + c.connectTimeouts, 0);
  // relayLinks counts both ends of a relayed pair; a pair whose first WebRTC attempt failed starts on the relay
  const relayed = counters.reduce((a, c) => a + (c.relayLinks ?? 0), 0) / 2;
  process.stdout.write(`run ${run}: ${dials} dials for ${(N * (N - 1)) / 2} links, ${timeouts} connect timeouts, ${relayed} pairs started on the relay\n`);
  await new Promise((r) => setTimeout(r, 5000));
  const rssIdle = agents.map((a) => rssMiB(a.pid!));
  await stopAll(agents);
  await stopAll([server]);
  rmSync(root, { recursive: true, force: true });
  return { meshMs, rss, rssIdle };
}

process.on("SIGINT", async () => {
  await stopAll(children);
  process.exit(130);
});

const results = [];
for (let r = 1; r <= RUNS; r++) {
  const res = await once(r);
  results.push(res);
  const rs = stats(res.rss);
  const ri = stats(res.rssIdle);
  process.stdout.write(
    `run ${r}: ${N} ${values.transport} agents, ${(N * (N - 1)) / 2} links: full mesh in ${(res.meshMs / 1000).toFixed(2)} s; ` +
      `agent RSS at mesh min/median/max ${rs.min.toFixed(0)}/${rs.median.toFixed(0)}/${rs.max.toFixed(0)} MiB, after 5 s idle ${ri.min.toFixed(0)}/${ri.median.toFixed(0)}/${ri.max.toFixed(0)} MiB\n`,
  );
}
if (RUNS > 1) process.stdout.write(`median full-mesh time over ${RUNS} runs: ${(stats(results.map((r) => r.meshMs)).median / 1000).toFixed(2)} s\n`);
