#!/usr/bin/env node
/**
 * weftnet-cni: the CNI plugin executable (see plugin.ts for what each command does, spec.ts for the
 * contract). A container runtime runs it with CNI_* in the environment and the network configuration on
 * stdin; it prints the result (ADD), the version info (VERSION) or nothing (DEL, CHECK, GC, STATUS) on
 * stdout and exits 0, or prints the spec's error JSON {cniVersion, code, msg, details} on stdout and
 * exits 1. Logs are JSON lines on stderr (netconf logLevel, default warn).
 *
 * How it finds the agent: the unix socket STATEDIR/agent.sock (netconf stateDir, default
 * /var/lib/weftnet, or netconf socket), the agent's local API (agent/api.ts). Shipped two ways (README
 * "CNI plugin"): dist/agent/cni/main.js for hosts with Node.js, and dist/cni/weftnet-cni, a single
 * executable (Node SEA) with this file bundled by esbuild, for hosts without.
 */
import { run } from "./run.js";

function readStdin(): Promise<string> {
  return new Promise((resolve, reject) => {
    if (process.stdin.isTTY) return resolve("");
    const chunks: Buffer[] = [];
    process.stdin.on("data", (c: Buffer) => chunks.push(c));
    process.stdin.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    process.stdin.on("error", reject);
  });
}

async function main(): Promise<void> {
  const stdin = await readStdin().catch(() => "");
  const { stdout, code } = await run(process.env, stdin);
  // exit at once: the HTTP keep-alive socket to the agent must not hold the runtime up
  if (stdout) process.stdout.write(stdout + "\n", () => process.exit(code));
  else process.exit(code);
}

void main();
