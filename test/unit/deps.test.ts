// Dependency boundaries (after tailscale's deptest), checked on the import graph:
// - the core in src/ stays sans-I/O and implementation-free, so it can be driven by fakes and by any
//   transport: no sockets, files, processes, FFI, WebRTC/ws/hono libraries, no imports into agent/ or
//   signaling/, and clock-free (time and randomness are injected; src/testing's fakes may schedule);
// - agent/ has no import cycle (the composition root imports its parts; they never import it back), and the
//   data plane is built only from ports: agent/dataplane.ts imports nothing from agent/ and no I/O module.
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, normalize } from "node:path";
import { describe, expect, it } from "vitest";

const FORBIDDEN = [/^werift/, /^node-datachannel/, /^ws$/, /^hono/, /^@hono\//, /^koffi$/, /^(node:)?(dgram|net|child_process|http|https|tls|fs|fs\/promises|os|timers|timers\/promises|worker_threads)$/];
/** Calls that read a clock, schedule, or draw randomness (injected in src/ instead). */
const CLOCK = /\b(setTimeout|setInterval|setImmediate|queueMicrotask|performance\.now|Date\.now|Math\.random)\s*\(/;

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p) : p.endsWith(".ts") && !p.endsWith(".d.ts") ? [p] : [];
  });
}

/** Module specifiers a file imports: static (also `import type` and re-exports) and dynamic. */
function imports(src: string): string[] {
  const out: string[] = [];
  const re = /(?:import|export)\s[^'"]*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)|require\(\s*["']([^"']+)["']\s*\)|^\s*import\s+["']([^"']+)["']/gm;
  for (const m of src.matchAll(re)) out.push((m[1] ?? m[2] ?? m[3] ?? m[4])!);
  return out;
}

/** Source without comments, for the clock check (comments may name the functions). */
function code(src: string): string {
  return src.replace(/\/\*[\s\S]*?\*\//g, "").replace(/(^|[^:"'`])\/\/.*$/gm, "$1");
}

/** Relative imports resolved to repository paths (".js" -> ".ts"). */
function localImports(file: string): string[] {
  return imports(readFileSync(file, "utf8"))
    .filter((m) => m.startsWith("."))
    .map((m) => normalize(join(dirname(file), m)).replace(/\.js$/, ".ts"));
}

/** Every cycle's members (Tarjan's strongly connected components of size > 1, or a self-import). */
export function cycles(graph: Map<string, string[]>): string[][] {
  let index = 0;
  const idx = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const on = new Set<string>();
  const out: string[][] = [];
  const visit = (v: string) => {
    idx.set(v, index);
    low.set(v, index++);
    stack.push(v);
    on.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!idx.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (on.has(w)) low.set(v, Math.min(low.get(v)!, idx.get(w)!));
    }
    if (low.get(v) === idx.get(v)) {
      const comp: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        on.delete(w);
        comp.push(w);
      } while (w !== v);
      if (comp.length > 1 || (graph.get(v) ?? []).includes(v)) out.push(comp.sort());
    }
  };
  for (const v of graph.keys()) if (!idx.has(v)) visit(v);
  return out;
}

describe("src/ dependency boundary", () => {
  const srcFiles = files("src");
  it("finds the core sources", () => {
    expect(srcFiles.length).toBeGreaterThan(5);
  });
  it("the import scanner sees static, type-only, dynamic and side-effect imports", () => {
    expect(imports(`import { RTCPeerConnection } from "werift";\nimport type { X } from "../agent/agent.js";\nconst x = await import("node:dgram");\nimport "koffi";`)).toEqual(["werift", "../agent/agent.js", "node:dgram", "koffi"]);
  });
  it("the clock check sees calls, not comments or injected defaults", () => {
    expect(CLOCK.test(code("const t = setTimeout(f, 1);"))).toBe(true);
    expect(CLOCK.test(code("// setTimeout(f, 1) is not used here\nconst r: () => number = Math.random;"))).toBe(false);
  });
  for (const f of srcFiles) {
    it(`${f}: no sockets, files, processes, FFI, werift, ws or hono; nothing from agent/ or signaling/`, () => {
      const bad = imports(readFileSync(f, "utf8")).filter((m) => FORBIDDEN.some((re) => re.test(m)) || (m.startsWith(".") && /^(agent|signaling)\//.test(normalize(join(dirname(f), m)))));
      expect(bad).toEqual([]);
    });
    if (!f.startsWith(join("src", "testing"))) {
      it(`${f} is clock-free (no timers, clock reads or Math.random calls)`, () => {
        const lines = code(readFileSync(f, "utf8"))
          .split("\n")
          .filter((l) => CLOCK.test(l));
        expect(lines).toEqual([]);
      });
    }
  }
});

describe("agent/ import graph", () => {
  const graph = new Map(files("agent").map((f) => [f, localImports(f)]));
  it("finds the agent sources and their imports", () => {
    expect(graph.get(join("agent", "agent.ts"))).toContain(join("agent", "api.ts"));
  });
  it("the cycle finder sees a cycle", () => {
    expect(cycles(new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]], ["d", ["a"]]]))).toEqual([["a", "b", "c"]]);
  });
  it("has no import cycle", () => {
    expect(cycles(graph)).toEqual([]);
  });
  it("only the front ends (CLI, UI viewer) import the composition root (agent.ts); its parts never do", () => {
    const importers = [...graph].filter(([, deps]) => deps.includes(join("agent", "agent.ts"))).map(([f]) => f);
    expect(importers.filter((f) => !f.startsWith(join("agent", "cli") + "/") && !f.startsWith(join("agent", "ui") + "/"))).toEqual([]);
  });
  it("the data plane is built from ports: agent/dataplane.ts imports no agent/ module and no I/O", () => {
    const f = join("agent", "dataplane.ts");
    const bad = imports(readFileSync(f, "utf8")).filter((m) => FORBIDDEN.some((re) => re.test(m)) || (m.startsWith(".") && !normalize(join(dirname(f), m)).startsWith("src/")));
    expect(bad).toEqual([]);
  });
});
