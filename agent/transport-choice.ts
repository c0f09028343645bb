/**
 * Transport choice: which WebRTC implementation this agent runs (--transport werift | native | auto) and
 * with which link MTU (--link-mtu N | auto). The modules are imported on demand, so an agent that runs
 * one never loads the other (werift is pure JS; native is libdatachannel through node-datachannel).
 * ICE never pairs addresses inside the cluster range: the overlay must not carry its own links.
 */
import { WeftError } from "../src/errors.js";
import { containsIp, parseCidr, parseIp, type Cidr } from "../src/ipam/cidr.js";
import type { Logger } from "../src/log.js";
import type { Transport } from "../src/mesh/transport.js";
import { uplinkMtu } from "./os/mtu.js";
import { MAX_LINK_MTU, SAFE_LINK_MTU } from "./transport/link-base.js";

export interface TransportChoice {
  /** werift (default), native, or auto (native when it loads) */
  kind?: "auto" | "werift" | "native";
  /** native only: a number, or "auto" (default): the uplink MTU clamped to 1280..4096 */
  linkMtu?: number | "auto";
  /** the cluster range (never used for ICE) */
  clusterRange: string;
  werift?: { loopbackOnly?: boolean; icePortRange?: [number, number] };
  logger: Logger;
}

/** Is `ip` (any family; only IPv4 can match) inside the IPv4 CIDR? */
export function inRange(ip: string, cidr: Cidr): boolean {
  if (!/^\d+\.\d+\.\d+\.\d+$/.test(ip)) return false;
  try {
    return containsIp(cidr, parseIp(ip));
  } catch {
    return false;
  }
}

export async function createTransport(c: TransportChoice): Promise<Transport> {
  const log = c.logger;
  const rangeCidr = parseCidr(c.clusterRange);
  const common = { logger: log, ...(c.werift ?? {}), excludeAddress: (ip: string) => inRange(ip, rangeCidr) };
  let kind = c.kind ?? "werift";
  if (kind !== "werift") {
    const native = await import("./transport/native.js");
    if (await native.nativeAvailable()) {
      let mtu = c.linkMtu ?? "auto";
      if (mtu === "auto") {
        const up = await uplinkMtu();
        mtu = Math.min(MAX_LINK_MTU, Math.max(SAFE_LINK_MTU, up ?? SAFE_LINK_MTU));
        log.debug("link MTU from the uplink", { uplinkMtu: up ?? "unknown", linkMtu: mtu });
      }
      return native.createNativeTransport({ ...common, mtu });
    }
    if (kind === "native") throw new WeftError("ERR_NO_NATIVE", `--transport native: node-datachannel does not load here (${native.nativeLoadError() ?? "unknown reason"}); use --transport werift`);
    log.info("native transport unavailable; using werift", { reason: native.nativeLoadError() });
    kind = "werift";
  }
  if (typeof c.linkMtu === "number") log.warn("--link-mtu applies to the native transport only: werift sends fixed 1200-byte SCTP chunks", { linkMtu: c.linkMtu });
  return (await import("./transport/werift.js")).createWeriftTransport(common);
}
