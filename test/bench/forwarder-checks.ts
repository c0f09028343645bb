/**
 * node dist/test/bench/forwarder-checks.js [--seconds S] [--rounds R]   (no root)
 * CPU cost of the data path's zero-trust checks (issue 12), in one process, without any link or TUN:
 * Forwarder A -> Forwarder B (direct) and A -> B -> C (B a transit), 1400-byte packets in batches of 64,
 * send() handing a copy straight to the next forwarder's fromPeer, deliver() a no-op.
 *   plain     no `sources`, no `sealer` (the data path before cryptokey routing)
 *   checks    `sources` (TUN source, frame source node, inner source/destination) and `sealer`
 * Direct frames are never sealed (the link protects them): "checks" costs only the lookups there; via a
 * transit they are sealed end to end (ChaCha20-Poly1305 at A, opened at C). Rounds alternate plain/checks;
 * prints packets/s per round, medians, and checks/plain. Never fails on a number.
 */
import { parseArgs } from "node:util";
import { generateIdentity } from "../../src/identity.js";
import { Forwarder } from "../../src/packet/forwarder.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { FrameSealer } from "../../src/packet/seal.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";

const { values } = parseArgs({ options: { seconds: { type: "string", default: "2" }, rounds: { type: "string", default: "5" } } });
const SECONDS = Number(values.seconds);
const ROUNDS = Number(values.rounds);

const ids = [generateIdentity(), generateIdentity(), generateIdentity()];
const [A, B, C] = ids.map((i) => i.id) as [string, string, string];
const pubs = new Map(ids.map((i) => [i.id, i.publicKey]));
const BLOCKS: [string, string][] = [["10.40.0.0/26", A], ["10.40.0.64/26", B], ["10.40.0.128/26", C]];

function udp(src: number, dst: number, size: number): Uint8Array {
  const p = new Uint8Array(VNET_HDR_LEN + size);
  const ip = VNET_HDR_LEN;
  const dv = new DataView(p.buffer);
  p[ip] = 0x45;
  dv.setUint16(ip + 2, size);
  p[ip + 8] = 64;
  p[ip + 9] = 17;
  dv.setUint32(ip + 12, src);
  dv.setUint32(ip + 16, dst);
  return p;
}

function chain(checks: boolean, via: boolean): { fromTun: (b: Uint8Array[]) => void; delivered: () => number } {
  const routes = new PrefixTable<string>();
  for (const [c, n] of BLOCKS) routes.insert(c, n);
  const sources = new PrefixTable<string>();
  sources.replaceAll(BLOCKS);
  let delivered = 0;
  const fw: Record<string, Forwarder> = {};
  const hops: Record<string, Record<string, string>> = via ? { [A]: { [C]: B, [B]: B }, [B]: { [C]: C, [A]: A }, [C]: { [A]: B } } : { [A]: { [B]: B }, [B]: { [A]: A } };
  for (const idn of ids) {
    const id = idn.id;
    fw[id] = new Forwarder({
      selfId: id,
      routes,
      ...(checks ? { sources, sealer: new FrameSealer({ identity: idn, publicKeyOf: (n) => pubs.get(n), now: () => Date.now() }) } : {}),
      nextHop: (n) => hops[id]?.[n],
      send: (peer, frame) => {
        fw[peer]!.fromPeer(id, new Uint8Array(frame));
        return "ok";
      },
      deliver: (ps) => (delivered += ps.length),
      sendBorrows: true,
    });
  }
  return { fromTun: (b) => fw[A]!.fromTun(b), delivered: () => delivered };
}

const src = (10 << 24) | (40 << 16) | 2;
const batch = (dst: number) => Array.from({ length: 64 }, () => udp(src, dst, 1400));

function run(checks: boolean, via: boolean): number {
  const c = chain(checks, via);
  const b = batch(via ? (10 << 24) | (40 << 16) | 130 : (10 << 24) | (40 << 16) | 66);
  for (let i = 0; i < 200; i++) c.fromTun(b); // warm up
  const n0 = c.delivered();
  const t0 = performance.now();
  let t = t0;
  while (t - t0 < SECONDS * 1000) {
    for (let i = 0; i < 50; i++) c.fromTun(b);
    t = performance.now();
  }
  return ((c.delivered() - n0) / (t - t0)) * 1000;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
for (const via of [false, true]) {
  const plain: number[] = [];
  const checked: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    plain.push(run(false, via));
    checked.push(run(true, via));
  }
  const k = (x: number) => `${(x / 1000).toFixed(0)}k`;
  process.stdout.write(`${via ? "via a transit (A -> B -> C)" : "direct (A -> B)"}: packets/s (1400 B), ${ROUNDS} rounds of ${SECONDS} s\n`);
  process.stdout.write(`  plain   ${plain.map(k).join(" ")}  median ${k(median(plain))}\n`);
  process.stdout.write(`  checks  ${checked.map(k).join(" ")}  median ${k(median(checked))}  checks/plain ${(median(checked) / median(plain)).toFixed(3)}\n`);
  process.stdout.write(`  = ${(1e9 / median(checked) - 1e9 / median(plain)).toFixed(0)} ns more per packet (${((1400 * 8 * median(checked)) / 1e9).toFixed(1)} Gbit/s of 1400-byte packets with checks)\n`);
}
