import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { aggregateCidrs } from "../../src/ipam/aggregate.js";

const toInt = (ip: string) => ip.split(".").reduce((a, o) => a * 256 + Number(o), 0);
const covers = (cidrs: string[], x: number) =>
  cidrs.some((c) => {
    const [a, l] = c.split("/") as [string, string];
    const size = 2 ** (32 - Number(l));
    return x >= toInt(a) && x < toInt(a) + size;
  });

describe("aggregateCidrs", () => {
  it("merges siblings into their parent and keeps gaps", () => {
    expect(aggregateCidrs(["10.40.0.0/26", "10.40.0.64/26"])).toEqual(["10.40.0.0/25"]);
    expect(aggregateCidrs(["10.40.0.64/26", "10.40.0.128/26"])).toEqual(["10.40.0.64/26", "10.40.0.128/26"]);
    const all = Array.from({ length: 1024 }, (_, i) => `10.40.${Math.floor(i / 4)}.${(i % 4) * 64}/26`);
    expect(aggregateCidrs(all)).toEqual(["10.40.0.0/16"]);
    expect(aggregateCidrs(all.slice(1))).toHaveLength(10);
    expect(aggregateCidrs([])).toEqual([]);
  });
  it("covers exactly the same addresses (random /26 subsets of a /22)", () => {
    fc.assert(
      fc.property(fc.subarray(Array.from({ length: 16 }, (_, i) => i)), (idx) => {
        const cidrs = idx.map((i) => `10.40.${Math.floor(i / 4)}.${(i % 4) * 64}/26`);
        const agg = aggregateCidrs(cidrs);
        expect(agg.length).toBeLessThanOrEqual(cidrs.length);
        for (let x = toInt("10.40.0.0"); x < toInt("10.40.4.0"); x += 32) expect(covers(agg, x)).toBe(covers(cidrs, x));
      }),
    );
  });
});
