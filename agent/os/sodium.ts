/**
 * A faster Aead for the bulk link (src/bulk/crypto.ts's port): libsodium's AES-256-GCM through koffi.
 *
 * Why: Node's crypto API costs one cipher object (key schedule, OpenSSL context, output buffers) per
 * datagram, and the bulk link seals every pod packet on its own. libsodium's *_afternm calls take a key
 * schedule expanded once per key (crypto_aead_aes256gcm_beforenm) and work in place on raw pointers: one
 * FFI call per datagram and no allocation. Measured here (loaded 2-core box, same run): ~2.5 us vs ~7.5 us
 * per 1432-byte seal.
 *
 * Interoperable with nodeAead: the same algorithm, nonce and tag layout, so peers may use either.
 * Available only where libsodium (Debian: libsodium23) loads and the CPU has AES-NI + PCLMUL
 * (crypto_aead_aes256gcm_is_available); otherwise loadSodiumAead() returns undefined and the agent uses
 * nodeAead.
 *
 * Pointers: buffers are addressed by their ArrayBuffer's base address (taken once, cached) plus offset.
 * Off-heap ArrayBuffers never move; reading `.buffer` moves a small on-heap typed array off the heap first.
 *
 * The library is opened once per process (openSodium(): koffi, libsodium.so.23 or .so, sodium_init, libc's memcpy
 * for addresses); loadSodiumAead and loadSodiumChaCha bind their functions from that one handle.
 */
import { createRequire } from "node:module";
import type { Aead, AeadKey } from "../../src/bulk/crypto.js";
import type { ChaChaPort } from "../../src/packet/seal.js";

const HDR = 16;
const TAG = 16;

interface Sodium {
  beforenm(st: number, k: number): number;
  enc(c: number, mac: number, maclen: number, m: number, mlen: number, ad: number, adlen: number, nsec: number, npub: number, st: number): number;
  dec(m: number, nsec: number, c: number, clen: number, mac: number, ad: number, adlen: number, npub: number, st: number): number;
  stateBytes: number;
  addr(b: Uint8Array): number;
}

/** libsodium, opened once per process (both Aeads below use it): the library, its `func` binder, and buffer addresses. */
interface SodiumLib {
  func: (sig: string) => (...a: unknown[]) => unknown;
  /** the base address of a typed array's bytes (libc memcpy(b, b, 0) returns its destination) */
  addr(b: Uint8Array): number;
}

let opened: SodiumLib | null | undefined;
let openError: string | undefined;

/**
 * Open libsodium through koffi once (libsodium.so.23, else libsodium.so), run sodium_init, and bind libc's memcpy
 * for addresses. null when it cannot (koffi or libsodium missing, sodium_init failed); sodiumOpenError() says why.
 */
export function openSodium(): SodiumLib | null {
  if (opened !== undefined) return opened;
  try {
    const require = createRequire(import.meta.url);
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const koffi = require("koffi") as typeof import("koffi");
    let lib;
    try {
      lib = koffi.load("libsodium.so.23");
    } catch {
      lib = koffi.load("libsodium.so");
    }
    if ((lib.func("int sodium_init()")() as number) < 0) throw new Error("sodium_init failed");
    const memcpy = koffi.load("libc.so.6").func("uintptr_t memcpy(void *d, void *s, size_t n)");
    const l = lib;
    opened = { func: (sig) => l.func(sig) as (...a: unknown[]) => unknown, addr: (b) => Number(memcpy(b, b, 0)) };
  } catch (e) {
    openError = (e as Error).message;
    opened = null;
  }
  return opened;
}

let loaded: Sodium | null | undefined;
let loadError: string | undefined;

function load(): Sodium | null {
  if (loaded !== undefined) return loaded;
  try {
    const lib = openSodium();
    if (!lib) throw new Error(openError ?? "libsodium did not load");
    if ((lib.func("int crypto_aead_aes256gcm_is_available()")() as number) !== 1) throw new Error("no AES-NI/PCLMUL: libsodium's AES-256-GCM is unavailable on this CPU");
    loaded = {
      beforenm: lib.func("int crypto_aead_aes256gcm_beforenm(uintptr_t st, uintptr_t k)") as Sodium["beforenm"],
      enc: lib.func("int crypto_aead_aes256gcm_encrypt_detached_afternm(uintptr_t c, uintptr_t mac, uintptr_t maclen, uintptr_t m, unsigned long long mlen, uintptr_t ad, unsigned long long adlen, uintptr_t nsec, uintptr_t npub, uintptr_t st)") as Sodium["enc"],
      dec: lib.func("int crypto_aead_aes256gcm_decrypt_detached_afternm(uintptr_t m, uintptr_t nsec, uintptr_t c, unsigned long long clen, uintptr_t mac, uintptr_t ad, unsigned long long adlen, uintptr_t npub, uintptr_t st)") as Sodium["dec"],
      stateBytes: Number(lib.func("size_t crypto_aead_aes256gcm_statebytes()")()),
      addr: lib.addr,
    };
  } catch (e) {
    loadError = (e as Error).message;
    loaded = null;
  }
  return loaded;
}

export function sodiumLoadError(): string | undefined {
  load();
  return loadError;
}

/** The libsodium Aead, or undefined when it cannot run here (see sodiumLoadError()). */
export function loadSodiumAead(): Aead | undefined {
  const s = load();
  if (!s) return undefined;
  const bases = new WeakMap<ArrayBufferLike, number>();
  const addressOf = (b: Uint8Array): number => {
    const ab = b.buffer;
    let base = bases.get(ab);
    if (base === undefined) {
      base = s.addr(new Uint8Array(ab, 0, 1));
      bases.set(ab, base);
    }
    return base + b.byteOffset;
  };
  const nonce = Buffer.allocUnsafeSlow(12).fill(0);
  const aNonce = addressOf(nonce);
  const setNonce = (counter: number) => {
    nonce.writeUInt32LE(counter >>> 0, 4);
    nonce.writeUInt32LE(Math.floor(counter / 0x1_0000_0000) >>> 0, 8);
  };
  const state = (key: AeadKey): number => {
    let st = key.impl as { buf: Buffer; addr: number } | undefined;
    if (!st) {
      if (key.algorithm !== "aes-256-gcm") throw new Error(`libsodium Aead does ${key.algorithm} not here`);
      const buf = Buffer.allocUnsafeSlow(s.stateBytes + 16);
      const raw = Buffer.allocUnsafeSlow(32);
      raw.set(key.raw);
      let addr = addressOf(buf);
      addr += (16 - (addr % 16)) % 16; // the state must be 16-byte aligned
      if (s.beforenm(addr, addressOf(raw)) !== 0) throw new Error("crypto_aead_aes256gcm_beforenm failed");
      raw.fill(0);
      st = { buf, addr };
      key.impl = st;
    }
    return st.addr;
  };
  return {
    name: "libsodium",
    seal(key, counter, buf, off, len) {
      const st = state(key);
      setNonce(counter);
      const a = addressOf(buf) + off;
      s.enc(a + HDR, a + HDR + len, 0, a + HDR, len, a, HDR, 0, aNonce, st);
      return len + TAG;
    },
    open(key, counter, d) {
      if (d.byteLength < HDR + TAG) return undefined;
      const st = state(key);
      setNonce(counter);
      const a = addressOf(d);
      const clen = d.byteLength - HDR - TAG;
      if (s.dec(a + HDR, 0, a + HDR, clen, a + HDR + clen, a, HDR, aNonce, st) !== 0) return undefined;
      return d.subarray(HDR, HDR + clen);
    },
  };
}

/**
 * libsodium's ChaCha20-Poly1305 (IETF) for end-to-end sealing of transit frames (src/packet/seal.ts's
 * ChaChaPort): one FFI call per frame instead of a node:crypto cipher object. Interoperable with nodeChaCha
 * (same algorithm, nonce, AAD and tag). Needs no AES-NI: undefined only when libsodium does not load.
 * The call takes raw addresses of one long-lived scratch buffer (key, nonce, AAD, message, tag at fixed
 * offsets): the bytes are copied in and out (a memcpy) because typed-array arguments cost koffi ~4 us per
 * call and a fresh buffer's address an FFI call of its own. Measured here: 1.4 KB frame ~13 -> ~3 us.
 */
export function loadSodiumChaCha(): ChaChaPort | undefined {
  const lib = openSodium();
  if (!lib) return undefined;
  let f: { enc: (...a: number[]) => number; dec: (...a: number[]) => number; addr: (b: Uint8Array) => number };
  try {
    f = {
      enc: lib.func("int crypto_aead_chacha20poly1305_ietf_encrypt_detached(uintptr_t c, uintptr_t mac, uintptr_t maclen, uintptr_t m, unsigned long long mlen, uintptr_t ad, unsigned long long adlen, uintptr_t nsec, uintptr_t npub, uintptr_t k)") as (...a: number[]) => number,
      dec: lib.func("int crypto_aead_chacha20poly1305_ietf_decrypt_detached(uintptr_t m, uintptr_t nsec, uintptr_t c, unsigned long long clen, uintptr_t mac, uintptr_t ad, unsigned long long adlen, uintptr_t npub, uintptr_t k)") as (...a: number[]) => number,
      addr: lib.addr,
    };
  } catch {
    return undefined;
  }
  const { enc, dec } = f;
  // scratch layout: key 32 | nonce 12 (+4) | tag 16 | aad up to 64 | message
  const K = 0;
  const N = 32;
  const T = 48;
  const AD = 64;
  const M = 128;
  let scratch = Buffer.allocUnsafeSlow(M + 70_000);
  let base = f.addr(scratch);
  const fill = (key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, len: number): boolean => {
    if (key.length !== 32 || nonce.length !== 12 || aad.length > M - AD) return false;
    if (M + len > scratch.length) {
      scratch = Buffer.allocUnsafeSlow(M + len);
      base = f.addr(scratch);
    }
    scratch.set(key, K);
    scratch.set(nonce, N);
    scratch.set(aad, AD);
    return true;
  };
  return {
    name: "libsodium",
    encrypt(key, nonce, aad, msg, out, tag) {
      const n = msg.length;
      if (out.length < n || tag.length < 16 || !fill(key, nonce, aad, n)) throw new RangeError("chacha20-poly1305: bad buffer sizes");
      scratch.set(msg, M);
      if (enc(base + M, base + T, 0, base + M, n, base + AD, aad.length, 0, base + N, base + K) !== 0) throw new Error("crypto_aead_chacha20poly1305_ietf_encrypt_detached failed");
      out.set(scratch.subarray(M, M + n));
      tag.set(scratch.subarray(T, T + 16));
    },
    decrypt(key, nonce, aad, ct, tag, out) {
      const n = ct.length;
      if (out.length < n || tag.length !== 16 || !fill(key, nonce, aad, n)) return false;
      scratch.set(ct, M);
      scratch.set(tag, T);
      if (dec(base + M, 0, base + M, n, base + T, base + AD, aad.length, base + N, base + K) !== 0) return false;
      out.set(scratch.subarray(M, M + n));
      return true;
    },
  };
}
