/**
 * TUN-to-TUN lab (root): two network namespaces A and B, each holding one TUN device that THIS process
 * opened (in the root namespace, then moved: the fd stays valid), wired to each other in-process through
 * the data-plane layers: route lookup -> FrameEncoder (coalesced per read batch) -> decodeFrame ->
 * writeBatch. Used by test/e2e/tun.test.ts and test/bench/tun.ts.
 *
 *   ns A: TUN wta<id> 10.99.N.1/24  <== this process (frame codec) ==>  ns B: TUN wtb<id> 10.99.N.2/24
 *
 * Children run inside the namespaces via `setpriv --pdeathsig KILL ip netns exec NS ...` so they die with
 * this process even if it crashes; close() kills them by PID, closes the TUNs and deletes the namespaces.
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { customAlphabet } from "nanoid";
import { openTun, type TunDevice } from "../../agent/os/tun.js";
import { DropCounters } from "../../src/packet/drop.js";
import { FrameEncoder, decodeFrame, nodeIdToBytes } from "../../src/packet/frame.js";
import { ipv4Dst, peekIp } from "../../src/packet/ip.js";
import { PrefixTable } from "../../src/packet/prefix-table.js";
import { VNET_GSO_TCPV6, VNET_HDR_LEN, isGso } from "../../src/packet/vnet.js";

export const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

export interface LabSide {
  ns: string;
  tun: TunDevice;
  addr: string;
  /** IPv6 address (fd99:N::1 / ::2, /64, no DAD). */
  addr6: string;
  nodeId: string;
}

export interface LabStats {
  frames: number;
  packets: number;
  gsoPackets: number;
  gso6Packets: number;
  maxPacket: number;
  maxFramePackets: number;
  drops: DropCounters;
}

export interface TunLab {
  a: LabSide;
  b: LabSide;
  stats: LabStats;
  /** Spawn `cmd args` inside namespace `ns`; output is collected. */
  run(ns: string, cmd: string, args: string[]): LabChild;
  close(): Promise<void>;
}

export interface LabChild {
  proc: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Resolves with the exit code (or -1 on a signal). */
  exited: Promise<number>;
}

const suffix = customAlphabet("abcdefghijklmnopqrstuvwxyz0123456789", 6);

function ip(args: string[]): void {
  execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
}

/** reuse: read slab and frame buffer reused across batches, as the agent's data plane runs them. */
export async function createTunLab(opts: { mtu?: number; maxMessageSize?: number; offload?: boolean; reuse?: boolean } = {}): Promise<TunLab> {
  const id = suffix();
  const net = 1 + Math.floor(Math.random() * 250);
  const namespaces: string[] = [];
  const tuns: TunDevice[] = [];
  const children = new Set<ChildProcess>();
  const stats: LabStats = { frames: 0, packets: 0, gsoPackets: 0, gso6Packets: 0, maxPacket: 0, maxFramePackets: 0, drops: new DropCounters() };

  const close = async (): Promise<void> => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null && c.pid) {
      try {
        process.kill(c.pid, "SIGKILL");
      } catch {
        /* already gone */
      }
    }
    await Promise.all(tuns.map((t) => t.close()));
    for (const ns of namespaces) {
      try {
        ip(["netns", "del", ns]);
      } catch {
        /* best effort */
      }
    }
  };

  try {
    const sides: LabSide[] = [];
    for (const [i, tag] of ["a", "b"].entries()) {
      const ns = `wt-${id}-${tag}`;
      ip(["netns", "add", ns]);
      namespaces.push(ns);
      const tun = openTun({ name: `wt${tag}${id}`, offload: opts.offload ?? true, reuseSlab: opts.reuse === true });
      tuns.push(tun);
      const addr = `10.99.${net}.${i + 1}`;
      ip(["link", "set", tun.name, "netns", ns]);
      const addr6 = `fd99:${net.toString(16)}::${i + 1}`;
      ip(["-n", ns, "addr", "add", `${addr}/24`, "dev", tun.name]);
      ip(["-n", ns, "addr", "add", `${addr6}/64`, "dev", tun.name, "nodad"]);
      ip(["-n", ns, "link", "set", tun.name, "mtu", String(opts.mtu ?? 1500), "up"]);
      ip(["-n", ns, "link", "set", "lo", "up"]);
      sides.push({ ns, tun, addr, addr6, nodeId: (tag === "a" ? "aa" : "bb").repeat(8) });
    }
    const [a, b] = sides as [LabSide, LabSide];

    // One route table for both directions: each side's /32 belongs to its node.
    const routes = new PrefixTable<LabSide>();
    routes.insert(`${a.addr}/32`, a);
    routes.insert(`${b.addr}/32`, b);
    routes.insert(`${a.addr6}/128`, a);
    routes.insert(`${b.addr6}/128`, b);

    const wire = (from: LabSide) => {
      // deliver() below consumes each frame synchronously, so reuse is safe here as in the agent
      const enc = new FrameEncoder({ ...(opts.maxMessageSize !== undefined ? { maxMessageSize: opts.maxMessageSize } : {}), reuse: opts.reuse === true });
      const src = nodeIdToBytes(from.nodeId);
      const deliver = (frame: Uint8Array) => {
        // the receiving agent: full validation, then the packets go to its TUN as they are
        const f = decodeFrame(frame, { maxMessageSize: enc.maxMessageSize });
        if (!f.ok) {
          stats.drops.drop(f.reason);
          return;
        }
        const to = f.dst === a.nodeId ? a : b;
        stats.frames++;
        if (f.packets.length > stats.maxFramePackets) stats.maxFramePackets = f.packets.length;
        to.tun.writeBatch(f.packets);
      };
      from.tun.start((batch) => {
        // the sending agent: route each packet, coalesce into frames, flush at the end of the batch
        let open: LabSide | undefined;
        for (const p of batch) {
          stats.packets++;
          if (p.length > stats.maxPacket) stats.maxPacket = p.length;
          if (isGso(p)) {
            stats.gsoPackets++;
            if (p[1] === VNET_GSO_TCPV6) stats.gso6Packets++;
          }
          // fast path for IPv4 (no allocation); IPv6 goes through the full peek
          const dst = ipv4Dst(p, VNET_HDR_LEN);
          let to: LabSide | undefined;
          if (dst >= 0) to = routes.lookup4(dst);
          else {
            const h = peekIp(p, VNET_HDR_LEN);
            if (!h.ok) {
              stats.drops.drop(h.reason);
              continue;
            }
            to = routes.lookupHeader(h);
          }
          if (!to || to === from) {
            stats.drops.drop("no-route"); // e.g. IPv6 router solicitations to ff02::2
            continue;
          }
          if (open !== to) {
            if (open) deliver(enc.finish()!);
            enc.begin(src, nodeIdToBytes(to.nodeId));
            open = to;
          }
          let r = enc.add(p);
          if (r === "full") {
            deliver(enc.finish()!);
            enc.begin(src, nodeIdToBytes(to.nodeId));
            r = enc.add(p);
          }
          if (r !== "ok") stats.drops.drop(r === "full" ? "too-big" : r);
        }
        const last = enc.finish();
        if (last) deliver(last);
      });
    };
    wire(a);
    wire(b);

    const run = (ns: string, cmd: string, args: string[]): LabChild => {
      const proc = spawn("setpriv", ["--pdeathsig", "KILL", "ip", "netns", "exec", ns, cmd, ...args], { stdio: ["ignore", "pipe", "pipe"] });
      children.add(proc);
      let out = "";
      let err = "";
      proc.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
      proc.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
      const exited = new Promise<number>((resolve) => {
        proc.on("error", (e) => {
          err += String(e);
          resolve(-1);
        });
        proc.on("exit", (code) => {
          children.delete(proc);
          resolve(code ?? -1);
        });
      });
      return { proc, stdout: () => out, stderr: () => err, exited };
    };

    return { a, b, stats, run, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/** Wait until `child` prints `text` (or exits / times out). */
export async function waitForOutput(child: LabChild, text: string, timeoutMs = 10_000): Promise<void> {
  const t0 = Date.now();
  while (!child.stdout().includes(text)) {
    if (child.proc.exitCode !== null) throw new Error(`child exited before printing ${text}: ${child.stderr()}`);
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${text}: ${child.stderr()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
