/**
 * End to end (root): the WebRTC link's path MTU check and search (agent/transport/link-base.ts, src/mesh/pmtu.ts).
 * Two native agents told to assume a 4096-byte path (--link-mtu 4096, --no-bulk so pods ride WebRTC) on a LAN
 * whose path carries 2000-byte IPv4 packets:
 *
 * - "uplink": every node's uplink has MTU 2000. The local kernel's route MTU limits the first link's search:
 *   it ends at once (nothing above it is ever sent: a packet over the route MTU fails with EMSGSIZE under
 *   Don't Fragment and wedges usrsctp's send queue), the next link is built for it and confirms it.
 * - "black hole": uplinks at 9000 but the LAN bridge's ports at 2000, which drop larger frames silently (no
 *   ICMP): the first link's 4096 probes are lost and the search probes its way up from 1280.
 *
 * libdatachannel's full-size packet is mtu - 31 bytes of IPv4 on the wire (native.ts NATIVE_WIRE_BELOW_MTU), so
 * a 2000-byte path carries mtu up to 2031; the search works in multiples of 4 (2028 from the route MTU) and 16-byte
 * fine steps (black hole). Then pods carry full-size TCP across, byte for byte.
 */
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isRoot, listening, MeshLab, sh, until } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
/** The largest libdatachannel `mtu` whose full-size packets fit a 2000-byte IPv4 path (see the header). */
const FITS = 2000 + 31;
if (!isRoot) console.warn("skipping path MTU e2e: needs root");

/** 4 MiB of TCP from pod a to pod b, checked by length and SHA-256 at b. */
async function tcpByteExact(lab: MeshLab, pa: { name: string; ip: string }, pb: { name: string; ip: string }): Promise<void> {
  const data = randomBytes(4 << 20);
  const file = join(lab.root, `payload-${pa.name}.bin`);
  writeFileSync(file, data);
  const server = sh(pb.name, process.execPath, ["-e", `const s=require('net').createServer(c=>{const h=require('crypto').createHash('sha256');let n=0;c.on('data',d=>{h.update(d);n+=d.length});c.on('end',()=>{console.log(n+' '+h.digest('hex'));s.close()})}).listen(5201,'${pb.ip}')`], 60_000);
  await listening(pb.name, 5201);
  await sh(pa.name, process.execPath, ["-e", `const c=require('net').connect(5201,'${pb.ip}',()=>{require('fs').createReadStream('${file}').pipe(c)})`], 60_000);
  expect((await server).stdout.trim()).toBe(`${data.length} ${createHash("sha256").update(data).digest("hex")}`);
}

function pmtuCase(name: string, opts: { uplinkMtu: number; lanPortMtu?: number }, within: number, outcome: "local-limit" | "searched") {
  d(`path MTU on a 2000-byte LAN: ${name}`, () => {
    const lab = new MeshLab(2, opts);
    const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");

    beforeAll(async () => {
      await lab.setup();
      await lab.startSignal();
      lab.nodes.forEach((n) => lab.startAgent(n, ["--transport", "native", "--link-mtu", "4096", "--no-bulk"]));
    }, 60_000);
    afterAll(async () => lab.close(), 60_000);

    it("settles on the largest path MTU that fits and carries full-size TCP over it", async () => {
      const mtus = await until(
        async () => {
          const st = await Promise.all(lab.nodes.map((n) => lab.status(n)));
          const m = st.map((s) => s.peers.find((p) => p.state === "connected")?.pathMtu);
          return m.every((x) => typeof x === "number" && x > 1500 && x <= FITS) && (m as number[]);
        },
        120_000, // a loaded box: agents start slowly; a black-hole search takes ~4 s per link
        "links at the searched MTU",
        dump,
      );
      console.log(`[measure] path MTU (${name}) on a 2000-byte IPv4 LAN with --link-mtu 4096: ${mtus.join(", ")} (largest that fits: ${FITS})`);
      for (const m of mtus) expect(FITS - m).toBeLessThan(within);
      // how status says the size was found: this side's own check (route limit / black hole), or the peer's result
      const hows = await Promise.all(lab.nodes.map(async (n) => (await lab.status(n)).peers.find((p) => p.state === "connected")?.pmtuHow));
      console.log(`[measure] pmtuHow (${name}): ${hows.join(", ")}`);
      const own = outcome === "local-limit" ? "route-limit" : "black-hole";
      for (const h of hows) expect([own, "peer"]).toContain(h);
      expect(hows).toContain(own);
      // how the first links ended, as status (and weftnet_pmtu_searches_total) counts it
      const counters = await Promise.all(lab.nodes.map(async (n) => (await lab.status(n)).pmtu));
      console.log(`[measure] pmtu counters (${name}): ${JSON.stringify(counters)}`);
      expect(counters.some((c) => (c?.searches[outcome] ?? 0) >= 1)).toBe(true);
      expect(counters.every((c) => (c?.searches.confirmed ?? 0) >= 1)).toBe(true);
      const pa = await lab.addPod(lab.nodes[0]!, "ma");
      const pb = await lab.addPod(lab.nodes[1]!, "mb");
      await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", "-s", "1372", "-M", "do", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "full-size ping", dump);
      await tcpByteExact(lab, pa, pb);
    }, 240_000);
  });
}

// route MTU 2000 -> mtu 2031, searched in multiples of 4: 2028
pmtuCase("uplink MTU 2000 (local route limit)", { uplinkMtu: 2000 }, 4, "local-limit");
// no local limit: the search's 16-byte fine steps
pmtuCase("silent black hole behind 9000-byte uplinks", { uplinkMtu: 9000, lanPortMtu: 2000 }, 16, "searched");

/**
 * The bulk link (src/bulk/session.ts driving src/mesh/pmtu.ts): pods with MTU 4000, so the bulk link's largest
 * datagram (a full-size pod packet sealed) is far above what a 2000-byte IPv4 path carries (1972 bytes of UDP
 * payload). Its probes are sealed datagrams sent with Don't Fragment.
 * - route limit: the kernel's route MTU (2000 - 28) caps the search, which probes exactly it: pathMax 1972;
 * - silent black hole: 9000-byte uplinks, 2000-byte bridge ports: probes above 1972 vanish, the search lands
 *   within 16 bytes below;
 * - a black hole that appears mid-life (the bridge ports shrink from 9000 to 2000 while the link is up at its
 *   full size): the periodic confirmation probe is lost while keepalives pass, the link falls back and searches.
 * Then full-size TCP between the pods rides the bulk link (segmented to the path MTU), byte for byte.
 */
const BULK_FITS = 2000 - 28;
function bulkCase(name: string, opts: { uplinkMtu: number; lanPortMtu?: number }, within: number, outcome: "local-limit" | "searched", shrink?: number) {
  d(`bulk link path MTU on a 2000-byte LAN: ${name}`, () => {
    const lab = new MeshLab(2, opts);
    const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");
    const bulkPeers = async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).map((s) => s.peers.find((p) => p.state === "connected" && p.linkType === "bulk")?.bulk);

    beforeAll(async () => {
      await lab.setup();
      await lab.startSignal();
      // mid-life shrink: the WebRTC link (the mesh's control channel) at 1280, so only the bulk link meets the black hole
      lab.nodes.forEach((n) => lab.startAgent(n, ["--mtu", "4000", ...(shrink ? ["--link-mtu", "1280"] : [])]));
    }, 60_000);
    afterAll(async () => lab.close(), 60_000);

    it("settles on the largest datagram that fits and carries full-size TCP over it, byte for byte", async () => {
      let pods: { name: string; ip: string }[] | undefined;
      let stopPinger: Promise<unknown> | undefined;
      if (shrink) {
        // first up at the full size on the 9000-byte LAN, then the bridge ports shrink silently while large pod
        // packets cross (pings of 3028 bytes both ways, every 100 ms): the keepalives' received-size reports show
        // them missing and the confirmation probe goes at once (quick check) instead of at the next 5 s one.
        const full = await until(async () => {
          const b = await bulkPeers();
          return b.every((x) => x?.pmtu.how === "confirmed" && x.pathMax === x.pmtu.maxDatagram) && b;
        }, 120_000, "bulk links at the full size", dump);
        console.log(`[measure] bulk pathMax before the shrink: ${full.map((x) => x!.pathMax).join(", ")}`);
        pods = [await lab.addPod(lab.nodes[0]!, "ba"), await lab.addPod(lab.nodes[1]!, "bb")];
        const [pa, pb] = pods as [{ name: string; ip: string }, { name: string; ip: string }];
        await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", "-s", "3000", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "large pod ping", dump);
        const pinger = sh(pa.name, "ping", ["-i", "0.1", "-w", "15", "-s", "3000", pb.ip], 30_000).catch(() => undefined);
        const t0 = Date.now();
        await Promise.all(lab.nodes.map((_, k) => sh(lab.lan, "ip", ["link", "set", `p${k + 1}`, "mtu", String(shrink)], 5000)));
        // time to the first black hole counted (status polled every 100 ms: a figure, not an assertion)
        const detected = await until(async () => {
          const t = await Promise.all(lab.nodes.map(async (n) => (await lab.status(n)).bulk?.pmtu.blackHoles ?? 0));
          return t.some((x) => x >= 1) && Date.now() - t0;
        }, 60_000, "a black hole counted", dump);
        const quick = (await bulkPeers()).map((x) => x?.pmtu.quickChecks);
        console.log(`[measure] mid-life black hole under traffic detected ${detected} ms after the shrink (WEFTNET_BULK_PMTU_CHECKS=${process.env.WEFTNET_BULK_PMTU_CHECKS ?? "on"}; quick checks per side ${quick.join(", ")})`);
        stopPinger = pinger;
      }
      const b = await until(
        async () => {
          const b = await bulkPeers();
          return b.every((x) => x && x.pmtu.how === outcome && typeof x.pathMax === "number" && x.pathMax <= BULK_FITS && x.pathMax > 1500) && b;
        },
        120_000,
        `bulk links at the path MTU (${outcome})`,
        dump,
      );
      const sizes = b.map((x) => x!.pathMax!);
      console.log(`[measure] bulk path MTU (${name}) on a 2000-byte IPv4 LAN, pods at MTU 4000: pathMax ${sizes.join(", ")} bytes of UDP payload (largest that fits: ${BULK_FITS}; largest datagram wanted: ${b[0]!.pmtu.maxDatagram})`);
      console.log(`[measure] bulk per-peer pmtu (${name}): ${JSON.stringify(b.map((x) => x!.pmtu))}`);
      for (const m of sizes) expect(BULK_FITS - m).toBeLessThan(within);
      const totals = await Promise.all(lab.nodes.map(async (n) => (await lab.status(n)).bulk?.pmtu));
      console.log(`[measure] bulk pmtu counters (${name}): ${JSON.stringify(totals)}`);
      expect(totals.every((c) => (c?.searches[outcome] ?? 0) >= 1)).toBe(true);
      if (shrink) {
        // At least one side's confirmation probe met the black hole (the other may have searched afresh after a
        // path change took its link down for a moment, which the logs say).
        const downs = lab.nodes.map((n) => lab.log(`${n.name}.log`).split("\n").filter((l) => /bulk link (down|up)/.test(l)).length);
        console.log(`[measure] bulk link up/down log lines per node during the shrink case: ${downs.join(", ")}`);
        expect(totals.some((c) => (c?.blackHoles ?? 0) >= 1), dump()).toBe(true);
      }
      const [pa, pb] = pods ?? [await lab.addPod(lab.nodes[0]!, "ba"), await lab.addPod(lab.nodes[1]!, "bb")];
      await until(async () => (await sh(pa!.name, "ping", ["-c", "1", "-W", "1", pb!.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping", dump);
      const before = (await bulkPeers())[0]!;
      await tcpByteExact(lab, pa!, pb!);
      const after = (await bulkPeers())[0]!;
      console.log(`[measure] bulk datagrams n1->n2 during 4 MiB: ${after.txDatagrams - before.txDatagrams}, too-big-for-path ${JSON.stringify((await lab.status(lab.nodes[0]!)).bulk?.counters.tooBigForPath)}`);
      expect(after.txDatagrams - before.txDatagrams).toBeGreaterThan((4 << 20) / 4000); // rode the bulk link
      await stopPinger; // (ends by itself: -w 15)
    }, 300_000);
  });
}

bulkCase("uplink MTU 2000 (local route limit)", { uplinkMtu: 2000 }, 1, "local-limit");
bulkCase("silent black hole behind 9000-byte uplinks", { uplinkMtu: 9000, lanPortMtu: 2000 }, 16, "searched");
bulkCase("black hole appears mid-life (bridge ports 9000 -> 2000)", { uplinkMtu: 9000 }, 16, "searched", 2000);
