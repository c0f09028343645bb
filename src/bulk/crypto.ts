/**
 * Cryptography of the bulk link, behind small ports so the hot path can later move to a faster
 * implementation (a batched FFI cipher in agent/) without touching the protocol code.
 *
 *   Aead: AES-256-GCM (default: AES-NI makes it the fastest AEAD in OpenSSL on x86) or ChaCha20-Poly1305,
 *         96-bit nonce = 4 zero bytes | 64-bit little-endian counter (WireGuard's layout), 16-byte tag.
 *   Key agreement: X25519 ephemeral keys per handshake (handshake.ts), HKDF-SHA256 into one key per
 *         direction.
 *
 * node:crypto is the one Node built-in src/ may use (src/identity.ts does too): it is pure computation.
 */
import { createCipheriv, createDecipheriv, createPublicKey, diffieHellman, generateKeyPairSync, hkdfSync, randomBytes, type KeyObject } from "node:crypto";
import { frame } from "../identity.js";

export type AeadAlgorithm = "aes-256-gcm" | "chacha20-poly1305";
export const TAG_LEN = 16;
export const KEY_LEN = 32;

/** One direction's key; an implementation may keep its expanded key schedule in `impl`. */
export interface AeadKey {
  readonly algorithm: AeadAlgorithm;
  readonly raw: Uint8Array;
  impl?: unknown;
}

export interface Aead {
  readonly name: string;
  /**
   * Seal in place: buf[off, off+16) is the datagram header (the associated data), the plaintext is
   * buf[off+16, off+16+len); it is replaced by the ciphertext and the 16-byte tag follows it. Returns len + 16.
   */
  seal(key: AeadKey, counter: number, buf: Uint8Array, off: number, len: number): number;
  /**
   * Open datagram `d` = header(16) | ciphertext | tag(16): the plaintext (a new buffer, or a view of `d`
   * decrypted in place: valid as long as `d`), or undefined when it does not authenticate.
   */
  open(key: AeadKey, counter: number, d: Uint8Array): Uint8Array | undefined;
}

const HDR = 16;

function nonceFor(buf: Buffer, counter: number): Buffer {
  buf.writeUInt32LE(0, 0);
  buf.writeUInt32LE(counter >>> 0, 4);
  buf.writeUInt32LE(Math.floor(counter / 0x1_0000_0000) >>> 0, 8);
  return buf;
}

/** The Aead over Node's crypto (OpenSSL): one cipher object per datagram, which is Node's API and its cost. */
export function nodeAead(): Aead {
  const nonce = Buffer.alloc(12);
  return {
    name: "node:crypto",
    seal(key, counter, buf, off, len) {
      const c = createCipheriv(key.algorithm as "aes-256-gcm", key.raw, nonceFor(nonce, counter), { authTagLength: TAG_LEN });
      c.setAAD(buf.subarray(off, off + HDR), { plaintextLength: len });
      const p = off + HDR;
      const ct = c.update(buf.subarray(p, p + len));
      buf.set(ct, p);
      const fin = c.final();
      if (fin.length) buf.set(fin, p + ct.length);
      buf.set(c.getAuthTag(), p + len);
      return len + TAG_LEN;
    },
    open(key, counter, d) {
      if (d.byteLength < HDR + TAG_LEN) return undefined;
      try {
        const dc = createDecipheriv(key.algorithm as "aes-256-gcm", key.raw, nonceFor(nonce, counter), { authTagLength: TAG_LEN });
        const body = d.subarray(HDR, d.byteLength - TAG_LEN);
        dc.setAAD(d.subarray(0, HDR), { plaintextLength: body.byteLength });
        dc.setAuthTag(d.subarray(d.byteLength - TAG_LEN));
        const a = dc.update(body);
        const b = dc.final();
        return b.length ? Buffer.concat([a, b]) : a;
      } catch {
        return undefined;
      }
    },
  };
}

// ---- key agreement ------------------------------------------------------------------------------------

const X25519_SPKI_PREFIX = Buffer.from("302a300506032b656e032100", "hex");

export interface EphemeralKey {
  readonly pub: Uint8Array; // raw 32 bytes
  readonly priv: KeyObject;
}

export function newEphemeral(): EphemeralKey {
  const kp = generateKeyPairSync("x25519");
  return { priv: kp.privateKey, pub: new Uint8Array(kp.publicKey.export({ type: "spki", format: "der" }).subarray(-32)) };
}

/**
 * Both directions' keys of one handshake: HKDF-SHA256(X25519(e_self, e_peer), salt = SHA-256 of the
 * context label, info = initiator id | responder id | handshake id | e_initiator | e_responder).
 * Throws when the peer's key is not a valid X25519 point (all-zero shared secret included).
 */
export function deriveKeys(
  algorithm: AeadAlgorithm,
  eph: EphemeralKey,
  peerPub: Uint8Array,
  t: { initiator: string; responder: string; hs: number; ePubI: Uint8Array; ePubR: Uint8Array },
): { i2r: AeadKey; r2i: AeadKey } {
  if (peerPub.byteLength !== 32) throw new RangeError("X25519 public key must be 32 bytes");
  const shared = diffieHellman({ privateKey: eph.priv, publicKey: createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, peerPub]), format: "der", type: "spki" }) });
  if (shared.every((b) => b === 0)) throw new RangeError("X25519 shared secret is zero (low-order peer key)");
  const info = frame("weftnet/bulk/keys/v1", t.initiator, t.responder, String(t.hs), t.ePubI, t.ePubR);
  const okm = new Uint8Array(hkdfSync("sha256", shared, "weftnet/bulk/v1", info, 2 * KEY_LEN));
  return { i2r: { algorithm, raw: okm.slice(0, KEY_LEN) }, r2i: { algorithm, raw: okm.slice(KEY_LEN) } };
}

export function randomU32(): number {
  return randomBytes(4).readUInt32LE(0);
}
