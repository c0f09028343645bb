// Simulated network of IpamNodes in one process with a manual clock (shared by the ipam unit and
// property tests). Links follow partition groups + explicit cuts; messages sent in one tick are
// delivered before the next tick (bounded delay), shuffled (reordering) and sometimes duplicated;
// a link going down drops what is in flight on it (loss).
import { createPrivateKey } from "node:crypto";
import { type Identity, identityFromPrivateKey } from "../../src/identity.js";
import { IpamNode, type IpamConfig, type IpamOutput, type IpamSnapshot } from "../../src/ipam/index.js";
import { identityKeys, type IpamKeys } from "../../src/ipam/signing.js";

/** A real Ed25519 identity from 32 bytes of the simulation's PRNG (reproducible runs). */
export function simIdentity(rand: () => number): Identity {
  const seed = Buffer.alloc(32);
  for (let k = 0; k < 32; k++) seed[k] = Math.floor(rand() * 256);
  const der = Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), seed]);
  return identityFromPrivateKey(createPrivateKey({ key: der, format: "der", type: "pkcs8" }));
}

export const SIM_CFG = {
  range: "10.40.0.0/22",
  blockPrefix: 28,
  reclaimAfterMs: 8_000,
  safetyMarginMs: 4_000,
  resyncMs: 2_000,
  contactMs: 1_500,
  claimSettleMs: 1_000,
  bootstrapWaitMs: 0,
  requestTimeoutMs: 2_000,
  syncIntervalMs: 2_000,
} satisfies Omit<IpamConfig, "id">;
export const TICK = 500;

export interface SimNode {
  id: string;
  node: IpamNode | null; // null while crashed
  snap: IpamSnapshot | null; // last persisted state
  group: number;
  gone: boolean; // left or died for good
  keys?: IpamKeys; // signed simulations: the node's own key
}

export { prng } from "../helpers/prng.js";

const pair = (a: string, b: string) => (a < b ? `${a}|${b}` : `${b}|${a}`);

export class Sim {
  now = 1_000_000;
  readonly nodes: SimNode[] = [];
  readonly cuts = new Set<string>();
  private links = new Set<string>();
  private queue: { from: string; to: string; body: unknown }[] = [];
  private seq = 0;
  dupRate = 0.05;
  /** give every node a real Ed25519 identity and sign IPAM state (slower: use fewer runs) */
  signed = false;
  /** signed simulations: the operator's public key every node is configured with (--operator-key) */
  operatorKey: Uint8Array | undefined = undefined;
  /** probability that one message is lost (on top of in-flight loss when a link goes down) */
  lossRate = 0;
  /** pod addresses revoked (only an operator's force release of a live node may cause one) */
  revoked = 0;
  /** per-node clock offset (ms): clocks need not agree; a step changes it */
  readonly skew = new Map<string, number>();
  readonly errors: string[] = [];
  podSeq = 0;

  constructor(
    readonly rand: () => number,
    readonly cfg: Omit<IpamConfig, "id"> = SIM_CFG,
  ) {}

  newId(): string {
    this.seq++;
    // ids in a random-ish but unique order so "lowest id" is not always the oldest node
    const r = Math.floor(this.rand() * 0xffff);
    return (r.toString(16).padStart(4, "0") + this.seq.toString(16).padStart(12, "0")).slice(0, 16);
  }

  live(): SimNode[] {
    return this.nodes.filter((n) => n.node !== null);
  }

  add(opts: { mayFound: boolean; group?: number; id?: string }): SimNode {
    let id = opts.id ?? this.newId();
    let keys: IpamKeys | undefined;
    if (this.signed) {
      const idn = simIdentity(this.rand);
      id = idn.id;
      keys = identityKeys(idn, this.operatorKey);
    }
    const sn: SimNode = { id, node: new IpamNode({ ...this.cfg, id, mayFound: opts.mayFound, ...(keys ? { keys } : {}) }, this.at(id)), snap: null, group: opts.group ?? 0, gone: false, ...(keys ? { keys } : {}) };
    this.nodes.push(sn);
    this.syncLinks();
    return sn;
  }

  crash(sn: SimNode, forever = false): void {
    sn.node = null;
    sn.gone = forever;
    this.syncLinks();
  }

  restart(sn: SimNode): void {
    if (sn.node || sn.gone) return;
    const cfg = { ...this.cfg, id: sn.id, mayFound: false, ...(sn.keys ? { keys: sn.keys } : {}) };
    sn.node = sn.snap ? IpamNode.restore(structuredClone(sn.snap), cfg, this.at(sn)) : new IpamNode(cfg, this.at(sn));
    this.syncLinks();
  }

  apply(sn: SimNode, out: IpamOutput): void {
    if (out.persist && sn.node) sn.snap = structuredClone(sn.node.snapshot());
    for (const s of out.send) if (this.links.has(pair(sn.id, s.to))) this.queue.push({ from: sn.id, to: s.to, body: s.body });
    for (const e of out.errors) this.errors.push(`${sn.id}: ${e.code} ${e.message}`);
    this.revoked += out.revoked.length;
  }

  /** this node's clock */
  at(sn: SimNode | string): number {
    return this.now + (this.skew.get(typeof sn === "string" ? sn : sn.id) ?? 0);
  }

  /** Bring links in line with groups, cuts and liveness; peerDown/peerUp both ends; drop in-flight on down. */
  syncLinks(): void {
    const want = new Set<string>();
    const live = this.live();
    for (let i = 0; i < live.length; i++)
      for (let j = i + 1; j < live.length; j++) {
        const a = live[i]!;
        const b = live[j]!;
        const k = pair(a.id, b.id);
        if (a.group === b.group && !this.cuts.has(k)) want.add(k);
      }
    const byId = new Map(this.nodes.map((n) => [n.id, n]));
    for (const k of [...this.links]) {
      if (want.has(k)) continue;
      this.links.delete(k);
      this.queue = this.queue.filter((m) => pair(m.from, m.to) !== k);
      for (const [x, y] of [k.split("|"), k.split("|").reverse()] as [string, string][]) {
        const sn = byId.get(x)!;
        if (sn.node) this.apply(sn, sn.node.handle({ type: "peerDown", peer: y }, this.at(sn)));
      }
    }
    for (const k of want) {
      if (this.links.has(k)) continue;
      this.links.add(k);
      const [x, y] = k.split("|") as [string, string];
      for (const [a, b] of [[x, y], [y, x]] as [string, string][]) {
        const sn = byId.get(a)!;
        if (sn.node) this.apply(sn, sn.node.handle({ type: "peerUp", peer: b }, this.at(sn)));
      }
    }
  }

  /** Put a message on a live link as if `from` had sent it (an attacker's injection). */
  inject(from: string, to: string, body: unknown): void {
    if (this.links.has(pair(from, to))) this.queue.push({ from, to, body });
  }

  flap(a: SimNode, b: SimNode): void {
    const k = pair(a.id, b.id);
    if (!this.links.has(k)) return;
    this.cuts.add(k);
    this.syncLinks();
    this.cuts.delete(k);
    this.syncLinks();
  }

  deliver(): void {
    const q = this.queue;
    this.queue = [];
    for (let i = q.length - 1; i > 0; i--) {
      const j = Math.floor(this.rand() * (i + 1));
      [q[i], q[j]] = [q[j]!, q[i]!];
    }
    const byId = new Map(this.nodes.map((n) => [n.id, n]));
    for (const m of q) {
      if (!this.links.has(pair(m.from, m.to))) continue;
      const sn = byId.get(m.to)!;
      if (!sn.node) continue;
      if (this.lossRate > 0 && this.rand() < this.lossRate) continue;
      const times = this.rand() < this.dupRate ? 2 : 1;
      for (let t = 0; t < times; t++) this.apply(sn, sn.node.handle({ type: "message", from: m.from, body: m.body }, this.at(sn)));
    }
  }

  tick(check: () => void = () => this.checkSafety()): void {
    this.now += TICK;
    this.deliver();
    check();
    for (const sn of this.live()) this.apply(sn, sn.node!.handle({ type: "tick" }, this.at(sn)));
    check();
  }

  run(ticks: number, check?: () => void): void {
    for (let i = 0; i < ticks; i++) this.tick(check);
  }

  /** what each node was handed and did not release: node -> pod -> ip (must survive everything but a force release) */
  readonly held = new Map<string, Map<string, string>>();

  allocate(sn: SimNode, podId = `pod-${++this.podSeq}`): string | null {
    if (!sn.node) return null;
    const r = sn.node.allocate(podId, this.at(sn));
    this.apply(sn, r.output);
    if (!r.ok) return null;
    if (r.changed) this.checkHandout(sn, r.ip);
    if (!this.held.has(sn.id)) this.held.set(sn.id, new Map());
    this.held.get(sn.id)!.set(podId, r.ip);
    return r.ip;
  }

  release(sn: SimNode, podId: string): void {
    if (!sn.node) return;
    this.apply(sn, sn.node.release(podId).output);
    this.held.get(sn.id)?.delete(podId);
  }

  /** Every live node still holds exactly what it was handed and did not release (nothing revoked). */
  checkKept(): void {
    for (const sn of this.live()) {
      const want = this.held.get(sn.id) ?? new Map<string, string>();
      const have = sn.node!.allocations();
      for (const [pod, ip] of want) if (have.get(pod) !== ip) throw new Error(`t=${this.now}: ${sn.id} lost ${pod} (${ip}); has ${have.get(pod)}`);
      if (have.size !== want.size) throw new Error(`t=${this.now}: ${sn.id} holds ${have.size} pods, was handed ${want.size}`);
    }
  }

  /** nodes that have had a pin of theirs confirmed by a majority (checkMembers) */
  readonly everPinned = new Set<string>();
  /** per live node: every node it ever listed as a member (checkMembers) */
  readonly everListed = new Map<string, Set<string>>();
  /** nodes that left (leave()) or that an operator released: the only ones that may leave a member list */
  readonly departed = new Set<string>();

  /**
   * Membership is stable (issue 15): a node stays a member (owns a block) from its first confirmed pin on,
   * whatever the partitions, silences and restarts — its pinned reserve is never reclaimed — until it
   * leaves or is released. Checked in the node's own view here; in every view after heal (ipam-sim).
   */
  checkMembers(): void {
    for (const sn of this.live()) {
      if ((sn.node!.snapshot().pinned ?? []).length > 0) this.everPinned.add(sn.id);
      if (this.everPinned.has(sn.id) && sn.node!.ownedBlocks().length === 0 && !this.departed.has(sn.id)) throw new Error(`t=${this.now}: ${sn.id} had a confirmed pin but owns no block`);
      // the member list only ever loses a node that left or was released: never by reclaim, silence or a restart
      const list = new Set(sn.node!.memberList());
      const removed = sn.node!.removedMembers();
      for (const r of removed) if (!this.departed.has(r)) throw new Error(`t=${this.now}: ${sn.id} removed ${r} from its member list, but ${r} neither left nor was released`);
      const ever = this.everListed.get(sn.id) ?? new Set<string>();
      for (const m of ever) if (!list.has(m) && !removed.includes(m)) throw new Error(`t=${this.now}: ${m} dropped out of ${sn.id}'s member list without a removal`);
      for (const m of list) ever.add(m);
      this.everListed.set(sn.id, ever);
    }
  }

  /** After a heal: every live node has the same member list, and it holds every node ever listed anywhere that did not depart. */
  checkMemberLists(): void {
    const live = this.live();
    const lists = live.map((sn) => sn.node!.memberList().join(","));
    if (new Set(lists).size !== 1) throw new Error(`t=${this.now}: member lists differ after heal:\n${live.map((sn, k) => `${sn.id}: ${lists[k]} (removed ${sn.node!.removedMembers().join(",")})`).join("\n")}`);
    const list = new Set(live[0]!.node!.memberList());
    for (const ever of this.everListed.values()) for (const m of ever) if (!this.departed.has(m) && !list.has(m)) throw new Error(`t=${this.now}: ${m} was a member and did not depart, but is no member after heal`);
  }

  /** I1: no block is allocatable by two live nodes at the same moment. */
  checkSafety(): void {
    const owner = new Map<number, string>();
    for (const sn of this.live()) {
      for (const i of sn.node!.allocatableBlocks(this.at(sn))) {
        const o = owner.get(i);
        if (o !== undefined) {
          const views = this.nodes.map((n) => `${n.id}${n.node ? "" : n.gone ? "(gone)" : "(down)"} g${n.group}: ${JSON.stringify(n.node?.view()[i] ?? n.snap?.entries.find((e) => e[0] === i))}`);
          throw new Error(`t=${this.now}: block ${i} allocatable by both ${o} and ${sn.id}\n${views.join("\n")}\n${process.env.IPAM_DEBUG ? debugDump(this) : ""}`);
        }
        owner.set(i, sn.id);
      }
    }
  }

  /** I3: a freshly handed-out address is not held by any other live node (no exception: nothing is ever revoked). */
  checkHandout(by: SimNode, ip: string): void {
    for (const sn of this.live()) {
      if (sn === by) continue;
      for (const [, held] of sn.node!.allocations()) {
        if (held === ip) throw new Error(`t=${this.now}: ${ip} handed out by ${by.id} while ${sn.id} holds it`);
      }
    }
  }

  blockOf(ip: string): number {
    const [a, b, c, d] = ip.split(".").map(Number) as [number, number, number, number];
    const n = ((a * 256 + b) * 256 + c) * 256 + d;
    return Math.floor((n - (10 * 2 ** 24 + 40 * 2 ** 16)) / 2 ** (32 - (this.cfg.blockPrefix ?? 26)));
  }
}
export function debugDump(sim: Sim): string {
  return sim.live().map((n) => {
    const st = n.node!.status(sim.now);
    return `${n.id} g${n.group} members=${st.members.length} ${JSON.stringify(st.members.map((m) => [m.id.slice(0, 4), m.silentMs]))} reason=${st.reason} peers=${st.peers.map((p) => `${p.id.slice(0, 4)}:${p.heardAgoMs}`).join(",")}`;
  }).join("\n");
}
