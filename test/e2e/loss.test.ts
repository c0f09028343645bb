/**
 * End to end (root): pod-to-pod TCP over a lossy path. Two agents on one LAN, the receiving node drops 1% of
 * its incoming UDP at random (iptables `-m statistic`; this kernel has no netem), and a 32 MiB stream must
 * arrive byte for byte over a native (libdatachannel) link and over a werift link. Over native, the
 * sender's segmentation policy (src/packet/gso-policy.ts, "auto") must have noticed the loss (the inner
 * TCP retransmits) and segmented. werift's SCTP recovers most lost chunks of the packets channel by
 * itself (measured: a handful of inner retransmissions in 32 MiB), so its inner TCP rarely sees the loss
 * and segmentation need not turn on there; the bytes must arrive all the same.
 */
import { createHash, randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { hasIptables } from "../helpers/netns.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot || !hasIptables);
if (!isRoot || !hasIptables) console.warn("skipping loss e2e: needs root and iptables");

const SIZE = 32 << 20;

for (const kind of ["native", "werift"] as const) {
  d(`pod-to-pod over a ${kind} link with 1% random UDP loss`, () => {
    const lab = new MeshLab(2);
    let pa: { ip: string; name: string };
    let pb: { ip: string; name: string };
    let undo: (() => void) | undefined;
    const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");

    beforeAll(async () => {
      await lab.setup();
      await lab.startSignal();
      lab.nodes.forEach((n) => lab.startAgent(n, ["--transport", kind, "--no-bulk"])); // the WebRTC path (the bulk link has its own loss test)
      await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.state === "connected")), 30_000, "mesh", dump);
      // A WebRTC link that is slow to form (a loaded box) starts on the signaling server's relay (TCP, which
      // the UDP loss does not touch): wait for the WebRTC link itself.
      await until(async () => (await Promise.all(lab.nodes.map((n) => lab.status(n)))).every((s) => s.peers.some((p) => p.linkType === "webrtc")), 60_000, "webrtc links", dump);
      pa = await lab.addPod(lab.nodes[0]!, "la");
      pb = await lab.addPod(lab.nodes[1]!, "lb");
      await until(async () => (await sh(pa.name, "ping", ["-c", "1", "-W", "1", pb.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping", dump);
      const b = lab.nodes[1] as LabNode;
      const rule = ["INPUT", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.01", "-j", "DROP"];
      execFileSync("nsenter", [`--net=/run/netns/${b.ns}`, "--", "iptables", "-I", ...rule]);
      undo = () => execFileSync("nsenter", [`--net=/run/netns/${b.ns}`, "--", "iptables", "-D", ...rule]);
    }, 90_000);
    afterAll(async () => {
      try {
        undo?.();
      } finally {
        await lab.close();
      }
    }, 60_000);

    it("carries 32 MiB byte for byte, segmenting once the loss shows", async () => {
      const data = randomBytes(SIZE);
      const file = join(lab.root, "payload.bin");
      writeFileSync(file, data);
      const server = sh(pb.name, process.execPath, ["-e", `const s=require('net').createServer(c=>{const h=require('crypto').createHash('sha256');let n=0;c.on('data',d=>{h.update(d);n+=d.length});c.on('end',()=>{console.log(n+' '+h.digest('hex'));s.close()})}).listen(5201,'${pb.ip}')`], 180_000);
      await new Promise((r) => setTimeout(r, 500));
      await sh(pa.name, process.execPath, ["-e", `const c=require('net').connect(5201,'${pb.ip}',()=>{require('fs').createReadStream('${file}').pipe(c)})`], 180_000);
      const out = (await server).stdout.trim();
      expect(out).toBe(`${data.length} ${createHash("sha256").update(data).digest("hex")}`);
      const sa = (await lab.status(lab.nodes[0]!)).dataplane!;
      const sb = (await lab.status(lab.nodes[1]!)).dataplane!;
      console.log(`${kind}: sender segmentation ${JSON.stringify(sa.segmentation)}, receiver GRO ${JSON.stringify(sb.gro)}`);
      expect(sa.segmentation.mode).toBe("auto");
      if (kind === "native") {
        expect(sa.segmentation.activations).toBeGreaterThanOrEqual(1);
        expect(sa.segmentation.segments).toBeGreaterThan(1000);
        expect(sb.gro.built).toBeGreaterThan(0);
      }
      expect(sb.drops.malformed ?? 0).toBe(0);
    }, 240_000);
  });
}
