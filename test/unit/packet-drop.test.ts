import { describe, expect, it } from "vitest";
import { DROP_REASONS, DropCounters, isDropReason } from "../../src/packet/drop.js";

describe("DropCounters", () => {
  it("counts per reason, totals, snapshots and resets", () => {
    const d = new DropCounters();
    expect(d.total()).toBe(0);
    expect(d.snapshot()).toEqual({});
    d.drop("no-route");
    d.drop("queue-full", 3);
    expect(d.get("queue-full")).toBe(3);
    expect(d.total()).toBe(4);
    expect(d.snapshot()).toEqual({ "no-route": 1, "queue-full": 3 });
    expect(Object.keys(d.snapshot(true))).toEqual([...DROP_REASONS]);
    d.reset();
    expect(d.total()).toBe(0);
  });

  it("recognises its reasons", () => {
    for (const r of DROP_REASONS) expect(isDropReason(r)).toBe(true);
    expect(isDropReason("nope")).toBe(false);
    expect(isDropReason(3)).toBe(false);
  });
});
