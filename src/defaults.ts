/**
 * Defaults that more than one layer needs, defined once. Layer-specific defaults live next to their code
 * (e.g. the node network's bridge and MTU in agent/os/netconf.ts).
 */

/** The cluster range pods are addressed from unless --range says otherwise (IPAM, the TUN route, ICE exclusion). */
export const DEFAULT_CLUSTER_RANGE = "10.40.0.0/16";
