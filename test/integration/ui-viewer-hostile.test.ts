/**
 * A hostile topology-page viewer (a werift peer in this process speaking to a real agent process):
 * nothing happens before it proves the cluster credential, a forged proof is refused, garbage closes its
 * link, its "packets" channel goes nowhere, and it never shows up in the agent's mesh (peers, routes).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { rmSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { RTCPeerConnection, type RTCDataChannel } from "werift";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generateIdentity, peerKeyOf, signFields, tokenMac } from "../../src/identity.js";
import { VIEWER_CTX } from "../../agent/ui/viewer.js";
import { tmpDir, waitFor } from "../helpers/cluster.js";

const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
const TOKEN = "ui-hostile-Lm7Xr2Tn5Wb9Yc4Hd6Jf0GsZq3v8Kp1";
const env = { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "", WEFTNET_LOG: "", WEFTNET_LOG_FORMAT: "" };

function start(args: string[]): { child: ChildProcess; out: () => string; err: () => string; exited: Promise<unknown> } {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"], env });
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  return { child, out: () => out, err: () => err, exited: new Promise((r) => child.once("exit", r)) };
}
const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });

interface Viewer {
  pc: RTCPeerConnection;
  control: RTCDataChannel;
  packets: RTCDataChannel;
  msgs: Record<string, unknown>[];
  closed: () => boolean;
}

/** A viewer link to the agent behind `base` (POST /ui/v1/offer), open and past the agent's challenge. */
async function openViewer(base: string): Promise<Viewer> {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const control = pc.createDataChannel("control", { negotiated: true, id: 0, ordered: true });
  const packets = pc.createDataChannel("packets", { negotiated: true, id: 1, ordered: false, maxRetransmits: 0 });
  const msgs: Record<string, unknown>[] = [];
  let isClosed = false;
  control.onMessage.subscribe((d: string | Buffer) => msgs.push(JSON.parse(d.toString()) as Record<string, unknown>));
  control.stateChanged.subscribe((s: string) => {
    if (s === "closed") isClosed = true;
  });
  pc.connectionStateChange.subscribe((s: string) => {
    if (s === "closed" || s === "failed") isClosed = true;
  });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise<void>((resolve) => {
    const t = setTimeout(resolve, 2000);
    pc.iceGatheringStateChange.subscribe((s: string) => {
      if (s === "complete") {
        clearTimeout(t);
        resolve();
      }
    });
  });
  const res = await fetch(`${base}/ui/v1/offer`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sdp: pc.localDescription!.sdp }) });
  const ans = (await res.json()) as { sdp: string; candidates: { candidate: string; sdpMid?: string; sdpMLineIndex?: number }[] };
  expect(res.status).toBe(200);
  await pc.setRemoteDescription({ type: "answer", sdp: ans.sdp });
  for (const c of ans.candidates) await pc.addIceCandidate(c as never).catch(() => {});
  await waitFor(() => msgs.some((m) => m.t === "challenge"), 15_000, "the agent's challenge");
  return { pc, control, packets, msgs, closed: () => isClosed };
}

const send = (v: Viewer, m: unknown) => v.control.send(Buffer.from(JSON.stringify(m)));

describe("a hostile viewer of the topology page", () => {
  let signal: ReturnType<typeof start>;
  const agents: ReturnType<typeof start>[] = [];
  const dirs: string[] = [];
  let base = "";
  const status = (dir: string) => {
    const r = spawnSync(process.execPath, [CLI, "status", "--json", "--state-dir", dir], { encoding: "utf8", env });
    return r.status === 0 ? (JSON.parse(r.stdout) as { peers: { id: string; state: string }[] }) : { peers: [] }; // not up yet: no peers
  };
  const routes = (dir: string) => JSON.parse(spawnSync(process.execPath, [CLI, "status", "routes", "--json", "--state-dir", dir], { encoding: "utf8", env }).stdout) as { routes: { dst: string }[] };

  beforeAll(async () => {
    signal = start(["signal", "--listen", "127.0.0.1:0", "--stun-port", String(await freePort()), "--token", TOKEN]);
    await waitFor(() => /listening on ws:\/\/\S+:\d+/.test(signal.out()), 10_000, "signal");
    const url = /listening on (ws:\/\/\S+:\d+)/.exec(signal.out())![1]!;
    const uiPort = await freePort();
    for (const [name, extra] of [["a", ["--ui-listen", `127.0.0.1:${uiPort}`]], ["b", []]] as const) {
      const dir = tmpDir(`weft-uih-${name}-`);
      dirs.push(dir);
      agents.push(start(["agent", "--no-tun", "--loopback-only", "--signal", url, "--token", TOKEN, "--name", name, "--state-dir", dir, ...extra]));
    }
    base = `http://127.0.0.1:${uiPort}`;
    await waitFor(() => status(dirs[0]!).peers.some((p) => p.state === "connected"), 30_000, "a and b linked");
  }, 45_000);

  afterAll(async () => {
    for (const p of [...agents, signal]) {
      if (p && p.child.exitCode === null) p.child.kill("SIGTERM");
      await p?.exited;
    }
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
  });

  it("gets nothing before a valid proof, is refused with a forged one, and is dropped for garbage", async () => {
    // before auth: requests are ignored; bytes on "packets" go nowhere
    const v1 = await openViewer(base);
    send(v1, { t: "ping", seq: 1, ts: 1 });
    send(v1, { t: "connect", seq: 2, target: "b", sdp: "v=0" });
    v1.packets.send(Buffer.from([0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]));
    await new Promise((r) => setTimeout(r, 1000));
    expect(v1.msgs.map((m) => m.t)).toEqual(["challenge"]);

    // a proof made with the wrong token: refused, then closed
    const idn = generateIdentity();
    const ch = v1.msgs[0] as { nonce: string; node: { id: string } };
    const pub = Buffer.from(idn.publicKey).toString("hex");
    const sig = Buffer.from(signFields(idn, VIEWER_CTX, ch.nonce, ch.node.id)).toString("hex");
    const badMac = Buffer.from(tokenMac(peerKeyOf("some-other-token"), VIEWER_CTX, ch.nonce, ch.node.id, idn.id, pub)).toString("hex");
    send(v1, { t: "auth", id: idn.id, pub, sig, mac: badMac });
    await waitFor(() => v1.msgs.some((m) => m.t === "refused"), 5_000, "refused");
    await waitFor(() => v1.closed(), 10_000, "the refused link closed");
    await v1.pc.close();

    // the right proof, then hostile traffic: fake gossip is not a viewer message, garbage closes the link
    const v2 = await openViewer(base);
    const ch2 = v2.msgs[0] as { nonce: string; node: { id: string } };
    send(v2, {
      t: "auth",
      id: idn.id,
      pub,
      sig: Buffer.from(signFields(idn, VIEWER_CTX, ch2.nonce, ch2.node.id)).toString("hex"),
      mac: Buffer.from(tokenMac(peerKeyOf(TOKEN), VIEWER_CTX, ch2.nonce, ch2.node.id, idn.id, pub)).toString("hex"),
    });
    await waitFor(() => v2.msgs.some((m) => m.t === "state"), 10_000, "state after welcome");
    expect(v2.msgs.map((m) => m.t)).toContain("welcome");
    send(v2, { t: "topology", origin: idn.id, blocks: ["10.40.0.0/16"], links: [] });
    send(v2, { t: "ping", seq: 7, ts: 42 });
    await waitFor(() => v2.msgs.some((m) => m.t === "pong" && m.seq === 7), 5_000, "pong");
    for (let i = 0; i < 12; i++) v2.control.send(Buffer.from("not json {"));
    await waitFor(() => v2.closed(), 10_000, "the garbage link closed");
    await v2.pc.close();

    // the mesh never saw the viewer
    for (const d of dirs) {
      expect(status(d).peers.map((p) => p.id)).not.toContain(idn.id);
      expect(routes(d).routes.map((r) => r.dst)).not.toContain(idn.id);
    }
    expect(agents[0]!.err()).toMatch(/refused a viewer: wrong cluster credential/);
    expect(agents[0]!.child.exitCode).toBeNull();
  }, 60_000);
});
