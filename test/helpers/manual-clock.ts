import type { Clock } from "../../signaling/core/hub.js";

/** The signaling core's clock port on a hand-moved time: timers fire in advance(), never by themselves. */
export class ManualClock implements Clock {
  timers: { at: number; fn: () => void }[] = [];
  constructor(public t = 1_000_000) {}
  now = () => this.t;
  setTimer = (fn: () => void, ms: number) => {
    const h = { at: this.t + ms, fn };
    this.timers.push(h);
    return h;
  };
  clearTimer = (h: unknown) => {
    this.timers = this.timers.filter((x) => x !== h);
  };
  advance(ms: number): void {
    this.t += ms;
    for (const h of this.timers.filter((x) => x.at <= this.t)) {
      this.timers = this.timers.filter((x) => x !== h);
      h.fn();
    }
  }
}
