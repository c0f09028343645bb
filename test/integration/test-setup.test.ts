/**
 * `npm test`'s set-up (scripts/test.mjs) run for real, as a new user's machine would see it: a PATH
 * reduced to a temp dir of symlinks (tools "not installed" are simply absent), a stand-in `apt-get`
 * that records its calls and "installs" a package by linking its tools into that dir (no network, the
 * machine is not changed), and, when this runs as root, the unprivileged case as user nobody (setpriv).
 * --setup-only: the script sets up and stops before the suites.
 */
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync, chmodSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TOOLS, which } from "../../scripts/test.mjs";

const script = resolve("scripts/test.mjs");
const isRoot = process.getuid?.() === 0;
const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A PATH dir with node and every tool of TOOLS found on this machine except `without`; `apt`: a stand-in apt-get. */
function fakeMachine(without: string[], apt: boolean): { dir: string; aptLog: string } {
  const dir = mkdtempSync(join(tmpdir(), "weftnet-setup-"));
  dirs.push(dir);
  chmodSync(dir, 0o755);
  symlinkSync(process.execPath, join(dir, "node"));
  const real = new Map<string, string>();
  for (const t of TOOLS) {
    if (real.has(t.tool)) continue; // listed for more than one suite
    const p = which(t.tool);
    if (p) real.set(t.tool, p);
    if (p && !without.includes(t.tool)) symlinkSync(p, join(dir, t.tool));
  }
  const aptLog = join(dir, "apt.log");
  if (apt) {
    // install PKG...: link the real tools of each package into this dir
    const links = TOOLS.filter((t) => real.has(t.tool)).map((t) => `[ "$p" = ${t.pkg} ] && /bin/ln -sf ${real.get(t.tool)} ${join(dir, t.tool)}`);
    writeFileSync(
      join(dir, "apt-get"),
      `#!/bin/sh\necho "$DEBIAN_FRONTEND apt-get $*" >> ${aptLog}\n[ "$1" = install ] || exit 0\nfor p in "$@"; do\n${links.join("\n")}\ndone\nexit 0\n`,
      { mode: 0o755 },
    );
  }
  return { dir, aptLog };
}

function run(path: string, args: string[], asNobody = false) {
  const cmd = asNobody ? ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", process.execPath] : [process.execPath];
  const r = spawnSync(cmd[0]!, [...cmd.slice(1), script, ...args], { env: { PATH: path, HOME: tmpdir() }, encoding: "utf8", timeout: 20_000 });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

describe.skipIf(!isRoot)("npm test set-up as root (reduced PATH, stand-in apt-get)", () => {
  it("installs what is missing with apt-get, saying what and why, after apt-get update", () => {
    const { dir, aptLog } = fakeMachine(["ping", "conntrack", "promtool"], true);
    const r = run(dir, ["--setup-only"]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/installing iputils-ping conntrack prometheus with apt-get/);
    expect(r.out).toMatch(/iputils-ping: ping \(pod-to-pod reachability; test\/e2e\//);
    const calls = readFileSync(aptLog, "utf8").trim().split("\n");
    expect(calls[0]).toMatch(/^noninteractive apt-get update/);
    expect(calls[1]).toMatch(/^noninteractive apt-get install -y .*iputils-ping conntrack prometheus$/);
    expect(run(dir, ["--setup-only"]).out).toMatch(/system tools present: .*ping/); // now nothing to do
  });

  it("without apt-get stops at once with the exact install line", () => {
    const { dir } = fakeMachine(["ping", "turnserver"], false);
    const r = run(dir, []);
    expect(r.code).toBe(2);
    expect(r.out).toContain("apt-get update && apt-get install -y --no-install-recommends iputils-ping coturn");
    expect(r.out).not.toMatch(/--- build/); // stopped before any suite
  });

  it("as an unprivileged user skips the e2e suite, says why, and asks for sudo for a missing tool", () => {
    const { dir } = fakeMachine(["promtool", "ping", "iptables"], false);
    const r = run(dir, ["--setup-only"], true);
    expect(r.out).toMatch(/SKIPPING the e2e suite: needs root \(network namespaces/);
    expect(r.code).toBe(2);
    expect(r.out).toContain("sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus");
    expect(r.out).not.toContain("iputils-ping"); // e2e's tools are not asked for
  });
});

describe.skipIf(isRoot)("npm test set-up as an unprivileged user", () => {
  it("skips the e2e suite and says why", () => {
    const { dir } = fakeMachine([], false);
    const r = run(dir, ["--setup-only"]);
    expect(r.out).toMatch(/SKIPPING the e2e suite: needs root/);
  });
});
