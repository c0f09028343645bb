/** Shared pieces of the root-only e2e labs (network namespaces, children that die with the test). */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createWriteStream } from "node:fs";

export const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

export const hasIptables = (() => {
  try {
    execFileSync("iptables", ["-V"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

/**
 * Start `cmd args` in network namespace `ns` with output appended to `logPath`. nsenter switches only
 * the network namespace (`ip netns exec` would also unshare the mount namespace); setpriv --pdeathsig
 * kills the child if the test process dies. The child is added to `procs` until it exits.
 */
export function spawnInNetns(ns: string, cmd: string, args: string[], logPath: string, procs: Set<ChildProcess>, env?: NodeJS.ProcessEnv): ChildProcess {
  const p = spawn("setpriv", ["--pdeathsig", "KILL", "nsenter", `--net=/run/netns/${ns}`, "--", cmd, ...args], { stdio: ["ignore", "pipe", "pipe"], ...(env ? { env: { ...process.env, ...env } } : {}) });
  const out = createWriteStream(logPath, { flags: "a" });
  p.stdout!.pipe(out);
  p.stderr!.pipe(out);
  procs.add(p);
  p.on("exit", () => procs.delete(p));
  return p;
}

/** Whether `cmd` is on the PATH (a test's system tool: skip, with a reason, when it is missing). */
export function hasTool(cmd: string): boolean {
  try {
    execFileSync("sh", ["-c", 'command -v "$1"', "sh", cmd], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** SIGTERM a child we started and wait for it to exit; SIGKILL after `killAfterMs`. Nothing if it is gone. */
export async function stopChild(p: ChildProcess | undefined, killAfterMs = 10_000): Promise<void> {
  if (!p || p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((r) => p.once("exit", r));
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), killAfterMs);
  await exited;
  clearTimeout(t);
}
