/**
 * The signaling core's crypto port and its WebCrypto implementation (Node >= 20, workerd, Deno, Bun).
 *
 * The hub needs three checks per hello: the join-key MAC (HMAC-SHA256), the node id (SHA-256 of the
 * public key) and the Ed25519 signature. A port may answer synchronously or with a promise; WebCrypto
 * always answers with a promise, so the hub keeps a session in "verifying" meanwhile.
 *
 * The framing is src/identity.ts's `frame()`: context utf8, then per field a 4-byte big-endian length and
 * the field's bytes. It is re-implemented here without Buffer so the core runs on every runtime;
 * test/unit/signaling-core.test.ts checks both agree.
 */

export type MaybePromise<T> = T | Promise<T>;

export interface SignalCrypto {
  /** true when mac == HMAC-SHA256(key as utf8, data); constant time */
  verifyHmac(key: string, data: Uint8Array, mac: Uint8Array): MaybePromise<boolean>;
  /** true when sig is a valid Ed25519 signature of data by the 32-byte public key */
  verifyEd25519(publicKey: Uint8Array, data: Uint8Array, sig: Uint8Array): MaybePromise<boolean>;
  sha256(data: Uint8Array): MaybePromise<Uint8Array>;
}

const enc = new TextEncoder();
// The project's TS lib has no DOM types; take WebCrypto's from the global object.
type Subtle = typeof globalThis.crypto.subtle;
type Key = Awaited<ReturnType<Subtle["importKey"]>>;

/** Same bytes as src/identity.ts frame(). */
export function frameFields(context: string, ...fields: (string | Uint8Array)[]): Uint8Array {
  const parts = [enc.encode(context), ...fields.map((f) => (typeof f === "string" ? enc.encode(f) : f))];
  let n = parts[0]!.byteLength;
  for (let i = 1; i < parts.length; i++) n += 4 + parts[i]!.byteLength;
  const out = new Uint8Array(n);
  out.set(parts[0]!, 0);
  let o = parts[0]!.byteLength;
  const dv = new DataView(out.buffer);
  for (let i = 1; i < parts.length; i++) {
    const p = parts[i]!;
    dv.setUint32(o, p.byteLength);
    out.set(p, o + 4);
    o += 4 + p.byteLength;
  }
  return out;
}

export function toHex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}

/** Constant-time equality of two strings (length is folded in, not short-circuited). */
export function constantTimeEqual(a: string, b: string): boolean {
  const x = enc.encode(a);
  const y = enc.encode(b);
  const n = Math.max(x.byteLength, y.byteLength);
  let diff = x.byteLength ^ y.byteLength;
  for (let i = 0; i < n; i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

// TS's DOM-less lib types BufferSource narrowly; our Uint8Arrays are always plain ArrayBuffer views.
// (Uint8Array.prototype.slice copies; Node's Buffer#slice would not.)
const src = (b: Uint8Array): ArrayBuffer => (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength ? b.buffer : Uint8Array.prototype.slice.call(b).buffer) as ArrayBuffer;

/** WebCrypto implementation of the port; HMAC keys are imported once per key string. */
export function webCryptoPort(subtle: Subtle = globalThis.crypto.subtle): SignalCrypto {
  const hmacKeys = new Map<string, Promise<Key>>();
  const hmacKey = (key: string) => {
    let k: Promise<Key> | undefined = hmacKeys.get(key);
    if (k === undefined) {
      k = subtle.importKey("raw", enc.encode(key), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]);
      if (hmacKeys.size > 8) hmacKeys.clear();
      hmacKeys.set(key, k);
    }
    return k;
  };
  return {
    async verifyHmac(key, data, mac) {
      if (mac.byteLength !== 32) return false;
      return subtle.verify("HMAC", await hmacKey(key), src(mac), src(data));
    },
    async verifyEd25519(publicKey, data, sig) {
      if (publicKey.byteLength !== 32 || sig.byteLength !== 64) return false;
      try {
        const k = await subtle.importKey("raw", src(publicKey), { name: "Ed25519" }, false, ["verify"]);
        return await subtle.verify({ name: "Ed25519" }, k, src(sig), src(data));
      } catch {
        return false;
      }
    },
    async sha256(data) {
      return new Uint8Array(await subtle.digest("SHA-256", src(data)));
    },
  };
}

export const JOIN_KEY_SALT = "weftnet/token-split/v1";

/**
 * The join key the signaling server holds, derived from the cluster token:
 * hex(HKDF-SHA256(ikm = utf8(token), salt = JOIN_KEY_SALT, info = "join", 32 bytes)).
 * Same derivation as src/identity.ts splitToken().joinKey.
 */
export async function deriveJoinKey(token: string, subtle: Subtle = globalThis.crypto.subtle): Promise<string> {
  const ikm = await subtle.importKey("raw", enc.encode(token), "HKDF", false, ["deriveBits"]);
  const bits = await subtle.deriveBits({ name: "HKDF", hash: "SHA-256", salt: enc.encode(JOIN_KEY_SALT), info: enc.encode("join") }, ikm, 256);
  return toHex(new Uint8Array(bits));
}

/** 32 random bytes per call by default; the random-bytes port. */
export function webRandom(n: number): Uint8Array {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

/** Shortest cluster token the servers accept without --allow-weak-token. */
export const MIN_TOKEN_CHARS = 16;
/** Least estimated entropy (length x log2 of the character classes used) of an accepted token. */
export const MIN_TOKEN_BITS = 80;

/**
 * Why a token is too weak to guard a cluster, or undefined when it is acceptable: at least
 * MIN_TOKEN_CHARS characters, 8 distinct ones, and MIN_TOKEN_BITS by a character-class estimate
 * (lower 26, upper 26, digits 10, anything else 33). A generated token (32 chars of nanoid) has ~190.
 */
export function tokenWeakness(token: string): string | undefined {
  if (token.length < MIN_TOKEN_CHARS) return `the token has ${token.length} characters; at least ${MIN_TOKEN_CHARS} are required`;
  if (new Set(token).size < 8) return "the token repeats too few distinct characters (at least 8 needed)";
  let pool = 0;
  if (/[a-z]/.test(token)) pool += 26;
  if (/[A-Z]/.test(token)) pool += 26;
  if (/[0-9]/.test(token)) pool += 10;
  if (/[^a-zA-Z0-9]/.test(token)) pool += 33;
  const bits = Math.floor(token.length * Math.log2(pool));
  if (bits < MIN_TOKEN_BITS) return `the token has about ${bits} bits of entropy; at least ${MIN_TOKEN_BITS} are required (use a longer or more varied token)`;
  return undefined;
}
