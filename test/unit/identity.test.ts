import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { checkTokenMac, CTX_HELLO, CTX_SDP, deriveNodeId, generateIdentity, identityFromPem, identityToPem, joinKeyOf, signFields, splitToken, tokenMac, verifyFields } from "../../src/identity.js";
import { checkSdpFingerprints, proveLink, proveSdp, verifyLink, verifySdp } from "../../src/mesh/auth.js";
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

describe("token split (join key for the server, peer key for the agents)", () => {
  it("derives two distinct, stable 32-byte keys, neither equal to the token", () => {
    const k = splitToken("correct horse battery staple");
    expect(k.joinKey).toMatch(/^[0-9a-f]{64}$/);
    expect(k.peerKey).toMatch(/^[0-9a-f]{64}$/);
    expect(k.joinKey).not.toBe(k.peerKey);
    expect(splitToken("correct horse battery staple")).toEqual(k);
    expect(joinKeyOf("other")).not.toBe(k.joinKey);
  });
  it("a server holding the join key cannot produce an SDP proof that peers accept", () => {
    const a = generateIdentity();
    const b = generateIdentity();
    const token = "cluster-token-for-split-test";
    const s = sdp(FP1);
    // The server knows the join key; using it as if it were the token, or directly as the MAC key, fails.
    const forged = proveSdp(a, joinKeyOf(token), b.id, "c1", s);
    expect(() => verifySdp({ token, selfId: b.id, from: a.id, fromPub: a.publicKey, conn: "c1", sdp: s, proof: forged })).toThrow(expect.objectContaining({ code: "ERR_BAD_TOKEN" }));
    const raw = { sig: forged.sig, mac: tokenMac(joinKeyOf(token), CTX_SDP, a.id, b.id, "c1", `sha-256 ${FP1}`) };
    expect(() => verifySdp({ token, selfId: b.id, from: a.id, fromPub: a.publicKey, conn: "c1", sdp: s, proof: raw })).toThrow(expect.objectContaining({ code: "ERR_BAD_TOKEN" }));
    expect(() => verifySdp({ token, selfId: b.id, from: a.id, fromPub: a.publicKey, conn: "c1", sdp: s, proof: proveSdp(a, token, b.id, "c1", s) })).not.toThrow();
  });
});

describe("exactly one sha-256 fingerprint per SDP", () => {
  const a = generateIdentity();
  const b = generateIdentity();
  const token = "t";
  // The attack from the issue: keep the victim's signed line first, append the attacker's after it.
  const tricks: [string, string][] = [
    ["appended second fingerprint", sdp(FP1) + `a=fingerprint:sha-256 ${FP2}\r\n`],
    ["media-level second fingerprint", `${sdp(FP1)}m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=fingerprint:sha-256 ${FP2}\r\n`],
    ["odd spelling", sdp(FP1) + `A=Fingerprint:SHA-256 ${FP2}\r\n`],
    ["spaces", sdp(FP1) + ` a = fingerprint: sha-256 ${FP2}\r\n`],
    ["lf only", sdp(FP1) + `a=fingerprint:sha-256 ${FP2}\n`],
    ["other algorithm", sdp(FP1) + `a=fingerprint:sha-1 ${Array(20).fill("EF").join(":")}\r\n`],
    ["only sha-1", `v=0\r\na=fingerprint:sha-1 ${Array(20).fill("EF").join(":")}\r\n`],
    ["short value", `v=0\r\na=fingerprint:sha-256 AB:CD\r\n`],
    ["garbage after", `v=0\r\na=fingerprint:sha-256 ${FP1} extra\r\n`],
  ];
  for (const [name, s] of tricks) {
    it(`refuses: ${name} (both when proving and when verifying)`, () => {
      expect(() => checkSdpFingerprints(s)).toThrow(expect.objectContaining({ code: "ERR_FINGERPRINT" }));
      expect(() => proveSdp(a, token, b.id, "c", s)).toThrow(expect.objectContaining({ code: "ERR_FINGERPRINT" }));
      // A proof made over the first line alone does not help the attacker either.
      const proof = proveSdp(a, token, b.id, "c", sdp(FP1));
      expect(() => verifySdp({ token, selfId: b.id, from: a.id, fromPub: a.publicKey, conn: "c", sdp: s, proof })).toThrow(expect.objectContaining({ code: "ERR_FINGERPRINT" }));
    });
  }
  it("accepts the same fingerprint repeated at session and media level", () => {
    const s = `${sdp(FP1)}m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=fingerprint:sha-256 ${FP1.toLowerCase()}\r\n`;
    expect(checkSdpFingerprints(s)).toEqual({ algorithm: "sha-256", value: FP1 });
  });
  it("never throws anything but AuthError on random SDP text", () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 400 }), (s) => {
        try {
          checkSdpFingerprints(s);
        } catch (e) {
          expect(e).toBeInstanceOf(AuthError);
        }
      }),
    );
  });
});

describe("identity proof over the link (negotiated DTLS certificates)", () => {
  const a = generateIdentity();
  const b = generateIdentity();
  const fa = { algorithm: "sha-256", value: FP1 };
  const fb = { algorithm: "sha-256", value: FP2 };
  const fm = { algorithm: "sha-256", value: Array(32).fill("EE").join(":") };
  it("checks when both sides negotiated the same certificates, fails for a man in the middle on either side, another conn, or another key", () => {
    const sig = proveLink(a, b.id, "c1", fa, fb); // a's view: own cert fa, saw fb
    expect(verifyLink({ from: a.id, fromPub: a.publicKey, selfId: b.id, conn: "c1", ours: fb, theirs: fa, sig })).toBe(true);
    // b actually talks DTLS to a middleman (saw fm instead of fa): refused
    expect(verifyLink({ from: a.id, fromPub: a.publicKey, selfId: b.id, conn: "c1", ours: fb, theirs: fm, sig })).toBe(false);
    // a talked to a middleman (saw fm): its proof names fm, b's own cert is fb: refused
    const sig2 = proveLink(a, b.id, "c1", fa, fm);
    expect(verifyLink({ from: a.id, fromPub: a.publicKey, selfId: b.id, conn: "c1", ours: fb, theirs: fa, sig: sig2 })).toBe(false);
    expect(verifyLink({ from: a.id, fromPub: a.publicKey, selfId: b.id, conn: "c2", ours: fb, theirs: fa, sig })).toBe(false);
    expect(verifyLink({ from: a.id, fromPub: b.publicKey, selfId: b.id, conn: "c1", ours: fb, theirs: fa, sig })).toBe(false);
  });
});
