/**
 * Agents serving STUN (issue 13 item 4) with real agents (werift over loopback) and a signaling server
 * that offers no STUN (like a Worker): one agent runs --stun-port, the others learn it through the
 * signed topology gossip, gather with it on the links they open later (its responder answers them), and
 * `weftnet netcheck` (the compiled CLI against an agent's local API) probes it and names the agent.
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { startSignalServer } from "../../signaling/server.js";
import { Cluster, fullMesh, testLogger, waitFor } from "../helpers/cluster.js";

const TOKEN = "agent-stun-test-token-0123456789abcdef";
const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of cleanups.splice(0).reverse()) await f().catch(() => {});
});

/** The CLI as a child process, asynchronously: the agents it asks live in this process and must keep answering. */
function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 30_000, env: { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "" } }, (e, out, err) => {
      resolve({ code: e ? ((e as { code?: number }).code ?? 1) : 0, out, err });
    });
  });
}

describe("agents serving STUN", () => {
  it("a --stun-port agent's STUN reaches the others through the mesh; they gather with it and netcheck names it", async () => {
    expect(existsSync(CLI), `${CLI} missing: run npm run build`).toBe(true);
    // no stunPort: this server offers no STUN, like the Workers build
    const server = await startSignalServer({ listen: { host: "127.0.0.1", port: 0 }, token: TOKEN, logger: testLogger() });
    expect(server.stunPort).toBe(0);
    const c = new Cluster(server, TOKEN);
    cleanups.push(() => c.cleanup());
    const a = await c.agent("stun-a", { stunPort: 0 });
    const b = await c.agent("stun-b");
    await waitFor(() => fullMesh([a, b]), 40_000, "a and b linked");
    const port = a.stun!.port;
    expect(port).toBeGreaterThan(0);
    const advertised = `127.0.0.1:${port}`; // the address the signaling server saw a connect from

    // b learns it from a's signed topology record and uses it: it has no STUN of its own
    await waitFor(() => b.stunUses().some((u) => u.server === advertised), 20_000, "b learns a's STUN through the mesh");
    expect(b.stunUses()).toEqual([{ server: advertised, source: "agent stun-a", node: a.id }]);
    expect(b.iceServers()).toContainEqual({ urls: `stun:${advertised}` });
    expect(a.stunUses()).toEqual([]); // never its own
    const st = await b.status();
    expect(st.stun?.using[0]).toMatchObject({ server: advertised, source: "agent stun-a" });
    expect((await a.status()).stun?.serving).toMatchObject({ port, advertised: [advertised] });

    // a link opened later: b (and c, once it has heard of a) gathers with a's STUN
    const before = a.stun!.answeredFrom("127.0.0.1");
    const late = await c.agent("stun-c");
    await waitFor(() => fullMesh([a, b, late]), 40_000, "c joins the mesh");
    await waitFor(() => a.stun!.answeredFrom("127.0.0.1") > before, 20_000, "a's responder answers the ICE gathering of a later link");
    expect(a.stun!.status(null).stats.dropped).toBe(0);

    // netcheck on b probes a's STUN and says where it came from
    const js = await cli(["netcheck", "--json", "--state-dir", c.dirs[1]!, "--timeout", "2000"]);
    expect(js.code, js.out + js.err).toBe(0);
    const r = JSON.parse(js.out) as { stun: { servers: string[]; sources: { server: string; source: string }[] }; udp: boolean; reflexive: string; probes: { mapped: string | null }[] };
    expect(r.stun.sources).toEqual([{ server: advertised, source: "agent stun-a" }]);
    expect(r.udp).toBe(true);
    expect(r.reflexive).toMatch(/^127\.0\.0\.1:\d+$/);
    const text = await cli(["netcheck", "--state-dir", c.dirs[1]!, "--timeout", "2000"]);
    expect(text.out).toMatch(new RegExp(`^STUN\\s+127\\.0\\.0\\.1:${port} \\(agent stun-a\\)$`, "m"));
  }, 150_000);
});
