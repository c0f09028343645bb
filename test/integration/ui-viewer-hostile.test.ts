/**
 * A hostile topology-page viewer (a werift peer in this process speaking to a real agent process):
 * nothing happens before it proves the cluster credential, a forged proof is refused, garbage closes its
 * link, its "packets" channel goes nowhere, and it never shows up in the agent's mesh (peers, routes).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generateIdentity, peerKeyOf, signFields, tokenMac, type Identity } from "../../src/identity.js";
import { VIEWER_CTX } from "../../agent/ui/viewer.js";
import { mintInvite, pubHex } from "../../agent/ui/invite.js";
import { formatInvite, INVITE_CTX, invitePayload } from "../../src/wire/invite.js";
import { waitFor } from "../helpers/cluster.js";
import { agentRoutes, agentStatus, freePort, openNodeViewer as openViewer, sendViewer as send, startAgents, startSignal, stopAgents, stopCli, type NodeViewer as Viewer, type Proc, type TestAgent } from "../helpers/ui.js";

const TOKEN = "ui-hostile-Lm7Xr2Tn5Wb9Yc4Hd6Jf0GsZq3v8Kp1";
/** the invite key agent a pins (as if it were the signaling server's) and one nobody pins */
const SERVER_KEY = generateIdentity();
const OTHER_KEY = generateIdentity();

/** An auth message for the challenge in v.msgs[0]: holds `idn`, proves the token or shows an invite. */
function auth(v: Viewer, idn: Identity, cred: { token: string } | { invite: string }): Record<string, unknown> {
  const ch = v.msgs[0] as { nonce: string; node: { id: string } };
  const pub = Buffer.from(idn.publicKey).toString("hex");
  const sig = Buffer.from(signFields(idn, VIEWER_CTX, ch.nonce, ch.node.id)).toString("hex");
  if ("invite" in cred) return { t: "auth", id: idn.id, pub, sig, invite: cred.invite };
  return { t: "auth", id: idn.id, pub, sig, mac: Buffer.from(tokenMac(peerKeyOf(cred.token), VIEWER_CTX, ch.nonce, ch.node.id, idn.id, pub)).toString("hex") };
}

describe("a hostile viewer of the topology page", () => {
  let signal: Proc | undefined;
  let agents: TestAgent[] = [];
  let dirs: string[] = [];
  let base = "";
  let baseB = "";
  const status = (dir: string) => agentStatus(dir) ?? { peers: [] }; // not up yet: no peers
  const routes = (dir: string) => ({ routes: agentRoutes(dir) });

  beforeAll(async () => {
    const s = await startSignal(TOKEN);
    signal = s.proc;
    const [uiPort, uiPortB] = [await freePort(), await freePort()];
    // a pins SERVER_KEY's invites; b takes none
    agents = startAgents(s.url, TOKEN, [
      ["a", ["--ui-listen", `127.0.0.1:${uiPort}`, "--ui-invite-key", pubHex(SERVER_KEY)]],
      ["b", ["--ui-listen", `127.0.0.1:${uiPortB}`]],
    ]);
    dirs = agents.map((a) => a.dir);
    base = `http://127.0.0.1:${uiPort}`;
    baseB = `http://127.0.0.1:${uiPortB}`;
    await waitFor(() => status(dirs[0]!).peers.some((p) => p.state === "connected"), 30_000, "a and b linked");
  }, 45_000);

  afterAll(async () => {
    await stopAgents(agents);
    await stopCli(signal);
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
    expect(agents[0]!.proc.err()).toMatch(/refused a viewer: wrong cluster credential/);
    expect(agents[0]!.proc.child.exitCode).toBeNull();
  }, 60_000);

  it("takes an invite only when signed by the pinned key, unexpired and not too long-lived; an agent that pins no key takes none", async () => {
    const idn = generateIdentity();
    const refusedWith = async (where: string, invite: string) => {
      const v = await openViewer(where);
      send(v, auth(v, idn, { invite }));
      await waitFor(() => v.msgs.some((m) => m.t === "refused" || m.t === "welcome"), 10_000, "an answer to the invite");
      await v.pc.close();
      const r = v.msgs.find((m) => m.t === "refused");
      expect(v.msgs.some((m) => m.t === "state")).toBe(false);
      return r ? String(r.reason) : "welcome";
    };
    // forged: signed by a key a does not pin (a hostile server's, say)
    expect(await refusedWith(base, mintInvite(OTHER_KEY, 60_000).invite)).toBe("invite refused: the invite was not signed with the invite key this agent pins");
    // expired: the right key, but its time is over
    expect(await refusedWith(base, mintInvite(SERVER_KEY, 60_000, Date.now() - 120_000).invite)).toMatch(/^invite refused: the invite expired \d+ s ago$/);
    // tampered: a valid invite whose expiry was pushed out
    const good = mintInvite(SERVER_KEY, 60_000).invite;
    const [, payload, sig] = good.split(".");
    const longer = Buffer.from(JSON.stringify({ ...JSON.parse(Buffer.from(payload!, "base64url").toString()), exp: Date.now() + 3600_000 })).toString("base64url");
    expect(await refusedWith(base, `wv1.${longer}.${sig}`)).toBe("invite refused: the invite was not signed with the invite key this agent pins");
    // signed by the pinned key but claiming two days: longer than any agent takes
    const twoDays = invitePayload(Date.now() + 48 * 3600_000, "00112233aabbccdd");
    expect(await refusedWith(base, formatInvite(twoDays, signFields(SERVER_KEY, INVITE_CTX, twoDays)))).toBe("invite refused: the invite claims to be valid for more than 24 h");
    // garbage instead of an invite
    expect(await refusedWith(base, "wv1.not-an-invite")).toMatch(/^invite refused: /);
    // b pins no invite key: a valid invite is no credential there
    expect(await refusedWith(baseB, good)).toBe("invite refused: this agent does not accept viewer invites (no --ui-invite-key)");
    expect(agents[1]!.proc.err()).toMatch(/refused a viewer invite/);

    // the genuine invite: a viewer, with state and pongs, still not a mesh member
    const v = await openViewer(base);
    send(v, auth(v, idn, { invite: good }));
    await waitFor(() => v.msgs.some((m) => m.t === "state"), 10_000, "state for the invited viewer");
    send(v, { t: "ping", seq: 9, ts: 1 });
    await waitFor(() => v.msgs.some((m) => m.t === "pong" && m.seq === 9), 5_000, "pong");
    await v.pc.close();
    for (const d of dirs) expect(status(d).peers.map((p) => p.id)).not.toContain(idn.id);
    expect(agents[0]!.proc.err()).toMatch(/viewer joined.*invite/);
  }, 60_000);
});
