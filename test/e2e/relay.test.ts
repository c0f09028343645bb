/**
 * End to end (root): a node whose site blocks all UDP reaches its peers through the signaling server's
 * relay (end-to-end sealed), and moves to a direct WebRTC link make-before-break when UDP comes back,
 * while a TCP stream between pods keeps running across the switches (bytes verified).
 */
import { createHash } from "node:crypto";
import { execFileSync, spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const d = describe.skipIf(!isRoot);
if (!isRoot) console.warn("skipping relay e2e: needs root (network namespaces, TUN, iptables)");

function blockUdp(n: LabNode): () => void {
  const rules = [
    ["INPUT", "-p", "udp", "-j", "DROP"],
    ["OUTPUT", "-p", "udp", "-j", "DROP"],
  ];
  const ipt = (op: string, r: string[]) => execFileSync("nsenter", [`--net=/run/netns/${n.ns}`, "--", "iptables", op, ...r]);
  for (const r of rules) ipt("-I", r);
  return () => {
    for (const r of rules) ipt("-D", r);
  };
}

d("relay of last resort", () => {
  const lab = new MeshLab(2);
  let unblock: (() => void) | undefined;
  let pods: { ip: string; name: string }[] = [];
  const dump = () => lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`).join("\n");

  beforeAll(async () => {
    await lab.setup();
    await lab.startSignal();
    unblock = blockUdp(lab.nodes[0]!);
    for (const n of lab.nodes) lab.startAgent(n, ["--connect-timeout", "3s", "--transport", "werift"]);
  }, 60_000);
  afterAll(async () => {
    unblock?.();
    await lab.close();
  }, 60_000);

  it("a site without UDP reaches its peer through the signaling server, and status says why", async () => {
    const [n1, n2] = lab.nodes as [LabNode, LabNode];
    await until(async () => (await lab.status(n1)).peers.find((p) => p.name === "n2")?.path === "relay", 40_000, "n1 -> n2 over the relay", dump);
    // IPAM reached n1 through the relay too (one cluster IPAM, founded by whoever has the lowest id).
    for (const n of lab.nodes) pods.push(await lab.addPod(n, `r${n.name}`));
    const st = await lab.status(n2);
    const p = st.peers.find((x) => x.name === "n1")!;
    expect(p).toMatchObject({ state: "connected", path: "relay", link: "relay" });
    expect(p.lastWebrtcError ?? "").not.toBe("");
    expect(await lab.cli(n1, ["status"])).toMatch(/relay\s.*through the signaling server/);
    await until(async () => (await sh(pods[0]!.name, "ping", ["-c", "1", "-W", "1", pods[1]!.ip], 5000)).stdout.includes("1 received"), 20_000, "pod ping over the relay", dump);
  }, 60_000);

  it("moves to direct WebRTC when UDP comes back, without breaking a running TCP stream", async () => {
    const [n1] = lab.nodes as [LabNode, LabNode];
    const [a, b] = pods as [{ ip: string; name: string }, { ip: string; name: string }];
    const chunkSize = 64 * 1024;
    const server = sh(b.name, process.execPath, ["-e", `const s=require('net').createServer(c=>{const h=require('crypto').createHash('sha256');let n=0;c.on('data',d=>{h.update(d);n+=d.length});c.on('end',()=>{console.log(n+' '+h.digest('hex'));s.close()})}).listen(5202,'${b.ip}')`], 110_000);
    await new Promise((r) => setTimeout(r, 500));
    // A paced sender (~2 MB/s) with a deterministic payload that runs until the test closes its stdin (or
    // 96 MiB), so the stream spans every switch: relay -> bulk UDP when UDP comes back, relay -> WebRTC for
    // the mesh link later. It prints how much it has sent ("S n") and, at the end, the total ("END n").
    // Its exit is awaited from spawn on: once it had finished before the upgrade, and an exit listener
    // added after the fact waited for the test timeout (the stream itself was complete).
    const sender = spawn("nsenter", [`--net=/run/netns/${a.name}`, "--", process.execPath, "-e", `
      const c=require('net').connect(5202,'${b.ip}');let sent=0,stop=false;const chunk=Buffer.alloc(${chunkSize});
      process.stdin.on('end',()=>{stop=true});process.stdin.resume();
      const tick=()=>{if(stop||sent>=${96 << 20}){c.end(()=>console.log('END '+sent));return}for(let i=0;i<chunk.length;i++)chunk[i]=(sent+i)*31&255;sent+=chunk.length;if(sent%${1 << 20}===0)console.log('S '+sent);c.write(chunk)?setTimeout(tick,30):c.once('drain',()=>setTimeout(tick,30))};
      c.on('connect',tick);`], { stdio: ["pipe", "pipe", "inherit"] });
    let out = "";
    sender.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    const exited = new Promise<number | null>((r) => sender.once("exit", (code) => r(code)));
    const sentSoFar = () => Math.max(0, ...[...out.matchAll(/^S (\d+)$/gm)].map((m) => Number(m[1])));
    try {
      await until(async () => sentSoFar() >= 4 << 20, 30_000, "4 MiB of the stream sent over the relay", dump);
      unblock!();
      unblock = undefined;
      const t0 = Date.now();
      await until(async () => (await lab.status(n1)).peers.find((p) => p.name === "n2")?.path === "direct", 40_000, "upgrade to direct", dump);
      console.log(`relay -> direct WebRTC ${Date.now() - t0} ms after UDP came back (status polled every 200 ms)`);
      const st = await lab.status(n1);
      expect(st.counters.upgrades).toBeGreaterThan(0);
      // The stream keeps flowing after the switch.
      const atSwitch = sentSoFar();
      await until(async () => sentSoFar() >= atSwitch + (4 << 20), 30_000, "4 MiB more of the stream after the upgrade", dump);
    } finally {
      sender.stdin!.end();
    }
    const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r("still running"), 30_000))]);
    expect(code, `sender exit (output: ${out.slice(-200)})`).toBe(0);
    const total = Number(/^END (\d+)$/m.exec(out)?.[1]);
    expect(total).toBeGreaterThan(8 << 20);
    const expected = createHash("sha256");
    const chunk = Buffer.alloc(chunkSize);
    for (let sent = 0; sent < total; sent += chunk.length) {
      for (let i = 0; i < chunk.length; i++) chunk[i] = ((sent + i) * 31) & 255;
      expected.update(chunk);
    }
    expect((await server).stdout.trim()).toBe(`${total} ${expected.digest("hex")}`);
  }, 120_000);
});

