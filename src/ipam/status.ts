/**
 * What `weftnet status ipam` shows of one node (IpamNode.status): the range, every block with its owner,
 * this node's allocations and free space, why allocation or new blocks wait (a 2|2 split says so), blocks
 * kept for silent members' pods, peers and members with their silence, refused data and counters. Pure:
 * built from the node's parts, changes nothing but what the lease check itself records.
 */
import type { Allocations } from "./allocations.js";
import { formatCidr, formatIp } from "./cidr.js";
import type { Resolved } from "./config.js";
import type { WriteRule } from "./consensus.js";
import type { Lease } from "./lease.js";
import type { Members } from "./members.js";
import type { BlockTable } from "./table.js";
import type { EpochInfo } from "./wire.js";

const NEG = Number.NEGATIVE_INFINITY;

export interface IpamCounters {
  malformed: number;
  conflicts: number;
  epochMismatch: number;
  rangeMismatch: number;
  claims: number;
  forced: number;
  grants: number;
  revoked: number;
  /** remote state refused because its signature is missing or wrong, or its signer had no right to say it */
  forged: number;
  /** remote counters or versions that jumped further ahead than allowed (MAX_BEAT_AHEAD_MS, MAX_VERSION_STEP) */
  jumps: number;
  /**
   * remote force releases refused because nothing authorised them: no operator signature (or a wrong one)
   * and this node did not see the released node's Kubernetes Node deleted itself (also counted in forged)
   */
  releasesRefused: number;
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
  proposals: { index: number; cidr: string; kind: "t" | "c" | "p"; from: string; to: string; promises: number }[];
  /**
   * Ownership changes (new blocks by grant or claim) need the lease: a strict majority of the members
   * heard within W, and after a restart or a lapse that contact held for U. Allocation from our own
   * pinned blocks never needs it. `reason` says plainly why new blocks wait (e.g. a 2|2 split).
   */
  ownership: { lease: boolean; membersHeard: number; members: number; reason: string | null };
  /** blocks of members that are silent but kept for their pods (pinned): never reclaimed automatically */
  reserved: { cidr: string; owner: string; silentMs: number | null }[];
  peers: { id: string; epochOk: boolean; freeBlocks: number; heardAgoMs: number | null }[];
  /**
   * The member list (every owner, every node added by a grant and not removed): who counts in every
   * majority, whether we heard it within W, how many blocks it owns (0: a member by its record alone)
   */
  members: { id: string; silentMs: number | null; heard: boolean; blocks: number }[];
  /** nodes removed from the member list (left, or seen gone: Kubernetes, the operator) */
  removed: string[];
  conflicts: { peer: string; code: string; message: string }[];
  counters: IpamCounters;
}

/** What a node knows of one direct peer's IPAM (from its hellos). */
export interface PeerInfo {
  epochOk: boolean;
  free: number;
  digest: number;
  lastSync: number | null;
}

/** The parts of a node that its status is built from. */
export interface StatusSource {
  id: string;
  cfg: Resolved;
  epoch: EpochInfo | null;
  table: BlockTable | null;
  allocs: Allocations;
  settleUntil: ReadonlyMap<number, number>;
  rule: WriteRule;
  lease: Lease;
  members: Members;
  peers: ReadonlySet<string>;
  info: ReadonlyMap<string, PeerInfo>;
  conflicts: ReadonlyMap<string, { code: string; message: string }>;
  counters: IpamCounters;
  pending: { to: string; since: number } | null;
  freeAddresses(): number;
  /** the lease check (it records lease state: called once, where the node called it) */
  leaseValid(): boolean;
  blockCidr(i: number): string;
}

export function buildStatus(s: StatusSource, now: number): IpamStatus {
  const why = s.table ? null : "not yet part of a cluster IPAM";
  const free = s.freeAddresses();
  const memberSet = s.table ? s.rule.memberSet(s.table) : new Set<string>();
  const members = [...memberSet].sort();
  const isHeard = (m: string) => m === s.id || s.lease.heardWithin(m, now);
  const heard = members.filter(isHeard).length;
  const lease = s.leaseValid();
  const need = Math.floor(memberSet.size / 2) + 1;
  const short = (m: string) => m.slice(0, 8);
  const notHeard = members.filter((m) => !isHeard(m));
  const ownershipReason = !s.table
    ? why
    : lease
      ? null
      : heard < need
        ? `no majority: ${heard} of ${memberSet.size} members heard (need ${need}), not heard: ${notHeard.map(short).join(", ")}; new blocks (grants, reclaims) wait, existing blocks keep allocating`
        : `resyncing: majority contact must last ${Math.round(s.cfg.U / 1000)} s before ownership changes; existing blocks keep allocating`;
  return {
    id: s.id,
    epoch: s.epoch,
    range: formatCidr(s.cfg.range),
    blockPrefix: s.cfg.blockPrefix,
    canAllocate: why === null && free > 0,
    reason: why ?? (free > 0 ? null : s.rule.pinRound() ? "pinning a block: waiting for a majority of the members to record it" : "no free address in owned blocks"),
    blocks: s.table
      ? s.table.all().map((e, i) => ({
          index: i,
          cidr: s.blockCidr(i),
          owner: e.owner,
          version: e.version,
          kind: e.kind,
          mine: e.owner === s.id,
          free: e.owner === s.id ? s.allocs.usableSize() - s.allocs.usedIn(i) : null,
          settling: (s.settleUntil.get(i) ?? NEG) > now,
        }))
      : [],
    allocations: [...s.allocs.entries()].map(([podId, ip]) => ({ podId, ip: formatIp(ip) })),
    pending: s.pending ? { to: s.pending.to, sinceMs: now - s.pending.since } : null,
    proposals: [...s.rule.proposals].map(([i, p]) => ({ index: i, cidr: s.blockCidr(i), kind: p.kind, from: p.owner, to: p.to, promises: p.acks.size })),
    peers: [...s.peers].sort().map((p) => {
      const inf = s.info.get(p);
      const h = s.lease.heard.get(p);
      return { id: p, epochOk: inf?.epochOk ?? false, freeBlocks: inf?.free ?? 0, heardAgoMs: h === undefined ? null : now - h };
    }),
    members: members.map((m) => ({ id: m, silentMs: s.lease.silentMs(m, now), heard: isHeard(m), blocks: s.table ? s.table.indicesOf(m).length : 0 })),
    removed: s.members.removedNodes(),
    conflicts: [...s.conflicts].map(([peer, c]) => ({ peer, ...c })),
    counters: { ...s.counters },
    ownership: { lease, membersHeard: heard, members: memberSet.size, reason: ownershipReason },
    reserved: s.table
      ? s.table
          .all()
          .map((e, i) => ({ e, i }))
          .filter(({ e }) => e.kind === "p" && e.owner !== s.id && (s.lease.silentMs(e.owner, now) ?? 0) >= s.cfg.R)
          .map(({ e, i }) => ({ cidr: s.blockCidr(i), owner: e.owner, silentMs: s.lease.silentMs(e.owner, now) }))
      : [],
  };
}
