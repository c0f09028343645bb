/**
 * The set-up logic of `npm test` (scripts/test.mjs): which tools are needed, what is installed, when it
 * stops with the install line, which suites are skipped without root. Pure: the machine is described.
 */
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { failuresIn, hasTool, isStaticElf, plan, SUITES, TOOLS, which, type Env, type Tool } from "../../scripts/test.mjs";

const machine = (over: Partial<Env> & { missing?: string[] } = {}): Env => {
  const missing = new Set(over.missing ?? []);
  return { root: true, apt: true, exists: () => true, has: (t: Tool) => !missing.has(t.tool), ...over };
};

describe("npm test set-up plan", () => {
  it("runs everything when root and every tool is there", () => {
    const p = plan(machine());
    expect(p.action).toBe("run");
    expect(p.suites.every((s) => s.run)).toBe(true);
    expect(p.packages).toEqual([]);
  });

  it("as root with apt installs the missing packages, once each", () => {
    const p = plan(machine({ missing: ["ping", "iptables", "containerd", "ctr", "promtool"] }));
    expect(p.action).toBe("install");
    expect(p.packages.sort()).toEqual(["containerd", "iptables", "iputils-ping", "prometheus"]);
    expect(p.missing.map((t) => t.tool).sort()).toEqual(["containerd", "ctr", "iptables", "ping", "promtool"]);
  });

  it("as root without apt-get, or with --no-install, stops with the exact install line", () => {
    for (const env of [machine({ apt: false, missing: ["ping", "conntrack"] }), machine({ noInstall: true, missing: ["ping", "conntrack"] })]) {
      const p = plan(env);
      expect(p.action).toBe("stop");
      expect(p.line).toBe("apt-get update && apt-get install -y --no-install-recommends iputils-ping conntrack");
      expect(p.message).toContain(p.line);
    }
  });

  it("without root skips the e2e suite with its reason and does not need its tools", () => {
    const p = plan(machine({ root: false, missing: ["ping", "iptables", "turnserver"] }));
    expect(p.action).toBe("run");
    expect(p.suites.find((s) => s.name === "e2e")).toMatchObject({ run: false, why: expect.stringMatching(/needs root.*sudo npm test/) });
    expect(p.suites.filter((s) => s.run).map((s) => s.name)).toEqual(["build", "unit", "integration"]);
    expect(p.needed.some((t) => t.suite === "e2e")).toBe(false);
  });

  it("without root stops with a sudo line when an unprivileged suite's tool is missing", () => {
    const p = plan(machine({ root: false, missing: ["promtool"] }));
    expect(p.action).toBe("stop");
    expect(p.line).toBe("sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus");
  });

  it("needs a tool only when a file that uses it exists", () => {
    const p = plan(machine({ exists: (f) => f !== "test/e2e/cni-containerd.test.ts", missing: ["containerd", "ctr", "runc", "busybox"] }));
    expect(p.action).toBe("run");
    expect(p.needed.map((t) => t.tool)).not.toContain("containerd");
  });

  it("benchmark tools only with --bench", () => {
    expect(plan(machine({ missing: ["wireguard-go", "wg"], exists: () => true })).action).toBe("run");
    expect(plan(machine({ bench: true, missing: ["wireguard-go", "wg"] })).packages).toEqual(["wireguard-go", "wireguard-tools"]);
    // a tool both a suite and the benchmarks use is needed by the suite alone
    expect(plan(machine({ missing: ["iperf3"] })).packages).toEqual(["iperf3"]);
  });

  it("every tool names a suite that exists, a package and at least one file", () => {
    const suites = new Set([...SUITES.map((s) => s.name), "bench"]);
    for (const t of TOOLS) {
      expect(suites.has(t.suite), t.tool).toBe(true);
      expect(t.pkg, t.tool).toMatch(/^[a-z0-9][a-z0-9.+-]+$/);
      expect(t.usedBy.length, t.tool).toBeGreaterThan(0);
    }
  });

  it("finds tools on PATH and tells a static binary from a dynamic one", () => {
    expect(which("node", process.env.PATH)).toBeDefined();
    expect(which("node", "/nonexistent")).toBeUndefined();
    expect(isStaticElf(process.execPath)).toBe(false); // node is dynamically linked
    expect(isStaticElf("/nonexistent")).toBe(false);
    if (existsSync("/bin/busybox") && which("busybox")) expect(typeof isStaticElf("/bin/busybox")).toBe("boolean");
    // shared libraries are looked up in the library dirs, not on PATH
    const lib = (name: string): Tool => ({ tool: name, pkg: "x", suite: "integration", why: "", usedBy: ["x"], check: "lib" });
    expect(hasTool(lib("libc.so.6"))).toBe(true);
    expect(hasTool(lib("libnot-a-library.so.99"))).toBe(false);
  });

  it("names each failed test in one line for the summary (the part of a CI log that is kept)", () => {
    const dir = mkdtempSync(join(tmpdir(), "wn-report-"));
    try {
      const report = join(dir, "r.json");
      const root = join(import.meta.dirname, "..", "..");
      writeFileSync(report, JSON.stringify({
        testResults: [
          { name: join(root, "test/e2e/pod.test.ts"), status: "failed", assertionResults: [
            { status: "passed", fullName: "pods ok" },
            { status: "failed", fullName: "pods concurrent adds", failureMessages: ["\u001b[31mAssertionError: expected 3 to be 2\u001b[39m\n    at x"] },
          ] },
          { name: join(root, "test/unit/broken.test.ts"), status: "failed", message: "SyntaxError: Unexpected token", assertionResults: [] },
          { name: join(root, "test/unit/fine.test.ts"), status: "passed", assertionResults: [{ status: "passed", fullName: "fine" }] },
        ],
      }));
      expect(failuresIn(report)).toEqual([
        "test/e2e/pod.test.ts > pods concurrent adds: AssertionError: expected 3 to be 2",
        "test/unit/broken.test.ts: SyntaxError: Unexpected token",
      ]);
      expect(failuresIn(join(dir, "absent.json"))).toEqual(["(no test report was written: see the output above)"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
