import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { checkTokenMac, CTX_HELLO, CTX_SDP, deriveNodeId, generateIdentity, identityFromPem, identityToPem, signFields, tokenMac, verifyFields } from "../../src/identity.js";
import { proveSdp, verifySdp } from "../../src/mesh/auth.js";
import { AuthError } from "../../src/errors.js";

const sdp = (fp: string) => `v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\na=fingerprint:sha-256 ${fp}\r\na=setup:actpass\r\n`;
const FP1 = Array(32).fill("AB").join(":");
const FP2 = Array(32).fill("CD").join(":");

describe("identity", () => {
  it("derives a 16-hex node id from the public key, stable across PEM round trip", () => {
    const a = generateIdentity();
    expect(a.id).toMatch(/^[0-9a-f]{16}$/);
    expect(deriveNodeId(a.publicKey)).toBe(a.id);
    const b = identityFromPem(identityToPem(a));
    expect(b.id).toBe(a.id);
    expect(Buffer.from(b.publicKey)).toEqual(Buffer.from(a.publicKey));
  });

  it("rejects a non-Ed25519 or garbage key", () => {
    expect(() => identityFromPem("not a key")).toThrow(AuthError);
  });

  it("signatures verify only for the same key, context and fields", () => {
    const a = generateIdentity();
    const b = generateIdentity();
    fc.assert(
      fc.property(fc.string(), fc.uint8Array({ maxLength: 64 }), fc.string(), (s, u, other) => {
        const sig = signFields(a, CTX_HELLO, s, u);
        expect(verifyFields(a.publicKey, sig, CTX_HELLO, s, u)).toBe(true);
        expect(verifyFields(b.publicKey, sig, CTX_HELLO, s, u)).toBe(false);
        expect(verifyFields(a.publicKey, sig, CTX_SDP, s, u)).toBe(false);
        if (other !== s) expect(verifyFields(a.publicKey, sig, CTX_HELLO, other, u)).toBe(false);
      }),
      { numRuns: 50 },
    );
  });

  it("field framing is unambiguous (no concatenation collisions)", () => {
    const a = generateIdentity();
    const sig = signFields(a, CTX_HELLO, "ab", "c");
    expect(verifyFields(a.publicKey, sig, CTX_HELLO, "a", "bc")).toBe(false);
  });

  it("token MACs check the token", () => {
    const mac = tokenMac("secret", CTX_HELLO, "x");
    expect(checkTokenMac("secret", mac, CTX_HELLO, "x")).toBe(true);
    expect(checkTokenMac("Secret", mac, CTX_HELLO, "x")).toBe(false);
    expect(checkTokenMac("secret", mac.subarray(1), CTX_HELLO, "x")).toBe(false);
  });
});

describe("SDP authentication", () => {
  const a = generateIdentity();
  const b = generateIdentity();
  const proof = proveSdp(a, "tok", b.id, "c1", sdp(FP1));
  const base = { token: "tok", selfId: b.id, from: a.id, fromPub: a.publicKey, conn: "c1", sdp: sdp(FP1), proof };

  it("accepts an untouched offer", () => {
    expect(() => verifySdp(base)).not.toThrow();
  });
  it("detects a swapped fingerprint (man in the middle)", () => {
    expect(() => verifySdp({ ...base, sdp: sdp(FP2) })).toThrow(/man in the middle/);
  });
  it("detects a wrong cluster token", () => {
    expect(() => verifySdp({ ...base, token: "other" })).toThrow(expect.objectContaining({ code: "ERR_BAD_TOKEN" }));
  });
  it("detects a key that does not derive the sender id", () => {
    expect(() => verifySdp({ ...base, fromPub: b.publicKey })).toThrow(expect.objectContaining({ code: "ERR_ID_MISMATCH" }));
  });
  it("detects an offer meant for someone else or a replay on another connection", () => {
    expect(() => verifySdp({ ...base, selfId: a.id })).toThrow(AuthError);
    expect(() => verifySdp({ ...base, conn: "c2" })).toThrow(AuthError);
  });
  it("refuses an SDP without a fingerprint", () => {
    expect(() => verifySdp({ ...base, sdp: "v=0\r\n" })).toThrow(expect.objectContaining({ code: "ERR_FINGERPRINT" }));
  });
});
