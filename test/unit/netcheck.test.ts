import { describe, expect, it } from "vitest";
import { netcheck, netcheckVerdict } from "../../agent/netcheck.js";
import { startStunServer } from "../../signaling/stun.js";

const srv = (n: number) => `198.18.0.1:${3478 + n}`;

describe("netcheck verdict (pure)", () => {
  const local = ["127.0.0.1", "10.1.0.10"];
  it("no answer at all: UDP blocked", () => {
    const v = netcheckVerdict({ localAddresses: local, localPort: 5000, probes: [{ target: srv(0), mapped: null }, { target: srv(1), mapped: null }] });
    expect(v).toMatchObject({ udp: false, reflexive: null, verdict: "UDP blocked", mappingVariesByDestination: null });
  });
  it("seen as our own address and port: no NAT", () => {
    const v = netcheckVerdict({ localAddresses: ["198.18.1.10"], localPort: 5000, probes: [{ target: srv(0), mapped: "198.18.1.10:5000" }, { target: srv(1), mapped: "198.18.1.10:5000" }] });
    expect(v).toMatchObject({ udp: true, natted: false, verdict: "no NAT", reflexive: "198.18.1.10:5000", mappingVariesByDestination: false });
  });
  it("same mapping for two destinations: cone", () => {
    const v = netcheckVerdict({ localAddresses: local, localPort: 5000, probes: [{ target: srv(0), mapped: "198.18.0.11:5000" }, { target: srv(1), mapped: "198.18.0.11:5000" }] });
    expect(v).toMatchObject({ natted: true, verdict: "endpoint-independent mapping (cone)", mappingVariesByDestination: false });
  });
  it("different mappings per destination: symmetric", () => {
    const v = netcheckVerdict({ localAddresses: local, localPort: 5000, probes: [{ target: srv(0), mapped: "198.18.0.11:40001" }, { target: srv(1), mapped: "198.18.0.11:52922" }] });
    expect(v).toMatchObject({ natted: true, verdict: "address/port-dependent mapping (symmetric)", mappingVariesByDestination: true, reflexive: "198.18.0.11:40001" });
  });
  it("one answer only: NATed but mapping unknown; one answer without NAT is still no NAT", () => {
    expect(netcheckVerdict({ localAddresses: local, localPort: 5000, probes: [{ target: srv(0), mapped: "198.18.0.11:5000" }, { target: srv(1), mapped: null }] })).toMatchObject({ verdict: "NAT, mapping behaviour unknown", mappingVariesByDestination: null, udp: true });
    expect(netcheckVerdict({ localAddresses: local, localPort: 5000, probes: [{ target: srv(0), mapped: "10.1.0.10:5000" }] })).toMatchObject({ verdict: "no NAT" });
  });
});

describe("netcheck against real STUN responders on loopback", () => {
  it("sees no NAT, and UDP blocked for a port nobody answers on", async () => {
    const a = await startStunServer({ host: "127.0.0.1", port: 0 });
    const b = await startStunServer({ host: "127.0.0.1", port: 0 });
    try {
      const r = await netcheck({ servers: [`127.0.0.1:${a.port}`, `127.0.0.1:${b.port}`], timeoutMs: 300 });
      expect(r.verdict).toBe("no NAT");
      expect(r.reflexive).toBe(`127.0.0.1:${r.localPort}`);
      expect(r.probes.every((p) => p.attempts === 1)).toBe(true);
    } finally {
      await a.close();
      await b.close();
    }
    const dead = await netcheck({ servers: ["127.0.0.1:9"], timeoutMs: 100, attempts: 2 });
    expect(dead).toMatchObject({ udp: false, verdict: "UDP blocked" });
    expect(dead.probes[0]!.attempts).toBe(2);
  });
});
