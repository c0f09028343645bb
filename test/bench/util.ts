/** Helpers of the benches that drive the real CLI (built: dist/test/bench/*.js, next to dist/agent). */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const CLI = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "agent", "cli", "main.js");

/** Every process spawnCli started, in order. */
export const children: ChildProcess[] = [];

/**
 * `weftnet <args>` as a child that exits with this process (WEFTNET_EXIT_WITH_PARENT); stdout ignored.
 * WEFTNET_BENCH_NODE_ARGS adds node flags to the children, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof".
 */
export function spawnCli(args: string[]): ChildProcess {
  const nodeArgs = (process.env.WEFTNET_BENCH_NODE_ARGS ?? "").split(" ").filter(Boolean);
  const c = spawn(process.execPath, [...nodeArgs, CLI, ...args], { stdio: ["pipe", "ignore", "inherit"], env: { ...process.env, WEFTNET_EXIT_WITH_PARENT: "1" } });
  children.push(c);
  return c;
}

/** A TCP port free on 127.0.0.1 right now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise<number>((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => resolve(p));
    });
  });
}

/** SIGTERM the children still running and wait until they have exited. */
export async function stopAll(cs: ChildProcess[]): Promise<void> {
  for (const c of cs) if (c.exitCode === null) c.kill("SIGTERM");
  await Promise.all(cs.map((c) => (c.exitCode !== null ? null : new Promise((r) => c.once("exit", r)))));
}
