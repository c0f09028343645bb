/**
 * The Workers build under workerd: a Durable Object evicted by hibernation keeps presence.
 *
 * Eviction is forced the way the platform does it: every socket is hibernatable and nobody talks, so
 * workerd evicts the object after its idle timeout (~10 s); the object's generation counter (in
 * /v1/stats) proves a new instance was constructed. That instance must rebuild every session from the
 * sockets' attachments: registered members without any message to them, a session still in its
 * handshake with its nonce, and then route signals, list nodes and announce newcomers as before.
 */
import { afterAll, afterEach, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { CTX_HELLO, generateIdentity, joinKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";
import { stopAllTargets, workerdRuntime, type SignalTarget } from "../helpers/signal-runtimes.js";

const TOKEN = "hibernation-test-token-0123456789ab";
const targets: SignalTarget[] = [];
const sockets: WebSocket[] = [];
afterEach(async () => {
  for (const s of sockets.splice(0)) s.terminate();
  await Promise.all(targets.splice(0).map((t) => t.close()));
});
afterAll(() => stopAllTargets());

class Sim {
  readonly ws: WebSocket;
  readonly msgs: ServerMsg[] = [];
  nonce: Uint8Array | undefined;
  constructor(
    url: string,
    readonly idn: Identity = generateIdentity(),
  ) {
    this.ws = new WebSocket(url);
    sockets.push(this.ws);
    this.ws.on("message", (d) => {
      const m = decodeServerMsg(d as Buffer);
      this.msgs.push(m);
      if (m.t === "challenge") this.nonce = m.nonce;
    });
  }
  hello(): void {
    const n = this.nonce!;
    const id = this.idn.id;
    this.ws.send(encodeSignal({ t: "hello", id, pub: this.idn.publicKey, name: `h-${id.slice(0, 4)}`, instance: "i", meta: { v: "1" }, mac: tokenMac(joinKeyOf(TOKEN), CTX_HELLO, n, id, "i"), sig: signFields(this.idn, CTX_HELLO, n, id, "i") }));
  }
  async until(pred: (m: ServerMsg) => boolean, what: string, timeoutMs = 10_000): Promise<ServerMsg> {
    const t0 = Date.now();
    for (;;) {
      const hit = this.msgs.find(pred);
      if (hit) return hit;
      if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; got ${this.msgs.map((m) => m.t).join(",")}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

const why = workerdRuntime.unavailable();

describe("Durable Object hibernation (workerd)", () => {
  it.skipIf(why !== undefined)(`an evicted object rebuilds presence from the sockets' attachments${why ? ` [skipped: ${why}]` : ""}`, async () => {
    const t = await workerdRuntime.start({ token: TOKEN, helloTimeoutMs: 60_000 });
    targets.push(t);
    const stats = async () => (await (await fetch(t.url.replace(/^ws/, "http") + "/v1/stats", { headers: { Authorization: `Bearer ${TOKEN}` } })).json()) as { generation: number; restoredSessions: number; members: number; sessions: number };

    const [a, b, c] = [new Sim(t.signalUrl), new Sim(t.signalUrl), new Sim(t.signalUrl)];
    for (const s of [a, b, c]) {
      await s.until((m) => m.t === "challenge", "challenge");
      s.hello();
      await s.until((m) => m.t === "welcome", "welcome");
    }
    const pending = new Sim(t.signalUrl); // challenged, answers only after the eviction
    await pending.until((m) => m.t === "challenge", "challenge");
    await a.until((m) => m.t === "join" && m.peer.id === c.idn.id, "join of c");
    const before = await stats();
    expect(before).toMatchObject({ members: 3, sessions: 4 });

    // silence: every socket is hibernatable and idle, so workerd evicts the object
    const deadline = Date.now() + 45_000;
    let after = before;
    while (Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 12_000));
      after = await stats(); // (this request wakes it again)
      if (after.generation > before.generation) break;
    }
    expect(after.generation).toBeGreaterThan(before.generation);
    expect(after).toMatchObject({ members: 3, sessions: 4, restoredSessions: 4 });
    const nodes = (await (await fetch(t.url.replace(/^ws/, "http") + "/v1/nodes", { headers: { Authorization: `Bearer ${TOKEN}` } })).json()) as { nodes: { id: string; name: string; meta: Record<string, string> }[] };
    expect(nodes.nodes.map((n) => n.id).sort()).toEqual([a, b, c].map((s) => s.idn.id).sort());
    expect(nodes.nodes.find((n) => n.id === a.idn.id)).toMatchObject({ name: `h-${a.idn.id.slice(0, 4)}`, meta: { v: "1" } });
    // nothing was re-sent to the members by the rebuild
    expect(a.msgs.filter((m) => m.t === "welcome")).toHaveLength(1);

    // signals route between members registered before the eviction
    a.ws.send(encodeSignal({ t: "signal", to: b.idn.id, data: { kind: "bye", conn: "after-eviction" } }));
    await b.until((m) => m.t === "signal" && m.from === a.idn.id, "signal a->b after eviction");
    // the handshake that was pending completes against its original nonce
    pending.hello();
    const w = await pending.until((m) => m.t === "welcome", "welcome of the pending session");
    expect(w.t === "welcome" && w.peers.map((p) => p.id).sort()).toEqual([a, b, c].map((s) => s.idn.id).sort());
    await a.until((m) => m.t === "join" && m.peer.id === pending.idn.id, "join of the pending one");
    // a member leaving is announced by the new instance
    c.ws.close();
    await b.until((m) => m.t === "leave" && m.id === c.idn.id, "leave of c");
  }, 90_000);
});
