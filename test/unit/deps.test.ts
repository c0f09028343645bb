// Dependency boundary (after tailscale's deptest): the core in src/ stays sans-I/O and
// implementation-free, so it can be driven by fakes and by any transport.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";

const FORBIDDEN = [/^werift/, /^node-datachannel/, /^ws$/, /^hono/, /^@hono\//, /^(node:)?(dgram|net|child_process|http|https|tls)$/];

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") ? [p] : [];
  });
}

function imports(src: string): string[] {
  const out: string[] = [];
  const re = /(?:import|export)\s[^'"]*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)|require\(\s*["']([^"']+)["']\s*\)/g;
  for (const m of src.matchAll(re)) out.push((m[1] ?? m[2] ?? m[3])!);
  return out;
}

describe("src/ dependency boundary", () => {
  const srcFiles = files("src");
  it("finds the core sources", () => {
    expect(srcFiles.length).toBeGreaterThan(5);
  });
  it("the import scanner sees forbidden imports", () => {
    expect(imports(`import { RTCPeerConnection } from "werift";\nconst x = await import("node:dgram");`)).toEqual(["werift", "node:dgram"]);
  });
  for (const f of srcFiles) {
    it(`${f} imports no sockets, werift, ws or hono`, () => {
      const bad = imports(readFileSync(f, "utf8")).filter((m) => FORBIDDEN.some((re) => re.test(m)));
      expect(bad).toEqual([]);
    });
  }
});
