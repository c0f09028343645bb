/**
 * Topology-page viewers at the signaling server (issue 14): POST /ui/v1/offer checks a credential (a
 * join-key proof bound to the offer and a time, or an invite signed with the server's invite key), and
 * hub.introduceViewer hands the offer to one agent that said `ui` in its hello (for an invite, one that
 * pins the key) and waits for its viewer-answer. Hostile agents' answers for offers they were not sent
 * are bad frames; silence times out; a disconnect fails the wait. In-memory sockets, a manual clock.
 */
import { describe, expect, it } from "vitest";
import { createSignalApp, VIEWER_OFFER_CTX } from "../../signaling/core/app.js";
import { renderSignalMetrics } from "../../signaling/core/metrics.js";
import { SignalHub, VIEWER_ANSWER_TIMEOUT_MS, type Clock, type SignalSession, type SignalSocket } from "../../signaling/core/hub.js";
import { ManualClock } from "../helpers/manual-clock.js";
import { CTX_HELLO, generateIdentity, joinKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { decodeServerMsg, encodeSignal, type ServerMsg } from "../../src/wire/signal.js";
import { mintInvite, pubHex } from "../../agent/ui/invite.js";

const TOKEN = "viewer-test-token-0123456789abcdef";
const KEY = joinKeyOf(TOKEN);
const SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n";

class MemSocket implements SignalSocket {
  readonly sent: ServerMsg[] = [];
  constructor(readonly remoteAddress = "192.0.2.1") {}
  send(b: Uint8Array): void {
    this.sent.push(decodeServerMsg(b));
  }
  close(): void {}
  of<T extends ServerMsg["t"]>(t: T): Extract<ServerMsg, { t: T }>[] {
    return this.sent.filter((m) => m.t === t) as Extract<ServerMsg, { t: T }>[];
  }
}


async function join(hub: SignalHub, meta: Record<string, string>, idn: Identity = generateIdentity()): Promise<{ sock: MemSocket; s: SignalSession; idn: Identity }> {
  const sock = new MemSocket();
  const s = hub.open(sock);
  const nonce = sock.of("challenge")[0]!.nonce;
  s.receive(encodeSignal({ t: "hello", id: idn.id, pub: idn.publicKey, name: `n-${idn.id.slice(0, 4)}`, instance: "i1", meta, mac: tokenMac(KEY, CTX_HELLO, nonce, idn.id, "i1"), sig: signFields(idn, CTX_HELLO, nonce, idn.id, "i1") }));
  for (let i = 0; i < 400 && s.state === "verifying"; i++) await new Promise((r) => setTimeout(r, 2));
  expect(s.state).toBe("member");
  return { sock, s, idn };
}

const answered = new WeakMap<MemSocket, number>();
/** Wait (real time, up to ~1 s) until `sock` got a viewer-offer it has not answered yet, then answer it. */
async function answerNext(sock: MemSocket, s: SignalSession, reply: { sdp?: string; error?: string }): Promise<string | undefined> {
  const seen = answered.get(sock) ?? 0;
  for (let i = 0; i < 500 && sock.of("viewer-offer").length <= seen; i++) await new Promise((r) => setTimeout(r, 2));
  const offer = sock.of("viewer-offer")[seen];
  if (offer === undefined) return undefined;
  answered.set(sock, seen + 1);
  s.receive(encodeSignal({ t: "viewer-answer", ref: offer.ref, ...reply, ...(reply.sdp ? { candidates: [{ candidate: "candidate:1 1 UDP 1 127.0.0.1 9 typ host", sdpMid: "0" }] } : {}) }));
  return offer.sdp;
}

describe("topology-page viewers at the signaling server", () => {
  it("introduces a viewer only to an agent that takes viewers, and returns its answer", async () => {
    const clock = new ClockWrap();
    const hub = new SignalHub({ joinKey: KEY, clock: clock.c });
    const plain = await join(hub, {});
    await expect(hub.introduceViewer(SDP)).rejects.toMatchObject({ code: "ERR_NO_PEER" });
    const ui = await join(hub, { ui: "1" });
    const p = hub.introduceViewer(SDP);
    expect(await answerNext(ui.sock, ui.s, { sdp: "v=0 answer" })).toBe(SDP);
    const r = await p;
    expect(r.node.id).toBe(ui.idn.id);
    expect(r.sdp).toBe("v=0 answer");
    expect(r.candidates).toHaveLength(1);
    expect(plain.sock.of("viewer-offer")).toHaveLength(0);
    // by name, and refused by the agent
    const q = hub.introduceViewer(SDP, { target: ui.s.member!.name });
    await answerNext(ui.sock, ui.s, { error: "this agent already serves 16 viewers" });
    await expect(q).rejects.toMatchObject({ code: "ERR_VIEWER", message: expect.stringContaining("16 viewers") });
    await expect(hub.introduceViewer(SDP, { target: plain.s.member!.name })).rejects.toMatchObject({ code: "ERR_NO_PEER" });
    expect(hub.stats()).toMatchObject({ viewerOffers: 2, viewerAnswers: 1, viewerFailures: 3 });
    const text = renderSignalMetrics(hub, undefined);
    expect(text).toMatch(/^weftnet_signal_viewer_introductions_total\{result="answered"\} 1$/m);
    expect(text).toMatch(/^weftnet_signal_viewer_introductions_total\{result="failed"\} 3$/m);
  });

  it("counts a viewer-answer for an offer the agent was not sent as a bad frame; silence times out; a disconnect fails the wait", async () => {
    const clock = new ClockWrap();
    const hub = new SignalHub({ joinKey: KEY, clock: clock.c });
    const a = await join(hub, { ui: "1" });
    const p = hub.introduceViewer(SDP, { target: a.idn.id });
    const b = await join(hub, { ui: "1" });
    for (let i = 0; i < 100 && a.sock.of("viewer-offer").length === 0; i++) await new Promise((r) => setTimeout(r, 2));
    const ref = a.sock.of("viewer-offer")[0]!.ref;
    // b answers a's offer (it learned or guessed the ref): a bad frame, the wait goes on
    b.s.receive(encodeSignal({ t: "viewer-answer", ref, sdp: "v=0 forged" }));
    b.s.receive(encodeSignal({ t: "viewer-answer", ref: "nope", sdp: "v=0 forged" }));
    expect(b.sock.of("error").map((e) => e.code)).toEqual(["ERR_INVALID", "ERR_INVALID"]);
    expect(hub.stats().badFrames).toBe(2);
    clock.m.advance(VIEWER_ANSWER_TIMEOUT_MS + 1);
    await expect(p).rejects.toMatchObject({ code: "ERR_TIMEOUT" });
    // a late answer to a finished wait is a bad frame too, not a crash
    a.s.receive(encodeSignal({ t: "viewer-answer", ref, sdp: "v=0 late" }));
    expect(a.sock.of("error").map((e) => e.code)).toEqual(["ERR_INVALID"]);
    const q = hub.introduceViewer(SDP, { target: b.idn.id });
    b.s.closed();
    await expect(q).rejects.toMatchObject({ code: "ERR_NO_PEER" });
  });

  it("POST /ui/v1/offer wants a fresh join-key proof of this offer, or an invite this server signed", async () => {
    const clock = new ClockWrap();
    const inviteKey = generateIdentity();
    const { app, hub } = createSignalApp({ joinKey: KEY, clock: clock.c, viewerInvitePub: inviteKey.publicKey });
    const plain = await join(hub, { ui: "1" });
    const pinning = await join(hub, { ui: "1", "ui-invite": pubHex(inviteKey) });
    const post = (body: unknown) => app.request("/ui/v1/offer", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    const proof = (ts: number, key = KEY, sdp = SDP) => ({ ts, mac: Buffer.from(tokenMac(key, VIEWER_OFFER_CTX, String(ts), sdp)).toString("hex") });
    const now = clock.m.t;

    const refused = async (body: unknown) => {
      const r = await post(body);
      return { status: r.status, ...((await r.json()) as { error: { code: string; message: string } }).error };
    };
    expect(await refused({ sdp: SDP })).toMatchObject({ status: 401, code: "ERR_BAD_TOKEN" });
    expect(await refused({ sdp: SDP, proof: proof(now, joinKeyOf("another-token-entirely-000000")) })).toMatchObject({ status: 401, message: "wrong cluster token" });
    expect(await refused({ sdp: SDP, proof: proof(now, KEY, "v=0 another offer") })).toMatchObject({ status: 401, message: "wrong cluster token" });
    expect(await refused({ sdp: SDP, proof: proof(now - 5 * 60_000) })).toMatchObject({ status: 401, message: expect.stringContaining("off by more than 2 minutes") });
    expect(await refused({ sdp: "hello", proof: proof(now) })).toMatchObject({ status: 400 });
    expect(await refused({ sdp: SDP, invite: mintInvite(generateIdentity(), 60_000, now).invite })).toMatchObject({ status: 401, code: "ERR_BAD_INVITE", message: "the invite was not signed by this server" });
    expect(await refused({ sdp: SDP, invite: mintInvite(inviteKey, 60_000, now - 120_000).invite })).toMatchObject({ status: 401, message: expect.stringMatching(/^the invite expired/) });
    expect(await refused({ sdp: SDP, invite: "wv1.garbage" })).toMatchObject({ status: 401, code: "ERR_BAD_INVITE" });
    expect(plain.sock.of("viewer-offer").length + pinning.sock.of("viewer-offer").length).toBe(0);

    // a good proof: to any agent taking viewers
    const ok = post({ sdp: SDP, proof: proof(now) });
    const got = await Promise.all([answerNext(plain.sock, plain.s, { sdp: "v=0 a" }), answerNext(pinning.sock, pinning.s, { sdp: "v=0 b" })]);
    expect(got.filter((x) => x !== undefined)).toEqual([SDP]);
    const res = await ok;
    expect(res.status).toBe(200);
    expect((await res.json()) as { sdp: string }).toMatchObject({ sdp: expect.stringMatching(/^v=0 [ab]$/) });

    // a good invite: only to the agent pinning this server's invite key, however often
    const before = plain.sock.of("viewer-offer").length;
    for (let i = 0; i < 4; i++) {
      const r = post({ sdp: SDP, invite: mintInvite(inviteKey, 60_000, now).invite });
      await answerNext(pinning.sock, pinning.s, { sdp: "v=0 b" });
      expect((await r).status).toBe(200);
    }
    expect(plain.sock.of("viewer-offer").length).toBe(before);

    // no agent that takes viewers: 503
    pinning.s.closed();
    plain.s.closed();
    expect(await refused({ sdp: SDP, proof: proof(now) })).toMatchObject({ status: 503, code: "ERR_NO_PEER" });
  });

  it("a server without an invite key refuses invites", async () => {
    const { app } = createSignalApp({ joinKey: KEY });
    const r = await app.request("/ui/v1/offer", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ sdp: SDP, invite: mintInvite(generateIdentity(), 60_000).invite }) });
    expect(r.status).toBe(401);
    expect(((await r.json()) as { error: { message: string } }).error.message).toMatch(/does not issue viewer invites/);
  });
});

/** A manual clock whose now() also drives the hub's wall clock (invite expiry, proof times). */
class ClockWrap {
  readonly m = new ManualClock(1_700_000_000_000);
  readonly c: Clock = { now: () => this.m.now(), setTimer: (fn, ms) => this.m.setTimer(fn, ms), clearTimer: (h) => this.m.clearTimer(h) };
}
