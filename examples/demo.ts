/**
 * `npm run demo`: a signaling server and three agents on this machine, each a real `weftnet` process
 * with its own temporary state dir, meshing over WebRTC on loopback. Prints the status table and pings,
 * then keeps running until Ctrl-C (or exits at once with --once), and removes everything it made.
 * With --pods (root) it then runs examples/netns-demo.sh: three nodes in network namespaces with TUN
 * devices and pods that ping each other and run iperf3 over the mesh. That part creates namespaces,
 * bridges and TUN devices on this machine, so it runs only when asked for; its tools are checked first.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const CLI = join(here, "..", "agent", "cli", "main.js");
const once = process.argv.includes("--once");
const pods = process.argv.includes("--pods");
const isRoot = process.getuid?.() === 0;
const netnsDemo = join(here, "..", "..", "examples", "netns-demo.sh");
const NAMES = ["alpha", "beta", "gamma"];
const children: ChildProcess[] = [];
const root = mkdtempSync(join(tmpdir(), "weftnet-demo-"));

const bold = process.stdout.isTTY && !process.env.NO_COLOR ? (s: string) => `\x1b[1m${s}\x1b[0m` : (s: string) => s; // no escape codes into files

function say(s: string): void {
  process.stdout.write(`${bold("==>")} ${s}\n`);
}

function start(args: string[], label: string): ChildProcess {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ["pipe", "pipe", "pipe"], env: { ...process.env, WEFTNET_EXIT_WITH_PARENT: "1" } });
  children.push(child);
  const prefix = (s: string) => s.split("\n").filter(Boolean).map((l) => `   [${label}] ${l}\n`).join("");
  child.stdout!.on("data", (d: Buffer) => process.stdout.write(prefix(d.toString())));
  child.stderr!.on("data", (d: Buffer) => process.stdout.write(prefix(d.toString())));
  return child;
}

function run(args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (out += d.toString()));
    child.on("close", (code) => resolve({ code: code ?? 1, out }));
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

async function stopChildren(): Promise<void> {
  const stop = async (cs: ChildProcess[]) => {
    for (const c of cs) if (c.exitCode === null) c.kill("SIGTERM");
    await Promise.all(cs.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once("exit", r)))));
  };
  await stop(children.slice(1));
  await stop(children.slice(0, 1));
}

let cleaned = false;
async function cleanup(code: number): Promise<never> {
  if (!cleaned) {
    cleaned = true;
    say("stopping agents and the signaling server");
    // agents first (they say bye to each other), then the signaling server
    const stop = async (cs: ChildProcess[]) => {
      for (const c of cs) if (c.exitCode === null) c.kill("SIGTERM");
      await Promise.all(cs.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once("exit", r)))));
    };
    await stop(children.slice(1));
    await stop(children.slice(0, 1));
    rmSync(root, { recursive: true, force: true });
  }
  process.exit(code);
}
process.on("SIGINT", () => void cleanup(0));
process.on("SIGTERM", () => void cleanup(0));

async function main(): Promise<void> {
  if (pods) {
    if (!isRoot) {
      process.stderr.write("demo: --pods needs root (it creates network namespaces, bridges and TUN devices): sudo npm run demo -- --pods\n");
      process.exit(2);
    }
    // check the pod demo's tools before starting anything (it prints the apt-get line)
    if (spawnSync("bash", [netnsDemo, "--check"], { stdio: "inherit" }).status !== 0) process.exit(1);
  }
  const port = await freePort();
  const stun = await freePort();
  const token = `demo-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
  say(`starting the signaling server on 127.0.0.1:${port} (STUN udp/${stun})`);
  start(["signal", "--listen", `127.0.0.1:${port}`, "--stun-port", String(stun), "--token", token], "signal");
  await waitHealthy(`http://127.0.0.1:${port}/healthz`);
  for (const n of NAMES) {
    say(`starting agent ${n}`);
    start(["agent", "--signal", `ws://127.0.0.1:${port}`, "--token", token, "--name", n, "--state-dir", join(root, n), "--no-tun", "--loopback-only"], n);
  }
  say("waiting for the full mesh (3 agents, 3 links)");
  const t0 = Date.now();
  for (;;) {
    const sts = await Promise.all(NAMES.map(async (n) => run(["status", "--json", "--state-dir", join(root, n)])));
    const ok = sts.every((s) => s.code === 0 && (JSON.parse(s.out) as { peers: { state: string }[] }).peers.filter((p) => p.state === "connected").length === NAMES.length - 1);
    if (ok) break;
    if (Date.now() - t0 > 30_000) {
      process.stdout.write("the mesh did not form within 30 s; status of each agent:\n" + sts.map((s) => s.out).join("\n"));
      await cleanup(1);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  say(`full mesh after ${Date.now() - t0} ms`);
  await new Promise((r) => setTimeout(r, 1200)); // let heartbeats measure RTTs
  say(`weftnet status --state-dir ${join(root, NAMES[0]!)}`);
  process.stdout.write((await run(["status", "--state-dir", join(root, NAMES[0]!)])).out + "\n");
  for (const target of NAMES.slice(1)) {
    say(`weftnet ping ${target} (from ${NAMES[0]})`);
    process.stdout.write((await run(["ping", target, "--count", "3", "--state-dir", join(root, NAMES[0]!)])).out + "\n");
  }
  if (pods) {
    say("--pods: the data-plane demo with pods in network namespaces (examples/netns-demo.sh; it removes them at the end)");
    await stopChildren();
    const code = await new Promise<number>((resolve) => {
      const c = spawn("bash", [netnsDemo, ...(once ? ["--once"] : [])], { stdio: "inherit" });
      process.removeAllListeners("SIGINT");
      process.on("SIGINT", () => c.kill("SIGINT"));
      c.on("exit", (code) => resolve(code ?? 1));
    });
    await cleanup(code);
  } else {
    say(
      `(to also see pods on three nodes ping each other over the mesh: ${isRoot ? "" : "sudo "}npm run demo -- --pods` +
        " — it creates network namespaces, bridges and TUN devices on this machine and removes them at the end)",
    );
  }
  if (once) await cleanup(0);
  say("the mesh is running; press Ctrl-C to stop and clean up");
}

async function waitHealthy(url: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    try {
      if ((await fetch(url)).ok) return;
    } catch {
      // not up yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  say(`signaling server did not come up at ${url}`);
  await cleanup(1);
}

main().catch(async (e) => {
  process.stderr.write(`demo failed: ${(e as Error).stack}\n`);
  await cleanup(1);
});
