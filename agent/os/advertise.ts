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
