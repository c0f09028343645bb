/**
 * The FFI read loop's wait (agent/os/fd-reader.ts) with the bulk link's real UDP socket, in a child process
 * (Node's main thread, where the "uv" wait works; the modules are transpiled on the fly, no tsx here), for
 * both wait modes:
 * - every datagram sent after an idle gap (a cold wake each) is read and echoed;
 * - pause() stops reading (a datagram sent meanwhile waits in the socket), resume() reads it;
 * - an idle reader sleeps: its CPU time over 2 s stays far below a spinning loop's (loose bound, not a timing);
 * - close() settles promptly (the loop has other timers, as an agent does) and lets go of the fd: once the
 *   child's own timer is cleared its event loop has nothing left and the process exits on its own.
 */
import { spawn } from "node:child_process";
import dgram from "node:dgram";
import { afterAll, describe, expect, it } from "vitest";
import { childInbox, transpiledChild } from "../helpers/transpiled-child.js";

// The child: opens the socket with the asked wait mode, echoes every datagram, obeys commands on stdin.
const CHILD = `
import { createInterface } from "node:readline";
import { UdpSocket } from "./agent/os/udp.js";
const out = (m) => process.stdout.write(JSON.stringify(m) + "\\n");
const sock = UdpSocket.open({ address: "127.0.0.1", wait: process.argv[2] });
sock.start((data, _seg, from) => {
  const b = Buffer.allocUnsafeSlow(data.length);
  b.set(data);
  sock.sendBatch({ addr: from.addr, port: from.port }, b, b.length, 1);
});
out({ t: "ready", port: sock.port, waitMode: sock.waitMode });
// An agent has other timers: with this one the loop does not end at close, so a close promise that only
// settles at the next unrelated callback would show (it did: ~8 s in the TUN e2e test before the fix).
const keepAlive = setInterval(() => {}, 60_000);
const rl = createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  const m = JSON.parse(line);
  if (m.t === "pause") { sock.pause(); out({ t: "paused" }); }
  else if (m.t === "resume") { sock.resume(); out({ t: "resumed" }); }
  else if (m.t === "idle-cpu") {
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, m.ms));
    const c = process.cpuUsage(c0);
    out({ t: "cpu", cpuMs: (c.user + c.system) / 1000, wallMs: performance.now() - t0 });
  } else if (m.t === "close") {
    const t0 = performance.now();
    await sock.close();
    const closeMs = performance.now() - t0;
    clearInterval(keepAlive);
    rl.close();
    process.stdin.destroy();
    out({ t: "closed", closeMs });
    // no process.exit: the child must end because nothing keeps its event loop alive
  }
});
`;

const childModules = transpiledChild("agent/os/udp.ts", CHILD, "weftnet-fdwait-");
afterAll(() => childModules.cleanup());

interface Msg {
  t: string;
  port?: number;
  waitMode?: string;
  cpuMs?: number;
  wallMs?: number;
  closeMs?: number;
}

async function scenario(mode: "uv" | "pool"): Promise<void> {
  const child = spawn(process.execPath, ["child.js", mode], { cwd: childModules.dir(), stdio: ["pipe", "pipe", "pipe"] });
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  const { next, stderr } = childInbox<Msg>(child);
  const send = (m: object) => child.stdin.write(JSON.stringify(m) + "\n");
  const sock = dgram.createSocket("udp4");
  const echoes: string[] = [];
  sock.on("message", (m) => echoes.push(m.toString()));
  await new Promise<void>((r) => sock.bind(0, "127.0.0.1", r));
  const until = async (cond: () => boolean, what: string, ms = 20_000) => {
    const deadline = Date.now() + ms;
    while (!cond()) {
      if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms; echoes ${JSON.stringify(echoes)}; stderr: ${stderr.join("")}`);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  try {
    const ready = await next("ready");
    expect(ready.waitMode).toBe(mode); // the child runs on Node's main thread: "uv" is available
    const to = (s: string) => sock.send(s, ready.port!, "127.0.0.1");
    // Cold wakes: each datagram after the reader went back to sleep.
    for (let i = 0; i < 5; i++) {
      await new Promise((r) => setTimeout(r, 100));
      to(`d${i}`);
      await until(() => echoes.includes(`d${i}`), `echo of d${i}`);
    }
    // pause: nothing is read; resume: the waiting datagram is.
    send({ t: "pause" });
    await next("paused");
    to("while-paused");
    await new Promise((r) => setTimeout(r, 300));
    expect(echoes).not.toContain("while-paused");
    send({ t: "resume" });
    await next("resumed");
    await until(() => echoes.includes("while-paused"), "echo after resume");
    // Idle: the reader sleeps (a spinning loop would burn ~all of the 2 s).
    send({ t: "idle-cpu", ms: 2000 });
    const cpu = await next("cpu");
    expect(cpu.cpuMs!).toBeLessThan(0.25 * cpu.wallMs!);
    // close: nothing is left in the child's event loop, so it exits by itself.
    send({ t: "close" });
    const closed = await next("closed");
    expect(closed.closeMs!).toBeLessThan(10_000); // prompt; a stalled settle waits for the 60 s keep-alive timer
    const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r("still running 15 s after close"), 15_000))]);
    expect(code).toBe(0);
  } finally {
    sock.close();
    child.kill("SIGKILL");
  }
}

describe("FFI read loop wait (fd-reader) with a real UDP socket in a child process", () => {
  it('"uv": the event loop\'s epoll wakes the reader; pause/resume; idle sleeps; close leaves no handle', async () => {
    await scenario("uv");
  }, 60_000);

  it('"pool": poll() on a libuv worker thread, same behaviour', async () => {
    await scenario("pool");
  }, 60_000);
});
