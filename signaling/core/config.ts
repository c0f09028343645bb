/**
 * Server configuration from environment variables, for the entry points that have no CLI (the
 * Cloudflare Worker's secrets and vars, `deno run`, `bun run`). Runtime-neutral.
 *
 *   WEFTNET_TOKEN            cluster token (a Worker secret); only its join key is kept
 *   WEFTNET_JOIN_KEY         the join key instead (64 hex), so the server never sees the token
 *   WEFTNET_ALLOW_WEAK_TOKEN "1" accepts a token under 16 characters / ~80 bits (tests)
 *   WEFTNET_ADMIN_TOKEN      credential for /v1/nodes, /v1/stats, /metrics
 *   WEFTNET_HELLO_TIMEOUT_MS, WEFTNET_PROBE_TIMEOUT_MS, WEFTNET_PRESENCE_BATCH_MS
 *   WEFTNET_RELAY            "off" refuses the data relay;  WEFTNET_RELAY_RATE  bytes/s per agent
 *   WEFTNET_MAX_SESSIONS, WEFTNET_MAX_SESSIONS_PER_IP, WEFTNET_RELAY_RATE_PER_IP, WEFTNET_RELAY_RATE_GLOBAL,
 *   WEFTNET_MAX_BUFFERED, WEFTNET_RELAY_MAX_BUFFERED,
 *   WEFTNET_RELAY_CONTROL_RATE, WEFTNET_RELAY_CONTROL_RATE_GLOBAL (relay links' control channel, bytes/s)
 */
import { WeftError } from "../../src/errors.js";
import { deriveJoinKey, tokenWeakness } from "./crypto.js";
import type { SignalHubOptions, SignalLimits } from "./hub.js";

export type Env = Record<string, string | undefined>;

function num(env: Env, k: string): number | undefined {
  const v = env[k];
  if (v === undefined || v === "") return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new WeftError("ERR_USAGE", `${k} must be a non-negative number, got ${JSON.stringify(v)}`);
  return n;
}

/** The join key from WEFTNET_JOIN_KEY or WEFTNET_TOKEN (refusing a weak token unless allowed). */
export async function joinKeyFromEnv(env: Env): Promise<string> {
  const jk = env.WEFTNET_JOIN_KEY?.trim();
  if (jk) {
    if (!/^[0-9a-f]{64}$/.test(jk)) throw new WeftError("ERR_USAGE", "WEFTNET_JOIN_KEY must be 64 lowercase hex characters");
    return jk;
  }
  const token = env.WEFTNET_TOKEN?.trim();
  if (!token) throw new WeftError("ERR_USAGE", "set the cluster token (secret WEFTNET_TOKEN) or its join key (WEFTNET_JOIN_KEY)");
  const weak = tokenWeakness(token);
  if (weak !== undefined && env.WEFTNET_ALLOW_WEAK_TOKEN !== "1") throw new WeftError("ERR_USAGE", `weak cluster token: ${weak}`);
  return deriveJoinKey(token);
}

/** Hub and app options (without the join key) from the environment. */
export function hubOptionsFromEnv(env: Env): Omit<SignalHubOptions, "joinKey"> & { adminToken?: string } {
  const o: Omit<SignalHubOptions, "joinKey"> & { adminToken?: string } = {};
  const hello = num(env, "WEFTNET_HELLO_TIMEOUT_MS");
  if (hello !== undefined) o.helloTimeoutMs = hello;
  const probe = num(env, "WEFTNET_PROBE_TIMEOUT_MS");
  if (probe !== undefined) o.probeTimeoutMs = probe;
  o.presenceBatchMs = num(env, "WEFTNET_PRESENCE_BATCH_MS") ?? 20;
  const rate = num(env, "WEFTNET_RELAY_RATE");
  if (env.WEFTNET_RELAY === "off") o.relay = { enabled: false };
  else if (rate !== undefined) o.relay = { rateBytesPerSec: rate };
  const limits: Partial<SignalLimits> = {};
  const map: [string, keyof SignalLimits][] = [
    ["WEFTNET_MAX_SESSIONS", "maxSessions"],
    ["WEFTNET_MAX_SESSIONS_PER_IP", "maxSessionsPerIp"],
    ["WEFTNET_MAX_BUFFERED", "maxBufferedBytes"],
    ["WEFTNET_RELAY_MAX_BUFFERED", "relayMaxBufferedBytes"],
    ["WEFTNET_RELAY_RATE_PER_IP", "relayRatePerIp"],
    ["WEFTNET_RELAY_RATE_GLOBAL", "relayRateGlobal"],
    ["WEFTNET_RELAY_CONTROL_RATE", "relayControlRate"],
    ["WEFTNET_RELAY_CONTROL_RATE_GLOBAL", "relayControlRateGlobal"],
  ];
  for (const [k, key] of map) {
    const v = num(env, k);
    if (v !== undefined) limits[key] = v;
  }
  if (Object.keys(limits).length) o.limits = limits;
  const admin = env.WEFTNET_ADMIN_TOKEN?.trim();
  if (admin) o.adminToken = admin;
  return o;
}
