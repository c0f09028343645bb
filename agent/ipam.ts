/**
 * Agent-side driver of the IPAM core (src/ipam): wires it to the mesh, persists its snapshot atomically
 * in the state dir BEFORE anything it decided leaves the process (gossip, an address handed to a pod),
 * and retries allocations that are not possible yet (bootstrap, resync, a block request in flight).
 *
 * Persistence is coalesced and asynchronous (agent/snapshot-writer.ts): a state change marks the snapshot
 * dirty and one write (temp file, fsync, rename) runs off the event loop with the latest state. The order
 * "on disk before it leaves" holds per message: IPAM messages produced while a change is not on disk yet
 * are held, in order, until the write covering it completes; allocate() awaits the same barrier before it
 * returns an address. Releases are not awaited (a release lost in a crash keeps an address reserved for a
 * pod that is gone: a leak the next CNI DEL fixes, never a duplicate). Before, every applied change paid a
 * synchronous fsync on the event loop (200-300 ms per agent in the first 10 s after start).
 */
import { existsSync, readdirSync, readFileSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { WeftError } from "../src/errors.js";
import { IpamNode, containsIp, formatIp, gatewayOf, parseCidr, parseIp, type Cidr, type IpamConfig, type IpamOutput, type IpamOwners, type IpamSnapshot, type IpamStatus } from "../src/ipam/index.js";
import type { ReleaseAuth } from "../src/ipam/node.js";
import type { Logger } from "../src/log.js";
import type { MeshManager } from "../src/mesh/manager.js";
import { SnapshotWriter, type SnapshotWriterOptions } from "./snapshot-writer.js";

export const IPAM_FILE = "ipam.json";
export const IPAM_CHANNEL = "ipam";

export interface PodAddress {
  podId: string;
  ip: string;
  prefixLen: number;
  gateway: string;
  block: string;
}

export class IpamDriver {
  readonly node: IpamNode;
  private readonly path: string;
  readonly counters = { remoteErrors: 0, persists: 0, persistErrors: 0, abandoned: 0, held: 0 };
  /** the state file's writer (generations, durable barrier, write counters) */
  readonly writer: SnapshotWriter;
  /** IPAM messages waiting for the write of the state they were produced from (FIFO, gen non-decreasing) */
  private held: { gen: number; to: string; body: unknown }[] = [];
  private readonly blockListeners: (() => void)[] = [];
  private readonly revokeListeners: ((r: { podId: string; ip: string }) => void)[] = [];
  private readonly ownersListeners: (() => void)[] = [];
  private lastOwners: IpamOwners | undefined;
  private lastBlocks = "";
  private lastError: WeftError | undefined;
  private persistFailing: string | undefined;

  constructor(
    private readonly cfg: IpamConfig,
    private readonly stateDir: string,
    private readonly mesh: MeshManager,
    private readonly log: Logger,
    private readonly now: () => number = Date.now,
    /** the state file's write (tests inject failures and gates) and its retry delay */
    persistOpts: Pick<SnapshotWriterOptions, "write" | "retryMs"> = {},
  ) {
    this.path = join(stateDir, IPAM_FILE);
    this.node = this.load();
    this.writer = new SnapshotWriter(this.path, () => JSON.stringify(this.node.snapshot()), {
      mode: 0o600,
      ...persistOpts,
      onError: (err) => {
        this.counters.persistErrors++;
        // retried every second: say it once per distinct error, and once when it works again
        if (this.persistFailing !== err.message) this.log.error("cannot write the IPAM state; IPAM messages and new addresses wait until it is written (retrying)", { path: this.path, err: err.message });
        this.persistFailing = err.message;
      },
    });
    this.writer.onDurable((gen) => {
      this.counters.persists++;
      if (this.persistFailing !== undefined) this.log.info("IPAM state written again", { path: this.path, failures: this.counters.persistErrors });
      this.persistFailing = undefined;
      this.sendHeld(gen);
    });
    mesh.onPeerUp((peer) => this.apply(this.node.handle({ type: "peerUp", peer }, this.now())));
    mesh.onPeerDown((peer) => this.apply(this.node.handle({ type: "peerDown", peer }, this.now())));
    mesh.onApp(IPAM_CHANNEL, (from, body) => this.apply(this.node.handle({ type: "message", from, body }, this.now())));
  }

  private load(): IpamNode {
    const now = this.now();
    this.removeStaleTemps();
    if (!existsSync(this.path)) return new IpamNode(this.cfg, now);
    let snap: IpamSnapshot;
    try {
      snap = JSON.parse(readFileSync(this.path, "utf8")) as IpamSnapshot;
    } catch (e) {
      throw new WeftError("ERR_IPAM_STATE", `cannot read IPAM state ${this.path}: ${(e as Error).message}; move it away only if you accept that this node's pods get new addresses`);
    }
    try {
      return IpamNode.restore(snap, this.cfg, now);
    } catch (e) {
      throw new WeftError((e as WeftError).code ?? "ERR_IPAM_STATE", `IPAM state ${this.path} does not fit this agent: ${(e as Error).message}`);
    }
  }

  /** temp files of writes a crash interrupted (the state file itself is the previous complete write) */
  private removeStaleTemps(): void {
    let names: string[];
    try {
      names = readdirSync(this.stateDir);
    } catch {
      return;
    }
    for (const n of names) if (n.startsWith(`${IPAM_FILE}.tmp-`)) try {
      unlinkSync(join(this.stateDir, n));
    } catch {
      // not ours to remove (permissions): harmless, the state file is what counts
    }
  }

  tick(): void {
    this.apply(this.node.handle({ type: "tick" }, this.now()));
  }

  onBlocksChanged(f: () => void): void {
    this.blockListeners.push(f);
  }
  /** Some block's owner changed (any node's; the owners() view is a new object). */
  onOwnersChanged(f: () => void): void {
    this.ownersListeners.push(f);
  }
  onRevoked(f: (r: { podId: string; ip: string }) => void): void {
    this.revokeListeners.push(f);
  }

  /** Resolves when every IPAM state change made so far is on disk (rejects if that write failed). */
  flushed(): Promise<void> {
    return this.writer.flushed();
  }

  /** Agent stop: write what is not on disk yet and wait for it. */
  async close(): Promise<void> {
    await this.writer.close();
  }

  private sendHeld(durable: number): void {
    let i = 0;
    while (i < this.held.length && this.held[i]!.gen <= durable) {
      const m = this.held[i++]!;
      this.mesh.sendApp(m.to, IPAM_CHANNEL, m.body);
    }
    if (i) this.held.splice(0, i);
  }

  private apply(out: IpamOutput): void {
    if (out.persist && !this.writer.isClosed) this.writer.markDirty();
    // messages leave only once the state they were produced from is on disk (and in order)
    const gen = this.writer.requested;
    for (const { to, body } of out.send) {
      if (gen <= this.writer.durable && this.held.length === 0) this.mesh.sendApp(to, IPAM_CHANNEL, body);
      else {
        this.held.push({ gen, to, body });
        this.counters.held++;
      }
    }
    for (const r of out.revoked) {
      this.log.warn("pod address revoked: its block was reclaimed while this node was away", r);
      for (const f of this.revokeListeners) f(r);
    }
    for (const e of out.errors) {
      this.counters.remoteErrors++;
      if (this.lastError?.message !== e.message) this.log.warn("IPAM refused data from a peer", { code: e.code, err: e.message });
      this.lastError = e;
    }
    const blocks = this.localBlocks().join(",");
    if (blocks !== this.lastBlocks) {
      this.lastBlocks = blocks;
      for (const f of this.blockListeners) f();
    }
    const owners = this.node.owners(); // O(1) unless the block table changed
    if (owners !== this.lastOwners) {
      this.lastOwners = owners;
      for (const f of this.ownersListeners) f();
    }
  }

  /** Blocks this node owns (CIDR strings), for routes and the bridge. */
  localBlocks(): string[] {
    // Hot path (every IPAM message and every routing tick): no full status() here.
    const owned = this.node.ownedBlocks();
    const key = owned.join(",");
    if (key !== this.ownedKey) {
      this.ownedKey = key;
      this.ownedCidrs = owned.map((i) => this.node.blockCidr(i));
      this.ownedParsed = this.ownedCidrs.map(parseCidr);
    }
    return this.ownedCidrs;
  }
  private ownedKey = "";
  private ownedCidrs: string[] = [];
  private ownedParsed: Cidr[] = [];

  /** The owned block holding `ip`, if any. */
  private blockOf(ip: string): { cidr: string; block: Cidr } | undefined {
    this.localBlocks();
    const n = parseIp(ip);
    const i = this.ownedParsed.findIndex((c) => containsIp(c, n));
    return i < 0 ? undefined : { cidr: this.ownedCidrs[i]!, block: this.ownedParsed[i]! };
  }

  /** Owned blocks that hold at least one pod: these get a gateway address on the bridge. */
  activeBlocks(): string[] {
    const used = new Set<string>();
    for (const ip of this.node.allocations().values()) {
      const b = this.blockOf(ip);
      if (b) used.add(b.cidr);
    }
    return [...used].sort();
  }

  status(): IpamStatus {
    return this.node.status(this.now());
  }

  /** Range and block owners (cheap, the same object until an owner changes; src/ipam/owners.ts). */
  owners(): IpamOwners | undefined {
    return this.node.owners();
  }

  /**
   * Allocate (idempotently) an address for a pod, on disk before it returns (awaits the writer's barrier). Retries while the IPAM
   * is not ready or waits for a block, up to `timeoutMs`. A caller that gives up (its `signal` aborts:
   * the CNI plugin or `weftnet ipam allocate` timed out and closed the connection) leaves nothing behind:
   * the retries stop, and an address allocated for it by this call is released again.
   */
  async allocate(podId: string, timeoutMs = 30_000, signal?: AbortSignal): Promise<PodAddress> {
    const t0 = this.now();
    const had = this.node.allocations().has(podId);
    for (;;) {
      if (signal?.aborted) throw this.abandoned(podId, had);
      const r = this.node.allocate(podId, this.now());
      if (r.ok && r.changed) r.output.persist = true;
      this.apply(r.output);
      if (r.ok) {
        await this.writer.flushed(); // the address is on disk before anyone sees it
        if (signal?.aborted) throw this.abandoned(podId, had);
        return this.describe(podId, r.ip);
      }
      if (r.error.code !== "ERR_NOT_READY" && r.error.code !== "ERR_EXHAUSTED") throw r.error;
      if (this.now() - t0 > timeoutMs) throw new WeftError("ERR_IPAM_TIMEOUT", `no address for ${podId} after ${Math.round(timeoutMs / 1000)} s: ${r.error.message}`);
      await new Promise((res) => setTimeout(res, 200));
    }
  }

  /** The caller of allocate() went away: release what this call allocated (not an address the pod had before). */
  abandoned(podId: string, had: boolean): WeftError {
    if (!had && this.release(podId)) {
      this.counters.abandoned++;
      this.log.info("allocation abandoned by its caller: address released", { podId });
    }
    return new WeftError("ERR_IPAM_ABORTED", `the caller gave up on an address for ${podId}; nothing was kept`);
  }

  release(podId: string): boolean {
    const r = this.node.release(podId);
    if (r.changed) r.output.persist = true;
    this.apply(r.output);
    return r.changed;
  }

  forceRelease(node: string, auth: ReleaseAuth): void {
    const out = this.node.forceRelease(node, this.now(), auth);
    out.persist = true;
    this.apply(out);
  }

  describe(podId: string, ip: string): PodAddress {
    const b = this.blockOf(ip);
    if (!b) throw new WeftError("ERR_INVARIANT", `allocated ${ip} is outside this node's blocks`);
    return { podId, ip, prefixLen: b.block.prefix, gateway: formatIp(gatewayOf(b.block)), block: b.cidr };
  }
}
