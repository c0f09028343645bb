import { describe, expect, it } from "vitest";
import { decideRoutes } from "../../agent/os/advertise.js";
import { parseCidr } from "../../src/ipam/cidr.js";

const X = "1111111111111111";
const Y = "2222222222222222";
const base = { clusterRange: "10.40.0.0/16", localNetworks: [parseCidr("192.168.1.0/24")], protectedHosts: ["203.0.113.7", "198.51.100.20"] };
const ok = (ds: ReturnType<typeof decideRoutes>) => ds.filter((d) => d.accepted).map((d) => `${d.node}:${d.cidr}`);

describe("--accept-routes: which advertised routes a node installs", () => {
  it("installs nothing by default, only what the operator accepts", () => {
    const offers = [{ node: X, cidr: "172.16.5.0/24" }, { node: Y, cidr: "10.99.0.0/16" }];
    expect(ok(decideRoutes({ ...base, offers, accept: undefined }))).toEqual([]);
    expect(decideRoutes({ ...base, offers, accept: undefined })[0]!.reason).toMatch(/--accept-routes/);
    expect(ok(decideRoutes({ ...base, offers, accept: ["172.16.0.0/12"] }))).toEqual([`${X}:172.16.5.0/24`]);
    expect(ok(decideRoutes({ ...base, offers, accept: "all" })).sort()).toEqual([`${Y}:10.99.0.0/16`, `${X}:172.16.5.0/24`].sort());
  });
  it("never installs metadata/link-local, loopback, the underlay, server or peer addresses, default routes or cluster prefixes, even with all", () => {
    const bad = ["169.254.169.254/32", "169.254.0.0/16", "127.0.0.0/8", "192.168.1.0/24", "192.168.0.0/16", "203.0.113.7/32", "198.51.100.0/24", "0.0.0.0/0", "0.0.0.0/1", "10.40.3.0/26", "10.0.0.0/8", "224.0.0.1/32"];
    const ds = decideRoutes({ ...base, offers: bad.map((cidr) => ({ node: X, cidr })), accept: "all" });
    expect(ok(ds)).toEqual([]);
    expect(ds.every((d) => d.reason !== "accepted")).toBe(true);
  });
  it("overlapping offers from two nodes: reported, neither installed (the lower id does not win)", () => {
    const ds = decideRoutes({ ...base, offers: [{ node: X, cidr: "8.8.8.8/32" }, { node: Y, cidr: "8.8.8.0/24" }, { node: Y, cidr: "172.20.0.0/16" }], accept: "all" });
    expect(ok(ds)).toEqual([`${Y}:172.20.0.0/16`]);
    expect(ds.filter((d) => /conflicts/.test(d.reason))).toHaveLength(2);
    // ...and an offer overlapping a route this node advertises itself is not installed either
    const mine = decideRoutes({ ...base, offers: [{ node: X, cidr: "172.20.0.0/16" }], accept: "all", own: ["172.20.5.0/24"] });
    expect(mine[0]).toMatchObject({ accepted: false, reason: expect.stringMatching(/advertised by this node/) });
  });
});
