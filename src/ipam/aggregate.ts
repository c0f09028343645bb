/**
 * Aggregate IPv4 CIDRs into the smallest set of CIDRs covering exactly the same addresses
 * (merges adjacent aligned siblings, drops prefixes covered by others). Used to advertise a node's
 * blocks in topology gossip: the founder of a mesh owns every free block of the range, which
 * aggregates to the range itself.
 */
import { formatIp, parseIp } from "./cidr.js";

export function aggregateCidrs(cidrs: readonly string[]): string[] {
  // Work on [start, end) integer intervals, merge overlaps/adjacency, then split into aligned CIDRs.
  const iv = cidrs
    .map((c) => {
      const [a, l] = c.split("/") as [string, string];
      const len = Number(l);
      const size = 2 ** (32 - len);
      const start = Math.floor(parseIp(a) / size) * size;
      return [start, start + size] as [number, number];
    })
    .sort((x, y) => x[0] - y[0]);
  const merged: [number, number][] = [];
  for (const [s, e] of iv) {
    const last = merged[merged.length - 1];
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else merged.push([s, e]);
  }
  const out: string[] = [];
  for (let [s, e] of merged) {
    while (s < e) {
      let size = 1;
      // largest power of two that is aligned at s and fits in [s, e)
      while (size * 2 <= e - s && s % (size * 2) === 0 && size * 2 <= 2 ** 32) size *= 2;
      out.push(`${formatIp(s)}/${32 - Math.log2(size)}`);
      s += size;
    }
  }
  return out;
}
