/**
 * agent/ping.ts ViaPinger on an in-memory mesh of four nodes in a line (a - b - c - d): a ping is forwarded
 * hop by hop and timed over the whole path; a hop without a route, a hop budget used up, an answer from
 * the wrong peer and garbage are handled without throwing; forwarding is bounded.
 */
import { describe, expect, it } from "vitest";
import { ViaPinger, type PingPorts } from "../../agent/ping.js";
import { createLogger } from "../../src/log.js";

type Handler = (from: string, body: unknown) => void;

/** Nodes in a line; app messages delivered asynchronously; a direct ping costs `linkMs` of fake time. */
function line(names: string[], linkMs = 5) {
  let now = 0;
  const handlers = new Map<string, Handler>();
  const sent: { from: string; to: string; body: unknown }[] = [];
  const neighbours = (n: string) => names.filter((_, i) => Math.abs(i - names.indexOf(n)) === 1);
  const pingers = new Map<string, ViaPinger>();
  const ports = (self: string, over: Partial<PingPorts> = {}): PingPorts => ({
    selfId: self,
    onApp: (_ch, h) => handlers.set(self, h),
    sendApp: (peer, _ch, body) => {
      if (!neighbours(self).includes(peer)) return false;
      sent.push({ from: self, to: peer, body });
      now += linkMs / 2;
      setImmediate(() => handlers.get(peer)?.(self, body));
      return true;
    },
    connected: (p) => neighbours(self).includes(p),
    ping: async (p) => {
      if (!neighbours(self).includes(p)) throw new Error("not connected");
      now += linkMs;
      return linkMs;
    },
    nextHop: (node) => {
      const i = names.indexOf(self);
      const j = names.indexOf(node);
      return j < 0 || i === j ? undefined : names[i + Math.sign(j - i)];
    },
    now: () => now,
    log: createLogger({ level: "error" }),
    ...over,
  });
  for (const n of names) pingers.set(n, new ViaPinger(ports(n)));
  return { pingers, sent, handlers, ports, deliver: (to: string, from: string, body: unknown) => handlers.get(to)!(from, body) };
}

describe("ping via the route (agent/ping.ts)", () => {
  it("is forwarded hop by hop and timed over the whole path", async () => {
    const m = line(["a", "b", "c", "d"]);
    // a -> b -> c, c pings d over its own link, answers go back: 2 forwarded requests + 2 answers + c's ping
    const rtt = await m.pingers.get("a")!.via("d", "b", 1000);
    expect(rtt).toBe(4 * 2.5 + 5);
    expect(m.sent.map((s) => `${s.from}>${s.to}`)).toEqual(["a>b", "b>c", "c>b", "b>a"]);
  });

  it("says where it stopped: no route, hop budget used up; a wrong peer's answer and garbage change nothing", async () => {
    const m = line(["a", "b", "c", "d"]);
    await expect(m.pingers.get("a")!.via("x", "b", 1000)).rejects.toMatchObject({ code: "ERR_NOT_CONNECTED", message: expect.stringContaining("no route from b") });
    await expect(m.pingers.get("a")!.via("d", "b", 1000, 1)).rejects.toMatchObject({ code: "ERR_NOT_CONNECTED" });
    await expect(m.pingers.get("a")!.via("d", "c", 1000)).rejects.toMatchObject({ code: "ERR_NOT_CONNECTED", message: expect.stringContaining("cannot send to the next hop c") });
    // an answer from another peer than the one asked does not complete the wait
    const p = m.pingers.get("a")!.via("c", "b", 200);
    m.deliver("a", "d", { t: "res", seq: 4, ok: true });
    for (const junk of [null, 7, "x", { t: "res" }, { t: "req", seq: 1 }, { t: "req", seq: 1, target: 5, hops: 1 }, { t: "zzz", seq: 1 }]) m.deliver("a", "b", junk);
    expect(await p).toBeGreaterThan(0); // b's real answer
  });

  it("times out when the hop never answers", async () => {
    const m = line(["a", "b", "c"]);
    m.handlers.set("b", () => {}); // b swallows everything
    await expect(m.pingers.get("a")!.via("c", "b", 100)).rejects.toMatchObject({ code: "ERR_TIMEOUT" });
  });

  it("forwards at most 16 pings at once for others", async () => {
    const m = line(["a", "b", "c"]);
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const answers: unknown[] = [];
    // b's pings to c hang until released; a floods b with requests
    const b = new ViaPinger(
      m.ports("b", {
        ping: async () => {
          await gate;
          return 1;
        },
        sendApp: (_p, _ch, body) => {
          answers.push(body);
          return true;
        },
      }),
    );
    void b;
    for (let seq = 1; seq <= 20; seq++) m.deliver("b", "a", { t: "req", seq, target: "c", hops: 3 });
    await new Promise((r) => setImmediate(r));
    expect(answers).toHaveLength(4);
    expect(answers.every((x) => (x as { ok: boolean; error: string }).error === "busy")).toBe(true);
    release();
    await new Promise((r) => setTimeout(r, 10));
    expect(answers.filter((x) => (x as { ok: boolean }).ok)).toHaveLength(16);
  });
});
