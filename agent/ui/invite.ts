/**
 * Viewer invites on Node (format and rules: src/wire/invite.ts): the signaling server's invite key file,
 * minting an invite (`weftnet invite`), and the agents' check (agent/ui/viewer.ts, with the key pinned by
 * `--ui-invite-key`).
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { UsageError } from "../../src/errors.js";
import { generateIdentity, identityFromPem, identityToPem, signFields, verifyFields, type Identity } from "../../src/identity.js";
import { formatInvite, INVITE_CTX, invitePayload, inviteTimeProblem, MAX_INVITE_TTL_MS, parseInvite } from "../../src/wire/invite.js";
import { writeFileAtomic } from "../state.js";

/** The invite key in PEM file `path` (Ed25519, like a node identity); created (mode 0600) when `create` and missing. */
export function loadInviteKey(path: string, create: boolean): { key: Identity; created: boolean } {
  let pem: string | undefined;
  try {
    pem = readFileSync(path, "utf8");
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT" || !create) throw new UsageError(`invite key file ${path}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (e as Error).message}`);
  }
  if (pem !== undefined) {
    try {
      return { key: identityFromPem(pem), created: false };
    } catch (e) {
      throw new UsageError(`invite key file ${path}: ${(e as Error).message}`);
    }
  }
  const key = generateIdentity();
  try {
    writeFileAtomic(path, identityToPem(key), 0o600);
  } catch (e) {
    throw new UsageError(`cannot create the invite key file ${path}: ${(e as Error).message}`);
  }
  return { key, created: true };
}

export const pubHex = (k: Identity): string => Buffer.from(k.publicKey).toString("hex");

/** `--ui-invite-key HEX`: the 32-byte public key as 64 hex characters. */
export function parseInvitePub(flag: string, hex: string): Uint8Array {
  if (!/^[0-9a-f]{64}$/i.test(hex)) throw new UsageError(`${flag} must be the signaling server's invite public key: 64 hex characters (\`weftnet signal --invite-key-file F\` prints it)`);
  return new Uint8Array(Buffer.from(hex, "hex"));
}

/** A viewer invite valid for ttlMs from now. */
export function mintInvite(key: Identity, ttlMs: number, now = Date.now()): { invite: string; exp: number } {
  if (!(ttlMs > 0 && ttlMs <= MAX_INVITE_TTL_MS)) throw new UsageError(`an invite lives from 1 s to ${MAX_INVITE_TTL_MS / 3600_000} h`);
  const exp = now + ttlMs;
  const payload = invitePayload(exp, randomBytes(8).toString("hex"));
  return { invite: formatInvite(payload, signFields(key, INVITE_CTX, payload)), exp };
}

/** Why `invite` does not admit a viewer here (undefined: it does). Never throws. */
export function inviteProblem(invite: unknown, pinned: Uint8Array | undefined, now = Date.now()): string | undefined {
  if (pinned === undefined) return "this agent does not accept viewer invites (no --ui-invite-key)";
  let inv;
  try {
    inv = parseInvite(invite);
  } catch (e) {
    return (e as Error).message;
  }
  if (!verifyFields(pinned, inv.sig, INVITE_CTX, inv.payload)) return "the invite was not signed with the invite key this agent pins";
  return inviteTimeProblem(inv, now);
}
