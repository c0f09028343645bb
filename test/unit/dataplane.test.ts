// The DataPlane from its ports, without root: memory TUNs, a recording node network and an in-memory mesh
// packet port between nodes, with real Forwarders, real frames and a real source (anti-spoofing) table.
// Checks the packet way TUN -> mesh -> TUN, anti-spoof drops, the one backpressure policy (pause on "full",
// resume on the drain), and the one reconcile trigger (a pod add or del applies the node network once).
import { describe, expect, it } from "vitest";
import { DataPlane, type MeshPacketPort } from "../../agent/dataplane.js";
import type { PodAddress } from "../../agent/ipam.js";
import { Pods, type PodOs } from "../../agent/pods.js";
import { desiredNodeNetwork, type DesiredNodeNetwork } from "../../src/desired-network.js";
import { silentLogger } from "../../src/log.js";
import type { ChannelName, SendResult } from "../../src/mesh/transport.js";
import { parseIPv4 } from "../../src/packet/ip.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { MemoryDevice, RecordingNetwork } from "../../src/testing/memory-device.js";
import { ipv4Packet } from "./packet-fixtures.js";

const A = "aaaaaaaaaaaaaaaa";
const B = "bbbbbbbbbbbbbbbb";
const BLOCK_A = "10.40.0.0/26";
const BLOCK_B = "10.40.0.64/26";
/** A's second block (A owns both; with no pods the lowest, BLOCK_A, carries the host's source address) */
const BLOCK_A2 = "10.40.0.128/26";

/** a TUN packet (virtio header + IPv4/UDP) */
const pkt = (src: string, dst: string, payload = new Uint8Array(200).fill(9)) => {
  const ip = ipv4Packet(parseIPv4(src)!, parseIPv4(dst)!, payload);
  const p = new Uint8Array(VNET_HDR_LEN + ip.length);
  p.set(ip, VNET_HDR_LEN);
  return p;
};

type Handlers = { packet?: (from: string, d: Uint8Array) => void; drain?: (p: string, ch: ChannelName) => void; down?: (p: string) => void };

/** A mesh packet port per node over one in-memory wire; `full` peers refuse with "full"; every send is recorded. */
function wire() {
  const h: Record<string, Handlers> = { [A]: {}, [B]: {} };
  const full = new Set<string>();
  const queued = new Map<string, number>();
  const sent: { from: string; to: string; bytes: number }[] = [];
  const port = (self: string): MeshPacketPort => ({
    sendPacket(peer, frame): SendResult {
      if (!h[peer]) return "closed";
      if (full.has(peer)) return "full";
      sent.push({ from: self, to: peer, bytes: frame.length });
      h[peer]!.packet?.(self, new Uint8Array(frame)); // the link copies
      return "ok";
    },
    queued: (peer) => queued.get(peer) ?? 0,
    linkBudget: () => undefined,
    onPacket: (f) => void (h[self]!.packet = f),
    onDrain: (f) => void (h[self]!.drain = f),
    onPeerDown: (f) => void (h[self]!.down = f),
  });
  return { port, full, queued, sent, drain: (self: string, peer: string) => h[self]!.drain?.(peer, "packets"), down: (self: string, peer: string) => h[self]!.down?.(peer) };
}

/** The cryptokey table every node derives from the IPAM table: A owns BLOCK_A, B owns BLOCK_B. */
function sourcesTable(): PrefixTable<string> {
  const t = new PrefixTable<string>();
  t.replaceAll([
    [BLOCK_A, A],
    [BLOCK_B, B],
  ]);
  return t;
}

function node(self: string, w: ReturnType<typeof wire>, desired: () => DesiredNodeNetwork, opts: { sources?: boolean } = {}) {
  const owners = new PrefixTable<string>();
  owners.insert(BLOCK_A, A);
  owners.insert(BLOCK_B, B);
  const device = new MemoryDevice(`weft-${self.slice(0, 1)}`);
  const network = new RecordingNetwork();
  const dp = new DataPlane({
    selfId: self,
    device,
    network,
    mesh: w.port(self),
    routes: { owners, nextHop: (n) => (n === self ? undefined : n) },
    ...(opts.sources === false ? {} : { sources: sourcesTable() }),
    desired,
    logger: silentLogger,
    bridge: "br",
    mtu: 1400,
  });
  return { dp, device, network };
}

/** the receive side writes to the TUN from setImmediate (after userspace GRO) */
const tick = () => new Promise((r) => setImmediate(r));

const state = (active: string[]): DesiredNodeNetwork => desiredNodeNetwork({ tun: "weft0", clusterRange: "10.40.0.0/16", ownedBlocks: [BLOCK_A, BLOCK_A2], activeBlocks: active, acceptedRoutes: [], advertised: [], snat: false });

describe("DataPlane (memory ports)", () => {
  it("applies the network at start, then carries a TUN batch to the owner's TUN through the mesh port", async () => {
    const w = wire();
    const a = node(A, w, () => state([BLOCK_A]));
    const b = node(B, w, () => state([]));
    await a.dp.start();
    await b.dp.start();
    expect(a.network.applied).toEqual([state([BLOCK_A])]);
    expect(a.network.applied[0]!.node.clusterRouteSrc).toBe("10.40.0.1");
    const batch = [pkt("10.40.0.2", "10.40.0.70"), pkt("10.40.0.2", "10.40.0.71"), pkt("10.40.0.2", "10.40.9.9")];
    a.device.inject(batch);
    await tick();
    // one frame to B (the owner of 10.40.0.64/26) carried both packets; 10.40.9.9 has no owner
    expect(w.sent.map((s) => [s.from, s.to])).toEqual([[A, B]]);
    expect(b.device.written).toEqual(batch.slice(0, 2));
    expect(a.dp.stats().forwarder.txPackets).toBe(2);
    expect(a.dp.stats().drops["no-route"]).toBe(1);
    expect(b.dp.stats().forwarder.rxPackets).toBe(2);
    // and back: B's pod answers A's
    const reply = [pkt("10.40.0.70", "10.40.0.2")];
    b.device.inject(reply);
    await tick();
    expect(a.device.written).toEqual(reply);
    await a.dp.stop();
    expect(a.network.tornDown).toBe(true);
    expect(a.device.closed).toBe(true);
  });

  it("anti-spoofing: a source address that is not the sender's is dropped and counted, at the TUN and from the mesh", async () => {
    const w = wire();
    const a = node(A, w, () => state([]));
    const b = node(B, w, () => state([]));
    await a.dp.start();
    await b.dp.start();
    // A's own TUN: a packet from an address A does not own never leaves
    a.device.inject([pkt("192.168.1.5", "10.40.0.70"), pkt("10.40.0.100", "10.40.0.70")]);
    await tick();
    expect(w.sent).toEqual([]);
    expect(a.dp.stats().drops["spoofed-source"]).toBe(2);
    // a node without the check (a rogue or broken A) sends B's own address: B drops it on arrival
    const w2 = wire();
    const rogue = node(A, w2, () => state([]), { sources: false });
    const b2 = node(B, w2, () => state([]));
    await rogue.dp.start();
    await b2.dp.start();
    rogue.device.inject([pkt("10.40.0.100", "10.40.0.70"), pkt("10.40.0.2", "10.40.0.70")]);
    await tick();
    expect(w2.sent.length).toBe(1);
    expect(b2.dp.stats().drops["spoofed-source"]).toBe(1);
    expect(b2.device.written).toEqual([pkt("10.40.0.2", "10.40.0.70")]);
    for (const n of [a, b, rogue, b2]) await n.dp.stop();
  });

  it("pauses the TUN when the link is full and resumes on its drain, frames in order", async () => {
    const w = wire();
    const a = node(A, w, () => state([]));
    const b = node(B, w, () => state([]));
    await a.dp.start();
    await b.dp.start();
    w.full.add(B);
    const first = [pkt("10.40.0.2", "10.40.0.70")];
    a.device.inject(first);
    expect(a.device.paused).toBe(true);
    const second = [pkt("10.40.0.2", "10.40.0.71")];
    a.device.inject(second); // waits in the "kernel" queue
    await tick();
    expect(b.device.written).toEqual([]);
    w.drain(A, B); // stale: still full
    expect(a.device.paused).toBe(true);
    w.full.delete(B);
    w.drain(A, B);
    expect(a.device.paused).toBe(false);
    await tick();
    expect(b.device.written).toEqual([...first, ...second]);
    expect(a.dp.stats().drops["queue-full"]).toBeUndefined();
  });

  it("pauses above the high-water mark until the drain, and a lost peer resumes reading", async () => {
    const w = wire();
    const a = node(A, w, () => state([]));
    node(B, w, () => state([]));
    await a.dp.start();
    w.queued.set(B, 1 << 20);
    a.device.inject([pkt("10.40.0.2", "10.40.0.70")]);
    expect(a.device.paused).toBe(true);
    w.down(A, B);
    expect(a.device.paused).toBe(false);
  });

  it("reconcile: calls while one is queued share it; an unchanged state is not applied again; a failed apply is retried", async () => {
    const w = wire();
    let active = [BLOCK_A2];
    let computed = 0;
    const a = node(A, w, () => {
      computed++;
      return state(active);
    });
    await a.dp.start();
    expect(a.network.applied.length).toBe(1);
    await Promise.all([a.dp.reconcile(), a.dp.reconcile(), a.dp.reconcile()]);
    expect(computed).toBe(2); // one run for the three calls
    expect(a.network.applied.length).toBe(1); // and the same state as before: nothing to apply
    active = [];
    await a.dp.reconcile();
    expect(a.network.applied.at(-1)).toEqual(state([]));
    a.network.failNext = new Error("ip: boom");
    active = [BLOCK_A2];
    await expect(a.dp.reconcile()).rejects.toThrow("boom");
    const n = a.network.applied.length;
    await a.dp.reconcile(); // the same state, but never applied: tried again
    expect(a.network.applied.length).toBe(n + 1);
    expect(a.network.applied.at(-1)).toEqual(state([BLOCK_A2]));
  });

  it("a pod add or del applies the node network at most once, even when IPAM's block trigger fires too", async () => {
    const w = wire();
    const allocs = new Map<string, string>();
    const blockListeners: (() => void)[] = [];
    const active = () => (allocs.size ? [BLOCK_A2] : []);
    const ipam = {
      // like agent/ipam.ts: the first pod of a block changes the blocks with pods, and the listeners fire at once
      async allocate(podId: string): Promise<PodAddress> {
        const before = active().join();
        allocs.set(podId, `10.40.0.${allocs.size + 130}`);
        if (active().join() !== before) for (const f of blockListeners) f();
        return { podId, ip: allocs.get(podId)!, prefixLen: 26, gateway: "10.40.0.129", block: BLOCK_A2 };
      },
      release(podId: string): boolean {
        const before = active().join();
        const had = allocs.delete(podId);
        if (active().join() !== before) for (const f of blockListeners) f();
        return had;
      },
    };
    const a = node(A, w, () => state(active()));
    await a.dp.start();
    blockListeners.push(() => void a.dp.reconcile());
    const attached: string[] = [];
    const os: PodOs = {
      async add(spec) {
        // the bridge must have the block's gateway before the pod is attached
        expect(a.network.applied.at(-1)!.node.localBlocks).toContain(BLOCK_A2);
        attached.push(spec.podId!);
        return { hostVeth: "wp0", ifName: "eth0", mac: "", hostMac: "", netnsPath: "", createdNetns: true, ip: spec.ip, prefixLen: spec.prefixLen, gateway: spec.gateway, mtu: 1400 };
      },
      async del(ref) {
        attached.splice(attached.indexOf(ref.podId!), 1);
      },
    };
    const pods = new Pods({ ipam, reconcile: () => a.dp.reconcile(), os, bridge: "br", mtu: 1400, logger: silentLogger });
    const n0 = a.network.applied.length;
    const p1 = await pods.add("one"); // the block's first pod: its gateway goes on the bridge, once
    expect(p1).toMatchObject({ name: "one", ip: "10.40.0.130", netns: "one" });
    expect(a.network.applied.length).toBe(n0 + 1);
    expect(a.network.applied.at(-1)).toEqual(state([BLOCK_A2]));
    await pods.add("two"); // same block: the node network does not change
    expect(a.network.applied.length).toBe(n0 + 1);
    await pods.del("one");
    expect(a.network.applied.length).toBe(n0 + 1);
    expect(await pods.del("two")).toEqual({ released: true }); // the block's last pod: once again
    expect(a.network.applied.length).toBe(n0 + 2);
    expect(a.network.applied.at(-1)).toEqual(state([]));
    expect(attached).toEqual([]);
    await expect(pods.add("bad name")).rejects.toMatchObject({ code: "ERR_USAGE" });
    expect(a.network.applied.length).toBe(n0 + 2);
  });
});
