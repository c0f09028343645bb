/**
 * The data plane's NodeNetwork port on Linux: converges the kernel to a DesiredNodeNetwork
 * (src/desired-network.ts) through netconf.ts (TUN, bridge, routes, sysctls, forward chain) and
 * advertise.ts (gateway rules for advertised routes), both declarative and idempotent; teardown()
 * removes exactly what they added. The gateway chains are only touched once this node has advertised
 * something (most nodes never do).
 */
import type { DesiredNodeNetwork, NodeNetworkPort } from "../../src/desired-network.js";
import type { Logger } from "../../src/log.js";
import { AdvertiseGateway } from "./advertise.js";
import type { NodeNetwork } from "./netconf.js";

export class LinuxNodeNetwork implements NodeNetworkPort {
  private readonly gateway: AdvertiseGateway;
  private gatewayActive = false;

  constructor(
    private readonly net: NodeNetwork,
    private readonly log: Logger,
  ) {
    this.gateway = new AdvertiseGateway({ logger: log });
  }

  async apply(d: DesiredNodeNetwork): Promise<string[]> {
    const { changes } = await this.net.apply(d.node);
    if (d.gateway.routes.length || this.gatewayActive) {
      await this.gateway.apply(d.gateway);
      this.gatewayActive = d.gateway.routes.length > 0;
    }
    return changes;
  }

  async teardown(): Promise<void> {
    if (this.gatewayActive) await this.gateway.teardown().catch((err) => this.log.warn("could not remove the advertised-route rules", { err }));
    await this.net.teardown();
  }
}
