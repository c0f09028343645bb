/**
 * Gateway for advertised routes (`--advertise-routes`, `--snat-routes`): lets traffic that arrives from
 * the mesh for a prefix this node advertises (a home LAN, another cluster's pod range) leave through
 * the node's own routing table, and the replies come back.
 *
 * Declarative like netconf.ts: apply(desired) converges two iptables chains we own and reports what
 * changed (a second apply with the same input changes nothing); teardown() removes exactly them.
 *   filter WEFTNET-ADV  (jumped to from FORWARD): ACCEPT  -i TUN -d PREFIX ;  ACCEPT -o TUN -s PREFIX
 *   nat    WEFTNET-SNAT (jumped to from POSTROUTING, with --snat-routes): MASQUERADE -s CLUSTER -d PREFIX
 * Without SNAT the hosts behind the prefix need a route back to the cluster range via this node.
 */
import type { Logger } from "../../src/log.js";
import { silentLogger } from "../../src/log.js";
import { HostExec } from "./exec.js";
import { containsIp, overlaps, parseCidr, parseIp, type Cidr } from "../../src/ipam/cidr.js";

export const ADV_CHAIN = "WEFTNET-ADV";
export const SNAT_CHAIN = "WEFTNET-SNAT";

export interface AdvertiseDesired {
  tun: string;
  clusterRanges: string[];
  routes: string[];
  snat: boolean;
}

export class AdvertiseGateway {
  private readonly host: HostExec;
  private readonly log: Logger;
  constructor(opts: { logger?: Logger; netns?: string } = {}) {
    this.host = new HostExec(opts.netns);
    this.log = opts.logger ?? silentLogger;
  }

  private async ipt(args: string[]): Promise<{ ok: boolean; stdout: string }> {
    try {
      const r = await this.host.run("iptables", ["-w", "5", ...args]);
      return { ok: true, stdout: r.stdout };
    } catch (e) {
      return { ok: false, stdout: (e as { stderr?: string }).stderr ?? String(e) };
    }
  }

  /** Make `chain` in `table` hold exactly `rules` and be jumped to from `parent`; returns changes. */
  private async converge(table: string, parent: string, chain: string, rules: string[][]): Promise<string[]> {
    const changes: string[] = [];
    const listed = await this.ipt(["-t", table, "-S", chain]);
    if (!listed.ok) {
      if (rules.length === 0) return changes;
      const created = await this.ipt(["-t", table, "-N", chain]);
      if (!created.ok) throw new Error(`cannot create iptables chain ${table}/${chain}: ${created.stdout.trim()} (is iptables installed and are we root?)`);
      changes.push(`created ${table}/${chain}`);
    }
    const have = listed.ok ? listed.stdout.split("\n").filter((l) => l.startsWith(`-A ${chain} `)) : [];
    const want = rules.map((r) => `-A ${chain} ${r.join(" ")}`);
    if (have.join("\n") !== want.join("\n")) {
      await this.ipt(["-t", table, "-F", chain]);
      for (const r of rules) {
        const res = await this.ipt(["-t", table, "-A", chain, ...r]);
        if (!res.ok) throw new Error(`iptables -t ${table} -A ${chain} ${r.join(" ")} failed: ${res.stdout.trim()}`);
      }
      changes.push(`${table}/${chain}: ${rules.length} rules`);
    }
    const jump = await this.ipt(["-t", table, "-C", parent, "-j", chain]);
    if (rules.length > 0 && !jump.ok) {
      await this.ipt(["-t", table, "-I", parent, "1", "-j", chain]);
      changes.push(`${table}/${parent} -> ${chain}`);
    }
    if (rules.length === 0 && listed.ok) {
      await this.remove(table, parent, chain);
      changes.push(`removed ${table}/${chain}`);
    }
    return changes;
  }

  private async remove(table: string, parent: string, chain: string): Promise<void> {
    while ((await this.ipt(["-t", table, "-C", parent, "-j", chain])).ok) await this.ipt(["-t", table, "-D", parent, "-j", chain]);
    await this.ipt(["-t", table, "-F", chain]);
    await this.ipt(["-t", table, "-X", chain]);
  }

  async apply(d: AdvertiseDesired): Promise<{ changes: string[] }> {
    const fwd = d.routes.flatMap((p) => [
      ["-i", d.tun, "-d", p, "-j", "ACCEPT"],
      ["-o", d.tun, "-s", p, "-j", "ACCEPT"],
    ]);
    const nat = d.snat ? d.routes.flatMap((p) => d.clusterRanges.map((c) => ["-s", c, "-d", p, "-j", "MASQUERADE"])) : [];
    const changes = [...(await this.converge("filter", "FORWARD", ADV_CHAIN, fwd)), ...(await this.converge("nat", "POSTROUTING", SNAT_CHAIN, nat))];
    if (changes.length) this.log.info("advertised-route gateway updated", { changes });
    return { changes };
  }

  async teardown(): Promise<void> {
    await this.remove("filter", "FORWARD", ADV_CHAIN);
    await this.remove("nat", "POSTROUTING", SNAT_CHAIN);
  }
}

// ---- which routes other nodes advertise this node installs (--accept-routes) ---------------------------

/**
 * Never installed whatever the operator accepts: "this network" 0/8, loopback, link-local (cloud metadata
 * 169.254.169.254 lives there), multicast and reserved space.
 */
export const NEVER_ACCEPTED = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"];

export interface RouteOffer {
  node: string;
  cidr: string;
}

export interface RouteDecision extends RouteOffer {
  accepted: boolean;
  reason: string;
}

/**
 * Decide which prefixes advertised by other nodes (outside the cluster range: cluster routes come from the
 * IPAM table) this node routes into the mesh. Pure. A prefix is installed only when the operator accepts it
 * (`accept` = "all", or CIDRs that contain it; default none), it is not in NEVER_ACCEPTED, does not overlap
 * this host's own networks (the underlay), holds none of `protectedHosts` (the signaling server, STUN/TURN
 * servers, peers' addresses: routing them into the overlay would carry the overlay's own packets or let a
 * node capture them), and no other node advertises an overlapping prefix (a conflict is reported and
 * neither is installed: the lower node id does not win, ids can be ground).
 */
export function decideRoutes(o: { offers: RouteOffer[]; accept: "all" | string[] | undefined; clusterRange: string; localNetworks: Cidr[]; protectedHosts: string[]; own?: string[] }): RouteDecision[] {
  const own = (o.own ?? []).map((c) => ({ cidr: c, c: parseCidr(c) }));
  const range = parseCidr(o.clusterRange);
  const never = NEVER_ACCEPTED.map((c) => parseCidr(c));
  const accept = o.accept === "all" ? "all" : (o.accept ?? []).map((c) => parseCidr(c));
  const hosts: number[] = [];
  for (const h of o.protectedHosts) {
    try {
      if (/^\d+\.\d+\.\d+\.\d+$/.test(h)) hosts.push(parseIp(h));
    } catch {
      // not an IPv4 literal
    }
  }
  const offers = o.offers.filter((x) => !overlaps(parseCidr(x.cidr), range));
  const out: RouteDecision[] = [];
  for (const x of offers) {
    const c = parseCidr(x.cidr);
    let reason = "";
    if (accept !== "all" && !accept.some((a) => a.prefix <= c.prefix && containsIp(a, c.base))) reason = "not accepted here (--accept-routes)";
    else if (c.prefix === 0) reason = "a default route is never installed from the mesh";
    else if (never.some((n) => overlaps(n, c))) reason = "reserved, loopback or link-local space (cloud metadata)";
    else if (o.localNetworks.some((l) => overlaps(l, c))) reason = "overlaps this host's own network (the underlay)";
    else if (hosts.some((h) => containsIp(c, h))) reason = "holds the signaling, STUN/TURN server or a peer's address";
    else if (own.some((m) => overlaps(m.c, c))) reason = `conflicts with ${own.find((m) => overlaps(m.c, c))!.cidr} advertised by this node: not installed until one side changes --advertise-routes`;
    else {
      const rival = offers.find((y) => y.node !== x.node && overlaps(parseCidr(y.cidr), c));
      if (rival) reason = `conflicts with ${rival.cidr} advertised by ${rival.node}: neither is installed until one side changes --advertise-routes`;
    }
    out.push({ ...x, accepted: reason === "", reason: reason || "accepted" });
  }
  return out.sort((a, b) => (a.cidr < b.cidr ? -1 : a.cidr > b.cidr ? 1 : a.node < b.node ? -1 : 1));
}
