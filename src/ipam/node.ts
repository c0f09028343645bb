/**
 * IpamNode: the sans-I/O IPAM state machine of one agent. See index.ts for how to drive it and
 * docs/ipam.md for the algorithm and the safety argument. Time comes in as `now` (ms, one monotonic-rate
 * clock per node; clocks need not be synchronised, only tick at about the same rate).
 */
import { ProtocolError, WeftError } from "../errors.js";
import { NODE_ID_RE } from "../wire/codec.js";
import { type Cidr, blockAt, blockCount, blockIndexOf, equalCidr, formatCidr, formatIp, parseCidr, parseIp, usableRange } from "./cidr.js";
import { BlockTable, type EntryTuple, IpamError } from "./table.js";
import { type EpochInfo, MAX_BLOCKS, STATE_CHUNK, decodeIpamMessage, encodeIpamMessage, epochId, type IpamMessage } from "./wire.js";

export interface IpamConfig {
  /** this node's id (16 lowercase hex) */
  id: string;
  /** cluster range this agent was started with (--range); default 10.40.0.0/16 */
  range?: string;
  /** block prefix length (--block-size); default 26 */
  blockPrefix?: number;
  /** R: a member silent (no heartbeat progress) this long is reclaimed; default 10 min */
  reclaimAfterMs?: number;
  /** M: the lease window is R - M; must exceed twice the gossip delay plus clock drift; default R/5 */
  safetyMarginMs?: number;
  /** U: after a restart or after losing the lease, hold majority contact this long before allocating; default 15 s */
  resyncMs?: number;
  /** S: a fresh claim is not used for this long, so concurrent heirs converge first; default 10 s */
  claimSettleMs?: number;
  /** a node without state that sees no IPAM waits this long before founding one; default 5 s */
  bootstrapWaitMs?: number;
  /**
   * may this node found a new cluster IPAM? (false = only ever join one); default true. A function is
   * asked at every bootstrap decision: the agent answers from signaling presence ("am I the lowest id of
   * every node I know exists, connected or not?"), so a node that cannot reach anyone yet (UDP blocked,
   * relay still forming) does not found an IPAM of its own next to the real one.
   */
  mayFound?: boolean | (() => boolean);
  /** give up on an unanswered block request after this long; default 5 s */
  requestTimeoutMs?: number;
  /** minimum interval between two full state syncs to one peer on digest mismatch; default 30 s */
  syncIntervalMs?: number;
}

export type IpamEvent =
  | { type: "tick" }
  | { type: "peerUp"; peer: string }
  | { type: "peerDown"; peer: string }
  | { type: "message"; from: string; body: unknown };

export interface IpamOutput {
  /** messages for directly connected peers, on the "ipam" app channel (deliver AFTER persisting) */
  send: { to: string; body: unknown }[];
  /** state changed: persist snapshot() atomically before delivering `send` or returning an address */
  persist: boolean;
  /** pod addresses that are no longer ours (the block was reclaimed): tear these pods' interfaces down */
  revoked: { podId: string; ip: string }[];
  /** remote data refused (ProtocolError / IpamError): count them, they were dropped */
  errors: WeftError[];
}

export type AllocateResult = ({ ok: true; ip: string; changed: boolean } | { ok: false; error: IpamError }) & { output: IpamOutput };

export interface IpamSnapshot {
  v: 1;
  id: string;
  epoch: EpochInfo | null;
  entries: EntryTuple[];
  allocs: [string, string][];
  settling: number[];
  /** promises given as an acceptor: [blockIndex, version, newOwner, proposer, kind, until] */
  promises: [number, number, string, string, "t" | "c", number][];
  beat: number;
}

export interface IpamCounters {
  malformed: number;
  conflicts: number;
  epochMismatch: number;
  rangeMismatch: number;
  claims: number;
  forced: number;
  grants: number;
  revoked: number;
}

export interface IpamStatus {
  id: string;
  epoch: EpochInfo | null;
  range: string;
  blockPrefix: number;
  canAllocate: boolean;
  /** why allocation is not possible right now, if it is not */
  reason: string | null;
  blocks: { index: number; cidr: string; owner: string; version: number; kind: string; mine: boolean; free: number | null; settling: boolean }[];
  allocations: { podId: string; ip: string }[];
  pending: { to: string; sinceMs: number } | null;
  /** writes this node proposed and is collecting promises for (claims of silent members, grants) */
  proposals: { index: number; cidr: string; kind: "t" | "c"; from: string; to: string; promises: number }[];
  peers: { id: string; epochOk: boolean; freeBlocks: number; heardAgoMs: number | null }[];
  members: { id: string; silentMs: number | null }[];
  conflicts: { peer: string; code: string; message: string }[];
  counters: IpamCounters;
}

interface Resolved {
  range: Cidr;
  blockPrefix: number;
  R: number;
  M: number;
  U: number;
  S: number;
  bootstrapWait: number;
  mayFound: boolean | (() => boolean);
  reqTimeout: number;
  syncInterval: number;
}

function resolve(c: IpamConfig): Resolved {
  if (!NODE_ID_RE.test(c.id)) throw new IpamError("ERR_CONFIG", `node id ${JSON.stringify(c.id)} is not 16 lowercase hex chars`);
  let range: Cidr;
  try {
    range = parseCidr(c.range ?? "10.40.0.0/16");
  } catch (e) {
    throw new IpamError("ERR_CONFIG", (e as Error).message);
  }
  const blockPrefix = c.blockPrefix ?? 26;
  if (!Number.isInteger(blockPrefix) || blockPrefix < range.prefix || blockPrefix > 30) throw new IpamError("ERR_CONFIG", `block size /${blockPrefix} must be within /${range.prefix}../30`);
  if (blockCount(range, blockPrefix) > MAX_BLOCKS) throw new IpamError("ERR_CONFIG", `range ${formatCidr(range)} has more than ${MAX_BLOCKS} /${blockPrefix} blocks`);
  if (2 ** (32 - blockPrefix) > 65536) throw new IpamError("ERR_CONFIG", `blocks larger than /16 are not supported`);
  const R = c.reclaimAfterMs ?? 600_000;
  const M = c.safetyMarginMs ?? Math.floor(R / 5);
  const U = c.resyncMs ?? 15_000;
  const S = c.claimSettleMs ?? 10_000;
  if (!(R > 0 && M > 0 && M < R && U >= 0 && S >= 0)) throw new IpamError("ERR_CONFIG", "need 0 < safetyMargin < reclaimAfter, resync >= 0, claimSettle >= 0");
  return {
    range,
    blockPrefix,
    R,
    M,
    U,
    S,
    bootstrapWait: c.bootstrapWaitMs ?? 5_000,
    mayFound: c.mayFound ?? true,
    reqTimeout: c.requestTimeoutMs ?? 5_000,
    syncInterval: c.syncIntervalMs ?? 30_000,
  };
}

interface PeerInfo {
  epochOk: boolean;
  free: number;
  digest: number;
  lastSync: number | null;
}

const NEG = Number.NEGATIVE_INFINITY;

/** A promise this node gave as an acceptor: block version `v` may be written by `by`, naming `to`. */
interface Promise_ {
  v: number;
  to: string;
  by: string;
  kind: "t" | "c";
  until: number;
}
/** A write this node proposed: needs promises from a strict majority of the members. */
interface Proposal {
  v: number;
  kind: "t" | "c";
  owner: string; // current owner (the silent member for claims, us for grants)
  to: string; // new owner (us for claims, the requester for grants)
  acks: Set<string>;
  until: number;
}

export class IpamNode {
  readonly id: string;
  private readonly cfg: Resolved;
  private epoch: EpochInfo | null = null;
  private table: BlockTable | null = null;
  private readonly allocs = new Map<string, number>(); // podId -> ip
  private readonly ipToPod = new Map<number, string>();
  private readonly used = new Map<number, number>(); // block index -> allocated count
  private readonly settleUntil = new Map<number, number>();
  private readonly promises = new Map<number, Promise_>();
  /** our blocks that a peer reports as promised to a claimer: never used until that resolves */
  private readonly doomedBy = new Map<string, Set<number>>();
  private readonly proposals = new Map<number, Proposal>();
  private grantQueue: string[] = [];
  private beat = 0;
  private readonly beats = new Map<string, { beat: number; at: number }>();
  private readonly heard = new Map<string, number>();
  private readonly peers = new Set<string>();
  private readonly info = new Map<string, PeerInfo>();
  private readonly conflicts = new Map<string, { code: string; message: string }>();
  private startedAt: number;
  private leaseSince: number | null = null;
  private needsResync = false;
  private pending: { to: string; since: number } | null = null;
  readonly counters: IpamCounters = { malformed: 0, conflicts: 0, epochMismatch: 0, rangeMismatch: 0, claims: 0, forced: 0, grants: 0, revoked: 0 };

  constructor(config: IpamConfig, now: number) {
    this.id = config.id;
    this.cfg = resolve(config);
    this.startedAt = now;
  }

  // ---- persistence ---------------------------------------------------------------------------------

  snapshot(): IpamSnapshot {
    return {
      v: 1,
      id: this.id,
      epoch: this.epoch ? { ...this.epoch } : null,
      entries: this.table ? this.table.nonBaseline() : [],
      allocs: [...this.allocs].map(([p, ip]) => [p, formatIp(ip)]),
      settling: [...this.settleUntil.keys()].sort((a, b) => a - b),
      promises: [...this.promises].map(([i, p]): [number, number, string, string, "t" | "c", number] => [i, p.v, p.to, p.by, p.kind, p.until]),
      beat: this.beat,
    };
  }

  /** Rebuild from a persisted snapshot. Refuses (ERR_RANGE_MISMATCH) if the agent's range differs. */
  static restore(snap: IpamSnapshot, config: IpamConfig, now: number): IpamNode {
    const n = new IpamNode(config, now);
    if (snap.v !== 1 || snap.id !== n.id) throw new IpamError("ERR_CONFIG", `snapshot belongs to ${snap.id}, not ${n.id}`);
    n.beat = snap.beat;
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
        n.addAlloc(podId, ip);
      }
      for (const i of snap.settling) if (n.table!.get(i).owner === n.id) n.settleUntil.set(i, now + n.cfg.S);
      for (const [i, v, to, by, kind, until] of snap.promises ?? []) n.promises.set(i, { v, to, by, kind, until });
      n.needsResync = true;
    } else if (snap.allocs.length > 0) {
      throw new IpamError("ERR_CONFIG", "snapshot has allocations but no cluster");
    }
    n.assertInvariants();
    return n;
  }

  // ---- events --------------------------------------------------------------------------------------

  handle(ev: IpamEvent, now: number): IpamOutput {
    const out: IpamOutput = { send: [], persist: false, revoked: [], errors: [] };
    this.assertInvariants();
    switch (ev.type) {
      case "tick":
        this.onTick(now, out);
        break;
      case "peerUp":
        this.peers.add(ev.peer);
        this.heard.set(ev.peer, now);
        if (!this.info.has(ev.peer)) this.info.set(ev.peer, { epochOk: false, free: 0, digest: -1, lastSync: null });
        this.info.get(ev.peer)!.lastSync = null;
        this.sendHello(ev.peer, now, out);
        if (this.epoch) this.sendFull(ev.peer, now, out);
        break;
      case "peerDown":
        this.peers.delete(ev.peer);
        if (this.pending?.to === ev.peer) this.pending = null;
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
    const out: IpamOutput = { send: [], persist: false, revoked: [], errors: [] };
    this.assertInvariants();
    if (typeof podId !== "string" || podId.length === 0 || podId.length > 256) {
      return { ok: false, error: new IpamError("ERR_CONFIG", "pod id must be a non-empty string of at most 256 chars"), output: out };
    }
    const have = this.allocs.get(podId);
    if (have !== undefined) return { ok: true, ip: formatIp(have), changed: false, output: out };
    const why = this.whyNot(now);
    if (why) return { ok: false, error: new IpamError("ERR_NOT_READY", why), output: out };
    for (const i of this.allocatableBlocks(now)) {
      const ip = this.firstFree(i);
      if (ip !== null) {
        this.addAlloc(podId, ip);
        out.persist = true;
        if (this.freeAddresses(now) === 0) this.maybeRequest(now, out);
        this.assertInvariants();
        return { ok: true, ip: formatIp(ip), changed: true, output: out };
      }
    }
    this.maybeRequest(now, out);
    return { ok: false, error: new IpamError("ERR_EXHAUSTED", "no free address in this node's blocks; a block was requested from a peer"), output: out };
  }

  /** Release a pod's address (idempotent: unknown pods are a no-op with changed=false). */
  release(podId: string): { changed: boolean; output: IpamOutput } {
    const out: IpamOutput = { send: [], persist: false, revoked: [], errors: [] };
    const ip = this.allocs.get(podId);
    if (ip === undefined) return { changed: false, output: out };
    this.removeAlloc(podId);
    out.persist = true;
    this.assertInvariants();
    return { changed: true, output: out };
  }

  /**
   * Operator override (`weftnet ipam release NODE`): take over every block of `node` now, without the
   * grace period or the majority check. Only safe if `node` is really gone; the operator asserts that.
   */
  forceRelease(node: string, now: number): IpamOutput {
    const out: IpamOutput = { send: [], persist: false, revoked: [], errors: [] };
    if (!this.table || !this.epoch) throw new IpamError("ERR_NOT_READY", "no cluster IPAM yet");
    if (node === this.id) throw new IpamError("ERR_CONFIG", "a node cannot force-release itself; use leave()");
    const delta: EntryTuple[] = [];
    for (const i of this.table.indicesOf(node)) {
      const e = this.table.get(i);
      this.table.write(i, { owner: this.id, version: e.version + 1, kind: "f" });
      this.settleUntil.set(i, now + this.cfg.S);
      delta.push([i, this.id, e.version + 1, "f"]);
    }
    if (delta.length > 0) {
      this.counters.forced += delta.length;
      this.broadcast(delta, null, out);
      out.persist = true;
    }
    this.assertInvariants();
    return out;
  }

  /** Graceful leave: hand every block (with its allocations dropped) to one live peer that is already a member. */
  leave(now: number): { ok: boolean; to: string | null; output: IpamOutput } {
    const out: IpamOutput = { send: [], persist: false, revoked: [], errors: [] };
    if (!this.table || !this.epoch || !this.leaseValid(now)) return { ok: false, to: null, output: out };
    const owners = this.table.owners();
    const to = [...this.peers].filter((p) => owners.has(p) && this.info.get(p)?.epochOk && now - (this.heard.get(p) ?? NEG) < this.W).sort()[0];
    if (!to) return { ok: false, to: null, output: out };
    for (const pod of [...this.allocs.keys()]) this.removeAlloc(pod);
    const delta: EntryTuple[] = [];
    for (const i of this.table.indicesOf(this.id)) {
      const e = this.table.get(i);
      this.table.write(i, { owner: to, version: e.version + 1, kind: "t" });
      this.settleUntil.delete(i);
      delta.push([i, to, e.version + 1, "t"]);
    }
    this.broadcast(delta, null, out);
    out.persist = true;
    this.assertInvariants();
    return { ok: true, to, output: out };
  }

  // ---- views ---------------------------------------------------------------------------------------

  /** Blocks this node may hand new addresses out of right now (owned, lease valid, not settling). */
  allocatableBlocks(now: number): number[] {
    if (!this.table || this.whyNot(now)) return [];
    return this.table.indicesOf(this.id).filter((i) => !((this.settleUntil.get(i) ?? NEG) > now) && !this.isDoomed(i));
  }

  private isDoomed(i: number): boolean {
    if (this.proposals.has(i)) return true;
    for (const s of this.doomedBy.values()) if (s.has(i)) return true;
    return false;
  }

  canAllocate(now: number): boolean {
    return this.whyNot(now) === null && this.freeAddresses(now) > 0;
  }

  ownedBlocks(): number[] {
    return this.table ? this.table.indicesOf(this.id) : [];
  }

  allocations(): Map<string, string> {
    return new Map([...this.allocs].map(([p, ip]) => [p, formatIp(ip)]));
  }

  epochInfo(): EpochInfo | null {
    return this.epoch;
  }

  digest(): number | null {
    return this.table ? this.table.digest() : null;
  }

  /** Owner, version and kind of every block (for tests and status). */
  view(): EntryTuple[] {
    return this.table ? this.table.all().map((e, i): EntryTuple => [i, e.owner, e.version, e.kind]) : [];
  }

  blockCidr(i: number): string {
    return formatCidr(blockAt(this.cfg.range, this.cfg.blockPrefix, i));
  }

  status(now: number): IpamStatus {
    const why = this.whyNot(now);
    const free = this.freeAddresses(now);
    const members = this.table ? [...this.table.owners()].sort() : [];
    return {
      id: this.id,
      epoch: this.epoch,
      range: formatCidr(this.cfg.range),
      blockPrefix: this.cfg.blockPrefix,
      canAllocate: why === null && free > 0,
      reason: why ?? (free > 0 ? null : "no free address in owned blocks"),
      blocks: this.table
        ? this.table.all().map((e, i) => ({
            index: i,
            cidr: this.blockCidr(i),
            owner: e.owner,
            version: e.version,
            kind: e.kind,
            mine: e.owner === this.id,
            free: e.owner === this.id ? this.usableSize() - (this.used.get(i) ?? 0) : null,
            settling: (this.settleUntil.get(i) ?? NEG) > now,
          }))
        : [],
      allocations: [...this.allocs].map(([podId, ip]) => ({ podId, ip: formatIp(ip) })),
      pending: this.pending ? { to: this.pending.to, sinceMs: now - this.pending.since } : null,
      proposals: [...this.proposals].map(([i, p]) => ({ index: i, cidr: this.blockCidr(i), kind: p.kind, from: p.owner, to: p.to, promises: p.acks.size })),
      peers: [...this.peers].sort().map((p) => {
        const inf = this.info.get(p);
        const h = this.heard.get(p);
        return { id: p, epochOk: inf?.epochOk ?? false, freeBlocks: inf?.free ?? 0, heardAgoMs: h === undefined ? null : now - h };
      }),
      members: members.map((m) => ({ id: m, silentMs: m === this.id ? 0 : this.beats.has(m) ? now - this.beats.get(m)!.at : null })),
      conflicts: [...this.conflicts].map(([peer, c]) => ({ peer, ...c })),
      counters: { ...this.counters },
    };
  }

  // ---- internals -----------------------------------------------------------------------------------

  private get W(): number {
    return this.cfg.R - this.cfg.M;
  }

  private usableSize(): number {
    const [a, b] = usableRange(blockAt(this.cfg.range, this.cfg.blockPrefix, 0));
    return b - a + 1;
  }

  /** Strict majority of the current members (block owners) heard from directly within W (self counts). */
  private hasMajority(now: number): boolean {
    if (!this.table) return false;
    const members = this.memberSet();
    let n = 0;
    for (const m of members) if (m === this.id || now - (this.heard.get(m) ?? NEG) < this.W) n++;
    return 2 * n > members.size;
  }

  /** The lease: majority contact now, held for U after a restart or after a lapse. Updates lease state. */
  private leaseValid(now: number): boolean {
    if (!this.table) return false;
    const members = this.memberSet();
    if (members.size === 1 && members.has(this.id)) {
      this.leaseSince ??= now;
      this.needsResync = false;
      return true;
    }
    if (!this.hasMajority(now)) {
      if (this.leaseSince !== null) {
        this.leaseSince = null;
        this.needsResync = true;
      }
      return false;
    }
    this.leaseSince ??= now;
    if (this.needsResync) {
      if (now - this.leaseSince < this.cfg.U) return false;
      this.needsResync = false;
    }
    return true;
  }

  private whyNot(now: number): string | null {
    if (!this.table) return "not yet part of a cluster IPAM";
    if (!this.leaseValid(now)) {
      return this.leaseSince === null
        ? "frozen: fewer than a majority of block owners heard within the lease window (partition safety rule)"
        : "resyncing: waiting for majority contact to last the resync period before allocating";
    }
    return null;
  }

  private freeAddresses(now: number): number {
    let n = 0;
    for (const i of this.allocatableBlocks(now)) n += this.usableSize() - (this.used.get(i) ?? 0);
    return n;
  }

  private wholeFreeBlocks(now: number): number[] {
    if (!this.table) return [];
    return this.table.indicesOf(this.id).filter((i) => (this.used.get(i) ?? 0) === 0 && !((this.settleUntil.get(i) ?? NEG) > now) && !this.isDoomed(i));
  }

  private firstFree(i: number): number | null {
    const [a, b] = usableRange(blockAt(this.cfg.range, this.cfg.blockPrefix, i));
    if ((this.used.get(i) ?? 0) >= b - a + 1) return null;
    for (let ip = a; ip <= b; ip++) if (!this.ipToPod.has(ip)) return ip;
    return null;
  }

  private addAlloc(podId: string, ip: number): void {
    this.allocs.set(podId, ip);
    this.ipToPod.set(ip, podId);
    const i = blockIndexOf(this.cfg.range, this.cfg.blockPrefix, ip);
    this.used.set(i, (this.used.get(i) ?? 0) + 1);
  }

  private removeAlloc(podId: string): void {
    const ip = this.allocs.get(podId);
    if (ip === undefined) return;
    this.allocs.delete(podId);
    this.ipToPod.delete(ip);
    const i = blockIndexOf(this.cfg.range, this.cfg.blockPrefix, ip);
    const n = (this.used.get(i) ?? 0) - 1;
    if (n > 0) this.used.set(i, n);
    else this.used.delete(i);
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
  }

  private found(now: number, out: IpamOutput): void {
    const at = Math.max(0, Math.floor(now));
    this.adopt({ id: epochId(this.id, at), founder: this.id, at, range: formatCidr(this.cfg.range), bp: this.cfg.blockPrefix });
    out.persist = true;
    for (const p of this.peers) this.sendHello(p, now, out);
  }

  private onTick(now: number, out: IpamOutput): void {
    this.beat = Math.max(this.beat + 1, Math.floor(now));
    for (const [i, t] of this.settleUntil) if (t <= now) this.settleUntil.delete(i);
    // Bootstrap: found only if allowed, after the wait, seeing no IPAM, and lowest id among connected peers.
    const mayFound = typeof this.cfg.mayFound === "function" ? this.cfg.mayFound() : this.cfg.mayFound;
    if (!this.epoch && mayFound && now - this.startedAt >= this.cfg.bootstrapWait && this.conflicts.size === 0) {
      if ([...this.peers].every((p) => p > this.id)) this.found(now, out);
    }
    if (this.table && this.epoch) {
      this.prune(now);
      this.reclaim(now, out);
      this.completeProposals(now, out);
      this.nextGrant(now, out);
      if (this.pending && now - this.pending.since >= this.cfg.reqTimeout) this.pending = null;
      if (this.needsBlock(now)) this.maybeRequest(now, out);
    }
    for (const p of this.peers) this.sendHello(p, now, out);
  }

  private needsBlock(now: number): boolean {
    if (!this.table) return false;
    if (this.table.indicesOf(this.id).length === 0) return true;
    return this.whyNot(now) === null && this.freeAddresses(now) < Math.max(1, Math.floor(this.usableSize() / 4));
  }

  private maybeRequest(now: number, out: IpamOutput): void {
    if (!this.epoch || this.pending) return;
    const target = [...this.peers]
      .filter((p) => {
        const inf = this.info.get(p);
        return inf !== undefined && inf.epochOk && inf.free >= 2;
      })
      .sort((a, b) => this.info.get(b)!.free - this.info.get(a)!.free || (a < b ? -1 : 1))[0];
    if (!target) return;
    this.pending = { to: target, since: now };
    out.send.push({ to: target, body: encodeIpamMessage({ t: "req", epoch: this.epoch.id }) });
  }

  /** Silence of member m as we see it: time since its heartbeat last advanced (or since we learned of it). */
  private silentFor(m: string, now: number): number {
    if (m === this.id) return 0;
    let b = this.beats.get(m);
    if (!b) {
      b = { beat: 0, at: now };
      this.beats.set(m, b);
    }
    return now - b.at;
  }

  private get A(): number {
    return this.cfg.R - this.cfg.M / 2;
  }

  /** A promise is void once its proposer abandoned it (beat >= until) or went silent for A. */
  private promiseVoid(p: Promise_, now: number): boolean {
    if (p.by === this.id) return this.beat >= p.until;
    return (this.beats.get(p.by)?.beat ?? -1) >= p.until || this.silentFor(p.by, now) >= this.A;
  }

  /**
   * The member set used for majorities: the block owners, plus the new owners of grants we promised
   * and that are not yet written (a grant to a new node is a membership change: it counts against us
   * as soon as we promised it, so a majority computed from an older view can never be outvoted).
   */
  private memberSet(): Set<string> {
    const m = this.table!.owners();
    for (const p of this.promises.values()) if (p.kind === "t") m.add(p.to);
    return m;
  }

  private prune(now: number): void {
    const table = this.table!;
    for (const [i, p] of this.proposals) if (this.beat >= p.until || table.get(i).version >= p.v) this.proposals.delete(i);
    for (const [i, p] of this.promises) if (table.get(i).version >= p.v || this.promiseVoid(p, now)) this.promises.delete(i);
    for (const [peer, set] of this.doomedBy) {
      for (const i of set) if (table.get(i).owner !== this.id) set.delete(i);
      if (set.size === 0 || this.silentFor(peer, now) >= this.cfg.R) this.doomedBy.delete(peer);
    }
  }

  /** Start a proposal round for `blocks` (self-promise, then `prop` to every epoch peer). */
  private propose(kind: "t" | "c", owner: string, to: string, blocks: number[], now: number, out: IpamOutput): void {
    const table = this.table!;
    const until = this.beat + this.cfg.reqTimeout;
    const sent: [number, number][] = [];
    for (const i of blocks) {
      if (this.proposals.has(i)) continue;
      const v = table.get(i).version + 1;
      const acks = new Set<string>();
      if (this.accept(i, v, this.id, kind, owner, to, until, now)) {
        acks.add(this.id);
        out.persist = true;
      }
      this.proposals.set(i, { v, kind, owner, to, acks, until });
      sent.push([i, v]);
    }
    if (sent.length === 0) return;
    for (const p of this.peers) {
      if (!this.info.get(p)?.epochOk) continue;
      for (let k = 0; k < sent.length; k += STATE_CHUNK) {
        out.send.push({ to: p, body: encodeIpamMessage({ t: "prop", epoch: this.epoch!.id, kind, owner, to, until, blocks: sent.slice(k, k + STATE_CHUNK) }) });
      }
    }
    this.completeProposals(now, out);
  }

  /**
   * Reclaim: for members silent for R, the deterministic heir (lowest id among us and the epoch peers
   * heard within W) proposes a claim of each of their blocks at version+1. The claim is written once a
   * strict majority of the members promised it (completeProposals).
   */
  private reclaim(now: number, out: IpamOutput): void {
    const table = this.table!;
    const members = table.owners();
    for (const m of members) this.silentFor(m, now);
    const silent = [...members].filter((m) => m !== this.id && this.silentFor(m, now) >= this.cfg.R);
    if (silent.length === 0 || !this.leaseValid(now)) return;
    for (const dead of silent) {
      const candidates = [this.id, ...[...this.peers].filter((p) => p !== dead && this.info.get(p)?.epochOk && now - (this.heard.get(p) ?? NEG) < this.W)];
      if (candidates.sort()[0] !== this.id) continue;
      this.propose("c", dead, this.id, table.indicesOf(dead), now, out);
    }
  }

  /**
   * Acceptor rule for writing version v of block i. Every write except an operator force needs a
   * majority of these promises, and each acceptor promises a (block, version) to one live proposer:
   *   claim ("c"): the owner is someone else, and WE also saw it silent for A = R - M/2;
   *   transfer ("t"): proposed by the owner itself; if it adds a new member, only one such membership
   *   change may be outstanding per acceptor.
   */
  private accept(i: number, v: number, by: string, kind: "t" | "c", owner: string, to: string, until: number, now: number): boolean {
    const table = this.table!;
    if (i >= table.count) return false;
    const e = table.get(i);
    if (e.version !== v - 1 || e.owner !== owner || to === owner) return false;
    if (kind === "c") {
      if (by !== to || owner === this.id || this.silentFor(owner, now) < this.A) return false;
    } else {
      if (by !== owner) return false;
      if (!table.owners().has(to)) {
        for (const [j, q] of this.promises) if (j !== i && q.kind === "t" && q.to !== to && !table.owners().has(q.to) && !this.promiseVoid(q, now)) return false;
      }
    }
    const p = this.promises.get(i);
    if (p && !this.promiseVoid(p, now) && (p.v > v || (p.v === v && (p.by !== by || p.to !== to || p.kind !== kind)))) return false;
    if (by !== this.id && (this.beats.get(by)?.beat ?? -1) >= until) return false; // already abandoned
    this.promises.set(i, { v, to, by, kind, until });
    return true;
  }

  private completeProposals(now: number, out: IpamOutput): void {
    const table = this.table!;
    const members = this.memberSet();
    const owners = table.owners();
    const delta: EntryTuple[] = [];
    for (const [i, p] of this.proposals) {
      const e = table.get(i);
      if (e.version !== p.v - 1 || e.owner !== p.owner || this.beat >= p.until) {
        this.proposals.delete(i);
        continue;
      }
      // a grant is approved by the configuration before it (the new member cannot vote on itself)
      const voters = p.kind === "t" && !owners.has(p.to) ? members.size - 1 : members.size;
      let n = 0;
      for (const a of p.acks) if (owners.has(a)) n++;
      if (2 * n <= voters || !this.leaseValid(now)) continue;
      this.proposals.delete(i);
      table.write(i, { owner: p.to, version: p.v, kind: p.kind });
      delta.push([i, p.to, p.v, p.kind]);
      if (p.kind === "c") {
        this.settleUntil.set(i, now + this.cfg.S);
        this.counters.claims++;
      } else {
        this.settleUntil.delete(i);
        this.counters.grants++;
      }
    }
    if (delta.length > 0) {
      out.persist = true;
      this.broadcast(delta, null, out);
    }
  }

  private sendHello(to: string, now: number, out: IpamOutput): void {
    const beats: [string, number][] = [];
    for (const [n, b] of this.beats) if (b.beat > 0) beats.push([n, b.beat]);
    out.send.push({
      to,
      body: encodeIpamMessage({
        t: "hello",
        epoch: this.epoch,
        beat: this.beat,
        beats,
        free: this.table ? this.wholeFreeBlocks(now).length : 0,
        digest: this.table ? this.table.digest() : 0,
        promised: [...this.promises].filter(([i, p]) => this.table !== null && this.table.get(i).version < p.v).map(([i, p]): [number, number] => [i, p.v]),
      }),
    });
  }

  private sendFull(to: string, now: number, out: IpamOutput): void {
    if (!this.table || !this.epoch) return;
    const all = this.table.nonBaseline();
    for (let k = 0; k === 0 || k < all.length; k += STATE_CHUNK) {
      out.send.push({ to, body: encodeIpamMessage({ t: "state", epoch: this.epoch.id, entries: all.slice(k, k + STATE_CHUNK) }) });
    }
    const inf = this.info.get(to);
    if (inf) inf.lastSync = now;
  }

  private broadcast(delta: EntryTuple[], except: string | null, out: IpamOutput): void {
    if (!this.epoch || delta.length === 0) return;
    for (const p of this.peers) {
      if (p === except || !this.info.get(p)?.epochOk) continue;
      for (let k = 0; k < delta.length; k += STATE_CHUNK) {
        out.send.push({ to: p, body: encodeIpamMessage({ t: "state", epoch: this.epoch.id, entries: delta.slice(k, k + STATE_CHUNK) }) });
      }
    }
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
    this.heard.set(from, now);
    if (!this.info.has(from)) this.info.set(from, { epochOk: false, free: 0, digest: -1, lastSync: null });
    const inf = this.info.get(from)!;
    if (m.t === "hello") {
      this.mergeBeat(from, m.beat, now);
      for (const [i, p] of this.promises) if (p.to === from && m.beat >= p.until) this.promises.delete(i);
      if (m.epoch === null) {
        inf.epochOk = false;
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
        this.sendHello(from, now, out);
      }
      if (m.epoch.id !== this.epoch!.id) {
        inf.epochOk = false;
        this.refuse(from, new IpamError("ERR_EPOCH_MISMATCH", `peer ${from} belongs to a separately bootstrapped IPAM ${m.epoch.id} (${m.epoch.range}); ours is ${this.epoch!.id}; refusing to merge`), out);
        return;
      }
      if (!inf.epochOk) {
        inf.epochOk = true;
        this.conflicts.delete(from);
      }
      inf.free = m.free;
      inf.digest = m.digest;
      const doomed = new Set<number>();
      for (const [i, v] of m.promised) {
        if (i < this.table!.count && this.table!.get(i).owner === this.id && this.table!.get(i).version === v - 1) doomed.add(i);
      }
      if (doomed.size > 0) this.doomedBy.set(from, doomed);
      else this.doomedBy.delete(from);
      for (const [n, b] of m.beats) this.mergeBeat(n, b, now);
      if (m.digest !== this.table!.digest() && (inf.lastSync === null || now - inf.lastSync >= this.cfg.syncInterval)) this.sendFull(from, now, out);
      return;
    }
    if (!this.epoch || m.epoch !== this.epoch.id) {
      if (this.epoch) this.refuse(from, new IpamError("ERR_EPOCH_MISMATCH", `peer ${from} sent ${m.t} for IPAM ${m.epoch}; ours is ${this.epoch.id}`), out);
      return;
    }
    switch (m.t) {
      case "state":
        this.onState(from, m.entries, now, out);
        return;
      case "req":
        this.onRequest(from, now, out);
        return;
      case "prop": {
        const ok = m.blocks.filter(([i, v]) => this.accept(i, v, from, m.kind, m.owner, m.to, m.until, now));
        if (ok.length > 0) {
          out.persist = true;
          out.send.push({ to: from, body: encodeIpamMessage({ t: "prom", epoch: this.epoch.id, blocks: ok }) });
        }
        return;
      }
      case "prom":
        for (const [i, v] of m.blocks) {
          const p = this.proposals.get(i);
          if (p && p.v === v) p.acks.add(from);
        }
        this.completeProposals(now, out);
        this.nextGrant(now, out);
        return;
      case "nak":
        if (this.pending?.to === from) this.pending = null;
        inf.free = 0;
        return;
    }
  }

  private mergeBeat(n: string, b: number, now: number): void {
    if (n === this.id) return;
    const cur = this.beats.get(n);
    if (!cur || b > cur.beat) this.beats.set(n, { beat: b, at: now });
  }

  private onState(from: string, entries: EntryTuple[], now: number, out: IpamOutput): void {
    const table = this.table!;
    let delta: EntryTuple[];
    try {
      delta = table.merge(entries);
    } catch (e) {
      if (e instanceof IpamError && e.code === "ERR_CONFLICT") {
        this.refuse(from, e, out);
        return;
      }
      throw e;
    }
    if (delta.length === 0) return;
    out.persist = true;
    for (const [i, owner] of delta) {
      if (owner === this.id) {
        if (this.pending) this.pending = null;
        continue;
      }
      this.settleUntil.delete(i);
      const [a, b] = usableRange(blockAt(this.cfg.range, this.cfg.blockPrefix, i));
      if ((this.used.get(i) ?? 0) > 0) {
        for (let ip = a; ip <= b; ip++) {
          const pod = this.ipToPod.get(ip);
          if (pod !== undefined) {
            this.removeAlloc(pod);
            out.revoked.push({ podId: pod, ip: formatIp(ip) });
            this.counters.revoked++;
          }
        }
      }
    }
    this.broadcast(delta, from, out);
    void now;
  }

  private onRequest(from: string, now: number, out: IpamOutput): void {
    const free = this.leaseValid(now) ? this.wholeFreeBlocks(now) : [];
    if (free.length < 2 || !this.info.get(from)?.epochOk) {
      out.send.push({ to: from, body: encodeIpamMessage({ t: "nak", epoch: this.epoch!.id }) });
      return;
    }
    const mine = [...this.proposals.values()].filter((p) => p.kind === "t");
    if (mine.some((p) => p.to === from)) return; // already proposing a block for this requester
    if (mine.length > 0) {
      if (!this.grantQueue.includes(from)) this.grantQueue.push(from); // one grant round at a time
      return;
    }
    this.propose("t", this.id, from, [free[0]!], now, out);
  }

  /** Start the next queued grant once the previous round is over. */
  private nextGrant(now: number, out: IpamOutput): void {
    if ([...this.proposals.values()].some((p) => p.kind === "t")) return;
    while (this.grantQueue.length > 0) {
      const to = this.grantQueue.shift()!;
      if (!this.peers.has(to) || !this.info.get(to)?.epochOk) continue;
      const free = this.leaseValid(now) ? this.wholeFreeBlocks(now) : [];
      if (free.length < 2) {
        out.send.push({ to, body: encodeIpamMessage({ t: "nak", epoch: this.epoch!.id }) });
        continue;
      }
      this.propose("t", this.id, to, [free[0]!], now, out);
      return;
    }
  }

  /** Our own state must always satisfy these; a failure is a bug and throws loudly. */
  private assertInvariants(): void {
    const fail = (msg: string) => {
      throw new IpamError("ERR_INVARIANT", `ipam ${this.id}: ${msg}`);
    };
    if (!this.table) {
      if (this.allocs.size > 0) fail("allocations without a cluster");
      return;
    }
    if (this.allocs.size !== this.ipToPod.size) fail("pod/ip maps disagree");
    let total = 0;
    for (const [pod, ip] of this.allocs) {
      if (this.ipToPod.get(ip) !== pod) fail(`ip ${formatIp(ip)} maps to another pod`);
      const i = blockIndexOf(this.cfg.range, this.cfg.blockPrefix, ip);
      if (i < 0) fail(`allocation ${formatIp(ip)} outside the range`);
      if (this.table.get(i).owner !== this.id) fail(`allocation ${formatIp(ip)} in block ${i} owned by ${this.table.get(i).owner}`);
      const [a, b] = usableRange(blockAt(this.cfg.range, this.cfg.blockPrefix, i));
      if (ip < a || ip > b) fail(`allocation ${formatIp(ip)} is a network/broadcast address`);
    }
    for (const n of this.used.values()) total += n;
    if (total !== this.allocs.size) fail("per-block counts disagree with allocations");
    for (const i of this.settleUntil.keys()) if (this.table.get(i).owner !== this.id) fail(`settling block ${i} is not ours`);
  }
}
