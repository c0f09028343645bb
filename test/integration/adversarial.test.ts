/**
 * Adversarial suite: real agents, a real signaling server, and
 *   - a hostile signaling server (a WebSocket proxy in front of the real one that rewrites, forges and
 *     replays what it relays), on both transports (werift, libdatachannel);
 *   - a rogue agent that holds the token (an insider with its own valid identity) and sends forged gossip.
 * Every attack must fail and be counted, and the honest nodes must keep their links and routes (checked).
 */
import { rmSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import WebSocket, { WebSocketServer } from "ws";
import type { Agent } from "../../agent/agent.js";
import { nativeAvailable } from "../../agent/transport/native.js";
import { main as cli } from "../../agent/cli/main.js";
import { loadOperatorKey } from "../../agent/cli/operator.js";
import { IPAM_CHANNEL } from "../../agent/ipam.js";
import { generateIdentity } from "../../src/identity.js";
import { CTX_ENTRY, CTX_MEMBER, CTX_RELEASE, CTX_REMOVE, identityKeys, releaseFields, removalFields, removeFields } from "../../src/ipam/signing.js";
import { encodeTopologyMessages, signTopologyRecord, TOPO_CHANNEL, type TopologyRecord } from "../../src/mesh/topology.js";
import { decodeServerMsg, encodeSignal, type ServerMsg, type SignalData } from "../../src/wire/signal.js";
import { Cluster, fullMesh, startServer, tmpDir, waitFor } from "../helpers/cluster.js";

const TOKEN = "adversarial-token-0123456789abcdef";
const ATTACKER_FP = Array(32).fill("EE").join(":");
const haveNative = await nativeAvailable();
const ip4 = (s: string) => s.split(".").reduce((a, b) => a * 256 + Number(b), 0);

type Signal = Extract<ServerMsg, { t: "signal" }>;

/** A hostile signaling server: relays agent -> server as is; `fromServer` decides what each agent gets. */
class HostileProxy {
  private wss!: WebSocketServer;
  /** every signal the server relayed, by recipient socket */
  readonly seen: { to: WebSocket; msg: Signal }[] = [];
  readonly clients: WebSocket[] = [];
  constructor(private readonly upstreamUrl: string, private readonly fromServer: (msg: ServerMsg, raw: Buffer, client: WebSocket) => void = (_m, raw, c) => c.send(raw)) {}
  async start(): Promise<string> {
    this.wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    await new Promise((r) => this.wss.once("listening", r));
    this.wss.on("connection", (client) => {
      this.clients.push(client);
      const upstream = new WebSocket(this.upstreamUrl);
      const pending: Buffer[] = [];
      upstream.on("open", () => pending.splice(0).forEach((m) => upstream.send(m)));
      client.on("message", (m: Buffer) => (upstream.readyState === WebSocket.OPEN ? upstream.send(m) : pending.push(m)));
      upstream.on("message", (m: Buffer) => {
        let msg: ServerMsg;
        try {
          msg = decodeServerMsg(m);
        } catch {
          client.send(m);
          return;
        }
        if (msg.t === "signal") this.seen.push({ to: client, msg });
        this.fromServer(msg, m, client);
      });
      client.on("close", () => upstream.close());
      upstream.on("close", (code, reason) => client.close(code, reason));
    });
    return `ws://127.0.0.1:${(this.wss.address() as AddressInfo).port}`;
  }
  /** Inject a signal "from" a node to one agent's socket. */
  inject(client: WebSocket, from: string, data: SignalData): void {
    client.send(encodeSignal({ t: "signal", from, data }));
  }
  close(): Promise<void> {
    return new Promise((r) => this.wss?.close(() => r()));
  }
}

let c: Cluster | undefined;
let proxy: HostileProxy | undefined;
afterEach(async () => {
  await c?.cleanup();
  await proxy?.close();
  c = undefined;
  proxy = undefined;
});

const kinds = ["werift", ...(haveNative ? ["native"] : [])] as const;

describe.each(kinds)("a hostile signaling server (%s transport)", (kind) => {
  // relay off: the links under attack are DTLS links (a loaded box may otherwise fall back to the relay)
  const over = kind === "native" ? { transportKind: "native" as const, linkMtu: 1280, relay: false } : { transportKind: "werift" as const, relay: false };

  it("that appends its own fingerprint after the signed one (werift would accept either) is refused and counted", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    let added = 0;
    proxy = new HostileProxy(c.server.signalUrl, (msg, raw, client) => {
      if (msg.t === "signal" && (msg.data.kind === "offer" || msg.data.kind === "answer")) {
        // keep the victim's signed line first, add the attacker's after it (session and media level)
        msg.data.sdp = msg.data.sdp.replace(/(a=fingerprint:[^\r\n]*\r?\n)/, `$1a=fingerprint:sha-256 ${ATTACKER_FP}\r\n`);
        added++;
        client.send(encodeSignal(msg));
      } else client.send(raw);
    });
    const url = await proxy.start();
    const x = await c.agent("x", { signal: url, ...over });
    const y = await c.agent("y", { signal: url, ...over });
    await waitFor(async () => (await x.status()).counters.authFailures + (await y.status()).counters.authFailures > 0, 15_000, "fingerprint trick detected");
    const st = [await x.status(), await y.status()];
    expect(st.some((s) => s.peers.some((p) => p.state === "auth-failed" && /more than one DTLS fingerprint/.test(p.lastError ?? "")))).toBe(true);
    expect(added).toBeGreaterThan(0);
    expect(x.mesh.connectedPeers()).toEqual([]);
    expect(y.mesh.connectedPeers()).toEqual([]);
  });

  it("that forges or replays byes, answers, offers and candidates for live links: ignored, counted, links stay up", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    proxy = new HostileProxy(c.server.signalUrl);
    const url = await proxy.start();
    const x = await c.agent("x", { signal: url, ...over });
    const y = await c.agent("y", { signal: url, ...over });
    await waitFor(() => fullMesh([x, y]), 20_000, "x-y link");
    // the link came up through the identity proof over the negotiated DTLS certificates
    expect(x.mesh.link(y.id)!.remoteFingerprint!()).toEqual(y.transport.fingerprint);
    expect(y.mesh.link(x.id)!.remoteFingerprint!()).toEqual(x.transport.fingerprint);
    const offerer = x.id < y.id ? x : y;
    const answerer = offerer === x ? y : x;
    const offer = [...proxy.seen].reverse().find((s) => s.msg.data.kind === "offer" && s.msg.from === offerer.id)!;
    const answer = [...proxy.seen].reverse().find((s) => s.msg.data.kind === "answer" && s.msg.from === answerer.id)!;
    expect(offer && answer).toBeTruthy();
    const conn = offer.msg.data.conn;
    const before = [offerer.mesh.counters.ignoredSignals, answerer.mesh.counters.ignoredSignals];
    const up0 = [offerer.mesh.counters.linksClosed, answerer.mesh.counters.linksClosed];
    // forged, unsigned byes for the live conn, both directions
    proxy.inject(offer.to, offerer.id, { kind: "bye", conn });
    proxy.inject(answer.to, answerer.id, { kind: "bye", conn });
    // a bye "signed" by someone else (a valid signature, wrong key)
    proxy.inject(offer.to, offerer.id, { kind: "bye", conn, sig: new Uint8Array(64).fill(7) });
    // the live link's own offer and answer, replayed
    proxy.inject(offer.to, offerer.id, offer.msg.data);
    proxy.inject(answer.to, answerer.id, answer.msg.data);
    // a garbage answer for the live conn (would make the offerer close it as an auth failure)
    if (answer.msg.data.kind === "answer") proxy.inject(answer.to, answerer.id, { ...answer.msg.data, sdp: answer.msg.data.sdp.replace(/a=fingerprint:\S+ \S+/, `a=fingerprint:sha-256 ${ATTACKER_FP}`) });
    // a candidate pointing the live link elsewhere
    proxy.inject(offer.to, offerer.id, { kind: "candidate", conn, candidate: { candidate: "candidate:1 1 udp 2130706431 203.0.113.9 9 typ host", sdpMid: "0", sdpMLineIndex: 0 } });
    await waitFor(() => offerer.mesh.counters.ignoredSignals + answerer.mesh.counters.ignoredSignals >= before[0]! + before[1]! + 6, 5000, "forgeries counted");
    await new Promise((r) => setTimeout(r, 1500));
    expect(fullMesh([x, y])).toBe(true);
    expect([offerer.mesh.counters.linksClosed, answerer.mesh.counters.linksClosed]).toEqual(up0);
    expect((await x.ping(y.id)).rttMs).toBeGreaterThan(0);
    // ...while a signed bye from the real peer still works (graceful stop)
    await answerer.stop();
    await waitFor(() => !offerer.mesh.isConnected(answerer.id), 5000, "signed bye honoured");
  });
});

describe("a rogue agent with the token", () => {
  it("cannot forge, replay or outbid another node's topology record, nor ours: refused, counted, routes kept", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    const x = await c.agent("x");
    const v = await c.agent("victim");
    const rogue = await c.agent("rogue");
    await waitFor(() => fullMesh([x, v, rogue]), 30_000, "mesh of 3");
    await waitFor(() => [x.id, v.id, rogue.id].every((id) => v.router.topo.get(id)?.links.length === 2), 10_000, "topology converged");
    const genuineX = v.router.topo.get(x.id)!;
    const vOwnSeq = v.router.topo.seq;
    const now = Date.now();
    const R = (rogue.mesh as unknown as { o: { identity: ReturnType<typeof generateIdentity> } }).o.identity;
    const forged = (node: string, seq: number, how: "rogue-key" | "unsigned" | "stolen-sig"): TopologyRecord => {
      const plain: TopologyRecord = { node, seq, links: [{ peer: rogue.id, rttMs: 0.01 }], prefixes: ["10.40.0.0/16", "8.8.8.8/32"], updatedAt: now };
      if (how === "unsigned") return plain;
      if (how === "stolen-sig") return { ...plain, pub: genuineX.pub!, sig: genuineX.sig! };
      const s = signTopologyRecord(R, { ...plain, node: rogue.id });
      return { ...plain, pub: s.pub!, sig: s.sig! };
    };
    const attacks: TopologyRecord[] = [];
    for (const target of [x.id, v.id]) for (const seq of [Number.MAX_SAFE_INTEGER, genuineX.seq + 1, now + 60_000]) for (const how of ["rogue-key", "unsigned", "stolen-sig"] as const) attacks.push(forged(target, seq, how));
    // the rogue's own record with a seq jump far past the bound
    attacks.push(signTopologyRecord(R, { node: rogue.id, seq: Number.MAX_SAFE_INTEGER, links: [], prefixes: [], updatedAt: now }));
    const rejected0 = v.router.counters.rejectedRecords;
    for (const body of encodeTopologyMessages(attacks)) rogue.mesh.sendApp(v.id, TOPO_CHANNEL, body);
    // a replay of x's genuine record (stale: ignored, not an error)
    for (const body of encodeTopologyMessages([genuineX])) rogue.mesh.sendApp(v.id, TOPO_CHANNEL, body);
    // Unsigned: refused first (6). Signed with a wrong key: seq MAX -> seq jump (4, + the rogue's own),
    // seq now+60s -> bad signature (4). seq genuine+1 may already be stale (x re-originated): ignored.
    await waitFor(() => v.router.counters.rejectedRecords >= rejected0 + 15, 5000, "forgeries refused");
    expect(v.router.rejectedByCode.get("ERR_BAD_SIGNATURE")).toBeGreaterThanOrEqual(4);
    expect(v.router.rejectedByCode.get("ERR_UNSIGNED")).toBeGreaterThanOrEqual(6);
    expect(v.router.rejectedByCode.get("ERR_SEQ_JUMP")).toBeGreaterThanOrEqual(5);
    expect((await v.status()).counters.forgedTopologyRecords).toBeGreaterThanOrEqual(15);
    // X's record at the victim is X's own, the victim's counter was not pushed, routes unchanged
    const nowX = v.router.topo.get(x.id)!;
    expect(nowX.pub).toEqual(genuineX.pub);
    expect(nowX.links.map((l) => l.peer).sort()).toEqual([rogue.id, v.id].sort());
    expect(nowX.prefixes).not.toContain("8.8.8.8/32");
    expect(v.router.topo.seq).toBeLessThan(vOwnSeq + 3_600_000);
    expect(v.router.nextHop(x.id)).toBeDefined(); // (direct or via the rogue: RTT decides, the forgeries do not)
    expect(v.mesh.isConnected(x.id)).toBe(true);
    expect(v.router.topo.get(rogue.id)!.seq).toBeLessThan(Number.MAX_SAFE_INTEGER);
    // and the forgeries were not forwarded: x never saw them either
    expect(x.router.topo.get(v.id)!.prefixes).not.toContain("8.8.8.8/32");
    expect(x.router.counters.rejectedRecords).toBe(0);
    expect(fullMesh([x, v, rogue])).toBe(true);
    expect((await v.ping(x.id)).rttMs).toBeGreaterThan(0);
  });

  it("cannot claim another node's pod addresses, the cluster range or outside prefixes: forwarding follows IPAM and accepted routes only", async () => {
    c = new Cluster(await startServer(TOKEN), TOKEN);
    const x = await c.agent("x");
    const v = await c.agent("victim");
    const rogue = await c.agent("rogue");
    await waitFor(() => fullMesh([x, v, rogue]), 30_000, "mesh of 3");
    const pod = await v.allocate("pod/victim-pod", 30_000);
    const block = v.ipam.localBlocks()[0]!;
    await waitFor(() => x.router.owners.lookup4(ip4(pod.ip)) === v.id, 15_000, "x routes the victim's pod to the victim");
    // The rogue signs (validly: it is its own record) claims on the victim's pod, its block, the whole
    // cluster range and 8.8.8.8, with a fresh seq.
    const R = (rogue.mesh as unknown as { o: { identity: ReturnType<typeof generateIdentity> } }).o.identity;
    const mine = rogue.router.topo.get(rogue.id)!;
    const claim = signTopologyRecord(R, { node: rogue.id, seq: mine.seq + 10, links: [...mine.links], prefixes: [`${pod.ip}/32`, block, "10.40.0.0/16", "8.8.8.8/32"].sort(), updatedAt: Date.now() });
    for (const body of encodeTopologyMessages([claim])) for (const to of [x.id, v.id]) rogue.mesh.sendApp(to, TOPO_CHANNEL, body);
    await waitFor(() => x.router.topo.get(rogue.id)!.seq >= claim.seq, 5000, "the rogue's (own, signed) record merged");
    x.router.refreshOwners();
    // x still sends the victim's pod traffic to the victim; the rogue's claims route nothing
    expect(x.router.owners.lookup4(ip4(pod.ip))).toBe(v.id);
    // every cluster address routes to its IPAM owner (the founder may own much of the range), never by claim
    const blocks = x.ipam.status().blocks;
    for (const probe of ["10.40.255.1", "10.40.128.7", "10.40.3.3"]) {
      const owner = blocks.find((b) => { const [base, len] = b.cidr.split("/"); const size = 2 ** (32 - Number(len)); return ip4(probe) >= ip4(base!) && ip4(probe) < ip4(base!) + size; })?.owner;
      const routed = x.router.owners.lookup4(ip4(probe));
      expect(routed === undefined || routed === owner, `${probe} routed to ${routed}, IPAM owner ${owner}`).toBe(true);
    }
    expect(x.router.owners.lookup4(ip4("8.8.8.8"))).toBeUndefined();
    expect(v.ipam.localBlocks()).toContain(block);
    expect(fullMesh([x, v, rogue])).toBe(true);
  });

  it("cannot release a silent node's address blocks (unsigned, or 'signed' with its own key): refused and counted; the operator's signed release works", async () => {
    const keyDir = tmpDir("weft-operator-");
    try {
      const keyFile = join(keyDir, "operator.key");
      expect(await cli(["keygen", "--operator", "--out", keyFile])).toBe(0);
      const operatorKey = loadOperatorKey(`${keyFile}.pub`);
      c = new Cluster(await startServer(TOKEN), TOKEN);
      const x = await c.agent("x", { operatorKey });
      const v = await c.agent("victim", { operatorKey });
      const rogue = await c.agent("rogue", { operatorKey });
      await waitFor(() => fullMesh([x, v, rogue]), 30_000, "mesh of 3");
      await v.allocate("pod/victim-pod", 30_000);
      const ownedByV = () => x.ipam.node.view().filter((e) => e[1] === v.id).map((e) => e[0]);
      await waitFor(() => ownedByV().length > 0 && rogue.ipam.node.view().some((e) => e[1] === v.id), 20_000, "x and the rogue know the victim's block");
      const blocks = ownedByV();
      // the victim goes silent (partitioned away, or dead): nobody is connected to it any more
      await v.stop();
      await waitFor(() => !x.mesh.isConnected(v.id) && !rogue.mesh.isConnected(v.id), 15_000, "the victim is gone from the mesh");
      // the rogue's own (honest) engine refuses to release without the operator's signature...
      expect(() => rogue.ipamRelease(v.id)).toThrow(/operator/);
      // ...so it forges the forced entries itself, signed with its own (valid, member) key
      const R = (rogue.mesh as unknown as { o: { identity: ReturnType<typeof generateIdentity> } }).o.identity;
      const keys = identityKeys(R);
      const epoch = x.ipam.node.epochInfo()!.id;
      const forged = (how: "no-operator-sig" | "own-key-as-operator") => {
        const entries = blocks.map((i) => [i, rogue.id, x.ipam.node.view()[i]![2] + 1, "f"] as [number, string, number, "f"]);
        const certs = entries.map(([i, owner, ver, k]) => {
          const base = [v.id, rogue.id, R.publicKey, keys.sign(CTX_ENTRY, [epoch, String(i), owner, String(ver), k, v.id])];
          return how === "no-operator-sig" ? base : [...base, null, keys.sign(CTX_RELEASE, releaseFields(epoch, i, v.id, ver, rogue.id))];
        });
        return { v: 1, t: "state", epoch, entries, certs, handovers: entries.map(() => null) };
      };
      const refused0 = x.ipam.status().counters.releasesRefused;
      for (const how of ["no-operator-sig", "own-key-as-operator"] as const) expect(rogue.mesh.sendApp(x.id, IPAM_CHANNEL, forged(how))).toBe(true);
      await waitFor(() => x.ipam.status().counters.releasesRefused >= refused0 + 2 * blocks.length, 10_000, "forged releases refused and counted");
      expect(ownedByV()).toEqual(blocks); // the silent node keeps its blocks
      expect(x.ipam.status().counters.forged).toBeGreaterThanOrEqual(2 * blocks.length);
      // nor can it take the silent node off the member list (which would shrink every majority): a
      // "leave" in the victim's name (signed with the rogue's key: forged, counted) or a "gone" signed by
      // itself (valid, but x never saw the victim gone: refused)
      const forged0 = x.ipam.status().counters.forged;
      const removal = (reason: "leave" | "gone", by: string) => ({ v: 1, t: "members", epoch, records: [[v.id, "x", [reason, by, R.publicKey, keys.sign(CTX_MEMBER, removalFields(epoch, v.id, reason, by))]]] });
      for (const body of [removal("leave", v.id), removal("gone", rogue.id)]) expect(rogue.mesh.sendApp(x.id, IPAM_CHANNEL, body)).toBe(true);
      await waitFor(() => x.ipam.status().counters.forged > forged0, 10_000, "the forged member removal refused and counted");
      expect(x.ipam.node.memberList()).toContain(v.id);
      expect(x.ipam.node.removedMembers()).toEqual([]);
      // the operator's release (the real CLI: it reads x's view, signs each block with the operator key)
      expect(await cli(["ipam", "release", v.id, "--operator-key-file", keyFile, "--state-dir", x.cfg.stateDir, "--json"])).toBe(0);
      for (const a of [x, rogue]) await waitFor(() => blocks.every((i) => a.ipam.node.view()[i]![1] === x.id), 10_000, `${a.name} accepts the operator's release`);
      expect(x.ipam.status().counters.releasesRefused).toBe(refused0 + 2 * blocks.length);
      expect(rogue.ipam.status().counters.releasesRefused).toBe(0);
      // the operator's release takes the victim off the member list everywhere
      for (const a of [x, rogue]) await waitFor(() => a.ipam.node.removedMembers().includes(v.id) && !a.ipam.node.memberList().includes(v.id), 10_000, `${a.name} removes the released node from its member list`);
    } finally {
      rmSync(keyDir, { recursive: true, force: true });
    }
  });

  it("cannot remove a dead member that owns no block (its own key as 'operator'): refused and counted; the operator's `ipam release` removes it", async () => {
    const keyDir = tmpDir("weft-operator-");
    try {
      const keyFile = join(keyDir, "operator.key");
      expect(await cli(["keygen", "--operator", "--out", keyFile])).toBe(0);
      const operatorKey = loadOperatorKey(`${keyFile}.pub`);
      // a short reclaim time, so the dead member's unpinned block is reclaimed within the test
      const ipam = { reclaimAfterMs: 10_000, safetyMarginMs: 2000, resyncMs: 800, claimSettleMs: 500, bootstrapWaitMs: 500 };
      c = new Cluster(await startServer(TOKEN), TOKEN);
      const x = await c.agent("x", { operatorKey, ipam });
      const rogue = await c.agent("rogue", { operatorKey, ipam });
      await waitFor(() => fullMesh([x, rogue]) && x.ipam.node.memberList().length === 2 && rogue.ipam.node.memberList().length === 2, 30_000, "two members");
      // w dies while it joins: its first block is granted (so it is a member everywhere), but the grant never
      // reaches it (it drops every state message naming it as an owner), so it never pins the block
      const w = await c.agent("w", { operatorKey, ipam });
      const handle = w.ipam.node.handle.bind(w.ipam.node);
      const namesW = (body: unknown) => {
        const b = body as { t?: unknown; entries?: unknown };
        return b.t === "state" && Array.isArray(b.entries) && b.entries.some((e) => Array.isArray(e) && e[1] === w.id);
      };
      (w.ipam.node as { handle: typeof handle }).handle = (ev, now) => (ev.type === "message" && namesW(ev.body) ? handle({ type: "tick" }, now) : handle(ev, now));
      const ownsW = (a: Agent) => a.ipam.node.view().some((e) => e[1] === w.id);
      await waitFor(() => ownsW(x) && ownsW(rogue) && [x, rogue].every((a) => a.ipam.node.memberList().includes(w.id)), 30_000, "w granted a block (a member on x and the rogue)");
      expect(w.ipam.node.ownedBlocks()).toEqual([]);
      await w.stop();
      await waitFor(() => !x.mesh.isConnected(w.id) && !rogue.mesh.isConnected(w.id), 15_000, "w is gone from the mesh");
      // reclaim takes its (unpinned, empty) block back; w stays a member and counts in every majority
      await waitFor(() => !ownsW(x) && !ownsW(rogue), 90_000, "w's block reclaimed");
      for (const a of [x, rogue]) {
        expect(a.ipam.node.memberList()).toContain(w.id);
        expect(a.ipam.status().ownership.members).toBe(3);
      }
      // the rogue cannot take w off the member list: an operator removal signed with its own key
      const R = (rogue.mesh as unknown as { o: { identity: ReturnType<typeof generateIdentity> } }).o.identity;
      const keys = identityKeys(R);
      const epoch = x.ipam.node.epochInfo()!.id;
      const forged0 = x.ipam.status().counters.forged;
      const body = { v: 1, t: "members", epoch, records: [[w.id, "x", ["op", rogue.id, R.publicKey, keys.sign(CTX_REMOVE, removeFields(epoch, w.id))]]] };
      expect(rogue.mesh.sendApp(x.id, IPAM_CHANNEL, body)).toBe(true);
      await waitFor(() => x.ipam.status().counters.forged > forged0, 10_000, "the forged removal refused and counted");
      expect(x.ipam.node.memberList()).toContain(w.id);
      // the operator's release (the real CLI, run on x): w owns no block, the signed removal alone takes it off
      expect(await cli(["ipam", "release", w.id, "--operator-key-file", keyFile, "--state-dir", x.cfg.stateDir, "--json"])).toBe(0);
      for (const a of [x, rogue]) {
        await waitFor(() => a.ipam.node.removedMembers().includes(w.id) && !a.ipam.node.memberList().includes(w.id), 10_000, `${a.name} removes the dead member`);
        expect(a.ipam.status().ownership.members).toBe(2);
      }
      expect(x.ipam.status().counters.forged).toBe(forged0 + 1);
    } finally {
      rmSync(keyDir, { recursive: true, force: true });
    }
  });
});
