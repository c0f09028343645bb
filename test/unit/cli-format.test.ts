import { describe, expect, it } from "vitest";
import { localIpam, renderIpam, summarizeIpam } from "../../agent/cli/commands.js";
import { didYouMean, editDistance, errorJson, errorLine, fmtRtt, logOptions } from "../../agent/cli/util.js";
import { UsageError, WeftError } from "../../src/errors.js";
import { createLogger, formatText } from "../../src/log.js";

describe("log formats", () => {
  it("json: one object per line with time, level, component, msg and fields", () => {
    const lines: string[] = [];
    const log = createLogger({ level: "info", sink: (l) => lines.push(l), component: "agent" }).child("mesh", { node: "n1" });
    log.debug("hidden");
    log.info("peer connected", { peer: "p1", err: new Error("boom"), key: new Uint8Array([1, 2]) });
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0]!)).toMatchObject({ level: "info", component: "mesh", msg: "peer connected", node: "n1", peer: "p1", err: "boom", key: "0102" });
  });

  it("text: time, level, component, message, key=value (quoted when needed); colour only when asked", () => {
    const t = new Date(2026, 0, 2, 3, 4, 5, 6);
    const line = formatText({ time: t, level: "warn", component: "signal", msg: "cannot reach", fields: { url: "ws://x:1", err: "ECONNREFUSED: connect refused", n: 3, skip: undefined } });
    expect(line).toBe('03:04:05.006 WARN  signal  cannot reach  url=ws://x:1 err="ECONNREFUSED: connect refused" n=3');
    expect(line).not.toMatch(/\x1b/);
    expect(formatText({ time: t, level: "error", component: "a", msg: "m", fields: {} }, true)).toMatch(/\x1b\[31mERROR/);
    const lines: string[] = [];
    createLogger({ level: "info", format: "text", sink: (l) => lines.push(l) }).info("hi", { a: 1 });
    expect(lines[0]).toMatch(/^\d\d:\d\d:\d\d\.\d{3} INFO  weftnet  hi  a=1$/);
  });

  it("logOptions: auto is text on a TTY and JSON otherwise; bad values name the flag", () => {
    expect(logOptions("agent", {}, "info", true)).toMatchObject({ format: "text", level: "info" });
    expect(logOptions("agent", {}, "info", false)).toMatchObject({ format: "json", color: false });
    expect(logOptions("agent", { "log-format": "json" }, "info", true).format).toBe("json");
    expect(logOptions("agent", { verbose: true }, "info", false).level).toBe("debug");
    expect(() => logOptions("signal", { "log-level": "loud" })).toThrow(/^weftnet signal: --log-level "loud"/);
    expect(() => logOptions("agent", { "log-format": "xml" })).toThrow(/--log-format "xml"/);
  });
});

describe("CLI helpers", () => {
  it("did you mean: typos and transpositions, nothing for unrelated words", () => {
    expect(editDistance("ipma", "ipam")).toBe(1);
    expect(didYouMean("stauts", ["signal", "agent", "status"])).toBe("status");
    expect(didYouMean("--jsn", ["--json", "--state-dir"])).toBe("--json");
    expect(didYouMean("--verb", ["--verbose", "--json"])).toBe("--verbose");
    expect(didYouMean("frobnicate", ["signal", "agent", "status", "ping"])).toBeUndefined();
  });

  it("RTT: sub-ms precision kept, whole ms without a fake decimal", () => {
    expect(fmtRtt(0)).toBe("<1ms");
    expect(fmtRtt(1)).toBe("1ms");
    expect(fmtRtt(0.423)).toBe("0.42ms");
    expect(fmtRtt(12.34)).toBe("12.3ms");
    expect(fmtRtt(250.7)).toBe("251ms");
    expect(fmtRtt(null)).toBe("-");
  });

  it("errors: no doubled prefix; JSON form with code", () => {
    expect(errorLine(new UsageError("weftnet status: unknown option --jsn"))).toBe("weftnet status: unknown option --jsn");
    expect(errorLine(new WeftError("ERR_X", "boom"))).toBe("weftnet: boom");
    expect(JSON.parse(errorJson(new WeftError("ERR_X", "boom")))).toEqual({ error: { code: "ERR_X", message: "boom" } });
  });

  it("status ipam: summarised per owner with aggregated CIDRs; the full list only on request", () => {
    const blocks = [];
    for (let i = 0; i < 1024; i++) {
      const owner = i < 1022 ? "f0" : i === 1022 ? "b1" : "";
      blocks.push({ cidr: `10.40.${Math.floor(i / 4)}.${(i % 4) * 64}/26`, owner, ownerName: owner === "f0" ? "founder" : owner ? "b" : null, reachable: true, free: owner === "b1" ? 60 : null, mine: owner === "b1", settling: false, kind: "c" });
    }
    const v = { range: "10.40.0.0/16", blockPrefix: 26, canAllocate: true, reason: null, blocks, allocations: [{ podId: "p", ip: "10.40.255.130" }], pending: null, conflicts: [] };
    const s = summarizeIpam(v);
    expect(s.blocks).toBeUndefined();
    expect(s.totalBlocks).toBe(1024);
    expect(s.unownedBlocks).toBe(1);
    expect(s.owners.map((o) => [o.id, o.blocks])).toEqual([
      ["b1", 1],
      ["f0", 1022],
    ]);
    expect(s.owners[1]!.cidrs).toEqual(["10.40.0.0/17", "10.40.128.0/18", "10.40.192.0/19", "10.40.224.0/20", "10.40.240.0/21", "10.40.248.0/22", "10.40.252.0/23", "10.40.254.0/24", "10.40.255.0/25"]);
    expect(JSON.stringify(s).length).toBeLessThan(2000);
    expect(summarizeIpam(v, true).blocks).toHaveLength(1024);
    expect(localIpam(v)).toEqual({ blocks: ["10.40.255.128/26"], blockCount: 1, pods: 1 });
  });

  it("status ipam: the member list, who is not heard, members without a block, removed nodes", () => {
    const blocks = [{ cidr: "10.40.0.0/28", owner: "a0", ownerName: "n1", reachable: true, free: 10, mine: true, settling: false, kind: "p" }];
    const members = [
      { id: "a0", silentMs: 0, heard: true, blocks: 1 },
      { id: "b0b0b0b0b0b0b0b0", silentMs: 40_000, heard: false, blocks: 2 },
      { id: "c0c0c0c0c0c0c0c0", silentMs: null, heard: false, blocks: 0 },
    ];
    const v = { range: "10.40.0.0/22", blockPrefix: 28, canAllocate: true, reason: null, blocks, allocations: [], pending: null, conflicts: [], members, removed: ["d0d0d0d0d0d0d0d0"] };
    const s = summarizeIpam(v);
    expect(s.members).toEqual(members);
    expect(renderIpam(s)).toContain("members   3 (majority 2): n1, b0b0b0b0 (not heard, silent 40s), c0c0c0c0 (not heard, no block); removed: d0d0d0d0\n");
  });
});
