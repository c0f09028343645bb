// IpamDriver (agent/ipam.ts) on a fake mesh: a caller that gives up leaves nothing behind.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { IpamDriver } from "../../agent/ipam.js";
import { silentLogger } from "../../src/log.js";
import type { MeshManager } from "../../src/mesh/manager.js";

const fakeMesh = () =>
  ({
    onPeerUp() {},
    onPeerDown() {},
    onApp() {},
    sendApp() {},
  }) as unknown as MeshManager;

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function driver(bootstrapWaitMs: number) {
  const dir = mkdtempSync(join(tmpdir(), "weft-ipam-driver-"));
  dirs.push(dir);
  const d = new IpamDriver({ id: "00000000000000aa", range: "10.40.0.0/24", blockPrefix: 28, bootstrapWaitMs }, dir, fakeMesh(), silentLogger);
  return d;
}

describe("ipam driver", () => {
  it("a caller that gives up while the IPAM is not ready stops the retries; nothing is allocated later", async () => {
    const d = driver(60_000); // no cluster for a minute: allocation waits
    const ac = new AbortController();
    const p = d.allocate("cni/abc/eth0", 30_000, ac.signal);
    setTimeout(() => ac.abort(), 300);
    await expect(p).rejects.toMatchObject({ code: "ERR_IPAM_ABORTED" });
    expect(d.node.allocations().size).toBe(0);
  });

  it("an address allocated for a caller that already gave up is released again; an address the pod had before is kept", async () => {
    const d = driver(0);
    d.tick(); // founds a one-node cluster and pins a block
    d.tick();
    const ac = new AbortController();
    ac.abort();
    await expect(d.allocate("gone", 5_000, ac.signal)).rejects.toMatchObject({ code: "ERR_IPAM_ABORTED" });
    expect(d.node.allocations().has("gone")).toBe(false);
    const kept = await d.allocate("kept", 5_000);
    await expect(d.allocate("kept", 5_000, ac.signal)).rejects.toMatchObject({ code: "ERR_IPAM_ABORTED" });
    expect(d.node.allocations().get("kept")).toBe(kept.ip);
    expect(d.counters.abandoned).toBe(0);
    // the agent's path: allocated, then the caller went away while the bridge was being set up
    await d.allocate("late", 5_000);
    expect(d.abandoned("late", false).code).toBe("ERR_IPAM_ABORTED");
    expect(d.node.allocations().has("late")).toBe(false);
    expect(d.counters.abandoned).toBe(1);
  });
});
