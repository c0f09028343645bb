/**
 * Pod allocations of one node (podId <-> address, per-block counts). Pure bookkeeping: which blocks the
 * node may allocate from is decided by the caller (node.ts); this only finds free addresses inside a
 * given block and keeps the three maps consistent (checked by `problems()`).
 */
import { type Cidr, blockAt, blockIndexOf, formatIp, usableRange } from "./cidr.js";

export class Allocations {
  private readonly byPod = new Map<string, number>(); // podId -> ip
  private readonly byIp = new Map<number, string>();
  private readonly used = new Map<number, number>(); // block index -> allocated count

  constructor(
    private readonly range: Cidr,
    private readonly blockPrefix: number,
  ) {}

  get size(): number {
    return this.byPod.size;
  }

  get(podId: string): number | undefined {
    return this.byPod.get(podId);
  }

  pods(): string[] {
    return [...this.byPod.keys()];
  }

  entries(): IterableIterator<[string, number]> {
    return this.byPod.entries();
  }

  blockOf(ip: number): number {
    return blockIndexOf(this.range, this.blockPrefix, ip);
  }

  /** Addresses allocated in block i. */
  usedIn(i: number): number {
    return this.used.get(i) ?? 0;
  }

  /** Usable addresses per block (network, broadcast excluded). */
  usableSize(): number {
    const [a, b] = usableRange(blockAt(this.range, this.blockPrefix, 0));
    return b - a + 1;
  }

  firstFree(i: number): number | null {
    const [a, b] = usableRange(blockAt(this.range, this.blockPrefix, i));
    if (this.usedIn(i) >= b - a + 1) return null;
    for (let ip = a; ip <= b; ip++) if (!this.byIp.has(ip)) return ip;
    return null;
  }

  add(podId: string, ip: number): void {
    this.byPod.set(podId, ip);
    this.byIp.set(ip, podId);
    const i = this.blockOf(ip);
    this.used.set(i, this.usedIn(i) + 1);
  }

  remove(podId: string): void {
    const ip = this.byPod.get(podId);
    if (ip === undefined) return;
    this.byPod.delete(podId);
    this.byIp.delete(ip);
    const i = this.blockOf(ip);
    const n = this.usedIn(i) - 1;
    if (n > 0) this.used.set(i, n);
    else this.used.delete(i);
  }

  /** Drop every allocation inside block i; returns what was dropped. */
  dropBlock(i: number): { podId: string; ip: string }[] {
    const out: { podId: string; ip: string }[] = [];
    if (this.usedIn(i) === 0) return out;
    const [a, b] = usableRange(blockAt(this.range, this.blockPrefix, i));
    for (let ip = a; ip <= b; ip++) {
      const pod = this.byIp.get(ip);
      if (pod !== undefined) {
        this.remove(pod);
        out.push({ podId: pod, ip: formatIp(ip) });
      }
    }
    return out;
  }

  clear(): void {
    for (const pod of this.pods()) this.remove(pod);
  }

  /** Internal consistency, and every allocation inside a block `owns(i)` says is ours. First problem found, or null. */
  problem(owns: (i: number) => boolean): string | null {
    if (this.byPod.size !== this.byIp.size) return "pod/ip maps disagree";
    let total = 0;
    for (const [pod, ip] of this.byPod) {
      if (this.byIp.get(ip) !== pod) return `ip ${formatIp(ip)} maps to another pod`;
      const i = this.blockOf(ip);
      if (i < 0) return `allocation ${formatIp(ip)} outside the range`;
      if (!owns(i)) return `allocation ${formatIp(ip)} in block ${i}, which is not ours`;
      const [a, b] = usableRange(blockAt(this.range, this.blockPrefix, i));
      if (ip < a || ip > b) return `allocation ${formatIp(ip)} is a network/broadcast address`;
    }
    for (const n of this.used.values()) total += n;
    if (total !== this.byPod.size) return "per-block counts disagree with allocations";
    return null;
  }
}
