/**
 * The DTLS certificate both WebRTC transports use: a self-signed X.509 v3 certificate over an ECDSA P-256
 * key, signed with SHA-256 (what werift generates itself, and what libdatachannel accepts as PEM). Built
 * here with node:crypto and a few lines of DER, so the native transport does not load werift for it.
 *
 *   Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm (ecdsa-with-SHA256), signature BIT STRING }
 *   TBSCertificate ::= SEQUENCE { [0] version v3, serial, signature alg, issuer, validity, subject, spki }
 *
 * Peers never check the certificate's names or dates (WebRTC pins the SDP fingerprint, which weftnet signs
 * with the node key); they are there because DTLS stacks expect a well-formed certificate.
 */
import { generateKeyPairSync, randomBytes, sign } from "node:crypto";

/** PEM key (PKCS#8) + certificate, e.g. to persist the DTLS identity across restarts. */
export interface DtlsCertificatePem {
  certPem: string;
  keyPem: string;
}

const OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2";
const OID_CN = "2.5.4.3";
/** Validity of a generated certificate (as werift's: ten years from now). */
const VALID_DAYS = 3650;

function len(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  const bytes: number[] = [];
  for (let x = n; x > 0; x >>= 8) bytes.unshift(x & 0xff);
  return Buffer.from([0x80 | bytes.length, ...bytes]);
}
const tlv = (tag: number, body: Buffer): Buffer => Buffer.concat([Buffer.from([tag]), len(body.length), body]);
const seq = (...items: Buffer[]): Buffer => tlv(0x30, Buffer.concat(items));

function oid(s: string): Buffer {
  const [a, b, ...rest] = s.split(".").map(Number) as [number, number, ...number[]];
  const out = [40 * a + b];
  for (const n of rest) {
    const parts = [n & 0x7f];
    for (let x = n >>> 7; x > 0; x >>>= 7) parts.unshift(0x80 | (x & 0x7f));
    out.push(...parts);
  }
  return tlv(0x06, Buffer.from(out));
}

/** UTCTime YYMMDDHHMMSSZ (valid up to 2049, as RFC 5280 asks). */
function utcTime(d: Date): Buffer {
  const p = (n: number) => String(n).padStart(2, "0");
  const s = `${p(d.getUTCFullYear() % 100)}${p(d.getUTCMonth() + 1)}${p(d.getUTCDate())}${p(d.getUTCHours())}${p(d.getUTCMinutes())}${p(d.getUTCSeconds())}Z`;
  return tlv(0x17, Buffer.from(s, "ascii"));
}

function pem(label: string, der: Buffer): string {
  const b64 = der.toString("base64").replace(/.{1,64}/g, "$&\n");
  return `-----BEGIN ${label}-----\n${b64}-----END ${label}-----\n`;
}

export async function generateDtlsCertificate(now = new Date()): Promise<DtlsCertificatePem> {
  const { publicKey, privateKey } = generateKeyPairSync("ec", { namedCurve: "prime256v1" });
  const spki = publicKey.export({ type: "spki", format: "der" });
  const serial = randomBytes(8);
  serial[0] = (serial[0]! & 0x3f) | 0x40; // positive and minimal (DER): first byte 0x40..0x7f
  const name = seq(tlv(0x31, seq(oid(OID_CN), tlv(0x0c, Buffer.from("weftnet", "utf8")))));
  const algo = seq(oid(OID_ECDSA_SHA256));
  const notAfter = new Date(now.getTime() + VALID_DAYS * 86_400_000);
  const tbs = seq(tlv(0xa0, tlv(0x02, Buffer.from([2]))), tlv(0x02, serial), algo, name, seq(utcTime(now), utcTime(notAfter)), name, spki);
  const signature = sign("sha256", tbs, privateKey); // DER ECDSA-Sig-Value, as X.509 wants it
  const cert = seq(tbs, algo, tlv(0x03, Buffer.concat([Buffer.from([0]), signature])));
  const keyPem = privateKey.export({ type: "pkcs8", format: "pem" }) as string;
  return { certPem: pem("CERTIFICATE", cert), keyPem };
}
