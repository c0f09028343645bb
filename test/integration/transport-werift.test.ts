/**
 * Real werift peers in one process, wired by passing signals directly (no signaling server, no mocks).
 * What every transport must do is in the contract suite (transport-contract.test.ts); this file keeps
 * what the two WebRTC transports share beyond it (test/helpers/webrtc-transport-suite.ts) runs here with
 * werift's limits, string messages and socket count.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createWeriftTransport, WERIFT_LIMITS, type WeriftTransport } from "../../agent/transport/werift.js";
import type { ChannelName } from "../../src/mesh/transport.js";
import { capturedLogger, sleep } from "../helpers/links.js";
import { webrtcTransportTests } from "../helpers/webrtc-transport-suite.js";

const { logger, logLines } = capturedLogger();

const udpHandles = () => process.getActiveResourcesInfo().filter((r) => r === "UDPWrap").length;

describe("werift transport (loopback, one process)", () => {
  let ta: WeriftTransport;
  let tb: WeriftTransport;
  let baselineUdp = 0;

  beforeAll(async () => {
    baselineUdp = udpHandles();
    ta = await createWeriftTransport({ logger, loopbackOnly: true });
    tb = await createWeriftTransport({ logger, loopbackOnly: true });
  });

  afterAll(async () => {
    await ta?.close();
    await tb?.close();
  });

  webrtcTransportTests({
    label: "werift",
    transports: () => ({ ta, tb }),
    create: () => createWeriftTransport({ logger, loopbackOnly: true }),
    limits: WERIFT_LIMITS,
    maxPacketsAccepted: 1000,
    logLines,
    udpSockets: udpHandles,
    // reach into werift to send a string, as a non-weftnet peer could
    sendString: (link, str) => (link as unknown as { dc: Record<ChannelName, { send(d: string): void }> }).dc.control.send(str),
    candidatesBeforeOffer: "some",
  });

  it("leaves no UDP sockets behind", async () => {
    await sleep(300);
    expect(udpHandles()).toBe(baselineUdp);
  });
});
