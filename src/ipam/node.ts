/**
 * IpamNode: the sans-I/O IPAM state machine of one agent — the dispatcher. It routes events and calls
 * to the parts, each with one responsibility:
 *   lease.ts        liveness (heartbeats, silence) and the lease (majority contact, resync hold)
 *   consensus.ts    the write rule: proposals, promises, majority writes of claims and grants
 *   allocations.ts  pod allocations inside our blocks
 *   certs.ts        signed state: certs of entries, signing our writes, checking remote ones
 *   gossip.ts       hellos, state messages (full syncs, deltas), merging remote state, held-back releases
 *   pins.ts         our reserve of pinned blocks, recording others' pins, disputed pins
 *   grants.ts       block requests, grants, reclaim: proposal rounds and the acceptor's promises
 *   members.ts      the member list: added by a grant, removed only by leave() or a node seen gone
 *   status.ts       what `weftnet status ipam` shows
 *   table.ts        the block-ownership CRDT;  wire.ts the messages;  config.ts the parameters
 * What stays here: the event dispatch (handle), allocation and release calls, force release and leave,
 * persistence (snapshot/restore) and our invariants.
 * See index.ts for how to drive it and docs/ipam.md for the algorithm and the safety argument. Time
 * comes in as `now` (ms, one monotonic-rate clock per node; clocks need not be synchronised, only tick
 * at about the same rate).
 */
import type { NodeParts } from "./context.js";
import { ProtocolError, WeftError } from "../errors.js";
import { Allocations } from "./allocations.js";
import { type Cidr, blockAt, blockCount, blockIndexOf, equalCidr, formatCidr, formatIp, parseCidr, parseIp } from "./cidr.js";
import { type IpamConfig, type Resolved, resolve } from "./config.js";
import { type PromiseTuple, WriteRule } from "./consensus.js";
import { Lease } from "./lease.js";
import { type MemberRecordJson, Members } from "./members.js";
import { buildStatus, type IpamCounters, type IpamStatus, type PeerInfo } from "./status.js";
import { MAX_VERSION_STEP, SignedState } from "./certs.js";
import { Gossip, type HelloFrom, MAX_BEAT_AHEAD_MS } from "./gossip.js";
import { emptyOutput, type IpamOutput } from "./output.js";
import { Grants } from "./grants.js";
import { Pins } from "./pins.js";
import { CTX_REMOVE, releaseFields, removeFields } from "./signing.js";
import { BlockTable, type EntryTuple, IpamError } from "./table.js";
import { OwnersCache, type IpamOwners } from "./owners.js";
import { type EpochInfo, decodeIpamMessage, epochId, type IpamMessage, type RemovalWire } from "./wire.js";

export type { IpamConfig } from "./config.js";
export type { IpamCounters, IpamStatus } from "./status.js";

export type IpamEvent =
  | { type: "tick" }
  | { type: "peerUp"; peer: string }
  | { type: "peerDown"; peer: string }
  | { type: "message"; from: string; body: unknown };

export type { IpamOutput } from "./output.js";

export type AllocateResult = ({ ok: true; ip: string; changed: boolean } | { ok: false; error: IpamError }) & { output: IpamOutput };

export interface IpamSnapshot {
  v: 1;
  id: string;
  epoch: EpochInfo | null;
  entries: EntryTuple[];
  allocs: [string, string][];
  settling: number[];
  /** promises given as an acceptor: [blockIndex, version, newOwner, proposer, kind, until] */
  promises: PromiseTuple[];
  /** our pins a majority recorded: [blockIndex, version] (absent in snapshots before pins existed) */
  pinned?: [number, number][];
  /** who wrote each entry and with what right (signed clusters): [blockIndex, cert, handover?] with hex keys */
  certs?: [number, unknown, unknown][];
  /** nodes known gone (a Kubernetes Node deletion we saw, or an operator's release we accepted) */
  gone?: string[];
  /**
   * the member list's records: [node, "m", grant proof | null] and [node, "x", removal | null] (absent in
   * snapshots from before the list: restore derives it once from the owners in the table)
   */
  members?: MemberRecordJson[];
  beat: number;
}

/**
 * What authorises a force release (forceRelease): the operator's signatures, one per block (block index ->
 * signature of releaseFields(epoch, block, node, version of the forced entry, this node's id), by the
 * --operator-key; written as kind "o"), or this node's own observation that the node is gone (its
 * Kubernetes Node object was deleted; kind "f").
 *
 * `remove` is the operator's signature of removeFields(epoch, node) (CTX_REMOVE): it takes the node off the
 * member list on every agent with the same --operator-key, also when it owns no block (then no block
 * signature can). `weftnet ipam release` always sends it.
 */
export type ReleaseAuth = { operator: Map<number, Uint8Array>; remove?: Uint8Array } | { observedGone: true };


const NEG = Number.NEGATIVE_INFINITY;
export { MAX_VERSION_STEP };
export { MAX_BEAT_AHEAD_MS };


export class IpamNode {
  readonly id: string;
  private readonly cfg: Resolved;
  private epoch: EpochInfo | null = null;
  private table: BlockTable | null = null;
  private readonly allocs: Allocations;
  private readonly settleUntil = new Map<number, number>();
  private readonly lease: Lease;
  private readonly rule: WriteRule;
  /** the member list (members.ts): who counts in every majority */
  private readonly members = new Members();
  private readonly peers = new Set<string>();
  private readonly info = new Map<string, PeerInfo>();
  private readonly conflicts = new Map<string, { code: string; message: string }>();
  private startedAt: number;
  readonly counters: IpamCounters = { malformed: 0, conflicts: 0, epochMismatch: 0, rangeMismatch: 0, claims: 0, forced: 0, grants: 0, revoked: 0, forged: 0, jumps: 0, releasesRefused: 0 };
  /** signed clusters (the agent gave us a key): certs of our entries, signing and checking (certs.ts) */
  private readonly signed: SignedState | null;
  /** hellos, state messages and merging remote state (gossip.ts) */
  private readonly gossip: Gossip;
  /** our reserve of pinned blocks, others' pins we record, disputed pins (pins.ts) */
  private readonly pins: Pins;
  /** block requests, grants, reclaim, proposal rounds (grants.ts) */
  private readonly grants: Grants;
  /** the cheap owners view (owners.ts), rebuilt only when the block table changed */
  private readonly ownersCache: OwnersCache;

  constructor(config: IpamConfig, now: number) {
    this.id = config.id;
    this.cfg = resolve(config);
    this.signed = config.keys ? new SignedState(this.id, config.keys, this.signedContext()) : null;
    this.allocs = new Allocations(this.cfg.range, this.cfg.blockPrefix);
    this.ownersCache = new OwnersCache(this.cfg.range, this.cfg.blockPrefix);
    this.lease = new Lease(this.id, this.cfg);
    this.rule = new WriteRule(this.id, this.lease, this.cfg.R, config.keys !== undefined, (t) => this.members.list(t));
    const parts: NodeParts = { cfg: this.cfg, lease: this.lease, rule: this.rule, signed: this.signed, peers: this.peers, info: this.info, epoch: () => this.epoch, table: () => this.table };
    this.gossip = new Gossip({
      ...parts,
      counters: this.counters,
      wholeFreeBlocks: (now) => this.wholeFreeBlocks(now),
      refuse: (from, err, out) => this.refuse(from, err, out),
      clearConflict: (peer) => void this.conflicts.delete(peer),
      settleClash: (i, now, out) => this.pins.settleClash(i, now, out),
      dropLost: (delta, out) => this.dropLost(delta, out),
      members: this.members,
      digest: () => this.digest() ?? 0,
      markGone: (node, out) => this.removeGone(node, out),
    });
    this.pins = new Pins({
      ...parts,
      id: this.id,
      allocs: this.allocs,
      settleUntil: this.settleUntil,
      freeAddresses: (now) => this.freeAddresses(now),
      allocatableBlocks: (now) => this.allocatableBlocks(now),
      completeProposals: (now, out) => this.grants.complete(now, out),
      dropLost: (delta, out) => this.dropLost(delta, out),
      broadcast: (delta, except, out) => this.gossip.broadcast(delta, except, out),
      promiseSigs: (blocks, kind, from, to) => this.grants.promiseSigs(blocks, kind, from, to),
    });
    this.grants = new Grants({
      ...parts,
      id: this.id,
      counters: this.counters,
      settleUntil: this.settleUntil,
      leaseValid: (now) => this.leaseValid(now),
      wholeFreeBlocks: (now) => this.wholeFreeBlocks(now),
      broadcast: (delta, except, out) => this.gossip.broadcast(delta, except, out),
      noteOwners: (delta) => this.noteOwners(delta),
    });
    this.startedAt = now;
  }

  // ---- persistence ---------------------------------------------------------------------------------

  snapshot(): IpamSnapshot {
    return {
      v: 1,
      id: this.id,
      epoch: this.epoch ? { ...this.epoch } : null,
      entries: this.table ? this.table.nonBaseline() : [],
      allocs: [...this.allocs.entries()].map(([p, ip]) => [p, formatIp(ip)]),
      settling: [...this.settleUntil.keys()].sort((a, b) => a - b),
      promises: this.rule.snapshot(),
      pinned: [...this.rule.confirmed],
      ...(this.signed ? { certs: this.signed.snapshot() } : {}),
      ...(this.gossip.gone.size ? { gone: [...this.gossip.gone].sort() } : {}),
      ...(this.table ? { members: this.members.snapshot() } : {}),
      beat: this.lease.beat,
    };
  }

  /** Rebuild from a persisted snapshot. Refuses (ERR_RANGE_MISMATCH) if the agent's range differs. */
  static restore(snap: IpamSnapshot, config: IpamConfig, now: number): IpamNode {
    const n = new IpamNode(config, now);
    if (snap.v !== 1 || snap.id !== n.id) throw new IpamError("ERR_CONFIG", `snapshot belongs to ${snap.id}, not ${n.id}`);
    n.lease.beat = snap.beat;
    if (snap.epoch) {
      n.checkRange(snap.epoch);
      n.adopt(snap.epoch);
      try {
        n.table!.merge(snap.entries);
      } catch (e) {
        throw new IpamError("ERR_CONFIG", `snapshot is inconsistent: ${(e as Error).message}`);
      }
      for (const [podId, ipStr] of snap.allocs) {
        const ip = parseIp(ipStr);
        const i = blockIndexOf(n.cfg.range, n.cfg.blockPrefix, ip);
        if (i < 0 || n.table!.get(i).owner !== n.id) throw new IpamError("ERR_CONFIG", `snapshot allocation ${ipStr} is outside this node's blocks`);
        n.allocs.add(podId, ip);
      }
      for (const i of snap.settling) if (n.table!.get(i).owner === n.id) n.settleUntil.set(i, now + n.cfg.S);
      n.rule.restore(snap.promises ?? []);
      for (const [i, v] of snap.pinned ?? []) if (i < n.table!.count) n.rule.confirmed.set(i, v);
      n.signed?.restore(n.table!, snap.certs ?? []);
      for (const g of snap.gone ?? []) if (typeof g === "string") n.gossip.gone.add(g);
      if (Array.isArray(snap.members)) n.members.restore(snap.members);
      else {
        // a snapshot from before the member list: derive it once from the owners (with the grant behind
        // each, where our certs still hold it); from now on the list is kept and gossiped
        const table = n.table!;
        for (const o of table.owners()) n.members.add(o, n.signed ? (table.indicesOf(o).map((i) => n.signed!.grantProof(i, o)).find((p) => p !== null) ?? null) : null);
      }
      n.rule.prune(n.table!, now);
      n.lease.requireResync();
    } else if (snap.allocs.length > 0) {
      throw new IpamError("ERR_CONFIG", "snapshot has allocations but no cluster");
    }
    n.assertInvariants();
    return n;
  }

  // ---- events --------------------------------------------------------------------------------------

  handle(ev: IpamEvent, now: number): IpamOutput {
    const out = emptyOutput();
    this.assertInvariants();
    switch (ev.type) {
      case "tick":
        this.onTick(now, out);
        break;
      case "peerUp":
        this.peers.add(ev.peer);
        this.lease.heard.set(ev.peer, now);
        if (!this.info.has(ev.peer)) this.info.set(ev.peer, { epochOk: false, free: 0, digest: -1, lastSync: null });
        this.info.get(ev.peer)!.lastSync = null;
        this.gossip.sendHello(ev.peer, now, out);
        if (this.epoch) this.gossip.sendFull(ev.peer, now, out);
        break;
      case "peerDown":
        this.peers.delete(ev.peer);
        this.grants.peerDown(ev.peer);
        break;
      case "message":
        this.onMessage(ev.from, ev.body, now, out);
        break;
    }
    this.assertInvariants();
    return out;
  }

  /** Allocate (idempotently) an address for a pod, only from blocks this node owns. */
  allocate(podId: string, now: number): AllocateResult {
    const out = emptyOutput();
    this.assertInvariants();
    if (typeof podId !== "string" || podId.length === 0 || podId.length > 256) {
      return { ok: false, error: new IpamError("ERR_CONFIG", "pod id must be a non-empty string of at most 256 chars"), output: out };
    }
    const have = this.allocs.get(podId);
    if (have !== undefined) return { ok: true, ip: formatIp(have), changed: false, output: out };
    if (!this.table) return { ok: false, error: new IpamError("ERR_NOT_READY", "not yet part of a cluster IPAM"), output: out };
    // Our pinned blocks are ours alone until we let go of them: no lease, no resync, no waiting.
    for (const i of this.allocatableBlocks(now)) {
      const ip = this.allocs.firstFree(i);
      if (ip !== null) {
        this.allocs.add(podId, ip);
        out.persist = true;
        this.pins.keepReserve(now, out);
        this.assertInvariants();
        return { ok: true, ip: formatIp(ip), changed: true, output: out };
      }
    }
    if (this.pins.keepReserve(now, out) || this.rule.pinRound()) {
      return { ok: false, error: new IpamError("ERR_NOT_READY", "pinning a block of ours: waiting for a majority of the members to record it"), output: out };
    }
    this.grants.request(now, out);
    return { ok: false, error: new IpamError("ERR_EXHAUSTED", "no free address in this node's blocks; a block was requested from a peer"), output: out };
  }

  /** Release a pod's address (idempotent: unknown pods are a no-op with changed=false). */
  release(podId: string): { changed: boolean; output: IpamOutput } {
    const out = emptyOutput();
    if (this.allocs.get(podId) === undefined) return { changed: false, output: out };
    this.allocs.remove(podId);
    out.persist = true;
    this.assertInvariants();
    return { changed: true, output: out };
  }

  /**
   * Operator override (`weftnet ipam release NODE`): take over every block of `node` now, without the
   * grace period or the majority check. Only safe if `node` is really gone; the operator asserts that.
   * In a signed cluster (keys) it needs `auth` (ReleaseAuth), and every receiver checks the same right
   * before it merges or forwards the forced entries: the operator's signature of each block's release
   * (verified here first, against our --operator-key), or — without one — that the receiver itself saw the
   * node gone (Kubernetes). Nothing else a node says releases another node's blocks.
   */
  forceRelease(node: string, now: number, auth?: ReleaseAuth): IpamOutput {
    const out = emptyOutput();
    if (!this.table || !this.epoch) throw new IpamError("ERR_NOT_READY", "no cluster IPAM yet");
    if (node === this.id) throw new IpamError("ERR_CONFIG", "a node cannot force-release itself; use leave()");
    const indices = this.table.indicesOf(node);
    if (this.signed) {
      if (!auth) throw new IpamError("ERR_FORBIDDEN", "a force release needs the operator's signature (--operator-key) or a Kubernetes Node deletion");
      if ("observedGone" in auth) this.gossip.gone.add(node);
      else {
        const verifyOperator = this.signed.keys.verifyOperator;
        if (!verifyOperator) throw new IpamError("ERR_FORBIDDEN", "this agent has no --operator-key: it cannot check an operator-signed release (and its peers would refuse it)");
        const rm = auth.remove;
        if (rm !== undefined) {
          if (!this.members.list(this.table).has(node) && !this.members.isRemoved(node)) throw new IpamError("ERR_CONFIG", `${node} is not an IPAM member here`);
          if (!verifyOperator(rm, removeFields(this.epoch.id, node), CTX_REMOVE))
            throw new IpamError("ERR_FORBIDDEN", `no valid operator signature of the removal of ${node} from the members of epoch ${this.epoch.id} (a signature by another key, or for another epoch)`);
        } else if (indices.length === 0) throw new IpamError("ERR_FORBIDDEN", `${node} owns no block here: its removal from the member list needs the operator's signed removal`);
        for (const i of indices) {
          const sig = auth.operator.get(i);
          if (!sig || !verifyOperator(sig, releaseFields(this.epoch.id, i, node, this.table.get(i).version + 1, this.id)))
            throw new IpamError("ERR_FORBIDDEN", `no valid operator signature for block ${i} of ${node} at version ${this.table.get(i).version + 1} to ${this.id} (a signature by another key, for another agent, or the block changed since it was signed: sign again)`);
        }
        if (indices.length > 0 || rm !== undefined) this.gossip.gone.add(node); // declared gone by the operator: others' releases of it count too
      }
    }
    const delta: EntryTuple[] = [];
    // an operator's release is kind "o": it beats any other force of the same version on every node (table.ts)
    const kind = this.signed && auth && "operator" in auth ? "o" : "f";
    for (const i of indices) {
      const e = this.table.get(i);
      this.table.write(i, { owner: this.id, version: e.version + 1, kind });
      this.settleUntil.set(i, now + this.cfg.S);
      delta.push([i, this.id, e.version + 1, kind]);
      const op = auth && "operator" in auth ? auth.operator.get(i) : undefined;
      this.signed?.signOwn([i, this.id, e.version + 1, kind], node, undefined, op);
    }
    if (delta.length > 0) {
      this.counters.forced += delta.length;
      this.gossip.broadcast(delta, null, out);
      out.persist = true;
    }
    this.gossip.mergeHeld(node, now, out);
    // the node is gone (Kubernetes, the operator; unsigned clusters: the caller's word): off the member list
    // (the operator's signed removal when given: every agent with --operator-key accepts it on its own)
    const opRemove = this.signed && auth && "operator" in auth && auth.remove ? (["op", this.id, this.signed.keys.publicKey, auth.remove] as RemovalWire) : undefined;
    if (!this.signed || this.gossip.gone.has(node)) this.removeGone(node, out, opRemove);
    this.assertInvariants();
    return out;
  }

  /** Graceful leave: hand every block (with its allocations dropped) to one live peer that is already a member. */
  leave(now: number): { ok: boolean; to: string | null; output: IpamOutput } {
    const out = emptyOutput();
    if (!this.table || !this.epoch || !this.leaseValid(now)) return { ok: false, to: null, output: out };
    const owners = this.table.owners();
    const to = [...this.peers].filter((p) => owners.has(p) && this.info.get(p)?.epochOk && this.lease.heardWithin(p, now)).sort()[0];
    if (!to) return { ok: false, to: null, output: out };
    this.allocs.clear();
    const delta: EntryTuple[] = [];
    for (const i of this.table.indicesOf(this.id)) {
      const e = this.table.get(i);
      this.table.write(i, { owner: to, version: e.version + 1, kind: "t" });
      this.settleUntil.delete(i);
      delta.push([i, to, e.version + 1, "t"]);
      this.signed?.signOwn([i, to, e.version + 1, "t"], this.id);
    }
    this.gossip.broadcast(delta, null, out);
    // off the member list, by our own signed word: we no longer vote
    if (this.members.remove(this.id, this.signed ? this.signed.signRemoval(this.id, "leave") : null)) this.gossip.broadcastMembers([this.members.record(this.id, "x")!], null, out);
    out.persist = true;
    this.assertInvariants();
    return { ok: true, to, output: out };
  }

  // ---- views ---------------------------------------------------------------------------------------

  /** Blocks this node may hand new addresses out of right now: owned, pinned with a majority's record. */
  allocatableBlocks(now: number): number[] {
    const table = this.table;
    if (!table) return [];
    return table.indicesOf(this.id).filter((i) => this.rule.isConfirmed(table, i) && !((this.settleUntil.get(i) ?? NEG) > now));
  }

  canAllocate(now: number): boolean {
    return this.freeAddresses(now) > 0;
  }

  /** Does this node hold the lease (may it change block ownership: grant, claim)? */
  hasLease(now: number): boolean {
    return this.leaseValid(now);
  }

  ownedBlocks(): number[] {
    return this.table ? this.table.indicesOf(this.id) : [];
  }

  allocations(): Map<string, string> {
    return new Map([...this.allocs.entries()].map(([p, ip]) => [p, formatIp(ip)]));
  }

  epochInfo(): EpochInfo | null {
    return this.epoch;
  }

  /** Digest of the replicated state (block table and member list), as sent in hellos. */
  digest(): number | null {
    if (!this.table) return null;
    return (Math.imul(this.table.digest() ^ 0x9e3779b9, 0x01000193) ^ this.members.digest()) >>> 0;
  }

  /** The member list (sorted): every owner, and every node added by a grant and not removed. */
  memberList(): string[] {
    return this.table ? [...this.members.list(this.table)].sort() : [];
  }

  /** Nodes removed from the member list (left, or seen gone). */
  removedMembers(): string[] {
    return this.members.removedNodes();
  }

  /** Owner, version and kind of every block (for tests and status). */
  view(): EntryTuple[] {
    return this.table ? this.table.all().map((e, i): EntryTuple => [i, e.owner, e.version, e.kind]) : [];
  }

  /**
   * Range and owner of every block, for readers on hot paths (route policy): the same object until an
   * owner changes (owners.ts); no status() build. Undefined before this node is part of a cluster IPAM.
   */
  owners(): IpamOwners | undefined {
    return this.ownersCache.get(this.table);
  }

  /** owner views built so far (tests: an unchanged table builds none) */
  get ownersBuilds(): number {
    return this.ownersCache.builds;
  }

  blockCidr(i: number): string {
    return formatCidr(blockAt(this.cfg.range, this.cfg.blockPrefix, i));
  }

  status(now: number): IpamStatus {
    return buildStatus(
      {
        id: this.id,
        cfg: this.cfg,
        epoch: this.epoch,
        table: this.table,
        allocs: this.allocs,
        settleUntil: this.settleUntil,
        rule: this.rule,
        lease: this.lease,
        members: this.members,
        peers: this.peers,
        info: this.info,
        conflicts: this.conflicts,
        counters: this.counters,
        pending: this.grants.pending,
        freeAddresses: () => this.freeAddresses(now),
        leaseValid: () => this.leaseValid(now),
        blockCidr: (i) => this.blockCidr(i),
      },
      now,
    );
  }

  // ---- internals: lease and allocation -------------------------------------------------------------

  private leaseValid(now: number): boolean {
    return this.table !== null && this.lease.valid(this.rule.memberSet(this.table), now);
  }

  private freeAddresses(now: number): number {
    let n = 0;
    for (const i of this.allocatableBlocks(now)) n += this.allocs.usableSize() - this.allocs.usedIn(i);
    return n;
  }

  /** Whole free blocks we could give away: unpinned, empty, not settling, not doomed. */
  private wholeFreeBlocks(now: number): number[] {
    const table = this.table;
    if (!table) return [];
    return table.indicesOf(this.id).filter((i) => table.get(i).kind !== "p" && this.allocs.usedIn(i) === 0 && !((this.settleUntil.get(i) ?? NEG) > now) && !this.rule.isDoomed(i));
  }

  private checkRange(e: EpochInfo): void {
    let r: Cidr;
    try {
      r = parseCidr(e.range);
    } catch {
      throw new IpamError("ERR_RANGE_MISMATCH", `cluster IPAM ${e.id} has an invalid range ${JSON.stringify(e.range)}`);
    }
    if (!equalCidr(r, this.cfg.range) || e.bp !== this.cfg.blockPrefix) {
      throw new IpamError(
        "ERR_RANGE_MISMATCH",
        `the mesh's IPAM ${e.id} uses ${e.range} in /${e.bp} blocks, but this agent was started with ${formatCidr(this.cfg.range)} in /${this.cfg.blockPrefix} blocks`,
      );
    }
  }

  private adopt(e: EpochInfo): void {
    this.epoch = { ...e };
    this.table = new BlockTable(blockCount(this.cfg.range, this.cfg.blockPrefix), e.founder);
    this.members.add(e.founder, null); // a member from the start: the epoch names it
  }

  private found(now: number, out: IpamOutput): void {
    const at = Math.max(0, Math.floor(now));
    this.adopt({ id: epochId(this.id, at), founder: this.id, at, range: formatCidr(this.cfg.range), bp: this.cfg.blockPrefix });
    out.persist = true;
    for (const p of this.peers) this.gossip.sendHello(p, now, out);
  }

  private onTick(now: number, out: IpamOutput): void {
    this.lease.advance(now);
    for (const [i, t] of this.settleUntil) if (t <= now) this.settleUntil.delete(i);
    // Bootstrap: found only if allowed, after the wait, seeing no IPAM, and lowest id among connected peers.
    const mayFound = typeof this.cfg.mayFound === "function" ? this.cfg.mayFound() : this.cfg.mayFound;
    if (!this.epoch && mayFound && now - this.startedAt >= this.cfg.bootstrapWait && this.conflicts.size === 0) {
      if ([...this.peers].every((p) => p > this.id)) this.found(now, out);
    }
    if (this.table && this.epoch) {
      this.lease.observe(this.rule.memberSet(this.table), now);
      this.rule.prune(this.table, now);
      this.grants.reclaim(now, out);
      this.grants.complete(now, out);
      this.grants.nextGrant(now, out);
      this.pins.keepReserve(now, out);
      this.pins.maybeUnpin(now, out);
      this.grants.expire(now);
      if (this.needsBlock(now)) this.grants.request(now, out);
    }
    for (const p of this.peers) this.gossip.sendHello(p, now, out);
  }

  private needsBlock(now: number): boolean {
    if (!this.table) return false;
    if (this.table.indicesOf(this.id).length === 0) return true;
    let room = this.freeAddresses(now);
    for (const i of this.pins.pinnable(now)) room += this.allocs.usableSize() - this.allocs.usedIn(i);
    return room < this.pins.reserve;
  }

  private refuse(from: string, err: WeftError, out: IpamOutput): void {
    out.errors.push(err);
    if (err instanceof ProtocolError) this.counters.malformed++;
    else if (err.code === "ERR_CONFLICT") this.counters.conflicts++;
    else if (err.code === "ERR_EPOCH_MISMATCH") this.counters.epochMismatch++;
    else if (err.code === "ERR_RANGE_MISMATCH") this.counters.rangeMismatch++;
    if (err.code !== "ERR_CONFLICT" && !(err instanceof ProtocolError)) this.conflicts.set(from, { code: err.code, message: err.message });
  }

  private onMessage(from: string, body: unknown, now: number, out: IpamOutput): void {
    let m: IpamMessage;
    try {
      m = decodeIpamMessage(body);
    } catch (e) {
      this.refuse(from, e instanceof WeftError ? e : new ProtocolError("ERR_MALFORMED", String(e)), out);
      return;
    }
    this.lease.heard.set(from, now);
    if (this.table) this.lease.observe(this.rule.memberSet(this.table), now);
    if (!this.info.has(from)) this.info.set(from, { epochOk: false, free: 0, digest: -1, lastSync: null });
    const inf = this.info.get(from)!;
    if (m.t === "hello") {
      if (m.epoch === null) {
        inf.epochOk = false; // not a member (yet): its heartbeat matters to nobody
        return;
      }
      if (!this.epoch) {
        try {
          this.checkRange(m.epoch);
        } catch (e) {
          this.refuse(from, e as IpamError, out);
          return;
        }
        this.adopt(m.epoch);
        out.persist = true;
        this.gossip.sendHello(from, now, out);
      }
      this.gossip.onHello(from, m as HelloFrom, inf, now, out);
      return;
    }
    if (!this.epoch || m.epoch !== this.epoch.id) {
      if (this.epoch) this.refuse(from, new IpamError("ERR_EPOCH_MISMATCH", `peer ${from} sent ${m.t} for IPAM ${m.epoch}; ours is ${this.epoch.id}`), out);
      return;
    }
    switch (m.t) {
      case "state":
        this.gossip.onState(from, m.entries, m.certs, m.handovers, now, out);
        return;
      case "req":
        this.grants.onRequest(from, now, out);
        return;
      case "members":
        this.gossip.onMembers(from, m.records, now, out);
        return;
      case "prop":
        if (this.members.isRemoved(this.id)) return; // we left (or were seen gone): we no longer vote
        if (m.kind === "p") {
          if (m.owner !== from || m.to !== from) return; // only an owner pins, and only for itself
          this.pins.onPinProposal(from, m.blocks, now, out);
          return;
        }
        this.grants.onProposal(from, { ...m, kind: m.kind }, now, out);
        return;
      case "prom":
        this.grants.onPromise(from, m, now, out);
        return;
      case "nak":
        this.grants.onNak(from, inf);
        return;
    }
  }

  /** What the signed state needs of us (certs.ts). */
  private signedContext() {
    return {
      epochId: () => this.epoch?.id ?? "",
      table: () => this.table!,
      memberSet: () => this.rule.memberSet(this.table!),
      isFounder: (node: string) => this.epoch?.founder === node,
      connected: (peer: string) => this.peers.has(peer),
      sawGone: (node: string) => this.gossip.gone.has(node),
      operatorReleased: (node: string) => {
        if (this.gossip.gone.has(node)) return;
        this.gossip.gone.add(node);
        this.gossip.newlyGone.add(node);
      },
      yieldablePin: (i: number) => {
        const e = this.table!.get(i);
        return e.owner === this.id && e.kind === "p" && !this.rule.isConfirmed(this.table!, i) && this.allocs.usedIn(i) === 0;
      },
    };
  }

  /**
   * Entries that changed our table: a block that is no longer ours loses its allocations. With pins
   * this only happens by an operator's force release (a node declared gone) — never automatically.
   */
  private dropLost(delta: EntryTuple[], out: IpamOutput): void {
    this.noteOwners(delta);
    for (const [i, owner] of delta) {
      if (owner === this.id) {
        this.grants.pending = null;
        continue;
      }
      this.settleUntil.delete(i);
      this.rule.confirmed.delete(i);
      for (const r of this.allocs.dropBlock(i)) {
        out.revoked.push(r);
        this.counters.revoked++;
      }
    }
  }

  /**
   * Owners in entries that changed our table are members (a checked entry names them): add the ones the
   * list lacks, with the grant behind them when our certs hold it, so that we can pass the addition on
   * to a node that never sees the grant (its block reclaimed before the grant reached it).
   */
  private noteOwners(delta: EntryTuple[]): void {
    for (const [i, owner] of delta) {
      if (this.members.hasProof(owner)) continue;
      this.members.add(owner, this.signed ? this.signed.grantProof(i, owner) : null);
    }
  }

  /** `node` is known gone here (Kubernetes, the operator): remove it from the member list, signed, and tell the peers. */
  private removeGone(node: string, out: IpamOutput, proof?: RemovalWire): void {
    if (node === this.id || this.members.isRemoved(node)) return;
    this.members.remove(node, proof ?? (this.signed ? this.signed.signRemoval(node, "gone") : null));
    out.persist = true;
    this.gossip.broadcastMembers([this.members.record(node, "x")!], null, out);
  }

  /** Our own state must always satisfy these; a failure is a bug and throws loudly. */
  private assertInvariants(): void {
    const fail = (msg: string) => {
      throw new IpamError("ERR_INVARIANT", `ipam ${this.id}: ${msg}`);
    };
    const table = this.table;
    if (!table) {
      if (this.allocs.size > 0) fail("allocations without a cluster");
      return;
    }
    const p = this.allocs.problem((i) => table.get(i).owner === this.id);
    if (p) fail(p);
    for (const i of this.settleUntil.keys()) if (table.get(i).owner !== this.id) fail(`settling block ${i} is not ours`);
  }
}
