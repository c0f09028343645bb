/** Test helpers: a real signaling server and real agents (werift over loopback) in this process. */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Agent, type AgentConfig } from "../../agent/agent.js";
import { startSignalServer, type SignalServer } from "../../signaling/server.js";
import { createLogger } from "../../src/log.js";
import type { LinkOptions, Transport } from "../../src/mesh/transport.js";

export const TEST_TIMING = { heartbeatMs: 250, deadAfterMs: 2000, connectTimeoutMs: 8000, backoff: { baseMs: 200, maxMs: 2000, minMs: 100 } };

export function tmpDir(prefix = "weft-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

export const testLogger = () => createLogger({ level: (process.env.WEFTNET_TEST_LOG as "debug") ?? "error" });

export async function startServer(token: string, port = 0): Promise<SignalServer> {
  return startSignalServer({ listen: { host: "127.0.0.1", port }, token, stunPort: "ephemeral", logger: testLogger() });
}

export class Cluster {
  readonly dirs: string[] = [];
  readonly agents: Agent[] = [];
  constructor(public server: SignalServer, readonly token: string) {}

  async agent(name: string, over: Partial<AgentConfig> = {}): Promise<Agent> {
    const stateDir = over.stateDir ?? tmpDir(`weft-${name}-`);
    if (!over.stateDir) this.dirs.push(stateDir);
    const a = await Agent.start({
      signal: this.server.url,
      token: this.token,
      stateDir,
      name,
      logger: testLogger(),
      timing: TEST_TIMING,
      werift: { loopbackOnly: true },
      ...over,
    });
    this.agents.push(a);
    return a;
  }

  async cleanup(): Promise<void> {
    await Promise.allSettled(this.agents.map((a) => a.stop()));
    await this.server.close().catch(() => {});
    for (const d of this.dirs) rmSync(d, { recursive: true, force: true });
  }
}

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs: number, what: string): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    if (await cond()) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export function fullMesh(agents: Agent[]): boolean {
  return agents.every((a) => a.mesh.connectedPeers().length === agents.length - 1);
}

/** A transport whose links to the peers in `blocked` never open: their offers, answers and candidates are dropped. */
export function withBlocked(t: Transport, blocked: Set<string>): Transport {
  return new Proxy(t, {
    get(target, prop) {
      if (prop === "createLink") {
        return (opts: LinkOptions) => (blocked.has(opts.peer ?? "") ? target.createLink({ ...opts, handlers: { ...opts.handlers, onSignal: () => {} } }) : target.createLink(opts));
      }
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
