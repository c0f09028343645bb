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
  constructor(pathMtu: number, limits: Record<string, number>, counters = emptyPmtuCounters(), turnServers?: string[]) {
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
      ...(turnServers ? { turnServers } : {}),
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

function pairOf(pathMtu: number, limits: Record<string, number>, turnServers?: string[]) {
  const counters = emptyPmtuCounters();
  const a = new MemLink(pathMtu, limits, counters, turnServers);
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

  // A 1500-byte route carries link packets of mtu 1531 over IPv4 (NATIVE_WIRE_BELOW_MTU.v4 31) but only 1511 over
  // IPv6 (v6 11: the IPv6 header is 40 bytes, not 20); relayed through TURN, ChannelData's 4 bytes come off both.
  const V6_TURN = "2001:db8::2";
  const v6Limits = { [V6_TURN]: 1500 + 11, "198.18.0.2": 1500 + 31, "198.18.0.12": 1500 + 31 };

  it("over a TURN server reached by IPv6 whose relayed address is IPv4 (libjuice asks for no family), the limit is toward the server: 1511 - 4", async () => {
    const { a, b } = pairOf(1528, v6Limits, [V6_TURN]);
    a.sel = relayed; // local relay 198.18.0.2:6000: the IPv4 relayed address coturn handed out
    b.sel = direct;
    a.open();
    b.open();
    await until(() => a.failed !== undefined, "a's check ends on its local limit");
    // 1507 rounded down to a multiple of 4 (the search's step); the relayed address's IPv4 route would have said 1527 -> 1524
    expect(a.failed).toEqual({ found: 1504, how: "route-limit" });
    expect(a.state).toBe("failed");
  });

  it("a relayed address in brackets (IPv6, the server given by name) is parsed and limited as IPv6", async () => {
    const { a, b } = pairOf(1528, v6Limits, [""]);
    a.sel = { localType: "relay", localAddress: `[${V6_TURN}]:6000`, remoteType: "prflx", remoteAddress: "198.18.0.12:7000" };
    b.sel = direct;
    a.open();
    b.open();
    await until(() => a.failed !== undefined, "a's check ends on its local limit");
    expect(a.failed).toEqual({ found: 1504, how: "route-limit" });
  });

  it("several TURN servers: the least limit among those with a route; none with a route: 1280", async () => {
    const { a, b } = pairOf(1528, { ...v6Limits, "198.18.0.3": 1500 + 31 }, ["198.18.0.3", V6_TURN, "2001:db8::99"]);
    a.sel = relayed;
    b.sel = direct;
    a.open();
    b.open();
    await until(() => a.failed !== undefined, "a's check ends on its local limit");
    expect(a.failed).toEqual({ found: 1504, how: "route-limit" });
    const c = pairOf(1528, v6Limits, ["2001:db8::99"]);
    c.a.sel = relayed;
    c.b.sel = direct;
    c.a.open();
    c.b.open();
    await until(() => c.a.failed !== undefined, "c's check ends at 1280");
    expect(c.a.failed).toEqual({ found: 1280, how: "route-limit" });
  });

  it("pmtuHow: searching until checked, default at 1280 (never checked)", () => {
    expect(new MemLink(1524, {}).pmtuHow).toBe("searching");
    expect(new MemLink(1280, {}).pmtuHow).toBe("default");
  });
});
