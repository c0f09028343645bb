/**
 * Viewer invites: a short-lived, read-only admission to the live topology page, signed by the signaling
 * server's invite key (an Ed25519 key of its own: `weftnet signal --invite-key-file F`, minted with
 * `weftnet invite --invite-key-file F`). Runtime-neutral: format and checks only; the signature is
 * verified by the caller (src/identity.ts verifyFields on agents, the WebCrypto port in signaling/core).
 *
 *   wv1.<payload>.<sig>     payload = base64url(JSON {exp, n}), sig = base64url(Ed25519 over
 *                           frame(INVITE_CTX, payload)) — frame() of src/identity.ts
 *     exp  expiry, ms since the epoch      n  16 random hex chars (tells invites apart in logs)
 *
 * What an invite grants: the bearer may open viewer links (agent/ui/viewer.ts): receive topology and
 * link stats, ping nodes. Never mesh membership: no signaling hello, no gossip, no packets. Agents honour
 * invites only when their operator pinned the server's invite public key (`--ui-invite-key`), only
 * before `exp`, and never one that claims to live longer than MAX_INVITE_TTL_MS from now.
 */
import { ProtocolError } from "../errors.js";

export const INVITE_CTX = "weftnet/viewer-invite/v1";
export const INVITE_PREFIX = "wv1.";
/** an invite valid for longer than this (from the checker's now) is refused, whoever signed it */
export const MAX_INVITE_TTL_MS = 24 * 3600_000;

export interface ParsedInvite {
  /** the signed part, as it appears in the invite */
  payload: string;
  exp: number;
  n: string;
  sig: Uint8Array;
}

const B64URL = /^[A-Za-z0-9_-]+$/;

export function b64urlEncode(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += String.fromCharCode(x);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

export function b64urlDecode(s: string): Uint8Array {
  if (!B64URL.test(s)) throw new ProtocolError("ERR_INVALID", "not base64url");
  const bin = atob(s.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((s.length + 3) % 4));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** The payload to sign for an invite expiring at `exp` (`n`: 8 random bytes as hex). */
export function invitePayload(exp: number, n: string): string {
  return b64urlEncode(new TextEncoder().encode(JSON.stringify({ exp, n })));
}

export function formatInvite(payload: string, sig: Uint8Array): string {
  return `${INVITE_PREFIX}${payload}.${b64urlEncode(sig)}`;
}

/** Parse (not verify) an invite; throws ProtocolError ERR_INVALID for anything malformed. */
export function parseInvite(invite: unknown): ParsedInvite {
  if (typeof invite !== "string" || invite.length > 512 || !invite.startsWith(INVITE_PREFIX)) throw new ProtocolError("ERR_INVALID", "not a weftnet viewer invite (wv1.…)");
  const parts = invite.slice(INVITE_PREFIX.length).split(".");
  if (parts.length !== 2) throw new ProtocolError("ERR_INVALID", "a viewer invite has two parts after wv1.");
  const [payload, sigText] = parts as [string, string];
  const sig = b64urlDecode(sigText);
  if (sig.byteLength !== 64) throw new ProtocolError("ERR_INVALID", "the invite's signature is not 64 bytes");
  let body: unknown;
  try {
    body = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(b64urlDecode(payload)));
  } catch {
    throw new ProtocolError("ERR_INVALID", "the invite's payload is not JSON");
  }
  const b = body as { exp?: unknown; n?: unknown };
  if (!body || typeof body !== "object" || typeof b.exp !== "number" || !Number.isSafeInteger(b.exp) || typeof b.n !== "string" || !/^[0-9a-f]{16}$/.test(b.n)) {
    throw new ProtocolError("ERR_INVALID", "the invite's payload needs exp (ms) and n (16 hex)");
  }
  return { payload, exp: b.exp, n: b.n, sig };
}

/** Why an invite is not valid at `now` (ms), or undefined when its lifetime is fine. */
export function inviteTimeProblem(inv: ParsedInvite, now: number): string | undefined {
  if (inv.exp <= now) return `the invite expired ${Math.round((now - inv.exp) / 1000)} s ago`;
  if (inv.exp - now > MAX_INVITE_TTL_MS) return `the invite claims to be valid for more than ${MAX_INVITE_TTL_MS / 3600_000} h`;
  return undefined;
}
