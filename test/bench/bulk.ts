/**
 * bench:bulk — the bulk link's userspace pipeline alone, no root: two BulkServices in this process on
 * loopback (real UDP sockets with GSO/GRO, real crypto), a stand-in mesh for the handshake. The sender
 * hands TCP GSO super-packets (60 KB, gso_size 1360) in data-plane frames, the receiver counts what its
 * GRO hands back. Both ends share this one thread, so the figure is the pipeline's CPU ceiling (sending +
 * receiving on one core), not a link speed. Prints Gbit/s of pod payload and microseconds per packet
 * (wall clock, and CPU time of the process: the steadier figure on a shared box).
 *
 *   npm run build && node dist/test/bench/bulk.js [--seconds 5] [--crypto sodium|node]
 */
import { parseArgs } from "node:util";
import { BulkService, type BulkMeshPort } from "../../agent/transport/bulk.js";
import { loadSodiumAead } from "../../agent/os/sodium.js";
import { nodeAead } from "../../src/bulk/crypto.js";
import { generateIdentity, type Identity } from "../../src/identity.js";
import { createLogger } from "../../src/log.js";
import { encodeFrames, nodeIdToBytes, decodeFrame } from "../../src/packet/frame.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";
import { tcpGso } from "../helpers/gso-packets.js";

const { values } = parseArgs({ options: { seconds: { type: "string", default: "5" }, crypto: { type: "string", default: "sodium" } } });
const SECONDS = Number(values.seconds);

function mesh(self: Identity, peers: Map<string, { pub: Uint8Array; app?: (from: string, body: unknown) => void }>) {
  const st: { up?: (id: string) => void } = {};
  const m: BulkMeshPort = {
    onApp: (_c, h) => (peers.get(self.id)!.app = h),
    sendApp: (peer, _c, body) => {
      setImmediate(() => peers.get(peer)!.app!(self.id, structuredClone(body)));
      return true;
    },
    onPeerUp: (f) => (st.up = f),
    onPeerDown: () => {},
    isConnected: () => true,
    peerPublicKey: (p) => peers.get(p)?.pub,
    peerName: (p) => p,
  };
  return { m, st };
}

const ia = generateIdentity();
const ib = generateIdentity();
const peers = new Map<string, { pub: Uint8Array; app?: (from: string, body: unknown) => void }>([
  [ia.id, { pub: ia.publicKey }],
  [ib.id, { pub: ib.publicKey }],
]);
const ma = mesh(ia, peers);
const mb = mesh(ib, peers);
const logger = createLogger({ level: "error" });
const aead = values.crypto === "node" ? nodeAead() : (loadSodiumAead() ?? nodeAead());
const A = BulkService.open({ identity: ia, mesh: ma.m, logger, loopbackOnly: true, aead });
const B = BulkService.open({ identity: ib, mesh: mb.m, logger, loopbackOnly: true, aead });
ma.st.up!(ib.id);
mb.st.up!(ia.id);
while (!(A.isUp(ib.id) && B.isUp(ia.id))) await new Promise((r) => setTimeout(r, 20));

let rxBytes = 0;
let rxPackets = 0;
B.onFrame((_f, frame) => {
  const f = decodeFrame(frame);
  if (!f.ok) return;
  for (const p of f.packets) {
    rxBytes += p.length - VNET_HDR_LEN - 40;
    rxPackets++;
  }
});
const PAYLOAD = 60_000;
const MSS = 1360;
const src = nodeIdToBytes(ia.id);
const dst = nodeIdToBytes(ib.id);
let seq = 0;
let sent = 0;
const t0 = performance.now();
const cpu0 = process.cpuUsage();
const end = t0 + SECONDS * 1000;
while (performance.now() < end) {
  const frame = encodeFrames(src, dst, [tcpGso(PAYLOAD, MSS, seq)]).frames[0]!;
  seq += PAYLOAD;
  A.send(ib.id, frame);
  sent += PAYLOAD;
  // keep < 2 MB in flight (the receive buffer is 4 MiB): yield to the receiver
  while (sent - rxBytes > 2_000_000 && performance.now() < end + 2000) await new Promise((r) => setImmediate(r));
}
await new Promise((r) => setTimeout(r, 200));
const cpu = process.cpuUsage(cpu0);
const secs = (performance.now() - t0) / 1000;
const segs = rxBytes / MSS;
process.stdout.write(
  `bulk pipeline, one process (send + receive on one core), ${aead.name}: ${((rxBytes * 8) / secs / 1e9).toFixed(2)} Gbit/s of TCP payload, ` +
    `${((secs * 1e6) / segs).toFixed(2)} us per 1360-byte segment (seal+send+recv+open+GRO), ${(100 * rxBytes / sent).toFixed(1)}% delivered, ` +
    `${rxPackets} packets after GRO for ${Math.round(segs)} segments; CPU ${(((cpu.user + cpu.system) / segs)).toFixed(2)} us per segment (user+system: less sensitive to a loaded box than the wall clock)\n`,
);
await A.close();
await B.close();
