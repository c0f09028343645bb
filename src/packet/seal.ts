/**
 * End-to-end sealing of frames that travel through a transit node (multi-hop routing).
 *
 * A frame on a direct link is protected by the link (DTLS / the bulk link's AEAD) and its source node is
 * the link peer. A frame relayed by a transit node would otherwise be readable and forgeable by it: the
 * transit could alter the packets or claim any source node. So the source seals such frames for the
 * destination with a pairwise key only the two of them hold, and the destination accepts a frame whose
 * source node is not the link peer only when it opens with that source's key.
 *
 * Pairwise keys come from the node identities themselves (no extra handshake, no extra gossip): each
 * node's Ed25519 key is converted to X25519 (the standard birational map, as libsodium's
 * crypto_sign_ed25519_{sk,pk}_to_curve25519), and
 *   shared      = X25519(our converted private key, their converted public key)
 *   key(a -> b) = HKDF-SHA256(shared, salt "weftnet/e2e/v1", info "a|b", 32)    one key per direction
 * Their public key comes from their signed topology record (its hash is their node id).
 *
 * Sealed frame (flags bit FLAG_SEALED in byte 0; the fixed header stays in clear for transit forwarding):
 *   0   1  version | flags (FLAG_SEALED)
 *   1   1  ttl (decremented by transits: not authenticated)
 *   2   8  source node    10  8  destination node
 *   18  8  counter (u64 big-endian, strictly unique per direction: starts at the sender's clock x 1024)
 *   26  n  ChaCha20-Poly1305(key(src -> dst), nonce = 0x00000000 | counter, aad = bytes 0, 2..26) of the
 *          frame's records
 *   end 16 tag
 * The receiver keeps a sliding window of COUNTER_WINDOW counters per source (the packets channel is
 * unordered): a replayed or too old counter is dropped (`replayed`), a frame that does not open is
 * dropped (`bad-seal`). The sender restarting starts at a higher counter (its clock), so windows need no
 * reset handshake.
 */
import { createCipheriv, createDecipheriv, createHash, createPrivateKey, createPublicKey, diffieHellman, hkdfSync, type KeyObject } from "node:crypto";
import type { Identity } from "../identity.js";
import { FRAME_HEADER_LEN } from "./frame.js";

export const FLAG_SEALED = 0x01;
export const SEAL_COUNTER_LEN = 8;
export const SEAL_TAG_LEN = 16;
export const SEAL_OVERHEAD = SEAL_COUNTER_LEN + SEAL_TAG_LEN;
export const COUNTER_WINDOW = 4096;

const P = (1n << 255n) - 19n;
const X25519_SPKI_PREFIX = Buffer.from("302a300506032b656e032100", "hex");
const X25519_PKCS8_PREFIX = Buffer.from("302e020100300506032b656e04220420", "hex");

function modPow(b: bigint, e: bigint): bigint {
  let r = 1n;
  b %= P;
  while (e > 0n) {
    if (e & 1n) r = (r * b) % P;
    b = (b * b) % P;
    e >>= 1n;
  }
  return r;
}

/** Ed25519 public key (32 bytes) -> X25519 public key: u = (1 + y) / (1 - y) mod p. */
export function ed25519PubToX25519(pub: Uint8Array): Uint8Array {
  if (pub.byteLength !== 32) throw new RangeError("Ed25519 public key must be 32 bytes");
  let y = 0n;
  for (let i = 31; i >= 0; i--) y = (y << 8n) | BigInt(pub[i]!);
  y &= (1n << 255n) - 1n;
  const den = (1n - y + P) % P;
  if (den === 0n) throw new RangeError("Ed25519 public key has no X25519 form");
  let u = ((1n + y) * modPow(den, P - 2n)) % P;
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i++) {
    out[i] = Number(u & 0xffn);
    u >>= 8n;
  }
  return out;
}

/** Ed25519 private key -> X25519 private key (SHA-512 of the seed, first half; X25519 clamps it). */
export function ed25519PrivToX25519(idn: Identity): KeyObject {
  const der = idn.privateKey.export({ type: "pkcs8", format: "der" });
  const seed = der.subarray(der.length - 32);
  const scalar = createHash("sha512").update(seed).digest().subarray(0, 32);
  return createPrivateKey({ key: Buffer.concat([X25519_PKCS8_PREFIX, scalar]), format: "der", type: "pkcs8" });
}

/** Sliding replay window over u64 counters held as Numbers (< 2^53). */
class ReplayWindow {
  private top = -1;
  private readonly bits = new Uint32Array(COUNTER_WINDOW / 32);
  /** true (and recorded) when `c` is new and not older than the window */
  accept(c: number): boolean {
    if (c > this.top) {
      const shift = c - this.top;
      if (shift >= COUNTER_WINDOW) this.bits.fill(0);
      else for (let i = this.top + 1; i <= c; i++) this.clear(i);
      this.top = c;
      this.set(c);
      return true;
    }
    if (this.top - c >= COUNTER_WINDOW) return false;
    if (this.has(c)) return false;
    this.set(c);
    return true;
  }
  private idx(c: number): [number, number] {
    const i = c % COUNTER_WINDOW;
    return [i >>> 5, 1 << (i & 31)];
  }
  private has(c: number): boolean {
    const [w, m] = this.idx(c);
    return (this.bits[w]! & m) !== 0;
  }
  private set(c: number): void {
    const [w, m] = this.idx(c);
    this.bits[w]! |= m;
  }
  private clear(c: number): void {
    const [w, m] = this.idx(c);
    this.bits[w]! &= ~m;
  }
}

export type OpenResult = { ok: true; frame: Uint8Array } | { ok: false; reason: "bad-seal" | "replayed" };

/**
 * ChaCha20-Poly1305 (IETF, RFC 8439) with a detached 16-byte tag: the sealer's one primitive, as a port.
 * The default is node:crypto (one cipher object per frame: ~14 us for a 1.4 KB frame here); the agent
 * passes libsodium's through FFI (agent/os/sodium.ts: one call, no allocation), which matters once transit
 * frames are one packet each (the bulk link carries them whole, one per datagram).
 */
export interface ChaChaPort {
  readonly name: string;
  /** Encrypt `msg` into `out` (same length; may be the same memory) and write the tag into `tag`. */
  encrypt(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, msg: Uint8Array, out: Uint8Array, tag: Uint8Array): void;
  /** Decrypt `ct` into `out` (same length); false when it does not authenticate (`out` is then garbage). */
  decrypt(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, ct: Uint8Array, tag: Uint8Array, out: Uint8Array): boolean;
}

/** ChaChaPort over node:crypto. */
export function nodeChaCha(): ChaChaPort {
  return {
    name: "node:crypto",
    encrypt(key, nonce, aad, msg, out, tag) {
      const ci = createCipheriv("chacha20-poly1305", key, nonce, { authTagLength: SEAL_TAG_LEN });
      ci.setAAD(aad, { plaintextLength: msg.length });
      let n = 0;
      const a = ci.update(msg);
      out.set(a, 0);
      n += a.length;
      const b = ci.final();
      if (b.length) out.set(b, n);
      tag.set(ci.getAuthTag());
    },
    decrypt(key, nonce, aad, ct, tag, out) {
      try {
        const de = createDecipheriv("chacha20-poly1305", key, nonce, { authTagLength: SEAL_TAG_LEN });
        de.setAAD(aad, { plaintextLength: ct.length });
        de.setAuthTag(tag);
        const a = de.update(ct);
        out.set(a, 0);
        const b = de.final();
        if (b.length) out.set(b, a.length);
        return true;
      } catch {
        return false;
      }
    },
  };
}

export interface SealerOptions {
  identity: Identity;
  /** the Ed25519 public key of a node (from its signed topology record), undefined when unknown */
  publicKeyOf(node: string): Uint8Array | undefined;
  /** wall clock in ms: the first counter of this run */
  now: () => number;
  /** the AEAD (default nodeChaCha()) */
  cipher?: ChaChaPort;
}

/** Seals frames for, and opens frames from, nodes reached through transit nodes. */
export class FrameSealer {
  private readonly priv: KeyObject;
  private readonly keys = new Map<string, { pub: Uint8Array; ref: Uint8Array; tx: Buffer; rx: Buffer }>();
  private readonly cipher: ChaChaPort;
  private readonly windows = new Map<string, ReplayWindow>();
  private counter: number;
  private readonly nonce = Buffer.alloc(12);
  private readonly aad = Buffer.alloc(1 + 8 + 8 + SEAL_COUNTER_LEN);

  constructor(private readonly o: SealerOptions) {
    this.priv = ed25519PrivToX25519(o.identity);
    this.cipher = o.cipher ?? nodeChaCha();
    this.counter = Math.floor(o.now()) * 1024;
  }

  private pair(node: string): { tx: Buffer; rx: Buffer } | undefined {
    const pub = this.o.publicKeyOf(node);
    if (!pub || pub.byteLength !== 32) return undefined;
    const k = this.keys.get(node);
    // (the same key object as last time: no compare; per frame, so no allocation either)
    if (k && (k.ref === pub || sameBytes(k.pub, pub))) {
      k.ref = pub;
      return k;
    }
    let shared: Buffer;
    try {
      const peer = createPublicKey({ key: Buffer.concat([X25519_SPKI_PREFIX, ed25519PubToX25519(pub)]), format: "der", type: "spki" });
      shared = diffieHellman({ privateKey: this.priv, publicKey: peer });
    } catch {
      return undefined;
    }
    const self = this.o.identity.id;
    const derive = (a: string, b: string) => Buffer.from(hkdfSync("sha256", shared, "weftnet/e2e/v1", `${a}|${b}`, 32));
    const entry = { pub: new Uint8Array(pub), ref: pub, tx: derive(self, node), rx: derive(node, self) };
    if (this.keys.size > 4096) this.keys.clear();
    this.keys.set(node, entry);
    return entry;
  }

  /** A plain frame (header + records) for `dst` -> a new sealed frame, or undefined without a key for dst. */
  seal(dst: string, frame: Uint8Array): Uint8Array | undefined {
    const k = this.pair(dst);
    if (!k) return undefined;
    const c = ++this.counter;
    const out = new Uint8Array(frame.length + SEAL_OVERHEAD);
    out.set(frame.subarray(0, FRAME_HEADER_LEN), 0);
    out[0] = out[0]! | FLAG_SEALED;
    writeCounter(out, FRAME_HEADER_LEN, c);
    this.setNonceAad(out, c);
    const body = FRAME_HEADER_LEN + SEAL_COUNTER_LEN;
    const n = frame.length - FRAME_HEADER_LEN;
    this.cipher.encrypt(k.tx, this.nonce, this.aad, frame.subarray(FRAME_HEADER_LEN), out.subarray(body, body + n), out.subarray(body + n));
    return out;
  }

  /** A sealed frame from `src` -> the plain frame (header without the flag + records). */
  open(src: string, msg: Uint8Array): OpenResult {
    if (msg.length < FRAME_HEADER_LEN + SEAL_OVERHEAD) return { ok: false, reason: "bad-seal" };
    const k = this.pair(src);
    if (!k) return { ok: false, reason: "bad-seal" };
    const c = readCounter(msg, FRAME_HEADER_LEN);
    this.setNonceAad(msg, c);
    const body = FRAME_HEADER_LEN + SEAL_COUNTER_LEN;
    const ctLen = msg.length - body - SEAL_TAG_LEN;
    const out = new Uint8Array(FRAME_HEADER_LEN + ctLen);
    out.set(msg.subarray(0, FRAME_HEADER_LEN), 0);
    out[0] = out[0]! & ~FLAG_SEALED;
    if (!this.cipher.decrypt(k.rx, this.nonce, this.aad, msg.subarray(body, body + ctLen), msg.subarray(msg.length - SEAL_TAG_LEN), out.subarray(FRAME_HEADER_LEN))) {
      return { ok: false, reason: "bad-seal" };
    }
    let w = this.windows.get(src);
    if (!w) {
      if (this.windows.size > 4096) this.windows.clear();
      this.windows.set(src, (w = new ReplayWindow()));
    }
    if (!w.accept(c)) return { ok: false, reason: "replayed" };
    return { ok: true, frame: out };
  }

  /** nonce = 0^4 | counter; aad = version/flags byte, src, dst, counter (not the ttl: transits change it) */
  private setNonceAad(msg: Uint8Array, c: number): void {
    this.nonce.fill(0, 0, 4);
    writeCounter(this.nonce, 4, c);
    this.aad[0] = msg[0]! | FLAG_SEALED;
    this.aad.set(msg.subarray(2, FRAME_HEADER_LEN), 1);
    writeCounter(this.aad, 17, c);
  }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function writeCounter(b: Uint8Array, off: number, c: number): void {
  const hi = Math.floor(c / 2 ** 32);
  const lo = c >>> 0;
  b[off] = hi >>> 24;
  b[off + 1] = (hi >>> 16) & 255;
  b[off + 2] = (hi >>> 8) & 255;
  b[off + 3] = hi & 255;
  b[off + 4] = lo >>> 24;
  b[off + 5] = (lo >>> 16) & 255;
  b[off + 6] = (lo >>> 8) & 255;
  b[off + 7] = lo & 255;
}

function readCounter(b: Uint8Array, off: number): number {
  const hi = ((b[off]! << 24) | (b[off + 1]! << 16) | (b[off + 2]! << 8) | b[off + 3]!) >>> 0;
  const lo = ((b[off + 4]! << 24) | (b[off + 5]! << 16) | (b[off + 6]! << 8) | b[off + 7]!) >>> 0;
  return hi * 2 ** 32 + lo;
}
