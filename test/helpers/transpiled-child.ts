/**
 * A child process that runs real adapter code without a build: the entry module and every local module it
 * imports (relative imports, transitively) are transpiled with the TypeScript compiler into a temp dir
 * (no tsx here), beside `child.js` (the given source) and a link to node_modules. Used by the tests that
 * need an adapter in its own process (werift between two processes, the FFI reader on Node's main thread).
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { ChildProcess } from "node:child_process";
import { createInterface } from "node:readline";
import ts from "typescript";

const root = resolve(import.meta.dirname, "../..");

/** `entry` (a path from the repository root, .ts) and every local module it imports, transitively. */
function localClosure(entry: string): string[] {
  const seen = new Set<string>();
  const visit = (f: string) => {
    if (seen.has(f)) return;
    seen.add(f);
    for (const m of readFileSync(join(root, f), "utf8").matchAll(/(?:import|export)\s[^'"]*?from\s*["'](\.[^"']+)["']/g)) visit(join(dirname(f), m[1]!).replace(/\.js$/, ".ts"));
  };
  visit(entry);
  return [...seen];
}

/** Transpiled once on first use; `dir()` is where `node child.js` runs, `cleanup()` removes it (afterAll). */
export function transpiledChild(entry: string, childSource: string, prefix: string): { dir(): string; cleanup(): void } {
  let dir: string | undefined;
  return {
    dir() {
      if (dir) return dir;
      dir = mkdtempSync(join(tmpdir(), prefix));
      for (const f of localClosure(entry)) {
        const js = ts.transpileModule(readFileSync(join(root, f), "utf8"), { compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 } }).outputText;
        const target = join(dir, f.replace(/\.ts$/, ".js"));
        mkdirSync(dirname(target), { recursive: true });
        writeFileSync(target, js);
      }
      writeFileSync(join(dir, "package.json"), JSON.stringify({ type: "module" }));
      writeFileSync(join(dir, "child.js"), childSource);
      symlinkSync(join(root, "node_modules"), join(dir, "node_modules"));
      return dir;
    },
    cleanup() {
      if (dir) rmSync(dir, { recursive: true, force: true });
      dir = undefined;
    },
  };
}

/**
 * A child's JSON-lines stdout as an inbox: `next(t)` takes the first message `{ t, ... }` of that type
 * (waiting for it up to `ms`; the error carries the child's stderr so far).
 */
export function childInbox<M extends { t: string }>(child: ChildProcess): { next(t: string, ms?: number): Promise<M>; stderr: string[] } {
  const stderr: string[] = [];
  child.stderr?.on("data", (d: Buffer) => stderr.push(d.toString()));
  const inbox: M[] = [];
  const waiters: (() => void)[] = [];
  createInterface({ input: child.stdout! }).on("line", (line) => {
    inbox.push(JSON.parse(line) as M);
    waiters.splice(0).forEach((w) => w());
  });
  const next = async (t: string, ms = 20_000): Promise<M> => {
    const deadline = Date.now() + ms;
    for (;;) {
      const i = inbox.findIndex((m) => m.t === t);
      if (i >= 0) return inbox.splice(i, 1)[0]!;
      if (Date.now() > deadline) throw new Error(`child did not say ${t}; stderr: ${stderr.join("")}`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 200);
      });
    }
  };
  return { next, stderr };
}
