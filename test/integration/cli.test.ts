/**
 * The `weftnet` command as users run it: the compiled CLI (npm test builds first), real processes.
 */
import { spawnSync, spawn } from "node:child_process";
import { existsSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { tmpDir } from "../helpers/cluster.js";

const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const run = (args: string[], env: Record<string, string> = {}) => {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: { ...process.env, WEFTNET_TOKEN: "", ...env }, timeout: 20_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

describe("weftnet CLI", () => {
  it("is built (npm test runs `npm run build` first)", () => {
    expect(existsSync(CLI), `${CLI} missing: run npm run build`).toBe(true);
  });

  it("prints help for every command, exit 0", () => {
    for (const args of [["--help"], ["agent", "--help"], ["signal", "--help"], ["status", "--help"], ["ping", "--help"], ["pod", "--help"], ["ipam", "--help"]]) {
      const r = run(args);
      expect(r.code, args.join(" ")).toBe(0);
      expect(r.out).toMatch(/Usage: weftnet/);
    }
    expect(run(["version"]).out.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it("rejects wrong flags and missing arguments with one clear line and exit 2", () => {
    const cases: [string[], RegExp][] = [
      [["frobnicate"], /unknown command "frobnicate"/],
      [["agent", "--bogus"], /weftnet agent: .*--bogus/],
      [["agent", "--no-tun", "--token", "t"], /--signal URL is required/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1"], /cluster token is required/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--mtu", "100"], /--mtu must be/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--iface", "x"], /make no sense with --no-tun/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--link-mtu", "1000"], /--link-mtu must be an integer between 1280 and 4096/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--link-mtu", "1500", "--transport", "werift"], /--link-mtu applies to the native transport/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--range", "10.40.0.0"], /--range/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--reclaim-after", "soon"], /--reclaim-after must be a duration/],
      [["pod", "add"], /expected `add NAME`/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--advertise-routes", "10.40.5.0/24"], /overlaps the cluster range 10\.40\.0\.0\/16/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--advertise-routes", "192.168.1.0/24,192.168.0.0/16"], /overlap each other/],
      [["agent", "--signal", "ws://127.0.0.1:1", "--token", "t", "--snat-routes"], /--snat-routes needs --advertise-routes/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--advertise-routes", "192.168.1.0/24"], /needs the data plane/],
      [["ipam", "frob", "x"], /unknown command "frob"/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--name", "bad name!"], /--name/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--ice-server", "turn:example.org:3478"], /TURN needs a username/],
      [["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token", "t", "--token-file", "/nonexistent"], /not both/],
      [["ping"], /exactly one NODE/],
      [["ping", "x", "--count", "zero"], /--count must be a positive integer/],
      [["status", "--jsn"], /weftnet status: .*--jsn/],
      [["signal", "--listen", "nope"], /listen/],
    ];
    for (const [args, re] of cases) {
      const r = run(args);
      expect(r.code, `${args.join(" ")}: ${r.err}`).toBe(2);
      expect(r.err.trim().split("\n")).toHaveLength(1);
      expect(r.err).toMatch(re);
    }
  });

  it("says clearly when no agent is running", () => {
    const dir = tmpDir("weft-cli-");
    try {
      for (const args of [["status", "--state-dir", dir], ["ping", "x", "--state-dir", dir]]) {
        const r = run(args);
        expect(r.code).toBe(1);
        expect(r.err).toMatch(/no agent is running with this state dir/);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("agent: a bad --signal URL and an unreadable token file are usage errors", () => {
    const dir = tmpDir("weft-cli-");
    try {
      expect(run(["agent", "--no-tun", "--signal", "http//x", "--token", "t", "--state-dir", dir]).err).toMatch(/not a URL/);
      writeFileSync(join(dir, "empty"), "\n");
      const r = run(["agent", "--no-tun", "--signal", "ws://127.0.0.1:1", "--token-file", join(dir, "empty"), "--state-dir", dir]);
      expect(r.code).toBe(2);
      expect(r.err).toMatch(/is empty/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("agent: a wrong token makes the agent exit 1 with the server's reason", async () => {
    const dir = tmpDir("weft-cli-");
    const { startServer } = await import("../helpers/cluster.js");
    const server = await startServer("right-token");
    try {
      const child = spawn(process.execPath, [CLI, "agent", "--no-tun", "--loopback-only", "--signal", server.url, "--token", "wrong", "--state-dir", dir], { stdio: ["ignore", "pipe", "pipe"] });
      let err = "";
      child.stderr.on("data", (d: Buffer) => (err += d.toString()));
      const code = await new Promise<number | null>((r) => child.on("exit", r));
      expect(code).toBe(1);
      expect(err).toMatch(/refused this agent: bad token/);
    } finally {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("npm run demo: three agent processes mesh, status and ping work, everything is cleaned up", () => {
    const r = spawnSync(process.execPath, [join(process.cwd(), "dist", "examples", "demo.js"), "--once", "--no-pods"], { encoding: "utf8", timeout: 60_000 });
    expect(r.status, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/full mesh after \d+ ms/);
    expect(r.stdout).toMatch(/peers\s+2\/2 connected/);
    expect(r.stdout).toMatch(/3 sent, 3 received/);
  }, 70_000);
});
