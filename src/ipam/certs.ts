/**
 * Signed IPAM state, the receiving and the writing side (docs/ipam.md section 2b): who wrote each entry of
 * our table and with what right (its cert), the change of owner behind an owner's own entry (its
 * handover), signing what we write ourselves, and the check every remote entry passes before it is merged
 * or forwarded. Signatures themselves are signing.ts; this module decides whether a signed record may
 * change our table. node.ts owns one of these only when the agent gave it a key.
 */
import { CTX_BEAT, CTX_ENTRY, CTX_MEMBER, CTX_PROMISE, CTX_REMOVE, type IpamKeys, releaseFields, removalFields, removeFields, type Signed } from "./signing.js";
import { type BlockTable, compareEntries, type EntryKind, type EntryTuple } from "./table.js";
import { type AddProofWire, type CertWire, decodeCert, type HandoverWire, type RemovalWire } from "./wire.js";

/** a remote entry may be at most this many versions ahead of ours for its block (counted as a jump) */
export const MAX_VERSION_STEP = 64;

/** Who wrote an entry and with what right (see signing.ts). */
export interface Cert {
  from: string;
  by: string;
  pk: Uint8Array;
  sig: Uint8Array;
  proof?: Signed[];
  /** an operator's signature of a force release (kind "o") */
  op?: Uint8Array;
}
/** An entry with its cert: the current one of a block, or the change of owner behind it. */
export interface Handover {
  owner: string;
  version: number;
  kind: EntryKind;
  cert: Cert;
}

export const certWire = (c: Cert): CertWire => (c.op ? [c.from, c.by, c.pk, c.sig, c.proof ?? null, c.op] : c.proof ? [c.from, c.by, c.pk, c.sig, c.proof] : [c.from, c.by, c.pk, c.sig]);
export const certOf = (w: CertWire): Cert => ({ from: w[0], by: w[1], pk: w[2], sig: w[3], ...(w[4] ? { proof: w[4] } : {}), ...(w[5] ? { op: w[5] } : {}) });
const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const unhex = (s: unknown) => new Uint8Array(Buffer.from(String(s), "hex"));
export const certJson = (c: Cert) => [c.from, c.by, hex(c.pk), hex(c.sig), ...(c.proof || c.op ? [c.proof ? c.proof.map(([n, pk, sig, m]) => [n, hex(pk), hex(sig), m]) : null] : []), ...(c.op ? [hex(c.op)] : [])];
export const certFromJson = (x: unknown): Cert => {
  const a = x as unknown[];
  return certOf(decodeCert([a[0], a[1], unhex(a[2]), unhex(a[3]), a[4] ? (a[4] as unknown[][]).map(([n, pk, sig, m]) => [n, unhex(pk), unhex(sig), m]) : null, ...(a[5] ? [unhex(a[5])] : [])]));
};

/** What the signed state needs to know of the node it belongs to. */
export interface SignedContext {
  epochId(): string;
  table(): BlockTable;
  /** the member set used for majorities (the member list plus promised newcomers) */
  memberSet(): Set<string>;
  /** is `node` the founder of our epoch (a member from the start, no grant behind it) */
  isFounder(node: string): boolean;
  /** is `peer` directly connected to us (its blocks are never forced) */
  connected(peer: string): boolean;
  /** did this node see `node` gone itself (its Kubernetes Node was deleted): its force releases need no operator signature */
  sawGone(node: string): boolean;
  /** an operator-signed release of `node` checked out: the operator declared it gone (node.ts marks it gone) */
  operatorReleased(node: string): void;
  /** is block i our own pin, unconfirmed and without pods (a disputed pin that may yield, node.ts settleClash) */
  yieldablePin(i: number): boolean;
}

export class SignedState {
  /** the cert of each block's current entry, and the change of owner behind an owner's own entry */
  private readonly certs = new Map<number, Handover>();
  private readonly handovers = new Map<number, Handover>();
  private ownBeatSig: { beat: number; epoch: string; sig: Uint8Array } | null = null;

  constructor(
    private readonly self: string,
    readonly keys: IpamKeys,
    private readonly ctx: SignedContext,
  ) {}

  // ---- persistence ---------------------------------------------------------------------------------

  snapshot(): [number, unknown, unknown][] {
    return [...this.certs].map(([i, c]): [number, unknown, unknown] => {
      const h = this.handovers.get(i);
      return [i, certJson(c.cert), h ? [h.owner, h.version, h.kind, certJson(h.cert)] : null];
    });
  }

  restore(table: BlockTable, certs: [number, unknown, unknown][]): void {
    for (const [i, c, h] of certs) {
      if (i >= table.count) continue;
      const e = table.get(i);
      this.certs.set(i, { owner: e.owner, version: e.version, kind: e.kind, cert: certFromJson(c) });
      if (Array.isArray(h)) this.handovers.set(i, { owner: h[0] as string, version: h[1] as number, kind: h[2] as EntryKind, cert: certFromJson(h[3]) });
    }
  }

  // ---- what we sign --------------------------------------------------------------------------------

  private entryFields(i: number, owner: string, version: number, kind: EntryKind, from: string): string[] {
    return [this.ctx.epochId(), String(i), owner, String(version), kind, from];
  }

  private promiseFields(i: number, v: number, kind: string, from: string, to: string, members: number): string[] {
    return [this.ctx.epochId(), String(i), String(v), kind, from, to, String(members)];
  }

  /** Our signature on a promise (as an acceptor, or our self-promise as a proposer). */
  signPromise(i: number, v: number, kind: string, from: string, to: string, members: number): Uint8Array {
    return this.keys.sign(CTX_PROMISE, this.promiseFields(i, v, kind, from, to, members));
  }

  /** The signatures of a `prom` we send, with our member count. */
  promiseSigs(blocks: [number, number][], kind: string, from: string, to: string): { sigs: Uint8Array[]; pk: Uint8Array; m: number } {
    const m = this.ctx.memberSet().size;
    return { pk: this.keys.publicKey, m, sigs: blocks.map(([i, v]) => this.signPromise(i, v, kind, from, to, m)) };
  }

  verifyPromise(from: string, pk: Uint8Array, sig: Uint8Array, i: number, v: number, kind: string, owner: string, to: string, members: number): boolean {
    return this.keys.verify(from, pk, sig, CTX_PROMISE, this.promiseFields(i, v, kind, owner, to, members));
  }

  /** Our heartbeat's signature (one per beat), so that peers can relay it. */
  beatSig(beat: number): { pk: Uint8Array; sig: Uint8Array } {
    const epoch = this.ctx.epochId();
    if (this.ownBeatSig?.beat !== beat || this.ownBeatSig.epoch !== epoch) {
      this.ownBeatSig = { beat, epoch, sig: this.keys.sign(CTX_BEAT, [epoch, this.self, String(beat)]) };
    }
    return { pk: this.keys.publicKey, sig: this.ownBeatSig.sig };
  }

  verifyBeat(n: string, b: number, pk: Uint8Array | undefined, sig: Uint8Array | undefined): boolean {
    return pk !== undefined && sig !== undefined && this.keys.verify(n, pk, sig, CTX_BEAT, [this.ctx.epochId(), n, String(b)]);
  }

  /** Sign an entry we just wrote (from = the owner before; op: the operator's signature of a force release), and keep its cert to forward it. */
  signOwn(e: EntryTuple, from: string, proof?: Signed[], op?: Uint8Array): void {
    const [i, owner, version, kind] = e;
    const sig = this.keys.sign(CTX_ENTRY, this.entryFields(i, owner, version, kind, from));
    this.keepCert(e, { from, by: this.self, pk: this.keys.publicKey, sig, ...(proof && proof.length ? { proof } : {}), ...(op ? { op } : {}) }, null);
  }

  /** Remember the cert of a block's new entry; an owner's own write keeps the change of owner behind it. */
  keepCert(e: EntryTuple, cert: Cert, handover: Handover | null): void {
    const [i, owner, version, kind] = e;
    const prev = this.certs.get(i);
    if (cert.from !== owner) this.handovers.delete(i); // this entry is itself a change of owner
    else if (handover) this.handovers.set(i, handover);
    else if (prev && prev.cert.from !== prev.owner && prev.owner === owner) this.handovers.set(i, prev);
    else if (this.handovers.get(i)?.owner !== owner) this.handovers.delete(i);
    this.certs.set(i, { owner, version, kind, cert });
  }

  /** The certs and handovers that go with these entries in a `state` message. */
  wire(entries: EntryTuple[]): { certs: (CertWire | null)[]; handovers: (HandoverWire | null)[] } {
    return {
      certs: entries.map(([i]) => {
        const c = this.certs.get(i);
        return c ? certWire(c.cert) : null;
      }),
      handovers: entries.map(([i]): HandoverWire | null => {
        const h = this.handovers.get(i);
        return h ? [h.owner, h.version, h.kind, ...certWire(h.cert)] : null;
      }),
    };
  }

  /**
   * The grant that made `owner` the owner of block i, if our certs hold it (the block's current entry, or
   * the change of owner behind the owner's own entry): the proof of a member's addition.
   */
  grantProof(i: number, owner: string): AddProofWire | null {
    for (const h of [this.certs.get(i), this.handovers.get(i)]) {
      if (h && h.owner === owner && h.kind === "t" && h.cert.from !== owner && h.cert.by === h.cert.from && h.cert.proof?.length) return [i, h.version, ...certWire(h.cert)];
    }
    return null;
  }

  /** Our signed removal of `node` from the member list (we leave: "leave"; we saw it gone: "gone"). */
  signRemoval(node: string, reason: "leave" | "gone"): RemovalWire {
    return [reason, this.self, this.keys.publicKey, this.keys.sign(CTX_MEMBER, removalFields(this.ctx.epochId(), node, reason, this.self))];
  }

  // ---- what we accept ------------------------------------------------------------------------------

  /**
   * May `node` join our member list? "proven": with the grant that added it (the transfer naming it,
   * signed by the owner before, with promises from a majority of the members back then, as for a grant
   * entry: kept and passed on); "known": without one, if it founded the epoch or owns a block in our table
   * (a checked entry names it); otherwise "forged".
   */
  checkAdd(node: string, proof: AddProofWire | null): "proven" | "known" | "forged" {
    if (proof && this.grantOk(node, proof)) return "proven";
    return this.ctx.isFounder(node) || this.ctx.table().owners().has(node) ? "known" : "forged";
  }

  private grantOk(node: string, proof: AddProofWire): boolean {
    const [i, v, ...cw] = proof;
    const cert = certOf(cw as unknown as CertWire);
    if (cert.from === node || cert.by !== cert.from) return false;
    if (!this.keys.verify(cert.by, cert.pk, cert.sig, CTX_ENTRY, this.entryFields(i, node, v, "t", cert.from))) return false;
    return this.proofOk(i, v, "t", cert.from, node, cert.by, cert.proof);
  }

  /**
   * May `node` leave our member list? Only with a removal signed by the node itself ("leave"), or by a
   * node that saw it gone when we know it gone too (we saw its Kubernetes Node deleted, or accepted an
   * operator's release of it): "release" = validly signed but not authorised here (yet). Never ourselves
   * by someone else's word: a node declared gone while alive must not shrink its own majorities.
   * An operator's removal ("op") stands on the operator's signature of (epoch, node) alone, checked
   * against our --operator-key (a wrong one is a forgery); once it checks out the node is known gone here
   * (as after an operator's release). Without --operator-key we cannot check it: held back like a "gone".
   */
  checkRemoval(node: string, rw: RemovalWire | null): "ok" | "forged" | "release" {
    if (!rw) return "forged";
    const [reason, by, pk, sig] = rw;
    if (reason === "op") {
      if (node === this.self) return "forged";
      const verifyOperator = this.keys.verifyOperator;
      if (!verifyOperator) return this.ctx.sawGone(node) ? "ok" : "release";
      if (!verifyOperator(sig, removeFields(this.ctx.epochId(), node), CTX_REMOVE)) return "forged";
      this.ctx.operatorReleased(node);
      return "ok";
    }
    if (!this.keys.verify(by, pk, sig, CTX_MEMBER, removalFields(this.ctx.epochId(), node, reason, by))) return "forged";
    if (reason === "leave") return by === node ? "ok" : "forged";
    if (node === this.self || by === node) return "forged";
    return this.ctx.sawGone(node) ? "ok" : "release";
  }

  /**
   * Check one remote entry that would win over ours, with the cert and handover it came with. Returns
   * the proof to keep once merged, or why it is refused ("jump": too far ahead; "forged": no right;
   * "release": a validly signed force release that nothing authorised, see node.ts refusedForces).
   */
  check(e: EntryTuple, cw: CertWire | null | undefined, hw: HandoverWire | null | undefined): { cert: Cert; handover: Handover | null } | "jump" | "forged" | "release" {
    const cert = cw ? certOf(cw) : null;
    const handover = hw ? { owner: hw[0], version: hw[1], kind: hw[2], cert: certOf(hw.slice(3) as unknown as CertWire) } : null;
    const why = this.checkWrite(e, cert, handover);
    return why ?? { cert: cert!, handover };
  }

  /**
   * Do members vouch for this claim or grant with valid promises from more than half of the largest
   * member count any of them signed? (Judged from the promises themselves, so a node that joined later,
   * with a larger member set, still accepts a write a majority approved back then; signers must be
   * members we know, so keys made up for the occasion count for nothing.)
   */
  private proofOk(i: number, v: number, kind: string, from: string, to: string, writer: string, proof: Signed[] | undefined): boolean {
    if (!proof) return false;
    const members = this.ctx.memberSet();
    members.add(from);
    const signers = new Set<string>();
    let most = 0;
    for (const [n, pk, sig, m] of proof) {
      if (!members.has(n) || signers.has(n)) continue;
      if (!this.verifyPromise(n, pk, sig, i, v, kind, from, to, m)) continue;
      signers.add(n);
      if (n !== writer) most = Math.max(most, m); // the writer's own count cannot lower the bar
    }
    if (most === 0) return false; // nobody but the writer vouches
    // a grant to a newcomer is approved by the members before it (the newcomer, counted by promisers, does not vote)
    const voters = kind === "t" && !signers.has(to) ? most - 1 : most;
    return signers.size > 0 && 2 * signers.size > voters;
  }

  /**
   * May this remote entry replace our entry for its block? (null = yes)
   *   every entry is signed by its writer `by`; versions step forward by at most MAX_VERSION_STEP;
   *   claim:   written by the heir it names, with promises from a majority of the members;
   *   grant:   a transfer with promises from a majority, written by the owner before;
   *   owner's own write (pin, unpin, leave transfer): by the owner we know, or by the new owner of a
   *            verifiable change of owner (the handover) that is newer than what we know;
   *   force:   by the node it names, of a block whose owner we know (never of a node connected to us,
   *            and never of ours), authorised by our own observation that the owner is gone (its
   *            Kubernetes Node was deleted, or an operator's release of it checked out here);
   *   operator force ("o"): the same, authorised by the operator's signature of this release to the node
   *            it names (--operator-key). An agent without --operator-key cannot check one and treats it
   *            as a force ("f") for the right (it ranks above "f" on every node all the same: table.ts).
   */
  private checkWrite(e: EntryTuple, cert: Cert | null, handover: Handover | null, nested = false): null | "jump" | "forged" | "release" {
    const [i, owner, version, kind] = e;
    const cur = this.ctx.table().get(i);
    if (version > cur.version + MAX_VERSION_STEP) return "jump";
    if (!cert || !this.keys.verify(cert.by, cert.pk, cert.sig, CTX_ENTRY, this.entryFields(i, owner, version, kind, cert.from))) return "forged";
    switch (kind) {
      case "c":
        return cert.by === owner && cert.from !== owner && this.proofOk(i, version, "c", cert.from, owner, cert.by, cert.proof) ? null : "forged";
      case "f":
      case "o": {
        // the owner before: ours, or — when a force of the same block at the same version is ours — the one it forced
        const prev = (cur.kind === "f" || cur.kind === "o") && cur.version === version ? this.certs.get(i)?.cert.from : cur.owner;
        if (cert.by !== owner || cert.from === owner || cert.from !== prev || cert.from === this.self) return "forged";
        if (this.ctx.connected(cert.from)) return "forged"; // never the blocks of a node connected to us
        const verifyOperator = this.keys.verifyOperator;
        if (kind === "o" && verifyOperator) {
          // an operator force stands on the operator's signature alone: a wrong one is a forgery, never held back
          if (!cert.op || !verifyOperator(cert.op, releaseFields(this.ctx.epochId(), i, cert.from, version, owner))) return "forged";
          this.ctx.operatorReleased(cert.from); // other nodes' releases of it count too from now on
          return null;
        }
        return this.ctx.sawGone(cert.from) ? null : "release";
      }
      default:
        if (cert.by !== cert.from) return "forged";
        if (kind === "p" && owner !== cert.by) return "forged";
        if (cur.owner === cert.by) return null; // the owner we know hands it on, pins or unpins it
        if (cert.proof) return kind === "t" && this.proofOk(i, version, "t", cert.from, owner, cert.by, cert.proof) ? null : "forged";
        if (nested || !handover || handover.owner !== cert.by || handover.version >= version) return "forged";
        // the change of owner must itself beat what we hold (a claim beats a grant at one version) —
        // unless what we hold is our own unconfirmed pin without pods: a disputed pin (settleClash)
        // yields to the confirmed owner's higher pin, whose change of owner is verified all the same
        if (!this.ctx.yieldablePin(i)) {
          try {
            if (compareEntries({ owner: handover.owner, version: handover.version, kind: handover.kind }, cur, i) <= 0) return "forged";
          } catch {
            return "forged";
          }
        }
        return this.checkWrite([i, handover.owner, handover.version, handover.kind], handover.cert, null, true);
    }
  }
}
