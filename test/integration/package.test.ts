/**
 * The npm package as a user gets it: `npm pack` (of the current build), installed into an empty prefix
 * (`npm install -g --prefix`, dependencies' install scripts not run: npm 11's default), then the
 * installed `weftnet` and `weftnet-cni` commands run, the native dependencies load, and the quick-start
 * demo runs from the installed package. The packed file list ships what the README uses and nothing it
 * should not (source maps without sources, test helpers).
 */
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, normalize, posix } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const root = process.cwd();
const work = mkdtempSync(join(tmpdir(), "weftnet-pack-"));
const prefix = join(work, "prefix");
const pkgDir = join(prefix, "lib", "node_modules", "weftnet");
let files: string[] = [];
let installOut = "";

function sh(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string; timeout?: number } = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8", timeout: opts.timeout ?? 60_000, cwd: opts.cwd ?? root, env: { ...process.env, ...opts.env }, input: opts.input ?? "" });
  return { code: r.status, out: `${r.stdout ?? ""}${r.stderr ?? ""}`, stdout: r.stdout ?? "" };
}

beforeAll(() => {
  expect(existsSync(join(root, "dist", "agent", "cli", "main.js")), "npm run build first").toBe(true);
  // --ignore-scripts: prepack would build again; the suite has built already
  const pack = sh("npm", ["pack", "--json", "--ignore-scripts", "--pack-destination", work]);
  expect(pack.code, pack.out).toBe(0);
  const info = JSON.parse(pack.stdout) as { filename: string; files: { path: string }[] }[];
  files = info[0]!.files.map((f) => f.path);
  const inst = sh("npm", ["install", "-g", "--prefix", prefix, "--no-audit", "--no-fund", "--prefer-offline", join(work, info[0]!.filename)], { timeout: 180_000 });
  installOut = inst.out;
  expect(inst.code, inst.out).toBe(0);
}, 200_000);
afterAll(() => rmSync(work, { recursive: true, force: true }));

describe("npm package", () => {
  it("ships what the README uses: examples, LICENSE, both commands", () => {
    for (const f of ["LICENSE", "README.md", "examples/netns-demo.sh", "examples/cni/10-weftnet.conflist", "examples/kubernetes/weftnet.yaml", "examples/systemd/weftnet-agent.service", "examples/systemd/weftnet-signal.service", "examples/systemd/agent.env.example", "dist/agent/cli/main.js", "dist/agent/cni/main.js", "dist/examples/demo.js"])
      expect(files, f).toContain(f);
    // every examples/ path the README names is in the package
    const readme = readFileSync(join(root, "README.md"), "utf8");
    for (const m of readme.matchAll(/\bexamples\/[\w./-]*\w/g)) {
      const p = m[0];
      if (p === "examples/cloudflare" || p.startsWith("examples/cloudflare/")) continue; // a separate deploy, not part of the npm package
      expect(files.some((f) => f === p || f.startsWith(`${p}/`)), `README names ${p}`).toBe(true);
    }
    expect(readFileSync(join(root, "LICENSE"), "utf8")).toMatch(/Apache License\s+Version 2\.0, January 2004/);
    const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8")) as { license: string; bin: Record<string, string> };
    expect(pkg.license).toBe("Apache-2.0");
    expect(Object.keys(pkg.bin).sort()).toEqual(["weftnet", "weftnet-cni"]);
  });

  it("ships no source map without its sources, no test helpers, no tests", () => {
    for (const f of files.filter((f) => f.endsWith(".map"))) {
      const map = JSON.parse(readFileSync(join(pkgDir, f), "utf8")) as { sources: string[]; sourcesContent?: string[] };
      const shipped = map.sources.every((s) => files.includes(posix.normalize(posix.join(posix.dirname(f), s))));
      expect(shipped || map.sourcesContent?.length === map.sources.length, `${f} points at sources that are not shipped`).toBe(true);
    }
    expect(files.filter((f) => f.startsWith("dist/src/testing/") || f.startsWith("dist/test/") || f.startsWith("test/"))).toEqual([]);
  });

  it("every relative import of a shipped module is shipped", () => {
    const js = files.filter((f) => f.endsWith(".js"));
    const missing: string[] = [];
    for (const f of js) {
      const src = readFileSync(join(pkgDir, f), "utf8");
      for (const m of src.matchAll(/(?:\bfrom\s*|\bimport\s*\(\s*)["'](\.{1,2}\/[^"']+)["']/g)) {
        const target = normalize(join(dirname(f), m[1]!)).split("\\").join("/");
        if (!files.includes(target)) missing.push(`${f} -> ${m[1]}`);
      }
    }
    expect(missing).toEqual([]);
  });

  it("installs without dependencies' install scripts; the README explains npm's warning about them", () => {
    const readme = readFileSync(join(root, "README.md"), "utf8");
    for (const m of installOut.matchAll(/^npm warn install-scripts\s+(@?[\w./-]+?)@\d/gm)) expect(readme, `README explains ${m[1]}'s install script`).toContain(m[1]!);
    // the native pieces load without their install scripts
    const r = sh(process.execPath, ["--input-type=module", "-e", "const k = (await import('koffi')).default; if (typeof k.load !== 'function') process.exit(3); const { pack, unpack } = await import('msgpackr'); if (unpack(pack({ a: 1 })).a !== 1) process.exit(4); console.log('ok')"], { cwd: pkgDir });
    expect(r.code, r.out).toBe(0);
  });

  it("the installed weftnet runs: signal --help", () => {
    const r = sh(join(prefix, "bin", "weftnet"), ["signal", "--help"]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/Usage: weftnet signal/);
  });

  it("the installed weftnet-cni answers VERSION as a runtime calls it", () => {
    const r = sh(join(prefix, "bin", "weftnet-cni"), [], { env: { CNI_COMMAND: "VERSION" }, input: JSON.stringify({ cniVersion: "1.0.0" }) });
    expect(r.code, r.out).toBe(0);
    const v = JSON.parse(r.stdout) as { supportedVersions: string[] };
    expect(v.supportedVersions).toEqual(expect.arrayContaining(["1.0.0", "1.1.0"]));
    const bad = sh(join(prefix, "bin", "weftnet-cni"), [], { env: { CNI_COMMAND: "ADD" }, input: "{" });
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toMatchObject({ code: expect.any(Number), msg: expect.any(String) });
  });

  it("npm run demo works from the installed package", () => {
    const r = sh("npm", ["run", "demo", "--", "--once"], { cwd: pkgDir, timeout: 90_000 });
    expect(r.code, r.out).toBe(0);
    expect(r.out).toMatch(/full mesh after \d+ ms/);
    expect(r.out).not.toMatch(/\x1b\[/); // not a terminal: no escape codes
    expect(readdirSync(pkgDir)).not.toContain("tsconfig.json");
  }, 100_000);
});
