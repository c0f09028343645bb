// The DTLS certificate generator (agent/transport/cert.ts): strict DER that OpenSSL (libdatachannel) and
// werift accept, every time. A serial whose first byte was 0x00 once made ~1 in 256 certificates invalid.
import { X509Certificate, createPrivateKey } from "node:crypto";
import { describe, expect, it } from "vitest";
import { generateDtlsCertificate } from "../../agent/transport/cert.js";

describe("generateDtlsCertificate", () => {
  it("2000 certificates in a row parse, are self-signed ECDSA P-256 and match their key", async () => {
    for (let i = 0; i < 2000; i++) {
      const { certPem, keyPem } = await generateDtlsCertificate();
      const x = new X509Certificate(certPem);
      expect(x.checkPrivateKey(createPrivateKey(keyPem))).toBe(true);
      if (i < 3) {
        expect(x.verify(x.publicKey)).toBe(true);
        expect(x.publicKey.asymmetricKeyDetails?.namedCurve).toBe("prime256v1");
        expect(x.subject).toBe("CN=weftnet");
        expect(new Date(x.validTo).getTime() - Date.now()).toBeGreaterThan(9 * 365 * 86_400_000);
      }
    }
  });
});
