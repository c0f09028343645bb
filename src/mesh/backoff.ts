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
