import fc from "fast-check";
import { describe, expect, it } from "vitest";
import {
  VNET_F_NEEDS_CSUM,
  VNET_GSO_TCPV4,
  VNET_GSO_TCPV6,
  VNET_HDR_LEN,
  VNET_HDR_NONE,
  buildVnetHdr,
  isGso,
  readVnetHdr,
  validateVnetPacket,
  writeVnetHdr,
  type VnetHdr,
} from "../../src/packet/vnet.js";
import { ipv4Packet, ipv6Packet } from "./packet-fixtures.js";

const u16 = fc.integer({ min: 0, max: 0xffff });
const u8 = fc.integer({ min: 0, max: 0xff });
const hdr = fc.record<VnetHdr>({ flags: u8, gsoType: u8, hdrLen: u16, gsoSize: u16, csumStart: u16, csumOffset: u16 });

function withHdr(h: VnetHdr, ip: Uint8Array): Uint8Array {
  const p = new Uint8Array(VNET_HDR_LEN + ip.length);
  writeVnetHdr(p, 0, h);
  p.set(ip, VNET_HDR_LEN);
  return p;
}

describe("virtio_net_hdr", () => {
  it("round-trips every field", () => {
    fc.assert(fc.property(hdr, fc.nat(20), (h, off) => {
      const b = new Uint8Array(off + VNET_HDR_LEN);
      writeVnetHdr(b, off, h);
      expect(readVnetHdr(b, off)).toEqual(h);
      expect(buildVnetHdr(h)).toEqual(b.subarray(off));
    }));
  });

  it("is little-endian (what TUNSETVNETLE makes the kernel use)", () => {
    const b = buildVnetHdr({ flags: 1, gsoType: 1, hdrLen: 0x0102, gsoSize: 1448, csumStart: 20, csumOffset: 16 });
    expect([...b]).toEqual([1, 1, 0x02, 0x01, 1448 & 0xff, 1448 >> 8, 20, 0, 16, 0]);
  });

  it("short buffers give a typed drop", () => {
    expect(readVnetHdr(new Uint8Array(9))).toMatchObject({ ok: false, reason: "malformed" });
  });

  it("validates GSO headers against the IP packet", () => {
    const v4 = ipv4Packet(1, 2, new Uint8Array(3000), 6);
    const v6 = ipv6Packet(1n, 2n, new Uint8Array(3000), 6);
    const tso4: VnetHdr = { flags: VNET_F_NEEDS_CSUM, gsoType: VNET_GSO_TCPV4, hdrLen: 52, gsoSize: 1448, csumStart: 20, csumOffset: 16 };
    expect(validateVnetPacket(withHdr(tso4, v4))).toBeNull();
    expect(isGso(withHdr(tso4, v4))).toBe(true);
    expect(validateVnetPacket(withHdr({ ...tso4, gsoType: VNET_GSO_TCPV6 }, v6))).toBeNull();
    expect(validateVnetPacket(withHdr(tso4, v6))).toMatchObject({ detail: "virtio-net gso_type does not match the IP version" });
    expect(validateVnetPacket(withHdr({ ...tso4, gsoSize: 0 }, v4))).toMatchObject({ ok: false });
    expect(validateVnetPacket(withHdr({ ...tso4, gsoType: 2 }, v4))).toMatchObject({ detail: "virtio-net header has an unknown gso_type" });
    expect(validateVnetPacket(withHdr({ ...tso4, flags: 0x80 }, v4))).toMatchObject({ ok: false });
    expect(validateVnetPacket(withHdr({ ...tso4, csumStart: v4.length }, v4))).toMatchObject({ ok: false });
    expect(validateVnetPacket(withHdr({ ...tso4, hdrLen: v4.length + 1 }, v4))).toMatchObject({ ok: false });
    const plain = new Uint8Array(VNET_HDR_LEN + 28);
    plain.set(VNET_HDR_NONE);
    plain.set(ipv4Packet(1, 2, new Uint8Array(8)), VNET_HDR_LEN);
    expect(validateVnetPacket(plain)).toBeNull();
    expect(isGso(plain)).toBe(false);
  });

  it("validateVnetPacket never throws on random bytes", () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 80 }), (b) => {
      const r = validateVnetPacket(b);
      expect(r === null || r.reason === "malformed" || r.reason === "too-big").toBe(true);
    }), { numRuns: 3000 });
  });
});
