/**
 * The MTU of this host's uplink, for `--link-mtu auto`: the interface of the IPv4 default route, else (no
 * default route, e.g. a LAN-only host) the smallest MTU among the interfaces that are up, carry an IPv4
 * address and are neither loopback nor the overlay's own (weft*). undefined when nothing can be read.
 * Read with `ip -j -4 addr show` and /proc/net/route, both of the agent's network namespace (/sys/class/net
 * shows the mount namespace's, which differs under `nsenter --net`).
 * This is a guess about the path, not a measurement: links built above 1280 check it once open (LinkBase's
 * path MTU check and search, src/mesh/pmtu.ts) and rebuild for what the path carries to a peer whose path carries less.
 */
import { readFileSync } from "node:fs";
import { execCommand } from "./exec.js";

interface IpAddrEntry {
  ifname?: string;
  mtu?: number;
  flags?: string[];
  addr_info?: { family?: string }[];
}

/** Interface of the IPv4 default route (/proc/net/route: destination and mask 0). */
function defaultRouteIface(): string | undefined {
  try {
    for (const line of readFileSync("/proc/net/route", "utf8").split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length >= 8 && f[1] === "00000000" && f[7] === "00000000") return f[0];
    }
  } catch {
    /* not Linux */
  }
  return undefined;
}

/** Pure part (tested): pick the uplink MTU from `ip -j -4 addr show` output and the default route's device. */
export function pickUplinkMtu(entries: IpAddrEntry[], defaultIface: string | undefined): number | undefined {
  const usable = entries.filter(
    (e) => typeof e.mtu === "number" && e.mtu > 0 && e.ifname && !e.ifname.startsWith("weft") && e.flags?.includes("UP") && !e.flags.includes("LOOPBACK") && e.addr_info?.some((a) => a.family === "inet"),
  );
  const dflt = defaultIface ? usable.find((e) => e.ifname === defaultIface) : undefined;
  if (dflt) return dflt.mtu;
  return usable.length ? Math.min(...usable.map((e) => e.mtu!)) : undefined;
}

export async function uplinkMtu(): Promise<number | undefined> {
  try {
    const { stdout } = await execCommand("ip", ["-j", "-4", "addr", "show"], { timeoutMs: 5000 });
    return pickUplinkMtu(JSON.parse(stdout) as IpAddrEntry[], defaultRouteIface());
  } catch {
    return undefined;
  }
}
