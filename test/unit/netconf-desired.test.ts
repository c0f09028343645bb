/** desiredNetwork(): the node network the agent asks for, from IPAM state (pure; the kernel side is test/e2e/netconf.test.ts). */
import { describe, expect, it } from "vitest";
import { desiredNetwork } from "../../agent/os/netconf.js";

const range = ["10.40.0.0/16"];

describe("desiredNetwork", () => {
  it("an owned block without pods keeps its gateway on the bridge and is the cluster route's src", () => {
    expect(desiredNetwork({ clusterRanges: range, ownedBlocks: ["10.40.3.0/26"], activeBlocks: [] })).toEqual({
      clusterRanges: range,
      localBlocks: ["10.40.3.0/26"],
      clusterRouteSrc: "10.40.3.1",
    });
  });

  it("the src is the lowest block with pods, else the lowest owned block (numeric order)", () => {
    const owned = ["10.40.3.64/26", "10.40.10.0/26", "10.40.3.0/26"];
    expect(desiredNetwork({ clusterRanges: range, ownedBlocks: owned, activeBlocks: [] })).toMatchObject({ localBlocks: ["10.40.3.0/26"], clusterRouteSrc: "10.40.3.1" });
    // pods: only blocks holding pods are on the bridge, the src is the lowest of them (it is never handed away)
    expect(desiredNetwork({ clusterRanges: range, ownedBlocks: owned, activeBlocks: ["10.40.10.0/26", "10.40.3.64/26"] })).toMatchObject({
      localBlocks: ["10.40.3.64/26", "10.40.10.0/26"],
      clusterRouteSrc: "10.40.3.65",
    });
    expect(desiredNetwork({ clusterRanges: range, ownedBlocks: owned, activeBlocks: ["10.40.3.0/26"] })).toMatchObject({ localBlocks: ["10.40.3.0/26"], clusterRouteSrc: "10.40.3.1" });
    // 10.40.10.0 < 10.40.9.0 as strings, not as addresses
    expect(desiredNetwork({ clusterRanges: range, ownedBlocks: ["10.40.10.0/26", "10.40.9.0/26"], activeBlocks: [] }).clusterRouteSrc).toBe("10.40.9.1");
  });

  it("no owned block: no gateway address and no src", () => {
    const d = desiredNetwork({ clusterRanges: range, ownedBlocks: [], activeBlocks: [], extraRoutes: [{ cidr: "10.77.0.0/24", dev: "weft0" }] });
    expect(d).toEqual({ clusterRanges: range, localBlocks: [], extraRoutes: [{ cidr: "10.77.0.0/24", dev: "weft0" }] });
    expect("clusterRouteSrc" in d).toBe(false);
  });

  it("bad IPAM input is a typed error", () => {
    expect(() => desiredNetwork({ clusterRanges: range, ownedBlocks: ["10.40.3.0/99"], activeBlocks: [] })).toThrow(expect.objectContaining({ code: "ERR_NETCONF_INPUT" }));
  });
});
