/**
 * `weftnet pod add|del NAME`: a network namespace with a veth on the pod bridge and an address from this
 * node's IPAM blocks, by pod id "pod/NAME" — the same path the CNI plugin takes through the local API.
 * Each add or del allocates/releases through IPAM and then reconciles the node network once (the data
 * plane's one trigger: the bridge has the block's gateway before the pod is attached); the OS work is
 * agent/os/pod.ts behind the PodOs port.
 */
import { WeftError } from "../src/errors.js";
import type { Logger } from "../src/log.js";
import type { PodAddress } from "./ipam.js";
import { addPod, delPod, podVethName, type PodRef, type PodResult, type PodSpec } from "./os/pod.js";

export interface PodInfo extends PodAddress {
  name: string;
  hostVeth: string;
  netns: string;
}

/** What pods need from the OS (agent/os/pod.ts). */
export interface PodOs {
  add(spec: PodSpec): Promise<PodResult>;
  del(ref: PodRef): Promise<void>;
}

export const LINUX_PODS: PodOs = { add: addPod, del: delPod };

export interface PodsDeps {
  ipam: {
    /** the pod's address (idempotent per pod id) */
    allocate(podId: string): Promise<PodAddress>;
    release(podId: string): boolean;
  };
  /** the data plane's one reconcile trigger: resolves once the node network matches */
  reconcile(): Promise<void>;
  os?: PodOs;
  bridge: string;
  mtu: number;
  logger: Logger;
}

export class Pods {
  private readonly os: PodOs;

  constructor(private readonly d: PodsDeps) {
    this.os = d.os ?? LINUX_PODS;
  }

  async add(name: string): Promise<PodInfo> {
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(name)) throw new WeftError("ERR_USAGE", `pod name ${JSON.stringify(name)} must be 1-64 chars of letters, digits, '.', '_' or '-'`);
    const podId = `pod/${name}`;
    const addr = await this.d.ipam.allocate(podId);
    await this.d.reconcile(); // the block now has a pod: give it its gateway on the bridge
    let res: PodResult;
    try {
      res = await this.os.add({ netns: { name }, podId, ip: addr.ip, prefixLen: addr.prefixLen, gateway: addr.gateway, bridge: this.d.bridge, mtu: this.d.mtu, logger: this.d.logger });
    } catch (e) {
      this.d.ipam.release(podId);
      await this.d.reconcile().catch(() => {});
      throw e;
    }
    return { ...addr, name, hostVeth: res.hostVeth, netns: name };
  }

  async del(name: string): Promise<{ released: boolean }> {
    const podId = `pod/${name}`;
    await this.os.del({ netns: { name }, podId, hostVeth: podVethName(podId), deleteNetns: true, logger: this.d.logger });
    const released = this.d.ipam.release(podId);
    await this.d.reconcile();
    return { released };
  }

  /** IPAM revoked a pod's address (its block was reclaimed while this node was away): detach it. */
  async revoked(podId: string): Promise<void> {
    if (!podId.startsWith("pod/")) return;
    const name = podId.slice(4);
    await this.os.del({ netns: { name }, podId, hostVeth: podVethName(podId), deleteNetns: false, logger: this.d.logger }).catch((err) => this.d.logger.warn("could not detach revoked pod", { pod: name, err }));
  }
}
