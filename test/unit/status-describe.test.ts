/**
 * Status assembly (agent/status.ts describePeers): a peer routed via another agent names the link type of
 * that hop (bulk, webrtc, turn, relay), taken from the hop's own row, or says there is no link to it now.
 * The live WebRTC case runs in test/integration/ping-path.test.ts; bulk and relay hops here.
 */
import { describe, expect, it } from "vitest";
import { describePeers } from "../../agent/status.js";
import type { BulkPeerStatus } from "../../agent/transport/bulk.js";
import type { PeerStatus } from "../../src/mesh/manager.js";
import type { RouteEntry } from "../../src/mesh/paths.js";

const names: Record<string, string> = { "1": "n1", "2": "n2", "3": "n3", "4": "n4" };

function peer(id: string, over: Partial<PeerStatus> = {}): PeerStatus {
  return {
    id, name: names[id]!, state: "connected", path: "direct", link: "webrtc", webrtcFailures: 0, lastWebrtcError: null, rttMs: 1, srttMs: 1,
    bytesIn: 0, bytesOut: 0, uptimeMs: 1000, offerer: true, attempts: 1, lastError: null, lastSeenAgoMs: 0, selected: null, pathMtu: null, pmtuHow: null, meta: {}, version: null, ...over,
  };
}

const route = (dst: string, via: string): RouteEntry => ({ dst, nextHop: via, via, cost: 2, path: ["0", via, dst] });
const bulkUp: BulkPeerStatus = { state: "up", reason: "", endpoint: "192.0.2.2:41641", peerCands: [], rttMs: 1, keyAgeMs: 0, pathMax: 1464, txDatagrams: 0, rxDatagrams: 0, txBytes: 0, rxBytes: 0, rotations: 0, ups: 1, downs: 0, drops: {}, pmtu: { how: "confirmed", maxDatagram: 1464, foundAgoMs: 0, searches: 1, probes: 2, acked: 2, lost: 0, blackHoles: 0, tooBig: 0, unsolicitedAcks: 0, quickChecks: 0 } };

describe("status: peers routed via another agent", () => {
  it("name the hop's link type (bulk, relay), or that there is no link to the hop now", () => {
    const peers = [peer("2"), peer("3", { path: "relay", link: "relay" }), peer("4", { state: "backoff" }), peer("1", { state: "backoff" })];
    const routes: Record<string, RouteEntry> = { "2": route("2", "2"), "4": route("4", "2"), "1": route("1", "3") };
    routes["2"] = { dst: "2", nextHop: "2", via: "direct", cost: 1, path: ["0", "2"] };
    const v = describePeers(peers, (id) => routes[id], (id) => names[id], { enabled: true, status: (id) => (id === "2" ? bulkUp : null) });
    const by = (n: string) => v.find((p) => p.name === n)!;
    expect(by("n2")).toMatchObject({ linkType: "bulk", via: null, viaLink: null });
    expect(by("n3")).toMatchObject({ linkType: "relay", viaLink: null });
    expect(by("n4")).toMatchObject({ path: "via n2", linkType: "via", viaLink: "bulk", linkWhy: "no direct link; routed via n2 (bulk), lowest measured RTT" });
    expect(by("n1")).toMatchObject({ path: "via n3", linkType: "via", viaLink: "relay", linkWhy: "no direct link; routed via n3 (relay), lowest measured RTT" });
    // the hop's link went down before the routes caught up
    const down = describePeers([peer("2", { state: "backoff" }), peer("4", { state: "backoff" })], (id) => (id === "4" ? route("4", "2") : undefined), (id) => names[id], { enabled: false, status: () => null });
    expect(down.find((p) => p.name === "n4")).toMatchObject({ viaLink: null, linkWhy: "no direct link; routed via n2 (no link to it now), lowest measured RTT" });
  });
});

describe("weftnet status: how a WebRTC link's path MTU was found", () => {
  it("the NOTE column names it after the MTU (route limit, black hole, ...), and werift's fixed chunks", async () => {
    const { renderStatus } = await import("../../agent/cli/commands.js");
    const sel = { localType: "relay", localAddress: "198.18.0.2:5000", remoteType: "prflx", remoteAddress: "198.18.0.12:6000" };
    const st = {
      node: { name: "n0", id: "0", version: "x", transport: "native", uptimeMs: 1000, signal: { url: "ws://s", connected: true, addr: null } },
      pmtuFixed: null,
      routes: null,
      peers: [
        { ...peer("1", { selected: sel, pathMtu: 1524, pmtuHow: "route-limit" }), linkType: "turn", linkWhy: "", viaLink: null, via: null, bulk: null, path: "turn" },
        { ...peer("2", { selected: { ...sel, localType: "host" }, pathMtu: 2016, pmtuHow: "black-hole" }), linkType: "webrtc", linkWhy: "", viaLink: null, via: null, bulk: null },
        { ...peer("3", { selected: { ...sel, localType: "host" }, pathMtu: null, pmtuHow: "fixed" }), linkType: "webrtc", linkWhy: "", viaLink: null, via: null, bulk: null },
      ],
    } as unknown as Parameters<typeof renderStatus>[0];
    const out = renderStatus(st);
    expect(out).toMatch(/n1 .*relay->prflx 198\.18\.0\.12:6000 mtu 1524 \(route limit\)/);
    expect(out).toMatch(/n2 .*mtu 2016 \(black hole\)/);
    expect(out).toMatch(/n3 .*mtu fixed \(werift\)/);
  });
});
