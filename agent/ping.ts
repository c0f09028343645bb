/**
 * `weftnet ping` to a node this agent has no link of its own to: the ping is forwarded along the route
 * (the router's next hop), which pings the target over its own link (or forwards again, at most
 * MAX_HOPS in all) and answers. The round trip is measured here, over the whole path: us -> hop -> ...
 * -> target and back. Messages are app messages "ping-via" on the mesh's authenticated control channel:
 *   {t:"req", seq, target, hops}   ask the receiver to reach `target` (hops left)
 *   {t:"res", seq, ok, error?}     its answer
 * A member may ask us to ping a node we reach: bounded (MAX_FORWARDING at once), nothing else is done.
 */
import { WeftError } from "../src/errors.js";
import type { Logger } from "../src/log.js";

const CH = "ping-via";
export const MAX_HOPS = 4;
const MAX_FORWARDING = 16;
const MAX_PENDING = 64;

/** What the pinger needs of the mesh and the router. */
export interface PingPorts {
  selfId: string;
  onApp(ch: string, h: (from: string, body: unknown) => void): void;
  sendApp(peer: string, ch: string, body: unknown): boolean;
  connected(peer: string): boolean;
  /** round trip over our own link to `peer` (ms) */
  ping(peer: string, timeoutMs: number): Promise<number>;
  /** next hop towards `node`, undefined when there is no route */
  nextHop(node: string): string | undefined;
  now(): number;
  log: Logger;
}

export class ViaPinger {
  private seq = 0;
  private forwarding = 0;
  private readonly pending = new Map<number, { hop: string; done: (r: { ok: boolean; error?: string }) => void }>();

  constructor(private readonly p: PingPorts) {
    p.onApp(CH, (from, body) => void this.onMessage(from, body));
  }

  /**
   * Round trip (ms) to `target` through `hop` (our next hop towards it). Rejects with ERR_TIMEOUT, or
   * ERR_NOT_CONNECTED when some hop on the way cannot reach the next.
   */
  async via(target: string, hop: string, timeoutMs: number, hops = MAX_HOPS): Promise<number> {
    if (this.pending.size >= MAX_PENDING) throw new WeftError("ERR_BUSY", "too many forwarded pings in flight; try again");
    const seq = ++this.seq;
    const t0 = this.p.now();
    const r = await new Promise<{ ok: boolean; error?: string }>((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(seq);
        resolve({ ok: false, error: "timeout" });
      }, timeoutMs);
      timer.unref?.();
      this.pending.set(seq, {
        hop,
        done: (x) => {
          clearTimeout(timer);
          this.pending.delete(seq);
          resolve(x);
        },
      });
      if (!this.p.sendApp(hop, CH, { t: "req", seq, target, hops: hops - 1 })) this.pending.get(seq)!.done({ ok: false, error: `cannot send to the next hop ${hop}` });
    });
    if (r.ok) return this.p.now() - t0;
    if (r.error === "timeout") throw new WeftError("ERR_TIMEOUT", `no reply from ${target} via ${hop} within ${timeoutMs} ms`);
    throw new WeftError("ERR_NOT_CONNECTED", `${target} not reached via ${hop}: ${r.error}`);
  }

  private async onMessage(from: string, body: unknown): Promise<void> {
    if (!body || typeof body !== "object") return;
    const b = body as { t?: unknown; seq?: unknown; target?: unknown; hops?: unknown; ok?: unknown; error?: unknown };
    if (typeof b.seq !== "number") return;
    if (b.t === "res") {
      const w = this.pending.get(b.seq);
      if (w && w.hop === from) w.done({ ok: b.ok === true, ...(typeof b.error === "string" ? { error: b.error.slice(0, 200) } : {}) });
      return;
    }
    if (b.t !== "req" || typeof b.target !== "string" || typeof b.hops !== "number") return;
    const answer = (ok: boolean, error?: string) => this.p.sendApp(from, CH, { t: "res", seq: b.seq, ok, ...(error ? { error } : {}) });
    if (this.forwarding >= MAX_FORWARDING) return void answer(false, "busy");
    this.forwarding++;
    try {
      const target = b.target;
      if (this.p.connected(target)) {
        await this.p.ping(target, 3000);
        answer(true);
        return;
      }
      const next = this.p.nextHop(target);
      if (b.hops <= 0 || next === undefined || next === from || next === target) return void answer(false, `no route from ${this.p.selfId}`);
      await this.via(target, next, 3000, b.hops);
      answer(true);
    } catch (e) {
      answer(false, (e as Error).message.slice(0, 200));
    } finally {
      this.forwarding--;
    }
  }
}
