/**
 * LinkBase (agent/transport/link-base.ts): the path MTU check reads the local limit for the selected candidate
 * pair, and an open link whose selected pair changes (ICE nominates another one after the check, as libjuice
 * does) to one whose limit is below the link's MTU fails with that limit, so that the next link is built for it.
 * Two minimal LinkBase subclasses wired to each other in memory (real probe and ack bytes, real timers); the
 * "kernel" limits are a table per host. Over TURN the limit is toward the TURN server less ChannelData's 4 bytes.
 */
import { describe, expect, it } from "vitest";
import { LinkBase, TURN_OVERHEAD, type FoundHow } from "../../agent/transport/link-base.js";
import { emptyPmtuCounters, type ChannelName, type SelectedPath } from "../../src/mesh/transport.js";
import { silentLogger } from "../../src/log.js";

const LIMITS = { controlBufferLimit: 1 << 20, packetsBufferLimit: 1 << 20, controlLowWater: 1 << 16, packetsLowWater: 1 << 16, maxMessageSize: 1 << 16 };

class MemLink extends LinkBase {
  peer: MemLink | undefined;
  sel: SelectedPath | undefined;
  closed: string | undefined;
  isOpen = false;
  failed: { found: number; how: FoundHow } | undefined;
  constructor(pathMtu: number, limits: Record<string, number>, counters = emptyPmtuCounters()) {
    const self: { link?: MemLink } = {};
    super({
      initiator: true,
      handlers: { onSignal: () => {}, onOpen: () => (self.link!.isOpen = true), onMessage: () => {}, onClose: (r) => (self.link!.closed = r) },
      limits: LIMITS,
      log: silentLogger,
      onGone: () => {},
      pathMtu,
      onPathMtuFailed: (found, how) => (self.link!.failed = { found, how }),
      localMtuLimit: (host) => limits[host],
      pmtuCounters: counters,
    });
    self.link = this;
  }
  open(): void {
    this.channelState("control", "open");
  }
  iceChanged(): void {
    this.selectedPairMayHaveChanged();
  }
  protected async makeOffer(): Promise<string | undefined> {
    return "v=0";
  }
  protected async setRemote(): Promise<void> {}
  protected async makeAnswer(): Promise<string | undefined> {
    return "v=0";
  }
  protected signalingState(): string | undefined {
    return "stable";
  }
  protected addCandidate(): void {}
  protected channelsOpen(): boolean {
    return true;
  }
  protected sendCapacity(): { maxSize: number; buffered: number } {
    return { maxSize: 1 << 16, buffered: 0 };
  }
  protected sendNow(channel: ChannelName, data: Uint8Array): void {
    const to = this.peer;
    const copy = Uint8Array.from(data);
    setImmediate(() => to?.deliver(channel, copy));
  }
  protected selectedPath(): SelectedPath | undefined {
    return this.sel;
  }
  protected async dispose(): Promise<void> {}
  bufferedAmount(): number {
    return 0;
  }
}

const until = async (cond: () => boolean, what: string, ms = 5000) => {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
};

function pairOf(pathMtu: number, limits: Record<string, number>) {
  const counters = emptyPmtuCounters();
  const a = new MemLink(pathMtu, limits, counters);
  const b = new MemLink(pathMtu, limits);
  a.peer = b;
  b.peer = a;
  return { a, b, counters };
}

const direct: SelectedPath = { localType: "prflx", localAddress: "198.18.0.11:4000", remoteType: "relay", remoteAddress: "198.18.0.2:5000" };
const relayed: SelectedPath = { localType: "relay", localAddress: "198.18.0.2:6000", remoteType: "prflx", remoteAddress: "198.18.0.12:7000" };

describe("link path MTU: the selected pair's limit", () => {
  it("over TURN the limit is the route toward the TURN server less ChannelData's 4 bytes", () => {
    expect(TURN_OVERHEAD).toEqual({ v4: 4, v6: 4 });
  });

  it("a pair switch after the check to a pair whose limit is below the link's MTU fails the link with that limit (route-limit, counted)", async () => {
    // the TURN server (198.18.0.2) is behind a 1500-byte route: mtu limit 1531 sending to it, 1527 relayed through it
    const { a, b, counters } = pairOf(1528, { "198.18.0.2": 1531, "198.18.0.12": 1531 });
    a.sel = b.sel = direct;
    a.open();
    b.open();
    await until(() => a.isOpen && b.isOpen, "both links open after their checks");
    expect(a.pmtuHow).toBe("confirmed");
    expect(a.linkMtu).toBe(1528);
    // a switch to another pair that carries as much: nothing happens
    a.sel = { ...direct, remoteAddress: "198.18.0.12:7000", remoteType: "srflx" };
    a.iceChanged();
    expect(a.state).toBe("open");
    // ICE nominates the relayed pair: 1531 - 4 = 1527 < 1528
    a.sel = relayed;
    a.iceChanged();
    expect(a.state).toBe("failed");
    expect(a.failed).toEqual({ found: 1524, how: "route-limit" });
    expect(a.closed).toMatch(/selected candidate pair changed to relay->prflx.*1524/);
    expect(counters.pairChanges).toBe(1);
  });

  it("pmtuHow: searching until checked, default at 1280 (never checked)", () => {
    expect(new MemLink(1524, {}).pmtuHow).toBe("searching");
    expect(new MemLink(1280, {}).pmtuHow).toBe("default");
  });
});
