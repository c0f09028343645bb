/**
 * End-to-end authentication of WebRTC links, independent of the signaling server.
 *
 * Each offer/answer carries
 *   sig = Ed25519_sender(CTX_SDP | from | to | conn | fingerprint)
 *   mac = HMAC(token,    CTX_SDP | from | to | conn | fingerprint)
 * where fingerprint is the a=fingerprint of the SDP itself. The receiver checks that the sender's public
 * key (learned from presence) derives the sender's node id, that both proofs cover the fingerprint found
 * in the SDP, and that `to` is itself. werift then refuses any DTLS peer whose certificate does not match
 * that fingerprint. A signaling server that swaps a fingerprint (to sit in the middle) breaks the
 * signature; one that invents nodes lacks the token for the MAC.
 */
import { AuthError } from "../errors.js";
import { CTX_SDP, checkTokenMac, deriveNodeId, signFields, tokenMac, verifyFields, type Identity } from "../identity.js";
import { fingerprintString, sdpFingerprint } from "./transport.js";

export interface SdpProof {
  sig: Uint8Array;
  mac: Uint8Array;
}

export function proveSdp(idn: Identity, token: string, to: string, conn: string, sdp: string): SdpProof {
  const fp = sdpFingerprint(sdp);
  if (!fp) throw new AuthError("ERR_FINGERPRINT", "local SDP has no a=fingerprint line");
  const fields = [idn.id, to, conn, fingerprintString(fp)];
  return { sig: signFields(idn, CTX_SDP, ...fields), mac: tokenMac(token, CTX_SDP, ...fields) };
}

/** Throws AuthError with a reason fit for `weftnet status`. */
export function verifySdp(args: { token: string; selfId: string; from: string; fromPub: Uint8Array; conn: string; sdp: string; proof: SdpProof }): void {
  const { token, selfId, from, fromPub, conn, sdp, proof } = args;
  if (deriveNodeId(fromPub) !== from) throw new AuthError("ERR_ID_MISMATCH", `node id ${from} does not match its announced public key`);
  const fp = sdpFingerprint(sdp);
  if (!fp) throw new AuthError("ERR_FINGERPRINT", `SDP from ${from} has no DTLS fingerprint`);
  const fields = [from, selfId, conn, fingerprintString(fp)];
  if (!verifyFields(fromPub, proof.sig, CTX_SDP, ...fields)) {
    throw new AuthError("ERR_BAD_SIGNATURE", `SDP from ${from}: signature does not cover its DTLS fingerprint (altered in transit: possible man in the middle)`);
  }
  if (!checkTokenMac(token, proof.mac, CTX_SDP, ...fields)) {
    throw new AuthError("ERR_BAD_TOKEN", `SDP from ${from} is not bound to the cluster token (wrong token, or the DTLS fingerprint was altered in transit: possible man in the middle)`);
  }
}
