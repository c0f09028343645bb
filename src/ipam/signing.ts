/**
 * Signed IPAM state (issue 12): every node speaks only for itself. What a node says about itself —
 * its heartbeat, its pins and transfers, its promises — carries its Ed25519 signature (src/identity.ts,
 * domain-separated), checked by every receiver before it is merged and before it is forwarded. Records
 * are self-certifying: each signature travels with the signer's public key, and a key is accepted for a
 * node id only if the id derives from it (deriveNodeId), so relayed records from nodes we never linked to
 * verify too. Verified keys are cached per node.
 *
 *   beat      "weftnet/ipam-beat/v1"  epochId, node, beat
 *   entry     "weftnet/ipam-entry/v1" epochId, block, owner, version, kind, from   (signed by the writer)
 *   promise   "weftnet/ipam-prom/v1"  epochId, block, version, kind, from, to, members (signed by the acceptor)
 *   member    "weftnet/ipam-member/v1" epochId, node, "x", reason, by   (a removal from the member list, signed by
 *             `by`: the node itself for "leave", a node that saw it gone for "gone")
 *   release   "weftnet/ipam-release/v2" epochId, block, released node, version of the forced entry, new owner
 *             (signed by the OPERATOR key, not a node's: `weftnet keygen --operator`; agents hold only its
 *             public key, --operator-key, so no node can forge one; bound to one block at one version, so
 *             it cannot be replayed against blocks the node owns later, and to the node it was run on, so
 *             no other node can copy it onto a force of its own)
 *   remove    "weftnet/ipam-remove/v1" epochId, removed node   (signed by the OPERATOR key: `weftnet ipam release
 *             NODE` removes NODE from the member list with it — also a node that owns no block, which no
 *             block release could remove; receivers check it against --operator-key as a release)
 */
import { createPublicKey, type KeyObject, verify } from "node:crypto";
import { deriveNodeId, frame, type Identity, signFields } from "../identity.js";

const ED25519_SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");

export const CTX_BEAT = "weftnet/ipam-beat/v1";
export const CTX_ENTRY = "weftnet/ipam-entry/v1";
export const CTX_PROMISE = "weftnet/ipam-prom/v1";
export const CTX_RELEASE = "weftnet/ipam-release/v2";
export const CTX_MEMBER = "weftnet/ipam-member/v1";
export const CTX_REMOVE = "weftnet/ipam-remove/v1";

/** What an operator signs to remove `node` (gone for good) from the member list of epoch `epochId`. */
export function removeFields(epochId: string, node: string): string[] {
  return [epochId, node];
}

/** What `by` signs to remove `node` from the member list ("leave": by = node; "gone": by saw it gone). */
export function removalFields(epochId: string, node: string, reason: "leave" | "gone" | "op", by: string): string[] {
  return [epochId, node, "x", reason, by];
}

/** What an operator signs to release block `block` of `node` (gone for good) to `owner`: the forced entry's version and owner. */
export function releaseFields(epochId: string, block: number, node: string, version: number, owner: string): string[] {
  return [epochId, String(block), node, String(version), owner];
}

/** The signing port of the IPAM core: this node's key, and verification of anyone's. */
export interface IpamKeys {
  readonly publicKey: Uint8Array;
  sign(context: string, fields: string[]): Uint8Array;
  /** does `pk` belong to `node` (id derived from it) and did it sign `fields`? */
  verify(node: string, pk: Uint8Array, sig: Uint8Array, context: string, fields: string[]): boolean;
  /**
   * did the operator key (--operator-key) sign these fields (under `context`: CTX_RELEASE unless given,
   * or CTX_REMOVE)? Absent: no operator key configured.
   */
  verifyOperator?(sig: Uint8Array, fields: string[], context?: string): boolean;
}

/**
 * A promise signature with the signer's public key and the number of members the signer counted when it
 * promised: [node, pk, sig, members]. A write needs valid promises from more than half of the largest
 * member count among them, every signer a member: judged without the receiver's own (later) view.
 */
export type Signed = [string, Uint8Array, Uint8Array, number];

export function identityKeys(idn: Identity, operatorKey?: Uint8Array): IpamKeys {
  const op = operatorKey ? createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, Buffer.from(operatorKey)]), format: "der", type: "spki" }) : undefined;
  // node -> its verified key (id derived from it), parsed once: parsing a key costs more than verifying
  const known = new Map<string, { raw: Buffer; key: KeyObject }>();
  return {
    publicKey: idn.publicKey,
    sign: (context, fields) => signFields(idn, context, ...fields),
    verify(node, pk, sig, context, fields) {
      if (pk.byteLength !== 32 || sig.byteLength !== 64) return false;
      let k = known.get(node);
      if (k === undefined) {
        if (deriveNodeId(pk) !== node) return false;
        const raw = Buffer.from(pk);
        k = { raw, key: createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, raw]), format: "der", type: "spki" }) };
        known.set(node, k);
      } else if (!k.raw.equals(pk)) return false;
      try {
        return verify(null, frame(context, ...fields), k.key, sig);
      } catch {
        return false;
      }
    },
    ...(op
      ? {
          verifyOperator(sig: Uint8Array, fields: string[], context: string = CTX_RELEASE) {
            if (sig.byteLength !== 64 || (context !== CTX_RELEASE && context !== CTX_REMOVE)) return false;
            try {
              return verify(null, frame(context, ...fields), op, sig);
            } catch {
              return false;
            }
          },
        }
      : {}),
  };
}
