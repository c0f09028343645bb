/**
 * The agent's GC setting (tuneAgentGc in agent/cli/commands.ts) as V8 sees it: a child process that grows
 * its old generation starts incremental marking by default (the control), not after tuneAgentGc(), and an
 * explicit --incremental-marking from the operator wins. Uses the build (npm test builds first).
 */
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";

const COMMANDS = pathToFileURL(join(process.cwd(), "dist", "agent", "cli", "commands.js")).href;
const SCRIPT = `
if (process.argv[1] === "tune") (await import(${JSON.stringify(COMMANDS)})).tuneAgentGc();
const keep = [];
for (let i = 0; i < 60; i++) {
  const a = [];
  for (let j = 0; j < 20000; j++) a.push({ i, j, s: "x" + j });
  keep.push(a);
  await new Promise((r) => setImmediate(r));
}
console.log("kept", keep.length);
`;

function markingStarts(flags: string[], tune: boolean): number {
  const r = spawnSync(process.execPath, ["--trace-incremental-marking", ...flags, "--input-type=module", "-e", SCRIPT, ...(tune ? ["tune"] : [])], { encoding: "utf8", timeout: 60_000 });
  expect(r.status, r.stderr).toBe(0);
  expect(r.stdout).toContain("kept 60");
  return (r.stdout.match(/\[IncrementalMarking\] Start/g) ?? []).length;
}

describe("agent GC setting", () => {
  it("turns incremental marking off (V8 starts none), unless the operator asked for it", () => {
    expect(markingStarts([], false)).toBeGreaterThan(0); // the workload does trigger it by default
    expect(markingStarts([], true)).toBe(0);
    expect(markingStarts(["--incremental-marking"], true)).toBeGreaterThan(0);
  });
});
