/**
 * Kubernetes release rules (--k8s-node-watch): when a Node object is deleted, force-release the address
 * blocks of the weftnet node(s) of that name (agents run with --name $(NODE_NAME)). Tolerant, unlike
 * `weftnet ipam release`: a name no block owner has, our own name, or a node still reachable is logged and
 * skipped (a reachable one is re-checked for `pendingMs`: a VM that was just terminated still looks
 * connected until its heartbeats time out). The --reclaim-after mesh reclaim stays the fallback.
 *
 * Every agent sees the same deletion and they may all force-release at once: that converges, because
 * forced writes are ordinary CRDT entries (src/ipam/table.ts: higher version wins, at equal version kind
 * "f" beats "c" and "t", and two "f" at one version go to the lower owner id), so the agents agree on
 * exactly one new owner per block.
 */
import type { Logger } from "../src/log.js";

export interface K8sReleaseDeps {
  selfId: string;
  selfName: string;
  /** owners of the cluster's blocks as this node's IPAM sees them (with duplicates) */
  blockOwners(): (string | null | undefined)[];
  /** release every block of `node` (throws when IPAM refuses) */
  forceRelease(node: string): void;
  peerName(id: string): string | undefined;
  /** linked, or routed via another agent */
  reachable(id: string): boolean;
  /** how long a still-reachable deleted Node is re-checked (default 120 s) */
  pendingMs?: number;
  now(): number;
  logger: Logger;
}

export class K8sRelease {
  /** id -> name of every peer seen connected (the mesh forgets gone peers; a Node may be deleted much later) */
  private readonly seenNames = new Map<string, string>();
  /** Nodes deleted while their agent was still reachable: name -> re-check deadline */
  private readonly pending = new Map<string, number>();

  constructor(private readonly d: K8sReleaseDeps) {}

  /** A peer connected: remember its name. */
  peerUp(id: string): void {
    const n = this.d.peerName(id);
    if (n !== undefined) this.seenNames.set(id, n);
  }

  /** The Node is back (or was never gone): stop re-checking it. */
  present(name: string): void {
    this.pending.delete(name);
  }

  nodeDeleted(name: string, recheck = false): void {
    const log = this.d.logger;
    if (name === this.d.selfName) {
      log.warn("this node's own Kubernetes Node object was deleted; its blocks stay with it", { k8sNode: name });
      return;
    }
    const all = this.d.blockOwners();
    const owners = [...new Set(all.filter((o): o is string => !!o && o !== this.d.selfId))];
    const ids = owners.filter((id) => (this.d.peerName(id) ?? this.seenNames.get(id)) === name);
    if (ids.length === 0) {
      this.pending.delete(name);
      if (!recheck) log.info("deleted Kubernetes Node: no weftnet node of that name owns address blocks (known to this agent); nothing to release", { k8sNode: name });
      return;
    }
    let alive = false;
    for (const id of ids) {
      if (this.d.reachable(id)) {
        alive = true;
        if (!recheck) log.info("deleted Kubernetes Node: its weftnet agent is still connected; not releasing its blocks (re-checked for a while)", { k8sNode: name, id });
        continue;
      }
      try {
        const blocks = all.filter((o) => o === id).length;
        this.d.forceRelease(id);
        log.warn("released the address blocks of a deleted Kubernetes Node", { k8sNode: name, id, blocks });
      } catch (e) {
        log.warn("could not release the blocks of a deleted Kubernetes Node; the mesh reclaims them after --reclaim-after", { k8sNode: name, id, err: (e as Error).message });
      }
    }
    if (alive) {
      if (!this.pending.has(name)) this.pending.set(name, this.d.now() + (this.d.pendingMs ?? 120_000));
    } else this.pending.delete(name);
  }

  /** Periodic: re-check deleted Nodes whose agent was still reachable. */
  tick(): void {
    for (const [name, until] of [...this.pending]) {
      if (this.d.now() > until) {
        this.pending.delete(name);
        this.d.logger.info("deleted Kubernetes Node's agent is still connected; giving up (the mesh reclaims its blocks if it goes silent)", { k8sNode: name });
      } else this.nodeDeleted(name, true);
    }
  }
}
