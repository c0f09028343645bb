import { joinKeyOf } from "../../src/identity.js";
import { chmodSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SIGNAL_HELP, defaultStateDir, loadOrCreateToken, parseListen, runSignal } from "../../signaling/cli.js";
import type { SignalServer } from "../../signaling/server.js";

const dirs: string[] = [];
const aborts: AbortController[] = [];
afterEach(() => {
  for (const a of aborts.splice(0)) a.abort();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "weftnet-signal-"));
  dirs.push(d);
  return d;
}

async function run(argv: string[], env: NodeJS.ProcessEnv = {}, untilListening = false) {
  const out: string[] = [];
  const err: string[] = [];
  const ac = new AbortController();
  aborts.push(ac);
  let server: SignalServer | undefined;
  const done = runSignal(argv, {
    stdout: (s) => out.push(s),
    stderr: (s) => err.push(s),
    env,
    signal: ac.signal,
    onListening: (s) => {
      server = s;
    },
  });
  if (untilListening) {
    const deadline = Date.now() + 5_000;
    while (server === undefined && Date.now() < deadline) {
      const settled = await Promise.race([done.then(() => true), new Promise((r) => setTimeout(() => r(false), 10))]);
      if (settled) break;
    }
  }
  return { out, err, done, server: () => server, stop: () => ac.abort() };
}

describe("weftnet signal CLI", () => {
  it("parses --listen forms", () => {
    expect(parseListen("0.0.0.0:7000")).toEqual({ host: "0.0.0.0", port: 7000 });
    expect(parseListen("[::]:7001")).toEqual({ host: "::", port: 7001 });
    expect(parseListen(":7002")).toEqual({ host: "0.0.0.0", port: 7002 });
    expect(parseListen("7003")).toEqual({ host: "0.0.0.0", port: 7003 });
    expect(parseListen("example.org:1")).toEqual({ host: "example.org", port: 1 });
    for (const bad of ["host", "host:99999", "::1:7000", "h:-1", "h:x"]) expect(() => parseListen(bad)).toThrow(/--listen/);
  });

  it("picks the state dir by uid and XDG", () => {
    expect(defaultStateDir({}, 0)).toBe("/var/lib/weftnet-signal");
    expect(defaultStateDir({ XDG_STATE_HOME: "/x/state", HOME: "/home/u" }, 1000)).toBe("/x/state/weftnet-signal");
    expect(defaultStateDir({ HOME: "/home/u" }, 1000)).toBe("/home/u/.local/state/weftnet-signal");
  });

  it("generates a token once (0600) and reuses it", () => {
    const d = join(tmp(), "nested", "state");
    const first = loadOrCreateToken(d);
    expect(first.created).toBe(true);
    expect(first.token).toMatch(/^[A-Za-z0-9_-]{32}$/);
    expect(statSync(first.path).mode & 0o777).toBe(0o600);
    expect(readFileSync(first.path, "utf8").trim()).toBe(first.token);
    const second = loadOrCreateToken(d);
    expect(second).toEqual({ ...first, created: false });
    writeFileSync(first.path, "\n");
    expect(() => loadOrCreateToken(d)).toThrow(/empty; delete it/);
  });

  it("rejects unknown or bad flags with one line on stderr and exit code 2", async () => {
    for (const argv of [["--bogus"], ["--listen", "nope"], ["--stun-port", "70000"], ["--token", "a", "--token-file", "b"], ["--token-file", "/nonexistent/x"], ["positional"]]) {
      const r = await run(argv);
      expect(await r.done).toBe(2);
      expect(r.err).toHaveLength(1);
      expect(r.err[0]).toMatch(/^weftnet signal: .+\n$/);
      expect(r.err[0]!.trimEnd().includes("\n")).toBe(false);
    }
  });

  it("--help prints the help and exits 0", async () => {
    const r = await run(["--help"]);
    expect(await r.done).toBe(0);
    expect(r.out.join("")).toBe(SIGNAL_HELP);
    expect(SIGNAL_HELP).toMatch(/--stun-port/);
  });

  it("starts without a token: generates, prints it with the join command, and reuses it next time", async () => {
    const state = tmp();
    const r = await run(["--listen", "127.0.0.1:0", "--stun-port", "0", "--state-dir", state], {}, true);
    const server = r.server();
    expect(server).toBeDefined();
    const token = readFileSync(join(state, "token"), "utf8").trim();
    const text = r.out.join("");
    expect(text).toMatch(new RegExp(`^weftnet signal listening on ws://127\\.0\\.0\\.1:${server!.port} \\(STUN off\\)\\n`));
    expect(text).not.toContain(token); // never printed (stdout ends up in journald)
    expect(text).toContain(`weftnet agent --signal ws://127.0.0.1:${server!.port} --token-file ${join(state, "token")}`);
    expect(statSync(state).mode & 0o777).toBe(0o700);
    const health = await fetch(`http://127.0.0.1:${server!.port}/healthz`);
    expect(await health.json()).toEqual({ ok: true, agents: 0 });
    const nodes = await fetch(`http://127.0.0.1:${server!.port}/v1/nodes`, { headers: { Authorization: `Bearer ${joinKeyOf(token)}` } });
    expect(nodes.status).toBe(200);
    r.stop();
    expect(await r.done).toBe(0);

    const again = await run(["--listen", "127.0.0.1:0", "--stun-port", "0", "--state-dir", state], {}, true);
    const t2 = again.out.join("");
    expect(t2).not.toContain(token);
    expect(t2).toContain(join(state, "token"));
    again.stop();
    expect(await again.done).toBe(0);
  });

  it("takes the token from WEFTNET_TOKEN and serves STUN on the given port", async () => {
    const r = await run(["--listen", "127.0.0.1:0", "--stun-port", "0"], { WEFTNET_TOKEN: "from-env-0123456789-abcdefgh" }, true);
    const server = r.server()!;
    const ok = await fetch(`http://127.0.0.1:${server.port}/v1/nodes`, { headers: { Authorization: `Bearer ${joinKeyOf("from-env-0123456789-abcdefgh")}` } });
    expect(ok.status).toBe(200);
    r.stop();
    expect(await r.done).toBe(0);
  });

  it("refuses weak tokens unless --allow-weak-token, forces the state dir to 0700, and serves with a join key only", async () => {
    for (const [argv, env] of [[["--token", "short"], {}], [["--token", "aaaaaaaaaaaaaaaaaaaaaaaa"], {}], [[], { WEFTNET_TOKEN: "passw0rd-123" }]] as const) {
      const r = await run(["--listen", "127.0.0.1:0", "--stun-port", "0", ...argv], env);
      expect(await r.done).toBe(2);
      expect(r.err.join("")).toMatch(/^weftnet signal: weak cluster token: /);
    }
    const d = tmp();
    chmodSync(d, 0o755);
    loadOrCreateToken(d);
    expect(statSync(d).mode & 0o777).toBe(0o700);
    const strong = "Zq7-strong-test-token-0123456789";
    const keyFile = join(tmp(), "join-key");
    writeFileSync(keyFile, joinKeyOf(strong) + "\n");
    const adminFile = join(tmp(), "admin");
    writeFileSync(adminFile, "admin-credential-0123456789-xyz\n");
    const r = await run(["--listen", "127.0.0.1:0", "--stun-port", "0", "--join-key-file", keyFile, "--admin-token-file", adminFile], {}, true);
    const port = r.server()!.port;
    const get = (bearer: string) => fetch(`http://127.0.0.1:${port}/metrics`, { headers: { Authorization: `Bearer ${bearer}` } });
    expect((await get("admin-credential-0123456789-xyz")).status).toBe(200);
    expect((await get(strong)).status).toBe(401); // with an admin token, the cluster credential is not an admin one
    expect((await get(joinKeyOf(strong))).status).toBe(401);
    r.stop();
    expect(await r.done).toBe(0);
  });

  it("exits 1 with one line when the port is taken", async () => {
    const first = await run(["--listen", "127.0.0.1:0", "--stun-port", "0", "--token", "t", "--allow-weak-token"], {}, true);
    const port = first.server()!.port;
    const second = await run(["--listen", `127.0.0.1:${port}`, "--stun-port", "0", "--token", "t", "--allow-weak-token"]);
    expect(await second.done).toBe(1);
    expect(second.err.join("")).toMatch(/^weftnet signal: cannot listen on tcp 127\.0\.0\.1:\d+: .*EADDRINUSE/);
    first.stop();
    await first.done;
  });
});
