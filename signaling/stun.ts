/**
 * STUN Binding responder on UDP (RFC 5389 subset, codec in src/wire/stun.ts): answers each valid
 * Binding request with the sender's address as XOR-MAPPED-ADDRESS. Everything else is dropped and
 * counted; nothing a datagram contains can throw out of the handler. The signaling server and agents
 * started with `--stun-port` (agent/stun-server.ts) run this same responder.
 *
 * Not an amplifier: UDP sources can be spoofed, so an answer must not be worth more to an attacker than
 * the request it cost.
 *   - one datagram out per valid request, never more; the answer is 32 bytes (IPv4) or 44 (IPv6), 40 /
 *     52 with FINGERPRINT, which it carries only when the request did (a request is at least 20 bytes,
 *     28 with FINGERPRINT): at most 1.6x the bytes for IPv4, 2.2x for IPv6 — no more than a TCP SYN-ACK;
 *   - a token bucket per source address (default 20 answers/s, burst 40) and one for the whole
 *     responder (default 2,000/s, burst 4,000): a spoofed flood toward one victim gets at most the per-
 *     source rate of tiny datagrams, and a flood from rotating sources is capped in total. The table of
 *     sources is bounded (default 16,384, oldest dropped first). Refusals are counted ("rate-limited").
 */
import { createSocket, type Socket } from "node:dgram";
import { isIPv6 } from "node:net";
import { silentLogger, type Logger } from "../src/log.js";
import { encodeBindingSuccess, parseBindingRequest, type StunRejectReason } from "../src/wire/stun.js";

export type StunDropReason = StunRejectReason | "send-failed" | "rate-limited";

export interface StunStats {
  requests: number;
  responses: number;
  dropped: number;
  droppedByReason: Partial<Record<StunDropReason, number>>;
  /** bytes of valid requests answered and of the answers sent: their ratio is the amplification */
  bytesIn: number;
  bytesOut: number;
  /** answered requests per source address (the most recent sources, bounded like the rate table) */
  sources: number;
}

export interface StunLimits {
  /** answers per second per source address (default 20) and the burst (default 2x) */
  perSourceRate: number;
  perSourceBurst: number;
  /** answers per second for the whole responder (default 2,000) and the burst (default 2x) */
  totalRate: number;
  totalBurst: number;
  /** source addresses tracked (default 16,384; the oldest is forgotten first) */
  maxSources: number;
}

export const DEFAULT_STUN_LIMITS: StunLimits = { perSourceRate: 20, perSourceBurst: 40, totalRate: 2000, totalBurst: 4000, maxSources: 16_384 };

export interface StunServer {
  readonly port: number;
  readonly host: string;
  stats(): StunStats;
  /** answered requests from one source address (tests, status) */
  answeredFrom(address: string): number;
  close(): Promise<void>;
}

interface Bucket {
  tokens: number;
  at: number;
  answered: number;
}

/**
 * Token buckets per source and in total. Pure apart from the `now` it is handed (ms, monotonic).
 * take() says whether one more answer to `source` is allowed now.
 */
export class StunRateLimiter {
  private readonly perSource = new Map<string, Bucket>();
  private total: { tokens: number; at: number };
  constructor(
    private readonly l: StunLimits,
    now: number,
  ) {
    this.total = { tokens: l.totalBurst, at: now };
  }

  take(source: string, now: number): boolean {
    const t = this.total;
    t.tokens = Math.min(this.l.totalBurst, t.tokens + ((now - t.at) * this.l.totalRate) / 1000);
    t.at = now;
    let b = this.perSource.get(source);
    if (b === undefined) {
      if (this.perSource.size >= this.l.maxSources) {
        const oldest = this.perSource.keys().next().value;
        if (oldest !== undefined) this.perSource.delete(oldest);
      }
      b = { tokens: this.l.perSourceBurst, at: now, answered: 0 };
    } else {
      this.perSource.delete(source); // re-insert: Map order = least recently seen first
      b.tokens = Math.min(this.l.perSourceBurst, b.tokens + ((now - b.at) * this.l.perSourceRate) / 1000);
      b.at = now;
    }
    this.perSource.set(source, b);
    if (b.tokens < 1 || t.tokens < 1) return false;
    b.tokens -= 1;
    t.tokens -= 1;
    b.answered++;
    return true;
  }

  answered(source: string): number {
    return this.perSource.get(source)?.answered ?? 0;
  }

  get sources(): number {
    return this.perSource.size;
  }
}

/** Bind a responder on host:port (port 0 = any free port; the bound port is returned). */
export async function startStunServer(opts: { host: string; port: number; logger?: Logger; limits?: Partial<StunLimits> }): Promise<StunServer> {
  const log = opts.logger ?? silentLogger;
  const ipv6 = isIPv6(opts.host) || opts.host === "::";
  const sock: Socket = createSocket({ type: ipv6 ? "udp6" : "udp4", reuseAddr: false });
  const st = { requests: 0, responses: 0, dropped: 0, droppedByReason: {} as Partial<Record<StunDropReason, number>>, bytesIn: 0, bytesOut: 0 };
  const limiter = new StunRateLimiter({ ...DEFAULT_STUN_LIMITS, ...(opts.limits ?? {}) }, performance.now());
  let loggedDrop = false;
  const drop = (reason: StunDropReason, from: string) => {
    st.dropped++;
    st.droppedByReason[reason] = (st.droppedByReason[reason] ?? 0) + 1;
    if (!loggedDrop) {
      loggedDrop = true;
      log.debug("dropping a STUN datagram (further drops are only counted)", { reason, from });
    }
  };

  sock.on("message", (msg, rinfo) => {
    try {
      const req = parseBindingRequest(msg);
      if (!req.ok) return drop(req.reason, rinfo.address);
      if (!limiter.take(rinfo.address, performance.now())) return drop("rate-limited", rinfo.address);
      st.requests++;
      const res = encodeBindingSuccess(req.value.transactionId, { family: rinfo.family === "IPv6" ? "IPv6" : "IPv4", address: rinfo.address, port: rinfo.port }, { fingerprint: req.value.fingerprint });
      st.bytesIn += msg.byteLength;
      sock.send(res, rinfo.port, rinfo.address, (err) => {
        if (err) drop("send-failed", rinfo.address);
        else {
          st.responses++;
          st.bytesOut += res.byteLength;
        }
      });
    } catch (e) {
      drop("send-failed", rinfo.address);
      log.debug("stun reply failed", { err: e, from: rinfo.address });
    }
  });

  await new Promise<void>((resolve, reject) => {
    const onErr = (e: Error) => {
      try {
        sock.close();
      } catch {
        // never bound: nothing to close
      }
      reject(e);
    };
    sock.once("error", onErr);
    sock.bind(opts.port, opts.host, () => {
      sock.off("error", onErr);
      resolve();
    });
  });
  sock.on("error", (e) => log.warn("stun socket error", { err: e }));
  const port = sock.address().port;
  let closed: Promise<void> | undefined;
  return {
    port,
    host: opts.host,
    stats: () => ({ ...st, droppedByReason: { ...st.droppedByReason }, sources: limiter.sources }),
    answeredFrom: (address) => limiter.answered(address),
    close: () => (closed ??= new Promise<void>((resolve) => sock.close(() => resolve()))),
  };
}
