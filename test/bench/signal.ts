/**
 * bench:signal — N simulated agents against one signaling server: real WebSockets, real hellos (join-key
 * MAC + Ed25519 signature over the server's nonce) and real offers forwarded between them.
 *
 *   npm run bench:signal -- [--n 1000,10000] [--runtime node,workerd] [--concurrency 50] [--threads 4] [--offers 1]
 *
 * Per run it prints: join latency p50/p99 (connect start -> welcome, with `concurrency` joins in flight),
 * server RSS after all have joined, server CPU per join (utime+stime of the server process over the join
 * phase / N), offers forwarded and their delivery latency, and for workerd its ratio to Node at the same N
 * (same run). Simulated agents run in --threads worker threads; an offer goes to a random agent of the same
 * thread. The server is a separate process (`weftnet signal`, or workerd with the Workers build), so
 * RSS and CPU are its own. Simulated agents do not decode presence frames (they count bytes); the server
 * sends every one of them. workerd freezes its clock while a request runs, so its server-side join time
 * reads ~0. Figures are noisy on a shared box; ratios from one run are what to compare.
 */
import { readdirSync, readFileSync } from "node:fs";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
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
  /** phases of the join, ms from its start: WebSocket open (TCP + upgrade), challenge received */
  openMs = -1;
  challengeMs = -1;
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
      ws.once("open", () => (this.openMs = performance.now() - t0));
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
          this.challengeMs = performance.now() - t0;
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
  /** p99 of the join's phases as the client saw them: connect+upgrade, open -> challenge, challenge -> welcome */
  openP99: number;
  challengeP99: number;
  helloToWelcomeP99: number;
}

/** What a worker thread reports: its agents' join phases, loop delay, bytes, and later the offers it received. */
interface WorkerJoined {
  joins: number[];
  opens: number[];
  challenges: number[];
  hellos: number[];
  lagP99: number;
}
interface WorkerOffers {
  sent: number;
  delivered: number;
  latencies: number[];
  bytesIn: number;
}

/**
 * Simulated agents run in `threads` worker threads (each its own event loop and sockets): one loop
 * receiving every agent's presence (9 GB at 10,000) made the client's own delay the largest part of the
 * measured join time (event-loop delay p99 1.6 s at 10,000 with one thread).
 */
async function workerMain(): Promise<void> {
  const { url, n, concurrency } = workerData as { url: string; n: number; concurrency: number };
  const agents = Array.from({ length: n }, () => new SimAgent(generateIdentity()));
  const port = parentPort!;
  port.postMessage({ t: "ready" });
  await new Promise<void>((r) => port.once("message", () => r()));
  const lag = monitorEventLoopDelay({ resolution: 10 });
  lag.enable();
  let next = 0;
  const joiner = async () => {
    while (next < agents.length) await agents[next++]!.join(url);
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(concurrency, n)) }, joiner));
  lag.disable();
  const joined: WorkerJoined = { joins: agents.map((a) => a.joinMs), opens: agents.map((a) => a.openMs), challenges: agents.map((a) => a.challengeMs - a.openMs), hellos: agents.map((a) => a.joinMs - a.challengeMs), lagP99: lag.percentile(99) / 1e6 };
  port.postMessage({ t: "joined", ...joined });
  const offersPer = await new Promise<number>((r) => port.once("message", (m: { offers: number }) => r(m.offers)));
  let sent = 0;
  for (const [i, a] of agents.entries()) {
    for (let k = 0; k < offersPer && n > 1; k++) {
      a.offer(agents[(i + 1 + Math.floor(Math.random() * (n - 1))) % n]!); // any peer of this thread but itself
      sent++;
    }
  }
  const deadline = Date.now() + 30_000;
  const delivered = () => agents.reduce((s, a) => s + a.offersIn, 0);
  while (delivered() < sent && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  const offers: WorkerOffers = { sent, delivered: delivered(), latencies: agents.flatMap((a) => a.offerLatencies), bytesIn: agents.reduce((s, a) => s + a.bytesIn, 0) };
  port.postMessage({ t: "offers", ...offers });
  await new Promise<void>((r) => port.once("message", () => r()));
  for (const a of agents) a.ws?.terminate();
  port.postMessage({ t: "closed" });
}

async function run(runtime: "node" | "workerd", n: number, concurrency: number, offersPer: number, threads: number): Promise<Result> {
  const server = runtime === "node" ? await startNode(n) : await startWorkerd(n);
  const workers: Worker[] = [];
  const inbox = new Map<Worker, unknown[]>();
  const waiters = new Map<Worker, (m: unknown) => void>();
  const next = (w: Worker) => new Promise<unknown>((resolve) => {
    const q = inbox.get(w)!;
    if (q.length) resolve(q.shift());
    else waiters.set(w, resolve);
  });
  try {
    const t = Math.max(1, Math.min(threads, n));
    for (let i = 0; i < t; i++) {
      const share = Math.floor(n / t) + (i < n % t ? 1 : 0);
      const w = new Worker(new URL(import.meta.url), { workerData: { url: server.url, n: share, concurrency: Math.max(1, Math.round(concurrency / t)) } });
      inbox.set(w, []);
      w.on("message", (m) => {
        const f = waiters.get(w);
        if (f) (waiters.delete(w), f(m));
        else inbox.get(w)!.push(m);
      });
      w.on("error", (e) => console.error("bench worker failed", e));
      workers.push(w);
    }
    await Promise.all(workers.map(next)); // identities generated
    await new Promise((r) => setTimeout(r, 500));
    const idle = procStats(server.pid);
    const t0 = performance.now();
    for (const w of workers) w.postMessage({ t: "go" });
    const joined = (await Promise.all(workers.map(next))) as WorkerJoined[];
    const joinWallS = (performance.now() - t0) / 1000;
    let serverJoin = { p50: NaN, p99: NaN };
    try {
      const r = await fetch(server.url.replace(/^ws/, "http") + "/v1/stats", { headers: { Authorization: `Bearer ${TOKEN}` } });
      serverJoin = ((await r.json()) as { joinMs?: { p50: number; p99: number } }).joinMs ?? serverJoin;
    } catch {
      /* an older server: not reported */
    }
    // let the last presence batches drain before measuring
    await new Promise((r) => setTimeout(r, 1_000));
    const after = procStats(server.pid);
    for (const w of workers) w.postMessage({ offers: offersPer });
    const offers = (await Promise.all(workers.map(next))) as WorkerOffers[];
    for (const w of workers) w.postMessage({ t: "close" });
    await Promise.all(workers.map(next));
    const lat = offers.flatMap((o) => o.latencies);
    const all = (k: keyof Omit<WorkerJoined, "lagP99">) => joined.flatMap((j) => j[k]);
    return {
      runtime,
      n,
      joinP50: pct(all("joins"), 50),
      joinP99: pct(all("joins"), 99),
      rssMb: after.rssMb,
      rssIdleMb: idle.rssMb,
      cpuMsPerJoin: ((after.cpuS - idle.cpuS) * 1000) / n,
      joinWallS,
      offersSent: offers.reduce((s, o) => s + o.sent, 0),
      offersDelivered: offers.reduce((s, o) => s + o.delivered, 0),
      offerP50: pct(lat, 50),
      offerP99: pct(lat, 99),
      mibToAgents: offers.reduce((s, o) => s + o.bytesIn, 0) / 1048576,
      serverJoinP50: serverJoin.p50,
      serverJoinP99: serverJoin.p99,
      clientLagP99: Math.max(...joined.map((j) => j.lagP99)),
      openP99: pct(all("opens"), 99),
      challengeP99: pct(all("challenges"), 99),
      helloToWelcomeP99: pct(all("hellos"), 99),
    };
  } finally {
    await Promise.all(workers.map((w) => w.terminate()));
    await server.close();
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { n: { type: "string", default: "1000,10000" }, runtime: { type: "string", default: "node,workerd" }, concurrency: { type: "string", default: "50" }, threads: { type: "string", default: "4" }, offers: { type: "string", default: "1" }, "workerd-max": { type: "string", default: "1000" } } });
  const ns = values.n!.split(",").map(Number);
  const runtimes = values.runtime!.split(",") as ("node" | "workerd")[];
  const workerdMax = Number(values["workerd-max"]);
  const results: Result[] = [];
  console.log(`bench:signal  concurrency ${values.concurrency} joins in flight over ${values.threads} client threads, ${values.offers} offer(s) per agent; one box, noisy: compare ratios`);
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
      const r = await run(rt, n, Number(values.concurrency), Number(values.offers), Number(values.threads));
      results.push(r);
      const base = results.find((x) => x.runtime === "node" && x.n === n);
      const ratio = rt !== "node" && base ? `  vs node: join p99 x${(r.joinP99 / base.joinP99).toFixed(2)}, cpu/join x${(r.cpuMsPerJoin / base.cpuMsPerJoin).toFixed(2)}, rss x${(r.rssMb / base.rssMb).toFixed(2)}` : "";
      console.log(
        `${rt.padEnd(8)} N=${String(n).padStart(5)}  join p50 ${r.joinP50.toFixed(1)} ms  p99 ${r.joinP99.toFixed(1)} ms  (all joined in ${r.joinWallS.toFixed(1)} s)  ` +
          `RSS ${r.rssMb.toFixed(0)} MB (idle ${r.rssIdleMb.toFixed(0)})  CPU/join ${r.cpuMsPerJoin.toFixed(2)} ms  ` +
          `phases p99: connect+upgrade ${r.openP99.toFixed(0)} ms, open->challenge ${r.challengeP99.toFixed(0)} ms, challenge->welcome ${r.helloToWelcomeP99.toFixed(0)} ms  ` +
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

if (isMainThread) {
  main()
    .catch((e) => {
      console.error(e);
      process.exitCode = 1;
    })
    .finally(() => stopAll(children));
} else {
  workerMain().catch((e) => {
    console.error(e);
    process.exit(1);
  });
}
