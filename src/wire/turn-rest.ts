/**
 * TURN REST credentials: the shared-secret scheme of draft-uberti-behave-turn-rest-00, which coturn
 * implements with `use-auth-secret` + `static-auth-secret=<secret>`.
 *
 *   username   = "<expiry unix seconds>:<nodeId>"
 *   credential = base64(HMAC-SHA1(secret, username))
 *
 * The TURN server recomputes the credential from the username and its copy of the secret and refuses
 * usernames whose timestamp lies in the past. The signaling server hands each agent its own set in
 * `welcome` (see signal.ts), so agents need no TURN configuration of their own.
 *
 * Pure code apart from node:crypto's HMAC (no sockets).
 */
import { createHmac } from "node:crypto";

export interface TurnCredential {
  username: string;
  credential: string;
  /** expiry, unix seconds */
  expires: number;
}

export interface IceServerCredential {
  urls: string | string[];
  username?: string;
  credential?: string;
}

/** Default lifetime of handed-out credentials: 24 h (agents get fresh ones on every re-registration). */
export const DEFAULT_TURN_TTL_S = 24 * 3600;

/** Usernames may not contain ':' after the timestamp part in our scheme's user field; node ids never do. */
const USER_RE = /^[A-Za-z0-9._-]{1,64}$/;

export function turnRestCredential(secret: string | Uint8Array, user: string, nowMs: number, ttlS: number = DEFAULT_TURN_TTL_S): TurnCredential {
  if ((typeof secret === "string" ? secret.length : secret.byteLength) === 0) throw new TypeError("TURN shared secret must not be empty");
  if (!USER_RE.test(user)) throw new TypeError(`TURN REST user ${JSON.stringify(user)} must be 1-64 of A-Z a-z 0-9 . _ -`);
  if (!Number.isInteger(ttlS) || ttlS <= 0) throw new TypeError("TURN credential ttl must be a positive integer (seconds)");
  const expires = Math.floor(nowMs / 1000) + ttlS;
  const username = `${expires}:${user}`;
  return { username, credential: turnRestPassword(secret, username), expires };
}

/** base64(HMAC-SHA1(secret, username)): what coturn computes for `use-auth-secret`. */
export function turnRestPassword(secret: string | Uint8Array, username: string): string {
  return createHmac("sha1", secret).update(username, "utf8").digest("base64");
}

/** Expiry of a REST username ("<expiry>:<user>"), or undefined when it is not one. */
export function turnRestExpiry(username: string): number | undefined {
  const m = /^(\d{1,12}):/.exec(username);
  return m ? Number(m[1]) : undefined;
}

/** The iceServers entries to hand one node: one entry with every configured turn:/turns: URL. */
export function turnIceServers(urls: readonly string[], secret: string | Uint8Array, nodeId: string, nowMs: number, ttlS: number = DEFAULT_TURN_TTL_S): IceServerCredential[] {
  if (urls.length === 0) return [];
  const c = turnRestCredential(secret, nodeId, nowMs, ttlS);
  return [{ urls: urls.length === 1 ? urls[0]! : [...urls], username: c.username, credential: c.credential }];
}

/** Validate a --turn-url: turn:HOST[:PORT][?transport=udp|tcp] or turns:... */
export function isTurnUrl(url: string): boolean {
  return /^turns?:(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(\?transport=(udp|tcp))?$/.test(url);
}
