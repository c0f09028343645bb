import { randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { loadSodiumAead, sodiumLoadError } from "../../agent/os/sodium.js";
import { nodeAead, type AeadKey } from "../../src/bulk/crypto.js";

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
