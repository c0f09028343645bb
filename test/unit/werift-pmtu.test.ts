/**
 * Why werift links never search their path MTU (agent/transport/werift.ts WERIFT_PMTU_FIXED, shown by status):
 * werift's SCTP fragments every message into DATA chunks of USERDATA_MAX_LENGTH bytes, a module constant with no
 * per-association option. If a werift upgrade changes that, this fails and the claim (and packetBudget) must be
 * looked at again.
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { describe, expect, it } from "vitest";
import { WERIFT_PMTU_FIXED } from "../../agent/transport/werift.js";

describe("werift: fixed chunk size, no path MTU search", () => {
  it("werift/sctp still hard-codes USERDATA_MAX_LENGTH = 1200 and takes no MTU option", () => {
    const require = createRequire(import.meta.url);
    // the package's main entry lives under lib/; its SCTP is lib/sctp/src/sctp.js
    let root = dirname(require.resolve("werift"));
    while (!root.endsWith("node_modules/werift") && root !== dirname(root)) root = dirname(root);
    const src = readFileSync(join(root, "lib", "sctp", "src", "sctp.js"), "utf8");
    expect(src).toMatch(/const USERDATA_MAX_LENGTH = 1200;/);
    expect(src).not.toMatch(/\bmtu\b/i); // no MTU / max packet size setting anywhere in its SCTP
    expect(WERIFT_PMTU_FIXED).toMatch(/USERDATA_MAX_LENGTH/);
  });
});
