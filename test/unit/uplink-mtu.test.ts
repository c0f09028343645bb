import { describe, expect, it } from "vitest";
import { pickUplinkMtu } from "../../agent/os/mtu.js";

const e = (ifname: string, mtu: number, flags = ["BROADCAST", "UP", "LOWER_UP"], inet = true) => ({ ifname, mtu, flags, addr_info: inet ? [{ family: "inet" }] : [] });

describe("pickUplinkMtu (--link-mtu auto)", () => {
  it("takes the default route's interface", () => {
    expect(pickUplinkMtu([e("lo", 65536, ["LOOPBACK", "UP"]), e("eth0", 9001), e("eth1", 1500)], "eth0")).toBe(9001);
  });
  it("without a default route: the smallest usable interface, never loopback, the overlay or a down one", () => {
    const list = [e("lo", 65536, ["LOOPBACK", "UP"]), e("weft0", 1000), e("weft-br0", 1100), e("uplink", 1500), e("down0", 1200, ["BROADCAST"]), e("jumbo", 9000)];
    expect(pickUplinkMtu(list, undefined)).toBe(1500);
    expect(pickUplinkMtu(list, "gone0")).toBe(1500);
  });
  it("undefined when nothing qualifies", () => {
    expect(pickUplinkMtu([e("lo", 65536, ["LOOPBACK", "UP"]), e("eth0", 1500, ["UP"], false)], undefined)).toBeUndefined();
  });
});
