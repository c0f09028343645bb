/**
 * What this node's OS network should look like, as a pure function of what the agent knows (tailscale's
 * Router.Set(cfg) idea). The data plane (agent/dataplane.ts) computes it on every reconcile and hands it to
 * its NodeNetwork port, which converges the kernel to it (agent/os/node-network.ts: netconf.ts for the TUN,
 * bridge and routes, advertise.ts for the gateway rules) and reports what it changed. No I/O here.
 *
 *   cluster range                 -> routed into the TUN, src = a gateway address of this node (below)
 *   IPAM blocks with pods         -> a gateway address each on the bridge (the pods' default gateway)
 *   routes accepted from others   -> routed into the TUN (agent/route-policy.ts decides which)
 *   our advertised routes         -> gateway rules (forward, optionally masquerade) for mesh traffic to them
 *
 * Host-originated traffic (agent/os/netconf.ts header): the cluster-range route's `src` hint is the gateway
 * of this node's lowest block holding pods or, with no pods, of its lowest owned block, which then stays on
 * the bridge too, so traffic the host itself sends to other nodes' pods passes the data path's
 * anti-spoofing check. Owning no block: no such address and no hint.
 */
import { WeftError } from "./errors.js";
import { formatIp, parseCidr, type Cidr } from "./ipam/cidr.js";

/** agent/os/netconf.ts NodeNetwork.apply's input. */
export interface DesiredNetwork {
  /** Routed to the TUN (proto 87). */
  clusterRanges: string[];
  /** This node's IPAM blocks: the bridge gets the first usable address of each. */
  localBlocks: string[];
  /** More routes to manage (proto 87), e.g. advertised subnets. */
  extraRoutes?: { cidr: string; dev: string }[];
  /**
   * Preferred source (`ip route ... src`) of the cluster-range routes: must be the gateway address of one
   * of `localBlocks` (so it is local). Unset: no hint (the kernel picks, usually the LAN address).
   */
  clusterRouteSrc?: string;
}

function cidrInput(s: string, what: string): Cidr {
  try {
    return parseCidr(s);
  } catch (e) {
    throw new WeftError("ERR_NETCONF_INPUT", `${what}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * The desired node network from IPAM state: the bridge carries the gateway of every block with pods; the
 * `src` of the cluster-range routes is the gateway of the lowest of those or, with no pods, of the lowest
 * owned block, which then is on the bridge too. Owning no block: no such address and no `src`.
 */
export function desiredNetwork(input: {
  clusterRanges: readonly string[];
  /** every block this node owns (IPAM localBlocks()) */
  ownedBlocks: readonly string[];
  /** owned blocks holding at least one pod (IPAM activeBlocks()) */
  activeBlocks: readonly string[];
  extraRoutes?: readonly { cidr: string; dev: string }[];
}): DesiredNetwork {
  const base = (b: string) => cidrInput(b, "local block").base;
  const lowest = (bs: readonly string[]) => [...bs].sort((a, b) => base(a) - base(b))[0];
  const anchor = lowest(input.activeBlocks) ?? lowest(input.ownedBlocks);
  const localBlocks = [...new Set([...input.activeBlocks, ...(anchor === undefined ? [] : [anchor])])].sort((a, b) => base(a) - base(b));
  const out: DesiredNetwork = { clusterRanges: [...input.clusterRanges], localBlocks };
  if (input.extraRoutes) out.extraRoutes = input.extraRoutes.map((r) => ({ ...r }));
  if (anchor !== undefined) out.clusterRouteSrc = formatIp(base(anchor) + 1);
  return out;
}

/** agent/os/advertise.ts AdvertiseGateway.apply's input. */
export interface DesiredGateway {
  tun: string;
  clusterRanges: string[];
  routes: string[];
  snat: boolean;
}

/** Everything the NodeNetwork port converges: the node network and the gateway rules for advertised routes. */
export interface DesiredNodeNetwork {
  node: DesiredNetwork;
  gateway: DesiredGateway;
}

export interface NodeNetworkInputs {
  /** TUN device name */
  tun: string;
  /** the cluster range IPAM uses */
  clusterRange: string;
  /** every block this node owns */
  ownedBlocks: readonly string[];
  /** owned blocks holding at least one pod */
  activeBlocks: readonly string[];
  /** routes other nodes advertise that this node installs (accepted), sorted and unique */
  acceptedRoutes: readonly string[];
  /** prefixes this node advertises and still holds */
  advertised: readonly string[];
  /** masquerade mesh traffic to the advertised prefixes */
  snat: boolean;
}

export function desiredNodeNetwork(i: NodeNetworkInputs): DesiredNodeNetwork {
  return {
    node: desiredNetwork({ clusterRanges: [i.clusterRange], ownedBlocks: i.ownedBlocks, activeBlocks: i.activeBlocks, extraRoutes: i.acceptedRoutes.map((cidr) => ({ cidr, dev: i.tun })) }),
    gateway: { tun: i.tun, clusterRanges: [i.clusterRange], routes: [...i.advertised], snat: i.snat },
  };
}

/**
 * The data plane's NodeNetwork port: converges the OS to a desired state (agent/os/node-network.ts on
 * Linux; src/testing/memory-device.ts RecordingNetwork in tests).
 */
export interface NodeNetworkPort {
  /** Converge to `d` (safe to repeat); returns the changes made (empty: the OS already matched). */
  apply(d: DesiredNodeNetwork): Promise<string[]>;
  /** Remove what apply added. */
  teardown(): Promise<void>;
}
