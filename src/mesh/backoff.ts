/**
 * Exponential backoff with full jitter (AWS architecture blog's "full jitter"): delay for attempt n is
 * uniform in [min, min(max, base * 2^n)]. Pure: the random source is injected.
 */
export interface BackoffConfig {
  baseMs: number;
  maxMs: number;
  /** lower bound so a flapping peer is never hammered */
  minMs: number;
}

export const DEFAULT_BACKOFF: BackoffConfig = { baseMs: 500, maxMs: 30_000, minMs: 200 };

export function backoffDelay(attempt: number, cfg: BackoffConfig = DEFAULT_BACKOFF, random: () => number = Math.random): number {
  const n = Math.max(0, Math.min(attempt, 30));
  const cap = Math.min(cfg.maxMs, cfg.baseMs * 2 ** n);
  const hi = Math.max(cfg.minMs, cap);
  return Math.round(cfg.minMs + random() * (hi - cfg.minMs));
}

/**
 * A path that carried a link a moment ago usually comes back soon (an uplink that flapped, a firewall
 * reload, a blocked port that is unblocked): for `windowMs` after a link to the peer was last up, retries
 * wait at most `maxMs`, so a healed path is in use again within seconds. A pair that never had a link,
 * or lost it long ago (symmetric NAT, a peer that moved), backs off fully.
 */
export interface RecentPathConfig {
  windowMs: number;
  maxMs: number;
}

export const RECENT_PATH: RecentPathConfig = { windowMs: 600_000, maxMs: 5_000 };

/** `cfg` with its cap lowered to `recent.maxMs` while a link was up less than `recent.windowMs` ago. */
export function recentPathBackoff(cfg: BackoffConfig, lastUpAt: number | undefined, now: number, recent: RecentPathConfig = RECENT_PATH): BackoffConfig {
  if (lastUpAt === undefined || now - lastUpAt >= recent.windowMs || cfg.maxMs <= recent.maxMs) return cfg;
  return { ...cfg, maxMs: recent.maxMs, minMs: Math.min(cfg.minMs, recent.maxMs) };
}

/** Retries of a relayed link's upgrade to a direct one (MeshManager's probes). */
export interface ProbeBackoffConfig {
  firstMs: number;
  maxMs: number;
}

export const PROBE_BACKOFF: ProbeBackoffConfig = { firstMs: 5_000, maxMs: 300_000 };

/**
 * Delay before the next upgrade probe after `failed` probes in a row: firstMs * 2^failed, capped at
 * maxMs — or at RECENT_PATH.maxMs while a link to the peer was up less than RECENT_PATH.windowMs ago
 * (`lastUpAt`) — with ±25% jitter.
 */
export function probeDelay(
  failed: number,
  lastUpAt: number | undefined,
  now: number,
  cfg: ProbeBackoffConfig = PROBE_BACKOFF,
  random: () => number = Math.random,
  recent: RecentPathConfig = RECENT_PATH,
): number {
  const recentlyUp = lastUpAt !== undefined && now - lastUpAt < recent.windowMs;
  const cap = recentlyUp ? Math.min(cfg.maxMs, recent.maxMs) : cfg.maxMs;
  const d = Math.min(cap, cfg.firstMs * 2 ** Math.max(0, Math.min(failed, 30)));
  return Math.round(d * (0.75 + random() * 0.5));
}
