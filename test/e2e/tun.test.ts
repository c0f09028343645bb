/**
 * Real-kernel TUN tests (root): two namespaces whose TUN devices are wired together in this process
 * through the frame codec (see tun-lab.ts). Proves: ping works; a multi-MB TCP transfer arrives intact
 * while the kernel hands over GSO super-packets (> MTU) that the other TUN accepts with their virtio
 * header verbatim; close() is prompt; without CAP_NET_ADMIN / as a normal user the open fails with a
 * TunError pointing at --no-tun.
 */
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { openTun, TunError } from "../../agent/os/tun.js";
import { createTunLab, isRoot, waitForOutput, type TunLab } from "./tun-lab.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

if (!isRoot) {
  console.warn("test/e2e/tun.test.ts: skipped, needs root (creates TUN devices and network namespaces)");
}

const RECEIVER = `
const net = require("node:net"), crypto = require("node:crypto");
const h = crypto.createHash("sha256"); let n = 0;
const srv = net.createServer((s) => {
  s.on("data", (d) => { h.update(d); n += d.length; });
  s.on("end", () => { s.end(JSON.stringify({ n, hash: h.digest("hex") })); srv.close(); });
});
srv.listen(Number(process.argv[2]), process.argv[1], () => console.log("ready"));
`;

const SENDER = `
const net = require("node:net"), crypto = require("node:crypto");
const total = Number(process.argv[3]), chunk = 256 * 1024;
const h = crypto.createHash("sha256"); let sent = 0, reply = "";
const s = net.connect(Number(process.argv[2]), process.argv[1], () => {
  const pump = () => {
    while (sent < total) {
      const b = crypto.randomBytes(Math.min(chunk, total - sent));
      h.update(b); sent += b.length;
      if (!s.write(b)) return s.once("drain", pump);
    }
    s.end();
  };
  pump();
});
s.setEncoding("utf8");
s.on("data", (d) => (reply += d));
s.on("end", () => console.log(JSON.stringify({ sent, hash: h.digest("hex"), reply: JSON.parse(reply) })));
`;

/** vnet header + IPv4 ICMP echo request with valid checksums (the kernel checks both). */
function echoRequest(src: string, dst: string, seq: number): Uint8Array {
  const ip4 = (a: string) => a.split(".").map(Number);
  const sum = (b: Uint8Array, off: number, len: number) => {
    let x = 0;
    for (let i = 0; i < len; i += 2) x += (b[off + i]! << 8) | (b[off + i + 1] ?? 0);
    while (x > 0xffff) x = (x & 0xffff) + (x >>> 16);
    return ~x & 0xffff;
  };
  const pkt = new Uint8Array(10 + 20 + 16); // vnet header (no offloads), IPv4, ICMP echo with 8 data bytes
  const ip = 10;
  pkt.set([0x45, 0, 0, 36, 0, seq, 0x40, 0, 64, 1, 0, 0, ...ip4(src), ...ip4(dst)], ip);
  const ic = ip + 20;
  pkt.set([8, 0, 0, 0, 0x12, 0x34, 0, seq, 1, 2, 3, 4, 5, 6, 7, 8], ic);
  const c1 = sum(pkt, ip, 20);
  pkt[ip + 10] = c1 >> 8;
  pkt[ip + 11] = c1 & 255;
  const c2 = sum(pkt, ic, 16);
  pkt[ic + 2] = c2 >> 8;
  pkt[ic + 3] = c2 & 255;
  return pkt;
}

// reuse: the agent's mode (one read slab and one frame buffer, reused every batch); else fresh slabs.
describe.skipIf(!isRoot).each([{ reuse: false }, { reuse: true }])("TUN-to-TUN through the frame codec (root, real kernel, reuse $reuse)", ({ reuse }) => {
  let lab: TunLab | undefined;

  beforeAll(async () => {
    lab = await createTunLab({ reuse });
  });

  afterAll(async () => {
    await lab?.close();
  });

  it("the devices are what we asked for", () => {
    const { a } = lab!;
    expect(a.tun.vnetHdr).toBe(true);
    expect(a.tun.name).toMatch(/^wta[a-z0-9]{6}$/);
    expect(a.tun.tunIfaceIndex).toBeGreaterThan(0);
    const link = execFileSync("ip", ["-n", a.ns, "-d", "link", "show", a.tun.name], { encoding: "utf8" });
    expect(link).toMatch(/tun type tun pi off vnet_hdr on/);
    expect(link).not.toMatch(/persist on/);
  });

  it("ping A -> B works", async () => {
    const { a, b, run } = lab!;
    const p = run(a.ns, "ping", ["-c", "3", "-i", "0.2", "-W", "2", b.addr]);
    const code = await p.exited;
    expect(code, p.stdout() + p.stderr()).toBe(0);
    expect(p.stdout()).toMatch(/3 received/);
  });

  it("a TCP transfer of 32 MB arrives byte-exact, carried as GSO super-packets", async () => {
    const { a, b, run, stats } = lab!;
    const before = { gso: stats.gsoPackets, max: stats.maxPacket };
    const port = "5201";
    const rx = run(b.ns, process.execPath, ["-e", RECEIVER, b.addr, port]);
    await waitForOutput(rx, "ready");
    const tx = run(a.ns, process.execPath, ["-e", SENDER, b.addr, port, String(32 << 20)]);
    const [txCode, rxCode] = await Promise.all([tx.exited, rx.exited]);
    expect(txCode, tx.stderr()).toBe(0);
    expect(rxCode, rx.stderr()).toBe(0);
    const r = JSON.parse(tx.stdout()) as { sent: number; hash: string; reply: { n: number; hash: string } };
    expect(r.reply.n).toBe(32 << 20);
    expect(r.reply.hash).toBe(r.hash);
    // GSO was on: the kernel handed over packets larger than the 1500-byte MTU, and the other TUN took them.
    expect(stats.gsoPackets).toBeGreaterThan(before.gso);
    expect(stats.maxPacket).toBeGreaterThan(1500 + 10);
    expect(b.tun.drops.total() + a.tun.drops.total()).toBe(0);
    expect(stats.drops.get("too-big")).toBe(0);
    console.log(`tun e2e: ${stats.packets} packets, ${stats.gsoPackets} GSO, largest ${stats.maxPacket} B, ${stats.frames} frames, up to ${stats.maxFramePackets} packets/frame`);
  }, 60_000);

  it("IPv6: ping and an 8 MB TCP transfer through TCPv6 GSO super-packets", async () => {
    const { a, b, run, stats } = lab!;
    const p = run(a.ns, "ping", ["-6", "-c", "2", "-i", "0.2", "-W", "2", b.addr6]);
    expect(await p.exited, p.stdout() + p.stderr()).toBe(0);
    const before = stats.gso6Packets;
    const rx = run(b.ns, process.execPath, ["-e", RECEIVER, b.addr6, "5202"]);
    await waitForOutput(rx, "ready");
    const tx = run(a.ns, process.execPath, ["-e", SENDER, b.addr6, "5202", String(8 << 20)]);
    expect(await tx.exited, tx.stderr()).toBe(0);
    const r = JSON.parse(tx.stdout()) as { hash: string; reply: { n: number; hash: string } };
    expect(r.reply).toEqual({ n: 8 << 20, hash: r.hash });
    expect(stats.gso6Packets).toBeGreaterThan(before);
  }, 60_000);

  it("pause() stops reading (ping fails) and resume() restarts it", async () => {
    const { a, b, run } = lab!;
    a.tun.pause();
    expect(a.tun.paused).toBe(true);
    const p1 = run(a.ns, "ping", ["-c", "1", "-W", "1", b.addr]);
    expect(await p1.exited).not.toBe(0);
    a.tun.resume();
    const p2 = run(a.ns, "ping", ["-c", "2", "-i", "0.2", "-W", "2", b.addr]);
    expect(await p2.exited, p2.stdout()).toBe(0);
  });

  it("readNow() right after a write reads what the kernel answered during the write (an ICMP echo reply)", async () => {
    const { a, b } = lab!;
    // An echo request from a's address to b's, written into b's TUN: b's kernel answers it in the write's own
    // softirq and routes the reply out through b's TUN, where readNow() finds it before the event loop turns.
    // A loaded box may defer that softirq to ksoftirqd, so five tries, of which one must be synchronous.
    let sync = 0;
    for (let i = 0; i < 5 && sync === 0; i++) {
      await new Promise((r) => setTimeout(r, 50)); // b's reader parked on its watcher again
      const before = b.tun.stats.rxPackets;
      expect(b.tun.writeBatch([echoRequest(a.addr, b.addr, i)])).toBe(1);
      b.tun.readNow();
      if (b.tun.stats.rxPackets > before) sync++;
    }
    expect(sync).toBe(1);
  });

  it("a garbage write is counted as a drop, not thrown", () => {
    const { b } = lab!;
    const before = b.tun.drops.get("write-failed");
    const bad = new Uint8Array(60);
    bad[1] = 0x77; // unknown gso_type
    bad[10] = 0x45;
    expect(b.tun.writeBatch([bad])).toBe(0);
    expect(b.tun.drops.get("write-failed")).toBe(before + 1);
  });
});

describe.skipIf(!isRoot)("TUN lifecycle (root)", () => {
  it("close() returns promptly while idle in poll, and the interface disappears", async () => {
    const name = `wtc${Math.random().toString(36).slice(2, 8)}`;
    const t = openTun({ name, pollTimeoutMs: 5000 });
    t.start(() => {});
    await new Promise((r) => setTimeout(r, 100)); // parked in poll() on a worker thread
    const t0 = Date.now();
    await t.close();
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(fs.existsSync(`/sys/class/net/${name}`)).toBe(false);
    await t.close(); // idempotent
  });

  it("close() under load (flood ping both ways) is prompt and clean", async () => {
    const lab = await createTunLab();
    try {
      lab.run(lab.a.ns, "ping", ["-f", "-s", "1400", "-w", "5", lab.b.addr]);
      lab.run(lab.b.ns, "ping", ["-f", "-s", "1400", "-w", "5", lab.a.addr]);
      await new Promise((r) => setTimeout(r, 700));
      expect(lab.stats.packets).toBeGreaterThan(100);
      const t0 = Date.now();
      await Promise.all([lab.a.tun.close(), lab.b.tun.close()]);
      expect(Date.now() - t0).toBeLessThan(1000);
      const failed = lab.b.tun.drops.get("write-failed");
      expect(lab.b.tun.writeBatch([new Uint8Array(40)])).toBe(0); // closed: counted, not thrown
      expect(lab.b.tun.drops.get("write-failed")).toBe(failed + 1);
    } finally {
      await lab.close(); // kills the pings by PID, deletes the namespaces
    }
  }, 30_000);

  it("a second open of a name in use fails with ERR_TUN_BUSY", async () => {
    const name = `wtd${Math.random().toString(36).slice(2, 8)}`;
    const t = openTun({ name });
    try {
      expect(() => openTun({ name })).toThrow(expect.objectContaining({ code: "ERR_TUN_BUSY" }));
    } finally {
      await t.close();
    }
  });

  it("rejects invalid names", () => {
    expect(() => openTun({ name: "this-name-is-too-long" })).toThrow(TunError);
    expect(() => openTun({ name: "a/b" })).toThrow(/invalid interface name/);
  });

  describe("without privileges the error points at --no-tun", () => {
    let dir = "";
    beforeAll(() => {
      // The child cannot load .ts: transpile the modules tun.ts needs into a temp dir it can read.
      dir = fs.mkdtempSync(path.join(os.tmpdir(), "weft-tun-"));
      for (const f of ["agent/os/tun.ts", "agent/os/fd-reader.ts", "src/errors.ts", "src/packet/drop.ts", "src/packet/vnet.ts", "src/packet/ip.ts", "src/packet/device.ts"]) {
        const out = ts.transpileModule(fs.readFileSync(path.join(repo, f), "utf8"), {
          compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022, verbatimModuleSyntax: false },
        }).outputText;
        fs.mkdirSync(path.join(dir, path.dirname(f)), { recursive: true });
        fs.writeFileSync(path.join(dir, f.replace(/\.ts$/, ".js")), out);
      }
      fs.writeFileSync(path.join(dir, "package.json"), '{"type":"module"}');
      fs.symlinkSync(path.join(repo, "node_modules"), path.join(dir, "node_modules"));
      fs.writeFileSync(
        path.join(dir, "probe.js"),
        `import { openTun } from "./agent/os/tun.js";
         try { const t = openTun({ name: "wtpriv0" }); await t.close(); console.log(JSON.stringify({ ok: true })); }
         catch (e) { console.log(JSON.stringify({ ok: false, name: e.name, code: e.code, message: e.message })); }`,
      );
      execFileSync("chmod", ["-R", "a+rX", dir]);
    });
    afterAll(() => {
      if (dir) fs.rmSync(dir, { recursive: true, force: true });
    });

    const probe = (setprivArgs: string[]): Promise<{ ok: boolean; name?: string; code?: string; message?: string }> =>
      new Promise((resolve, reject) => {
        const p = spawn("setpriv", [...setprivArgs, "--pdeathsig", "KILL", process.execPath, path.join(dir, "probe.js")], { stdio: ["ignore", "pipe", "pipe"] });
        let out = "";
        let err = "";
        p.stdout.on("data", (d: Buffer) => (out += d.toString()));
        p.stderr.on("data", (d: Buffer) => (err += d.toString()));
        p.on("error", reject);
        p.on("exit", () => {
          try {
            resolve(JSON.parse(out));
          } catch {
            reject(new Error(`probe printed ${JSON.stringify(out)}; stderr ${err}`));
          }
        });
      });

    it("as an unprivileged user (uid 65534): cannot open /dev/net/tun", async () => {
      const r = await probe(["--reuid=65534", "--regid=65534", "--clear-groups"]);
      expect(r).toMatchObject({ ok: false, name: "TunError", code: "ERR_TUN_PERMISSION" });
      expect(r.message).toMatch(/--no-tun/);
    });

    it("as root without CAP_NET_ADMIN: TUNSETIFF is refused", async () => {
      const r = await probe(["--inh-caps=-all", "--bounding-set=-all"]);
      expect(r).toMatchObject({ ok: false, name: "TunError", code: "ERR_TUN_PERMISSION" });
      expect(r.message).toMatch(/CAP_NET_ADMIN.*--no-tun/);
    });
  });
});
