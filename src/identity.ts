/**
 * Node identity: an Ed25519 key pair per agent. The node id is derived from the public key
 *   id = hex(sha256(raw 32-byte public key))[0..16]
 * so nobody (the signaling server included) can pair an id with another key.
 *
 * Everything we sign is domain-separated: sign(context || 0x00 || field || 0x00 || field ...), so a
 * signature made for one purpose (signaling hello) can never be replayed as another (SDP binding).
 *
 * Token split. The cluster token is never used as a key itself; two keys are derived from it (HKDF-SHA256,
 * see splitToken):
 *   join key   what the signaling server holds: it checks the hello MAC with it and accepts it as the
 *              Bearer credential of its HTTP API. Knowing it lets you register at the server, nothing more.
 *   peer key   never leaves the agents: offer/answer MACs (mesh/auth.ts) and the relay links' key salt use
 *              it. A hostile server (it has the join key) can therefore neither mint nodes that other agents
 *              accept nor sit in the middle of a link: it lacks the peer key and every node's private key.
 * Proofs are HMAC-SHA256(key, same framing as signatures).
 */
import { createHash, createHmac, hkdfSync, createPrivateKey, createPublicKey, generateKeyPairSync, sign, timingSafeEqual, verify, type KeyObject } from "node:crypto";
import { AuthError } from "./errors.js";

export interface Identity {
  readonly id: string;
  readonly publicKey: Uint8Array; // raw 32 bytes
  readonly privateKey: KeyObject;
}

// DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw key is the trailing 32 bytes.
const ED25519_SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

export function deriveNodeId(publicKey: Uint8Array): string {
  if (publicKey.byteLength !== 32) throw new AuthError("ERR_ID_MISMATCH", "public key must be 32 bytes (Ed25519)");
  return createHash("sha256").update(publicKey).digest("hex").slice(0, 16);
}

export function generateIdentity(): Identity {
  const { privateKey } = generateKeyPairSync("ed25519");
  return identityFromPrivateKey(privateKey);
}

export function identityFromPrivateKey(privateKey: KeyObject): Identity {
  const spki = createPublicKey(privateKey).export({ type: "spki", format: "der" });
  const publicKey = new Uint8Array(spki.subarray(spki.length - 32));
  return { id: deriveNodeId(publicKey), publicKey, privateKey };
}

export function identityToPem(idn: Identity): string {
  return idn.privateKey.export({ type: "pkcs8", format: "pem" }).toString();
}

export function identityFromPem(pem: string): Identity {
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch (e) {
    throw new AuthError("ERR_BAD_SIGNATURE", `identity key is not a valid PEM private key: ${(e as Error).message}`);
  }
  if (key.asymmetricKeyType !== "ed25519") throw new AuthError("ERR_BAD_SIGNATURE", "identity key must be Ed25519");
  return identityFromPrivateKey(key);
}

// Gossip verifies many signatures by few keys: keep their KeyObjects (bounded: cleared when full).
const keyCache = new Map<string, KeyObject>();
function publicKeyObject(raw: Uint8Array): KeyObject {
  const k = Buffer.from(raw).toString("base64");
  let o = keyCache.get(k);
  if (!o) {
    o = createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, raw]), format: "der", type: "spki" });
    if (keyCache.size >= 4096) keyCache.clear();
    keyCache.set(k, o);
  }
  return o;
}

/** Domain-separated framing of the signed fields. */
export function frame(context: string, ...fields: (string | Uint8Array)[]): Buffer {
  const parts: Buffer[] = [Buffer.from(context, "utf8")];
  for (const f of fields) {
    const b = typeof f === "string" ? Buffer.from(f, "utf8") : Buffer.from(f);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(b.length);
    parts.push(len, b);
  }
  return Buffer.concat(parts);
}

export function signFields(idn: Identity, context: string, ...fields: (string | Uint8Array)[]): Uint8Array {
  return new Uint8Array(sign(null, frame(context, ...fields), idn.privateKey));
}

export function verifyFields(publicKey: Uint8Array, signature: Uint8Array, context: string, ...fields: (string | Uint8Array)[]): boolean {
  if (publicKey.byteLength !== 32 || signature.byteLength !== 64) return false;
  try {
    return verify(null, frame(context, ...fields), publicKeyObject(publicKey), signature);
  } catch {
    return false;
  }
}

export function tokenMac(token: string, context: string, ...fields: (string | Uint8Array)[]): Uint8Array {
  return new Uint8Array(createHmac("sha256", token).update(frame(context, ...fields)).digest());
}

export function checkTokenMac(token: string, mac: Uint8Array, context: string, ...fields: (string | Uint8Array)[]): boolean {
  const want = tokenMac(token, context, ...fields);
  return mac.byteLength === want.byteLength && timingSafeEqual(mac, want);
}

const SPLIT_SALT = "weftnet/token-split/v1";
const splitCache = new Map<string, { joinKey: string; peerKey: string }>();

/**
 * Derive the join key (for the signaling server) and the peer key (agents only) from the cluster token.
 * Both are 64 lowercase hex chars; neither reveals the token or the other key.
 */
export function splitToken(token: string): { joinKey: string; peerKey: string } {
  let k = splitCache.get(token);
  if (!k) {
    const derive = (info: string) => Buffer.from(hkdfSync("sha256", Buffer.from(token, "utf8"), SPLIT_SALT, info, 32)).toString("hex");
    k = { joinKey: derive("join"), peerKey: derive("peer") };
    if (splitCache.size > 16) splitCache.clear();
    splitCache.set(token, k);
  }
  return k;
}

export function joinKeyOf(token: string): string {
  return splitToken(token).joinKey;
}

export function peerKeyOf(token: string): string {
  return splitToken(token).peerKey;
}

/**
 * Signed records (gossip: topology records, IPAM state). A record says something about its origin node and
 * travels through other nodes, so it carries its own proof: the origin's raw public key (whose hash IS the
 * node id, so no directory is needed) and an Ed25519 signature over (ctx, origin, ...fields). Callers pass
 * the record's canonical content as fields (e.g. one canonical JSON string); a verifier recomputes the same
 * fields from the record it decoded, so any change of content, origin or purpose breaks the signature.
 *
 *   const proof = signRecord(identity, CTX_X, canonical(rec));          // { pub, sig }
 *   verifyRecord(rec.node, proof, CTX_X, canonical(rec))                // true / false, never throws
 */
export interface RecordProof {
  readonly pub: Uint8Array; // 32 bytes
  readonly sig: Uint8Array; // 64 bytes
}

export function signRecord(idn: Identity, context: string, ...fields: (string | Uint8Array)[]): RecordProof {
  return { pub: idn.publicKey, sig: signFields(idn, context, idn.id, ...fields) };
}

/** Does `proof` show that node `origin` (and nobody else) said `fields` for `context`? */
export function verifyRecord(origin: string, proof: { pub?: Uint8Array | undefined; sig?: Uint8Array | undefined }, context: string, ...fields: (string | Uint8Array)[]): boolean {
  const { pub, sig } = proof;
  if (!(pub instanceof Uint8Array) || !(sig instanceof Uint8Array) || pub.byteLength !== 32 || sig.byteLength !== 64) return false;
  let id: string;
  try {
    id = deriveNodeId(pub);
  } catch {
    return false;
  }
  return id === origin && verifyFields(pub, sig, context, origin, ...fields);
}

/** Signing contexts: one per purpose. */
export const CTX_HELLO = "weftnet/hello/v1";
export const CTX_SDP = "weftnet/sdp/v1";
export const CTX_TOPO = "weftnet/topo/v1";
export const CTX_BYE = "weftnet/bye/v1";
export const CTX_LINK = "weftnet/link/v1";

/**
 * The operator key (`weftnet keygen --operator`): an Ed25519 pair held by the cluster's operator, not by any
 * node. Agents are given only its public key (--operator-key: 64 hex chars) and accept a force release of
 * another node's blocks only with its signature (src/ipam/signing.ts CTX_RELEASE), so a compromised node
 * cannot release anyone's addresses.
 */
export function parseOperatorKey(text: string): Uint8Array {
  const t = text.trim();
  if (!/^[0-9a-fA-F]{64}$/.test(t)) throw new AuthError("ERR_BAD_SIGNATURE", "an operator public key is 64 hex characters (the .pub file `weftnet keygen --operator` writes)");
  return new Uint8Array(Buffer.from(t, "hex"));
}

export function publicKeyHex(idn: Identity): string {
  return Buffer.from(idn.publicKey).toString("hex");
}
