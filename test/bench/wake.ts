/**
 * npm run bench:wake  (no root)
 * What a cold wake-up of the FFI read loop costs (agent/os/fd-reader.ts), per wait mode, on loopback:
 * a child process (plain node:dgram) sends one datagram every --interval ms; this process reads it with the
 * bulk link's UdpSocket and echoes it at once. Two figures per mode:
 *   wake: kernel receive time of the datagram (SO_TIMESTAMPNS) -> the moment JS reads it (clock_gettime
 *         CLOCK_REALTIME through koffi), i.e. how long the idle reader took to notice;
 *   rtt:  the child's round trip (send -> echo read, node:dgram on its side).
 * Baseline in the same run: the same echo with node:dgram in this process (libuv's own UDP handle).
 * Prints p50 / p90 / avg in microseconds and the ratio of our rtt p50 to node:dgram's; never fails on a number.
 *   --count N   datagrams per mode (default 200)    --interval MS  gap between them (default 20)
 *   --modes L   comma-separated of dgram,uv,pool (default all)
 *   --warm N    first N back-to-back round trips, not counted (the JIT has compiled the path; default 0)
 */
import { spawn } from "node:child_process";
import dgram from "node:dgram";
import { parseArgs } from "node:util";
import { UdpSocket } from "../../agent/os/udp.js";
import { baseLibc } from "../../agent/os/fd-reader.js";

const { values } = parseArgs({ options: { count: { type: "string", default: "200" }, interval: { type: "string", default: "20" }, modes: { type: "string", default: "dgram,uv,pool" }, warm: { type: "string", default: "0" } } });
const COUNT = Number(values.count);
const INTERVAL = Number(values.interval);

const c = baseLibc();
const clockGettime = c.lib.func("int clock_gettime(int clk, void *ts)");
const ts = Buffer.alloc(16);
/** CLOCK_REALTIME in microseconds (as the kernel's SO_TIMESTAMPNS stamps are). */
function realtimeUs(): number {
  clockGettime(0, ts);
  return Number(ts.readBigInt64LE(0)) * 1e6 + Number(ts.readBigInt64LE(8)) / 1e3;
}

const stats = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(s.length * p))] ?? NaN;
  return { p50: q(0.5), p90: q(0.9), avg: s.reduce((a, b) => a + b, 0) / (s.length || 1), n: s.length };
};

/** The child: sends COUNT datagrams INTERVAL ms apart to `port`, prints the RTTs (us) as JSON. */
const CHILD = `
const dgram = require("node:dgram");
const [port, count, interval, warm] = process.argv.slice(1).map(Number);
const s = dgram.createSocket("udp4");
const rtts = [];
let t0 = 0n, i = 0, w = 0;
s.on("message", () => {
  if (w < warm) { if (++w === warm) setTimeout(send, interval); else send(); return; }
  rtts.push(Number(process.hrtime.bigint() - t0) / 1000); if (++i >= count) { process.stdout.write(JSON.stringify(rtts)); s.close(); } else setTimeout(send, interval); });
const send = () => { t0 = process.hrtime.bigint(); s.send(Buffer.alloc(64, i & 255), port, "127.0.0.1"); };
s.bind(0, "127.0.0.1", () => setTimeout(send, 200));
`;

async function runChild(port: number): Promise<number[]> {
  const p = spawn(process.execPath, ["-e", CHILD, String(port), String(COUNT), String(INTERVAL), values.warm], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  p.stdout.on("data", (d: Buffer) => (out += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => {
      p.kill("SIGKILL");
      reject(new Error("child timed out"));
    }, COUNT * (INTERVAL + 50) + 10_000);
    p.on("exit", () => {
      clearTimeout(t);
      resolve();
    });
  });
  return JSON.parse(out) as number[];
}

async function ours(mode: "uv" | "pool"): Promise<{ wake: number[]; rtt: number[]; waitMode: string }> {
  const sock = UdpSocket.open({ address: "127.0.0.1", wait: mode, rxTimestamps: true, gro: false });
  const wake: number[] = [];
  let skip = Number(values.warm);
  const echo = Buffer.allocUnsafeSlow(2048);
  sock.start((data, _seg, from) => {
    const now = realtimeUs();
    if (skip > 0) skip--;
    else wake.push(now - (sock.lastRxStamp[0] * 1e6 + sock.lastRxStamp[1] / 1e3));
    echo.set(data);
    sock.sendBatch(from, echo.subarray(0, data.length), data.length, 1);
  });
  try {
    return { rtt: await runChild(sock.port), wake, waitMode: sock.waitMode };
  } finally {
    await sock.close();
  }
}

async function nodeDgram(): Promise<{ rtt: number[] }> {
  const s = dgram.createSocket("udp4");
  s.on("message", (m, r) => s.send(m, r.port, r.address));
  await new Promise<void>((r) => s.bind(0, "127.0.0.1", r));
  try {
    return { rtt: await runChild(s.address().port) };
  } finally {
    s.close();
  }
}

const fmt = (x: { p50: number; p90: number; avg: number }) => `${x.p50.toFixed(0).padStart(6)} ${x.p90.toFixed(0).padStart(6)} ${x.avg.toFixed(0).padStart(6)}`;
const rows: string[] = [];
let base = NaN;
for (const m of values.modes.split(",")) {
  process.stderr.write(`measuring ${m} ...\n`);
  if (m === "dgram") {
    const r = stats((await nodeDgram()).rtt);
    base = r.p50;
    rows.push(`${"node:dgram echo (baseline)".padEnd(34)} ${"".padStart(20)}   ${fmt(r)}`);
  } else if (m === "uv" || m === "pool") {
    const r = await ours(m);
    const rt = stats(r.rtt);
    rows.push(`${`UdpSocket wait=${r.waitMode}${r.waitMode !== m ? ` (asked ${m})` : ""}`.padEnd(34)} ${fmt(stats(r.wake))}   ${fmt(rt)}${Number.isFinite(base) ? `  x${(rt.p50 / base).toFixed(2)}` : ""}`);
  }
}
const load = (await import("node:os")).loadavg()[0]!.toFixed(2);
process.stdout.write(`\ncold wake on loopback: ${COUNT} datagrams ${INTERVAL} ms apart (after ${values.warm} back-to-back); microseconds p50 / p90 / avg; load avg ${load}\n`);
process.stdout.write(`${"reader".padEnd(34)} ${"wake (kernel -> JS)".padStart(20)}   ${"echo rtt (child)".padStart(20)}  rtt p50 vs node:dgram\n`);
for (const r of rows) process.stdout.write(r + "\n");
