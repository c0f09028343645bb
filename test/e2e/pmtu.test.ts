/**
 * End to end (root): the path MTU search (agent/transport/link-base.ts, src/packet/gso-pmtu.ts). Two native
 * agents told to assume a 4096-byte path (--link-mtu 4096) on a LAN whose MTU is 2000: the first link's
 * full-size check fails, the link searches what gets through, and the next link is built for it: within one
 * fine search step (16 bytes) of the largest MTU that fits (found by probing, not a fixed step to 1500).
 * libdatachannel's `mtu` budgets 108 bytes for IPv6 + UDP + DTLS + SCTP; over IPv4 with AES-GCM DTLS a
 * full-size packet is mtu - 43 bytes on the wire, so a 2000-byte IPv4 LAN carries mtu up to 2043.
 * Pods then carry full-size TCP.
 */
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isRoot, MeshLab, sh, until } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
/** The largest libdatachannel `mtu` whose full-size packets fit a 2000-byte IPv4 path (see the header). */
const FITS = 2000 + 43;
if (!isRoot) console.warn("skipping path MTU e2e: needs root");

d("path MTU search on a 2000-byte LAN", () => {
  const lab = new MeshLab(2, { uplinkMtu: 2000 });
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");

  beforeAll(async () => {
    await lab.setup();
    await lab.startSignal();
    lab.nodes.forEach((n) => lab.startAgent(n, ["--transport", "native", "--link-mtu", "4096", "--no-bulk"]));
  }, 60_000);
  afterAll(async () => lab.close(), 60_000);

  it("settles on a path MTU just below 2000 and carries full-size TCP over it", async () => {
    const mtus = await until(
      async () => {
        const st = await Promise.all(lab.nodes.map((n) => lab.status(n)));
        const m = st.map((s) => s.peers.find((p) => p.state === "connected")?.pathMtu);
        return m.every((x) => typeof x === "number" && x > 1500 && x <= FITS) && (m as number[]);
      },
      120_000, // a loaded box: agents start slowly, and the first link's check takes ~3 s before the search
      "links at the searched MTU",
      dump,
    );
    console.log(`[measure] path MTU found on a 2000-byte IPv4 LAN with --link-mtu 4096: ${mtus.join(", ")} (largest that fits: ${FITS})`);
    for (const m of mtus) expect(FITS - m).toBeLessThan(16);
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
