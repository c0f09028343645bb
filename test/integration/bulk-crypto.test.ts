import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { loadSodiumAead, loadSodiumChaCha, sodiumLoadError } from "../../agent/os/sodium.js";
import { nodeAead, type AeadKey } from "../../src/bulk/crypto.js";
import { generateIdentity } from "../../src/identity.js";
import { FrameSealer, nodeChaCha } from "../../src/packet/seal.js";

describe("bulk link AEADs: libsodium (FFI) and node:crypto interoperate", () => {
  const sodium = loadSodiumAead();
  it.skipIf(!sodium)(`seal with one, open with the other, in both directions (${sodiumLoadError() ?? "libsodium loaded"})`, () => {
    const node = nodeAead();
    const raw = randomBytes(32);
    const k1: AeadKey = { algorithm: "aes-256-gcm", raw };
    const k2: AeadKey = { algorithm: "aes-256-gcm", raw };
    for (const [a, b] of [[sodium!, node], [node, sodium!]] as const) {
      for (const len of [1, 26, 1432, 9000]) {
        const counter = Math.floor(Math.random() * 2 ** 40);
        const buf = Buffer.allocUnsafeSlow(16 + len + 16);
        randomBytes(16).copy(buf);
        const plain = randomBytes(len);
        plain.copy(buf, 16);
        expect(a.seal(k1, counter, buf, 0, len)).toBe(len + 16);
        expect(buf.subarray(16, 16 + len).equals(plain)).toBe(false);
        const copy = Buffer.from(buf);
        const got = b.open(k2, counter, buf);
        expect(got && Buffer.from(got).equals(plain)).toBe(true);
        // wrong counter, flipped header bit, flipped tag bit: refused
        expect(b.open(k2, counter + 1, Buffer.from(copy))).toBeUndefined();
        const h = Buffer.from(copy);
        h[3]! ^= 1;
        expect(b.open(k2, counter, h)).toBeUndefined();
        const t = Buffer.from(copy);
        t[t.length - 1]! ^= 1;
        expect(b.open(k2, counter, t)).toBeUndefined();
      }
    }
  });
});

describe("end-to-end frame sealing: libsodium's ChaCha20-Poly1305 (FFI) and node:crypto's interoperate", () => {
  const sodium = loadSodiumChaCha();
  it.skipIf(!sodium)("frames sealed by one open with the other, both ways; tampering and replays refused", () => {
    const a = generateIdentity();
    const b = generateIdentity();
    const pubs = new Map([[a.id, a.publicKey], [b.id, b.publicKey]]);
    const mk = (idn: typeof a, cipher: typeof sodium) => new FrameSealer({ identity: idn, publicKeyOf: (n) => pubs.get(n), now: () => 1_800_000_000_000, ...(cipher ? { cipher } : {}) });
    for (const [ca, cb] of [[sodium!, nodeChaCha()], [nodeChaCha(), sodium!], [sodium!, sodium!]] as const) {
      const sa = mk(a, ca);
      const sb = mk(b, cb);
      for (const len of [22, 33, 1432, 9000, 65_000]) {
        const frame = randomBytes(len);
        frame[0] = 0x10;
        frame[1] = 8;
        const sealed = sa.seal(b.id, frame)!;
        expect(sealed.length).toBe(len + 24);
        expect(Buffer.from(sealed.subarray(26, 26 + Math.min(64, len - 18))).equals(frame.subarray(18, 18 + Math.min(64, len - 18)))).toBe(len === 18);
        const o = sb.open(a.id, sealed);
        expect(o.ok && Buffer.from(o.frame).equals(frame)).toBe(true);
        expect(sb.open(a.id, sealed)).toEqual({ ok: false, reason: "replayed" });
        // a flipped bit in the source node, the counter, the ciphertext, the tag: does not open
        for (const off of [5, 20, 30, sealed.length - 1]) {
          const t = Uint8Array.from(sealed);
          t[off] = t[off]! ^ 1;
          expect(sb.open(a.id, t)).toEqual({ ok: false, reason: "bad-seal" });
        }
      }
    }
  });
});
