/**
 * End-to-end authentication of WebRTC links, independent of the signaling server.
 *
 * Each offer/answer carries
 *   sig = Ed25519_sender(CTX_SDP | from | to | conn | fingerprint)
 *   mac = HMAC(peerKey,  CTX_SDP | from | to | conn | fingerprint)   peerKey = splitToken(token).peerKey
 * where fingerprint is the a=fingerprint of the SDP itself. The receiver checks that the sender's public
 * key (learned from presence) derives the sender's node id, that both proofs cover the fingerprint found
 * in the SDP, and that `to` is itself. The transport then refuses any DTLS peer whose certificate does not
 * match that fingerprint. A signaling server that swaps a fingerprint (to sit in the middle) breaks the
 * signature; one that invents nodes lacks the peer key for the MAC (it holds only the join key, see
 * identity.ts: both are derived from the token, neither reveals the other).
 *
 * Exactly one fingerprint: an SDP may carry several a=fingerprint lines (session and media level, several
 * algorithms), and a DTLS stack may accept a certificate matching ANY of them (werift does). Only the
 * first would be covered by the proof, so an attacker who appends its own line after the signed one sits in
 * the middle. checkSdpFingerprints() therefore refuses an SDP unless every a=fingerprint line (however
 * spelled) is the same single sha-256 fingerprint; both sides apply it (proveSdp, verifySdp) and the
 * transports apply it again before handing an SDP to their DTLS stack.
 */
import { AuthError } from "../errors.js";
import { CTX_LINK, CTX_SDP, checkTokenMac, deriveNodeId, peerKeyOf, signFields, signRecord, tokenMac, verifyFields, verifyRecord, type Identity } from "../identity.js";
import { fingerprintString, type Fingerprint } from "./transport.js";

export interface SdpProof {
  sig: Uint8Array;
  mac: Uint8Array;
}

/** Any attribute line naming a fingerprint, whatever its case or spacing (what a lenient parser might take). */
const FP_LINE = /^[ \t]*a[ \t]*=[ \t]*fingerprint[ \t]*:(.*)$/gim;
const SHA256_VALUE = /^(?:[0-9A-F]{2}:){31}[0-9A-F]{2}$/;

/**
 * The one DTLS fingerprint of an SDP. Throws AuthError(ERR_FINGERPRINT) unless the SDP names exactly one
 * fingerprint, sha-256, well-formed (identical repeats at session and media level are the same fingerprint).
 */
export function checkSdpFingerprints(sdp: string, who = "SDP"): Fingerprint {
  let found: Fingerprint | undefined;
  let lines = 0;
  for (const m of sdp.matchAll(FP_LINE)) {
    lines++;
    const rest = m[1]!.trim();
    const parts = /^(\S+) ([0-9A-Fa-f:]+)$/.exec(rest);
    if (!parts) throw new AuthError("ERR_FINGERPRINT", `${who}: malformed a=fingerprint line`);
    const algorithm = parts[1]!.toLowerCase();
    const value = parts[2]!.toUpperCase();
    if (algorithm !== "sha-256") throw new AuthError("ERR_FINGERPRINT", `${who}: fingerprint algorithm ${JSON.stringify(algorithm)} refused (only sha-256)`);
    if (!SHA256_VALUE.test(value)) throw new AuthError("ERR_FINGERPRINT", `${who}: sha-256 fingerprint is not 32 hex pairs`);
    if (found && found.value !== value) throw new AuthError("ERR_FINGERPRINT", `${who}: more than one DTLS fingerprint (an added fingerprint lets a man in the middle in)`);
    found = { algorithm, value };
    if (lines > 8) throw new AuthError("ERR_FINGERPRINT", `${who}: too many a=fingerprint lines`);
  }
  if (!found) throw new AuthError("ERR_FINGERPRINT", `${who} has no DTLS fingerprint`);
  return found;
}

export function proveSdp(idn: Identity, token: string, to: string, conn: string, sdp: string): SdpProof {
  const fp = checkSdpFingerprints(sdp, "local SDP");
  const fields = [idn.id, to, conn, fingerprintString(fp)];
  return { sig: signFields(idn, CTX_SDP, ...fields), mac: tokenMac(peerKeyOf(token), CTX_SDP, ...fields) };
}

/** Throws AuthError with a reason fit for `weftnet status`. */
export function verifySdp(args: { token: string; selfId: string; from: string; fromPub: Uint8Array; conn: string; sdp: string; proof: SdpProof }): void {
  const { token, selfId, from, fromPub, conn, sdp, proof } = args;
  if (deriveNodeId(fromPub) !== from) throw new AuthError("ERR_ID_MISMATCH", `node id ${from} does not match its announced public key`);
  const fp = checkSdpFingerprints(sdp, `SDP from ${from}`);
  const fields = [from, selfId, conn, fingerprintString(fp)];
  if (!verifyFields(fromPub, proof.sig, CTX_SDP, ...fields)) {
    throw new AuthError("ERR_BAD_SIGNATURE", `SDP from ${from}: signature does not cover its DTLS fingerprint (altered in transit: possible man in the middle)`);
  }
  if (!checkTokenMac(peerKeyOf(token), proof.mac, CTX_SDP, ...fields)) {
    throw new AuthError("ERR_BAD_TOKEN", `SDP from ${from} is not bound to the cluster's peer key (wrong token, an impostor admitted by the signaling server, or the DTLS fingerprint was altered in transit: possible man in the middle)`);
  }
}

/**
 * Identity proof over the link itself, once DTLS is up (both transports): each side sends, as its first
 * control message,
 *   auth { sig = Ed25519_sender(CTX_LINK | sender | receiver | conn | sender's certificate fingerprint |
 *                                the certificate fingerprint the sender saw from the receiver) }
 * and the receiver checks it against what IT negotiated (its own certificate, the one it saw from the
 * sender). A man in the middle that terminated DTLS on either side presents its own certificate there, so
 * the fingerprints the real peer signed do not match; the link carries nothing (no packets, no control
 * messages) until the proof checks. This does not depend on the SDP fingerprint checks being right.
 */
export function proveLink(idn: Identity, to: string, conn: string, local: Fingerprint, remote: Fingerprint): Uint8Array {
  return signRecord(idn, CTX_LINK, to, conn, fingerprintString(local), fingerprintString(remote)).sig;
}

export function verifyLink(a: { from: string; fromPub: Uint8Array; selfId: string; conn: string; ours: Fingerprint; theirs: Fingerprint; sig: Uint8Array }): boolean {
  return verifyRecord(a.from, { pub: a.fromPub, sig: a.sig }, CTX_LINK, a.selfId, a.conn, fingerprintString(a.theirs), fingerprintString(a.ours));
}
