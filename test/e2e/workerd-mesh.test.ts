/**
 * End to end (root): three agents (TUN data plane, pods in namespaces) meet through the Workers build of
 * the signaling server running under workerd, move pod traffic, and keep moving it when workerd is
 * stopped: a TCP stream between pods that spans the stop arrives byte for byte, and every pod pair still
 * pings afterwards. workerd runs in the lab's LAN namespace (no STUN there: Workers have no UDP).
 */
import { createHash } from "node:crypto";
import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { workerdRuntime } from "../helpers/signal-runtimes.js";
import { isRoot, MeshLab, sh, until, type LabNode } from "./mesh-lab.js";

const noWorkerd = workerdRuntime.unavailable();
const d = describe.skipIf(!isRoot || noWorkerd !== undefined);
if (!isRoot) console.warn("skipping workerd mesh e2e: needs root (network namespaces, TUN)");
else if (noWorkerd) console.warn(`skipping workerd mesh e2e: ${noWorkerd}`);

d(`pod traffic through a mesh that met on workerd${noWorkerd ? ` [skipped: ${noWorkerd}]` : ""}`, () => {
  const lab = new MeshLab(3);
  const pods: { ip: string; name: string }[] = [];
  const dump = () => [`--- signal (workerd)\n${lab.log("signal.log")}`, ...lab.nodes.map((n) => `--- ${n.name}\n${lab.log(`${n.name}.log`)}`)].join("\n");
  const pingOk = async (from: { name: string }, to: { ip: string }) => (await sh(from.name, "ping", ["-c", "1", "-W", "1", to.ip], 5000).catch(() => ({ stdout: "" }))).stdout.includes("1 received");

  beforeAll(async () => {
    await lab.setup();
    await lab.startWorkerdSignal();
    for (const n of lab.nodes) lab.startAgent(n);
  }, 90_000);
  afterAll(async () => {
    await lab.close();
  }, 60_000);

  it("three agents mesh through workerd and ping pod to pod", async () => {
    // each pair on a direct link (a first WebRTC attempt that times out on a busy box starts on the
    // server's relay and upgrades by itself: wait for where it settles, the links must outlive the server)
    for (const n of lab.nodes) {
      await until(async () => {
        const st = await lab.status(n);
        const up = st.peers.filter((p) => p.state === "connected" && p.path === "direct");
        return up.length === 2 && st.node.signal.connected;
      }, 90_000, `${n.name}: two direct links through workerd`, dump);
    }
    for (const n of lab.nodes) pods.push(await lab.addPod(n, `w${n.name}`));
    for (const a of pods) for (const b of pods) if (a !== b) await until(() => pingOk(a, b), 30_000, `${a.name} pings ${b.ip}`, dump);
  }, 180_000);

  it("keeps pod traffic flowing when workerd is stopped: a TCP stream across the stop arrives intact", async () => {
    expect(pods).toHaveLength(3);
    const [a, , c] = pods as [{ ip: string; name: string }, unknown, { ip: string; name: string }];
    const total = 16 << 20;
    const server = sh(c.name, process.execPath, ["-e", `const s=require('net').createServer(x=>{const h=require('crypto').createHash('sha256');let n=0;x.on('data',d=>{h.update(d);n+=d.length});x.on('end',()=>{console.log(n+' '+h.digest('hex'));s.close()})}).listen(5203,'${c.ip}')`], 120_000);
    await until(async () => (await sh(c.name, "ss", ["-ltn"], 5000)).stdout.includes(`${c.ip}:5203`), 10_000, "stream server listening");
    // paced (~1.3 MB/s, ~12 s) with a deterministic payload, so the stream spans the server's stop
    const sender = spawn("nsenter", [`--net=/run/netns/${a.name}`, "--", process.execPath, "-e", `
      const c=require('net').connect(5203,'${c.ip}');let sent=0;const chunk=Buffer.alloc(64*1024);
      const tick=()=>{if(sent>=${total}){c.end();return}for(let i=0;i<chunk.length;i++)chunk[i]=(sent+i)*37&255;sent+=chunk.length;c.write(chunk)?setTimeout(tick,50):c.once('drain',()=>setTimeout(tick,50))};
      c.on('connect',tick);c.on('error',e=>{console.error(e);process.exit(1)});`], { stdio: "ignore" });
    const senderExit = new Promise<number | null>((r) => sender.once("exit", (code) => r(code)));
    await new Promise((r) => setTimeout(r, 2_000));

    await lab.stopSignal(); // workerd gone
    for (const n of lab.nodes) await until(async () => !(await lab.status(n)).node.signal.connected, 30_000, `${n.name} notices the server is gone`, dump);

    expect(await senderExit).toBe(0);
    const expected = createHash("sha256");
    const chunk = Buffer.alloc(64 * 1024);
    for (let sent = 0; sent < total; sent += chunk.length) {
      for (let i = 0; i < chunk.length; i++) chunk[i] = ((sent + i) * 37) & 255;
      expected.update(chunk);
    }
    expect((await server).stdout.trim()).toBe(`${total} ${expected.digest("hex")}`);

    // and every pair still reaches the others' pods, with the server gone
    for (const x of pods) for (const y of pods) if (x !== y) await until(() => pingOk(x, y), 30_000, `${x.name} pings ${y.ip} without the server`, dump);
    for (const n of lab.nodes as LabNode[]) {
      const st = await lab.status(n);
      expect(st.node.signal.connected).toBe(false);
      expect(st.peers.filter((p) => p.state === "connected")).toHaveLength(2);
    }
  }, 180_000);
});
