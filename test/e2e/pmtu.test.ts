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
import { isRoot, MeshLab, sh, until } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
/** The largest libdatachannel `mtu` whose full-size packets fit a 2000-byte IPv4 path (see the header). */
const FITS = 2000 + 31;
if (!isRoot) console.warn("skipping path MTU e2e: needs root");

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
      // how the first links ended, as status (and weftnet_pmtu_searches_total) counts it
      const counters = await Promise.all(lab.nodes.map(async (n) => (await lab.status(n)).pmtu));
      console.log(`[measure] pmtu counters (${name}): ${JSON.stringify(counters)}`);
      expect(counters.some((c) => (c?.searches[outcome] ?? 0) >= 1)).toBe(true);
      expect(counters.every((c) => (c?.searches.confirmed ?? 0) >= 1)).toBe(true);
      const pa = await lab.addPod(lab.nodes[0]!, "ma");
      const pb = await lab.addPod(lab.nodes[1]!, "mb");
      await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", "-s", "1372", "-M", "do", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "full-size ping", dump);
      const data = randomBytes(4 << 20);
      const file = join(lab.root, "payload.bin");
      writeFileSync(file, data);
      const server = sh(pb.name, process.execPath, ["-e", `const s=require('net').createServer(c=>{const h=require('crypto').createHash('sha256');let n=0;c.on('data',d=>{h.update(d);n+=d.length});c.on('end',()=>{console.log(n+' '+h.digest('hex'));s.close()})}).listen(5201,'${pb.ip}')`], 60_000);
      await new Promise((r) => setTimeout(r, 500));
      await sh(pa.name, process.execPath, ["-e", `const c=require('net').connect(5201,'${pb.ip}',()=>{require('fs').createReadStream('${file}').pipe(c)})`], 60_000);
      expect((await server).stdout.trim()).toBe(`${data.length} ${createHash("sha256").update(data).digest("hex")}`);
    }, 240_000);
  });
}

// route MTU 2000 -> mtu 2031, searched in multiples of 4: 2028
pmtuCase("uplink MTU 2000 (local route limit)", { uplinkMtu: 2000 }, 4, "local-limit");
// no local limit: the search's 16-byte fine steps
pmtuCase("silent black hole behind 9000-byte uplinks", { uplinkMtu: 9000, lanPortMtu: 2000 }, 16, "searched");
