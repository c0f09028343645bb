/**
 * A rogue agent for the anti-spoofing e2e (test/e2e/antispoof.test.ts), run as its own process in a lab
 * namespace: `node dist/test/e2e/rogue-agent.js CONFIG.json`. It is a real agent (the cluster token, its
 * own valid identity, a real WebRTC link to every node) whose data path is replaced by an attacker's: it
 * sends hand-made frames straight on its link to the victim. Each round, one frame of each kind:
 *
 *   spoofed-node    source node = the honest node (not the link peer), unsealed        (udp sport 1)
 *   spoofed-source  source node = the rogue, inner source = the honest node's pod       (udp sport 2)
 *   foreign-dest    source = the rogue's own pod address, inner destination = the honest node's pod,
 *                   i.e. not an address of the victim                                   (udp sport 3)
 *   sealed-genuine  a frame sealed end to end by the honest node for the victim (its key read from its state
 *                   dir: stands for a frame a transit captured), sent once: delivered   (udp sport 5)
 *   sealed-replay   the same bytes again                                                 (udp sport 5)
 *   sealed-altered  a fresh genuine sealed frame with one ciphertext byte flipped       (udp sport 4)
 *   sealed-forged   "sealed" by the honest node but made with the rogue's own key       (udp sport 6)
 *
 * Every inner packet is a well-formed IPv4/UDP datagram to port 9999, so the test can count in the pods
 * what got through. Progress is printed as JSON lines on stdout.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { Agent } from "../../agent/agent.js";
import { IDENTITY_FILE } from "../../agent/state.js";
import { identityFromPem } from "../../src/identity.js";
import { parseIp } from "../../src/ipam/cidr.js";
import { createLogger } from "../../src/log.js";
import { encodeFrames, nodeIdToBytes } from "../../src/packet/frame.js";
import { FrameSealer } from "../../src/packet/seal.js";
import { VNET_HDR_LEN } from "../../src/packet/vnet.js";

export interface RogueConfig {
  signal: string;
  token: string;
  stateDir: string;
  victim: string;
  honest: string;
  honestStateDir: string;
  honestPodIp: string;
  victimPodIp: string;
  rounds: number;
  intervalMs: number;
}

export const SPORT = { spoofedNode: 1, spoofedSource: 2, foreignDest: 3, altered: 4, genuine: 5, forged: 6 } as const;

function checksum(b: Uint8Array, off: number, len: number): number {
  let s = 0;
  for (let i = 0; i < len; i += 2) s += (b[off + i]! << 8) | (b[off + i + 1] ?? 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** virtio-net header (no offload) + IPv4 + UDP (checksum 0: none) to port 9999, payload "weftnet-rogue". */
export function udpPacket(src: string, dst: string, sport: number): Uint8Array {
  const payload = Buffer.from("weftnet-rogue");
  const ipLen = 20 + 8 + payload.length;
  const p = new Uint8Array(VNET_HDR_LEN + ipLen);
  const ip = VNET_HDR_LEN;
  const dv = new DataView(p.buffer);
  p[ip] = 0x45;
  dv.setUint16(ip + 2, ipLen);
  p[ip + 8] = 64;
  p[ip + 9] = 17;
  dv.setUint32(ip + 12, parseIp(src) >>> 0);
  dv.setUint32(ip + 16, parseIp(dst) >>> 0);
  dv.setUint16(ip + 10, checksum(p, ip, 20));
  dv.setUint16(ip + 20, sport);
  dv.setUint16(ip + 22, 9999);
  dv.setUint16(ip + 24, 8 + payload.length);
  p.set(payload, ip + 28);
  return p;
}

const frameOf = (src: string, dst: string, pkt: Uint8Array) => encodeFrames(nodeIdToBytes(src), nodeIdToBytes(dst), [pkt]).frames[0]!;
const out = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);

async function main(): Promise<void> {
  const cfg = JSON.parse(readFileSync(process.argv[2]!, "utf8")) as RogueConfig;
  const agent = await Agent.start({ signal: cfg.signal, token: cfg.token, stateDir: cfg.stateDir, name: "rogue", api: false, logger: createLogger({ level: "warn" }) });
  const stop = async (code: number) => {
    await agent.stop().catch(() => {});
    process.exit(code);
  };
  process.once("SIGTERM", () => void stop(0));
  try {
    const until = async (cond: () => boolean, ms: number, what: string) => {
      const t0 = Date.now();
      while (!cond()) {
        if (Date.now() - t0 > ms) throw new Error(`rogue: timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };
    await until(() => agent.mesh.isConnected(cfg.victim) && agent.router.topo.get(cfg.victim)?.pub !== undefined, 60_000, "a link to the victim and its key");
    const own = await agent.allocate("pod/rogue", 60_000);
    out({ ready: true, id: agent.id, ip: own.ip });
    // the honest node's key (a frame it sealed for the victim stands for one a transit captured)
    const honest = identityFromPem(readFileSync(join(cfg.honestStateDir, IDENTITY_FILE), "utf8"));
    const victimPub = () => agent.router.topo.get(cfg.victim)?.pub;
    const honestSealer = new FrameSealer({ identity: honest, publicKeyOf: (n) => (n === cfg.victim ? victimPub() : undefined), now: () => Date.now() });
    // the rogue's own sealer: a frame it seals naming the honest node as source cannot have the right key
    const rogueSealer = new FrameSealer({ identity: agent.mesh.identity, publicKeyOf: (n) => (n === cfg.victim ? victimPub() : undefined), now: () => Date.now() });
    const { victim, honest: x, honestPodIp: xPod, victimPodIp: vPod } = cfg;
    const sent: Record<string, number> = {};
    const send = (kind: string, frame: Uint8Array | undefined) => {
      if (!frame) throw new Error(`rogue: could not build ${kind}`);
      const r = agent.mesh.sendPacket(victim, frame);
      if (r === "ok") sent[kind] = (sent[kind] ?? 0) + 1;
    };
    for (let round = 0; round < cfg.rounds; round++) {
      send("spoofed-node", frameOf(x, victim, udpPacket(xPod, vPod, SPORT.spoofedNode)));
      send("spoofed-source", frameOf(agent.id, victim, udpPacket(xPod, vPod, SPORT.spoofedSource)));
      send("foreign-destination", frameOf(agent.id, victim, udpPacket(own.ip, xPod, SPORT.foreignDest)));
      const genuine = honestSealer.seal(victim, frameOf(x, victim, udpPacket(xPod, vPod, SPORT.genuine)));
      send("sealed-genuine", genuine && Uint8Array.from(genuine));
      send("sealed-replay", genuine && Uint8Array.from(genuine));
      const altered = honestSealer.seal(victim, frameOf(x, victim, udpPacket(xPod, vPod, SPORT.altered)));
      if (altered) altered[altered.length - 20] = altered[altered.length - 20]! ^ 0x55; // in the ciphertext
      send("sealed-altered", altered && Uint8Array.from(altered));
      const forged = rogueSealer.seal(victim, frameOf(x, victim, udpPacket(xPod, vPod, SPORT.forged))); // "from" x, with the rogue's key
      send("sealed-forged", forged && Uint8Array.from(forged));
      await new Promise((r) => setTimeout(r, cfg.intervalMs));
    }
    out({ done: true, sent });
  } catch (e) {
    out({ error: (e as Error).message });
    await stop(1);
  }
}

// run only as a program (the e2e test imports SPORT and the config type from here)
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) void main();
