/**
 * werift transport between two OS processes (and over the machine's own interfaces). The child process runs
 * the real adapter, transpiled on the fly with the TypeScript compiler (no tsx here), and exchanges signals
 * with the test over stdin/stdout as JSON lines.
 */
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { networkInterfaces } from "node:os";
import { createInterface } from "node:readline";
import { afterAll, describe, expect, it } from "vitest";
import { transpiledChild } from "../helpers/transpiled-child.js";
import { createWeriftTransport } from "../../agent/transport/werift.js";
import type { LinkSignal, TransportLink } from "../../src/mesh/transport.js";


const CHILD = `
import { createInterface } from "node:readline";
import { createWeriftTransport } from "./agent/transport/werift.js";
const out = (m) => process.stdout.write(JSON.stringify(m) + "\\n");
const t = await createWeriftTransport({ loopbackOnly: process.argv[2] === "loop" });
const link = t.createLink({ initiator: false, iceServers: [], handlers: {
  onSignal: (sig) => out({ t: "signal", sig }),
  onOpen: () => out({ t: "open" }),
  onMessage: (channel, data) => { link.send(channel, data); },
  onClose: (reason) => { out({ t: "close", reason }); t.close().then(() => setTimeout(() => process.exit(0), 50)); },
}});
out({ t: "ready", fingerprint: t.fingerprint });
for await (const line of createInterface({ input: process.stdin })) {
  const m = JSON.parse(line);
  if (m.t === "signal") await link.handleSignal(m.sig);
}
`;

const childModules = transpiledChild("agent/transport/werift.ts", CHILD, "weftnet-transport-");
afterAll(() => childModules.cleanup());

function hasExternalIpv4(): boolean {
  return Object.values(networkInterfaces()).some((l) => l?.some((a) => a.family === "IPv4" && !a.internal));
}

async function echoAcrossProcesses(loopbackOnly: boolean): Promise<{ openMs: number }> {
  const cwd = childModules.dir();
  const child: ChildProcessWithoutNullStreams = spawn(process.execPath, ["child.js", loopbackOnly ? "loop" : "default"], { cwd });
  const stderr: string[] = [];
  child.stderr.on("data", (d: Buffer) => stderr.push(d.toString()));
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  const t = await createWeriftTransport({ loopbackOnly });
  let link!: TransportLink;
  const echoes: Uint8Array[] = [];
  let opened!: () => void;
  const open = new Promise<void>((r) => (opened = r));
  let remoteFingerprint: unknown;
  let childClosed = false;
  const ready = new Promise<void>((resolveReady) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      const m = JSON.parse(line) as { t: string; sig?: LinkSignal; fingerprint?: unknown };
      if (m.t === "ready") {
        remoteFingerprint = m.fingerprint;
        resolveReady();
      } else if (m.t === "signal" && m.sig) void link.handleSignal(m.sig);
      else if (m.t === "close") childClosed = true;
    });
  });
  try {
    await ready;
    const t0 = Date.now();
    link = t.createLink({
      initiator: true,
      iceServers: [],
      handlers: {
        onSignal: (sig) => child.stdin.write(JSON.stringify({ t: "signal", sig }) + "\n"),
        onOpen: () => opened(),
        onMessage: (_ch, data) => echoes.push(data),
        onClose: () => {},
      },
    });
    await link.start();
    await Promise.race([open, new Promise((_, rej) => setTimeout(() => rej(new Error(`no open; child: ${stderr.join("")}`)), 10_000))]);
    const openMs = Date.now() - t0;
    const answer = (await Promise.resolve(remoteFingerprint)) as { value: string };
    expect(answer.value).toMatch(/^[0-9A-F:]+$/);
    expect(link.send("control", new Uint8Array(100_000).fill(7))).toBe("ok");
    expect(link.send("packets", new Uint8Array([1, 2, 3]))).toBe("ok");
    const deadline = Date.now() + 10_000;
    while (echoes.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(echoes.map((e) => e.byteLength).sort((a, b) => a - b)).toEqual([3, 100_000]);
    link.close();
    // The child sees the close (SCTP abort), closes its transport and exits on its own.
    const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r("timeout"), 5000))]);
    expect(code).toBe(0);
    expect(childClosed).toBe(true);
    return { openMs };
  } finally {
    child.kill();
    await t.close();
  }
}

describe("werift transport across two processes", () => {
  it("connects, echoes on both channels and propagates close (loopbackOnly)", async () => {
    const { openMs } = await echoAcrossProcesses(true);
    console.log(`[measure] two processes, loopbackOnly: open after ${openMs} ms`);
  });

  it.skipIf(!hasExternalIpv4())("connects with default ICE settings over the machine's interfaces", async () => {
    const { openMs } = await echoAcrossProcesses(false);
    console.log(`[measure] two processes, default interfaces: open after ${openMs} ms`);
  });
});
