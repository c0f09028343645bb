/**
 * bench:signal — N simulated agents against one signaling server: real WebSockets, real hellos (join-key
 * MAC + Ed25519 signature over the server's nonce) and real offers forwarded between them.
 *
 *   npm run bench:signal -- [--n 1000,10000] [--runtime node,workerd] [--concurrency 200] [--offers 1]
 *
 * Per run it prints: join latency p50/p99 (connect start -> welcome, with `concurrency` joins in flight),
 * server RSS after all have joined, server CPU per join (utime+stime of the server process over the join
 * phase / N), offers forwarded and their delivery latency, and for workerd its ratio to Node at the same N
 * (same run). The server is a separate process (`weftnet signal`, or workerd with the Workers build), so
 * RSS and CPU are its own. Simulated agents do not decode presence frames (they count bytes); the server
 * sends every one of them. Figures are noisy on a shared box; ratios from one run are what to compare.
 */
import { readdirSync, readFileSync } from "node:fs";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import WebSocket from "ws";
import { CTX_HELLO, CTX_SDP, generateIdentity, joinKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { decodeServerMsg, encodeSignal, SIGNAL_PATH } from "../../src/wire/signal.js";
import { workerdRuntime, type SignalTarget } from "../helpers/signal-runtimes.js";
import { children, freePort, spawnCli, stopAll } from "./util.js";

const TOKEN = "bench-signal-token-0123456789abcdefgh";
const JOIN_KEY = joinKeyOf(TOKEN);
const WELCOME = Buffer.from("welcome");

interface Server {
  url: string;
  pid: number;
  close(): Promise<void>;
}

function statOf(pid: number): { ppid: number; ticks: number; rssKb: number } | undefined {
  try {
    const status = readFileSync(`/proc/${pid}/status`, "utf8");
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return { ppid: Number(f[1]), ticks: Number(f[11]) + Number(f[12]), rssKb: Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) };
  } catch {
    return undefined;
  }
}

/** RSS and CPU (utime+stime) of a process and its descendants (npm's workerd launcher runs the binary as a child). */
function procStats(pid: number): { rssMb: number; cpuS: number } {
  const all = new Map<number, { ppid: number; ticks: number; rssKb: number }>();
  for (const d of readdirSync("/proc")) {
    if (!/^\d+$/.test(d)) continue;
    const s = statOf(Number(d));
    if (s) all.set(Number(d), s);
  }
  const tree = new Set([pid]);
  for (let grew = true; grew; ) {
    grew = false;
    for (const [p, s] of all) if (!tree.has(p) && tree.has(s.ppid)) (tree.add(p), (grew = true));
  }
  let rssKb = 0;
  let ticks = 0;
  for (const p of tree) {
    const s = all.get(p);
    if (s) (rssKb += s.rssKb), (ticks += s.ticks);
  }
  return { rssMb: rssKb / 1024, cpuS: ticks / 100 };
}

async function waitHealthy(url: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    try {
      if ((await fetch(url.replace(/^ws/, "http") + "/healthz")).ok) return;
    } catch {
      /* not yet */
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`server at ${url} did not come up`);
}

async function startNode(n: number): Promise<Server> {
  const port = await freePort();
  const c = spawnCli(["signal", "--listen", `127.0.0.1:${port}`, "--stun-port", "0", "--token", TOKEN, "--max-sessions", String(n + 100), "--max-sessions-per-ip", String(n + 100), "--log-level", "warn"]);
  const url = `ws://127.0.0.1:${port}`;
  await waitHealthy(url);
  return { url, pid: c.pid!, close: () => stopAll([c]) };
}

async function startWorkerd(n: number): Promise<Server> {
  const t: SignalTarget = await workerdRuntime.start({ token: TOKEN, limits: { maxSessions: n + 100, maxSessionsPerIp: n + 100 } });
  return { url: t.url, pid: t.proc!.pid!, close: () => t.close() };
}

class SimAgent {
  ws!: WebSocket;
  joinMs = -1;
  bytesIn = 0;
  offersIn = 0;
  offerLatencies: number[] = [];
  constructor(readonly idn: Identity) {}

  join(url: string): Promise<void> {
    const t0 = performance.now();
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url + SIGNAL_PATH, { perMessageDeflate: false, maxPayload: 1 << 20 });
      this.ws = ws;
      ws.binaryType = "nodebuffer";
      let state: "challenge" | "welcome" | "member" = "challenge";
      ws.on("message", (data: Buffer) => {
        this.bytesIn += data.byteLength;
        if (state === "member") {
          // offers carry the send time in their conn id; everything else (presence) is only counted
          if (data.includes("bench-offer")) {
            const m = decodeServerMsg(data);
            if (m.t === "signal" && m.data.kind === "offer") {
              this.offersIn++;
              this.offerLatencies.push(performance.now() - Number(m.data.conn.split(":")[1]));
            }
          }
          return;
        }
        if (state === "challenge") {
          const m = decodeServerMsg(data);
          if (m.t !== "challenge") return;
          const id = this.idn.id;
          ws.send(encodeSignal({ t: "hello", id, pub: this.idn.publicKey, name: `sim-${id.slice(0, 6)}`, instance: "bench", meta: { version: "bench" }, mac: tokenMac(JOIN_KEY, CTX_HELLO, m.nonce, id, "bench"), sig: signFields(this.idn, CTX_HELLO, m.nonce, id, "bench") }));
          state = "welcome";
          return;
        }
        if (data.subarray(0, 16).includes(WELCOME)) {
          this.joinMs = performance.now() - t0;
          state = "member";
          resolve();
        }
      });
      ws.once("close", (code, reason) => {
        if (state !== "member") reject(new Error(`closed ${code} ${reason.toString()} before welcome`));
      });
      ws.once("error", (e) => {
        if (state !== "member") reject(e);
      });
    });
  }

  offer(to: SimAgent): void {
    const conn = `bench-offer:${performance.now()}`;
    const fields = [this.idn.id, to.idn.id, conn, "sha-256 00:11"] as const;
    const sdp = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 10.0.0.1 5000 typ host\r\n".repeat(12);
    this.ws.send(encodeSignal({ t: "signal", to: to.idn.id, data: { kind: "offer", conn, sdp, sig: signFields(this.idn, CTX_SDP, ...fields), mac: tokenMac(JOIN_KEY, CTX_SDP, ...fields) } }));
  }
}

const pct = (xs: number[], p: number) => {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]!;
};

interface Result {
  runtime: string;
  n: number;
  joinP50: number;
  joinP99: number;
  rssMb: number;
  rssIdleMb: number;
  cpuMsPerJoin: number;
  joinWallS: number;
  offersSent: number;
  offersDelivered: number;
  offerP50: number;
  offerP99: number;
  mibToAgents: number;
  /** server side: hello received -> welcome sent (GET /v1/stats joinMs), ms */
  serverJoinP50: number;
  serverJoinP99: number;
  /** the bench client's own event-loop delay p99 during the joins (its share of the measured join time), ms */
  clientLagP99: number;
}

async function run(runtime: "node" | "workerd", n: number, concurrency: number, offersPer: number): Promise<Result> {
  const ids: Identity[] = [];
  for (let i = 0; i < n; i++) ids.push(generateIdentity());
  const server = runtime === "node" ? await startNode(n) : await startWorkerd(n);
  const agents = ids.map((i) => new SimAgent(i));
  try {
    await new Promise((r) => setTimeout(r, 500));
    const idle = procStats(server.pid);
    const lag = monitorEventLoopDelay({ resolution: 10 });
    lag.enable();
    const t0 = performance.now();
    let next = 0;
    const worker = async () => {
      while (next < agents.length) {
        const a = agents[next++]!;
        await a.join(server.url);
      }
    };
    await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
    const joinWallS = (performance.now() - t0) / 1000;
    lag.disable();
    let serverJoin = { p50: NaN, p99: NaN };
    try {
      const r = await fetch(server.url.replace(/^ws/, "http") + "/v1/stats", { headers: { Authorization: `Bearer ${TOKEN}` } });
      serverJoin = ((await r.json()) as { joinMs?: { p50: number; p99: number } }).joinMs ?? serverJoin;
    } catch {
      /* an older server: not reported */
    }
    // let the last presence batches drain before measuring
    await new Promise((r) => setTimeout(r, 1_000));
    const joined = procStats(server.pid);
    // offers: each agent sends `offersPer` offers to random peers
    let sent = 0;
    for (const [i, a] of agents.entries()) {
      for (let k = 0; k < offersPer; k++) {
        a.offer(agents[(i + 1 + Math.floor(Math.random() * (n - 1))) % n]!); // any peer but itself
        sent++;
      }
    }
    const deadline = Date.now() + 30_000;
    const delivered = () => agents.reduce((s, a) => s + a.offersIn, 0);
    while (delivered() < sent && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    const lat = agents.flatMap((a) => a.offerLatencies);
    const joins = agents.map((a) => a.joinMs);
    return {
      runtime,
      n,
      joinP50: pct(joins, 50),
      joinP99: pct(joins, 99),
      rssMb: joined.rssMb,
      rssIdleMb: idle.rssMb,
      cpuMsPerJoin: ((joined.cpuS - idle.cpuS) * 1000) / n,
      joinWallS,
      offersSent: sent,
      offersDelivered: delivered(),
      offerP50: pct(lat, 50),
      offerP99: pct(lat, 99),
      mibToAgents: agents.reduce((s, a) => s + a.bytesIn, 0) / 1048576,
      serverJoinP50: serverJoin.p50,
      serverJoinP99: serverJoin.p99,
      clientLagP99: lag.percentile(99) / 1e6,
    };
  } finally {
    for (const a of agents) a.ws?.terminate();
    await server.close();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { n: { type: "string", default: "1000,10000" }, runtime: { type: "string", default: "node,workerd" }, concurrency: { type: "string", default: "50" }, offers: { type: "string", default: "1" }, "workerd-max": { type: "string", default: "1000" } } });
  const ns = values.n!.split(",").map(Number);
  const runtimes = values.runtime!.split(",") as ("node" | "workerd")[];
  const workerdMax = Number(values["workerd-max"]);
  const results: Result[] = [];
  console.log(`bench:signal  concurrency ${values.concurrency} joins in flight, ${values.offers} offer(s) per agent; one box, noisy: compare ratios`);
  for (const n of ns) {
    for (const rt of runtimes) {
      if (rt === "workerd") {
        const why = workerdRuntime.unavailable();
        if (why) {
          console.log(`workerd  N=${n}: skipped: ${why}`);
          continue;
        }
        if (n > workerdMax) {
          console.log(`workerd  N=${n}: skipped (--workerd-max ${workerdMax})`);
          continue;
        }
      }
      const r = await run(rt, n, Number(values.concurrency), Number(values.offers));
      results.push(r);
      const base = results.find((x) => x.runtime === "node" && x.n === n);
      const ratio = rt !== "node" && base ? `  vs node: join p99 x${(r.joinP99 / base.joinP99).toFixed(2)}, cpu/join x${(r.cpuMsPerJoin / base.cpuMsPerJoin).toFixed(2)}, rss x${(r.rssMb / base.rssMb).toFixed(2)}` : "";
      console.log(
        `${rt.padEnd(8)} N=${String(n).padStart(5)}  join p50 ${r.joinP50.toFixed(1)} ms  p99 ${r.joinP99.toFixed(1)} ms  (all joined in ${r.joinWallS.toFixed(1)} s)  ` +
          `RSS ${r.rssMb.toFixed(0)} MB (idle ${r.rssIdleMb.toFixed(0)})  CPU/join ${r.cpuMsPerJoin.toFixed(2)} ms  ` +
          `server hello->welcome p50 ${r.serverJoinP50.toFixed(0)} ms p99 ${r.serverJoinP99.toFixed(0)} ms  bench client loop delay p99 ${r.clientLagP99.toFixed(0)} ms  ` +
          `offers ${r.offersDelivered}/${r.offersSent} p50 ${r.offerP50.toFixed(1)} ms p99 ${r.offerP99.toFixed(1)} ms  presence+welcome to agents ${r.mibToAgents.toFixed(0)} MiB${ratio}`,
      );
    }
  }
  const n10k = results.find((r) => r.runtime === "node" && r.n === 10_000);
  if (n10k) console.log(`target 10,000 on Node: RSS ${n10k.rssMb.toFixed(0)} MB (<= 500), join p99 ${n10k.joinP99.toFixed(0)} ms (<= 1000)`);
  const w1k = results.find((r) => r.runtime === "workerd" && r.n === 1000);
  const n1k = results.find((r) => r.runtime === "node" && r.n === 1000);
  if (w1k && n1k) console.log(`target workerd within 2x of Node at 1,000: join p99 x${(w1k.joinP99 / n1k.joinP99).toFixed(2)}, CPU/join x${(w1k.cpuMsPerJoin / n1k.cpuMsPerJoin).toFixed(2)}`);
}

main()
  .catch((e) => {
    console.error(e);
    process.exitCode = 1;
  })
  .finally(() => stopAll(children));
