/**
 * The transport contract (src/mesh/transport.ts), one suite for every implementation: werift, native
 * (libdatachannel), relay (through the signaling server) and the in-memory fake. Each run passes a factory
 * for two transports that can reach each other and says what the implementation can do; the cases below
 * are what the mesh relies on. Library-specific behaviour (socket cleanup, string messages, MTU) stays in
 * each implementation's own test file.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { sdpFingerprint, type Transport } from "../../src/mesh/transport.js";
import { connectPair, exchangeBothChannels, sleep, until, within, type Pair } from "./links.js";

export interface ContractSetup {
  ta: Transport;
  tb: Transport;
  /** node ids of ta and tb, for transports that address peers themselves (relay) */
  ids?: [string, string];
  close(): Promise<void>;
}

export interface ContractCaps {
  /** every SDP carries the transport's own fixed fingerprint (DTLS transports; the relay keys per link) */
  fixedFingerprint: boolean;
  /** the largest message a link accepts (send() beyond it: "too-big") */
  maxMessageSize: number;
  /** a burst can fill the packets channel (send(): "full", then onDrain) */
  fillable: boolean;
  /** a close reaches the other side by itself (the relay's does not: the mesh sends a signed bye) */
  closePropagates: boolean;
  /** how long a remote close takes to be noticed, at most */
  remoteCloseMs: number;
}

export function transportContract(name: string, setup: () => Promise<ContractSetup>, caps: ContractCaps): void {
  describe(`transport contract: ${name}`, () => {
    let s: ContractSetup;
    const pair = (shuffle = false): Promise<Pair> => connectPair(s.ta, s.tb, shuffle, s.ids);
    beforeAll(async () => {
      s = await setup();
    });
    afterAll(async () => s?.close());

    it("opens with candidates handed over before the description; both channels carry bytes both ways", async () => {
      const { a, b } = await pair(true);
      expect(a.link.state).toBe("open");
      expect(b.link.state).toBe("open");
      await exchangeBothChannels(a, b);
      const stats = await a.link.stats();
      expect(stats.bytesSent).toBe(5);
      expect(stats.bytesReceived).toBe(5);
      a.link.close();
    });

    it("every offer and answer carries one sha-256 fingerprint (the transport's own, where it has one)", async () => {
      const { a, b } = await pair();
      const offer = a.signals.find((x) => x.kind === "offer");
      const answer = b.signals.find((x) => x.kind === "answer");
      const fo = offer && offer.kind === "offer" ? sdpFingerprint(offer.sdp) : undefined;
      const fa = answer && answer.kind === "answer" ? sdpFingerprint(answer.sdp) : undefined;
      expect(fo?.algorithm).toBe("sha-256");
      expect(fa?.algorithm).toBe("sha-256");
      if (caps.fixedFingerprint) {
        expect(fo).toEqual(s.ta.fingerprint);
        expect(fa).toEqual(s.tb.fingerprint);
      }
      a.link.close();
    });

    it("round-trips a control message near the size limit, byte for byte", async () => {
      const { a, b } = await pair();
      b.onMessage = (ch, data) => {
        if (ch === "control") b.link.send("control", data);
      };
      const big = new Uint8Array(Math.min(200 * 1024, caps.maxMessageSize));
      for (let i = 0; i < big.length; i++) big[i] = (i * 31) & 0xff;
      expect(a.link.send("control", big)).toBe("ok");
      await until(() => a.messages.length >= 1, 15_000, "echo");
      expect(Buffer.from(a.messages[0]!.data).equals(Buffer.from(big))).toBe(true);
      a.link.close();
    });

    it("send() results are typed: too-big beyond the max message size (and the link stays up)", async () => {
      const { a, b } = await pair();
      expect(a.link.send("packets", new Uint8Array(caps.maxMessageSize + 1))).toBe("too-big");
      expect(a.link.send("control", new Uint8Array(caps.maxMessageSize + 1))).toBe("too-big");
      expect(a.link.state).toBe("open");
      expect(a.link.send("packets", new Uint8Array([1]))).toBe("ok");
      await until(() => b.messages.length >= 1, 5000, "message after a too-big");
      a.link.close();
    });

    it.skipIf(!caps.fillable)("send() results are typed: full above the buffer limit, then onDrain, then ok", async () => {
      const { a } = await pair();
      const chunk = new Uint8Array(8 * 1024);
      let accepted = 0;
      let r: string;
      while ((r = a.link.send("packets", chunk)) === "ok") {
        accepted++;
        expect(accepted).toBeLessThan(10_000);
      }
      expect(r).toBe("full");
      expect(a.link.bufferedAmount("packets")).toBeGreaterThan(0);
      await until(() => a.drains.includes("packets"), 10_000, "drain");
      expect(a.link.send("packets", chunk)).toBe("ok");
      a.link.close();
    });

    it("close(): onClose fires once, send() is closed after; the other side follows where the transport carries it", async () => {
      const { a, b } = await pair();
      a.link.close();
      a.link.close();
      expect(a.link.state).toBe("closed");
      expect(a.link.send("control", new Uint8Array(1))).toBe("closed");
      if (!caps.closePropagates) b.link.close();
      await within(b.closed, caps.remoteCloseMs, "remote close");
      await sleep(100);
      expect(a.closes).toEqual(["closed locally"]);
      expect(b.closes.length).toBe(1);
      expect(b.link.send("packets", new Uint8Array(1))).toBe("closed");
    });

    it("handlers that throw do not break the link", async () => {
      const { a, b } = await pair();
      b.onMessage = () => {
        throw new Error("boom");
      };
      a.link.send("control", new Uint8Array([1]));
      a.link.send("control", new Uint8Array([2]));
      await until(() => b.messages.length >= 2, 5000, "messages despite a throwing handler");
      expect(b.link.state).toBe("open");
      a.link.close();
      if (!caps.closePropagates) b.link.close();
      await within(b.closed, caps.remoteCloseMs, "close");
    });
  });
}
