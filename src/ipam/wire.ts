/**
 * IPAM gossip messages, carried as plain (msgpack-able) maps on the mesh "ipam" app channel.
 *
 * Every body is { v: 1, t: type, ... }; decoders ignore unknown fields (a newer sender may append).
 *   hello  periodic, per directly connected peer:
 *            epoch   {id, founder, at, range, bp} | null   the cluster IPAM the sender belongs to
 *            beat    sender's heartbeat (strictly increasing per node, survives restarts)
 *            sig     the sender's signature of its beat (signing.ts; with its public key `pk`)
 *            beats   [[nodeId, beat, pk, sig]]   highest heartbeat the sender has seen of each member, with
 *                    the origin's signature (relayed only once verified: nobody can speak for another) (liveness
 *                    evidence travels transitively, so reclaim works on partial meshes)
 *            free    number of whole free blocks the sender could give away
 *            digest  FNV digest of the sender's block table; a mismatch triggers a full state sync
 *            promised [[blockIndex, version]] outstanding claim promises the sender gave as an acceptor:
 *                    the current owner of such a block stops using it until the claim resolves
 *   state  epoch id + [[blockIndex, owner, version, kind]] (a delta, or a chunk of a full sync); kind
 *          t transfer, p pin, c claim, f operator force
 * Pins (kind "p") are newer than the first release of this format: an agent from before pins refuses
 * entries and proposals of kind "p" as malformed (counted), so upgrade every agent of a cluster together.
 *   prop   write proposal: kind "c" (claim: `owner` has been silent for reclaimAfter, `to` = proposer),
 *          "t" (transfer/grant by `owner` = proposer to `to`), or "p" (pin: `owner` = `to` = proposer
 *          pins its own block at newVersion; the acceptor records the pin in its table at once and
 *          answers `prom`); "promise me these [[blockIndex,
 *          newVersion]]" (epoch id); `until` = the proposer's heartbeat value at which it abandons the
 *          proposal: a promise is void once a hello from the proposer carries beat >= until
 *   prom   the subset of a proposal this acceptor promised (it promises each (block, version) to at
 *          most one live proposer, persistently); a write happens only with a majority of promises
 *   members epoch id + [[node, "m" | "x", proof]]: the member list (docs/ipam.md section 5, "Membership"), sent
 *          with every full sync and flooded when it changes. "m" adds a node: proof = the grant that added it,
 *          [blockIndex, version, ...cert] (the transfer naming the node, with its majority's promises), or null
 *          for the founder or a node that owns a block in the receiver's table; "x" removes a node: proof =
 *          [reason, by, pk, sig], reason "leave" (signed by the node itself) or "gone" (signed by a node that
 *          saw it gone: a Kubernetes Node deletion, or an operator's release; the receiver must know it gone
 *          too) or "op" (an operator's removal, `weftnet ipam release NODE`: by = the agent it was run on,
 *          pk = that agent's key, sig = the OPERATOR's signature of (epoch, node), signing.ts CTX_REMOVE;
 *          checked against the receiver's --operator-key alone, so it removes a node that owns no block). Newer than kind "o": an agent from before refuses the message type (ERR_UNKNOWN_TYPE, counted
 *          as malformed), so upgrade every agent of a cluster together.
 *   req    "give me one block" (epoch id)
 *   nak    "I have nothing to give / cannot right now" (epoch id)
 *
 * decodeIpamMessage throws ProtocolError (malformed) — the caller counts and drops. Semantic checks
 * against our state (epoch, index range, CRDT conflicts) happen in node.ts and raise IpamError.
 */
import { ProtocolError } from "../errors.js";
import { NODE_ID_RE, arr, isPlainObject, nodeId, num, obj, str } from "../wire/codec.js";
import type { EntryKind, EntryTuple } from "./table.js";

export const IPAM_WIRE_VERSION = 1;
export const MAX_BLOCKS = 65536;
/** Entries per state message: ~28 bytes each keeps a chunk well under the mesh's ~200 KiB limit. */
export const STATE_CHUNK = 4096;
export const MAX_BEATS = 4096;

export interface EpochInfo {
  /** `${founder}.${at}` */
  readonly id: string;
  readonly founder: string;
  readonly at: number;
  readonly range: string;
  readonly bp: number;
}

export type IpamMessage =
  | { t: "hello"; epoch: EpochInfo | null; beat: number; pk?: Uint8Array; sig?: Uint8Array; beats: BeatRecord[]; free: number; digest: number; promised: [number, number][] }
  | { t: "state"; epoch: string; entries: EntryTuple[]; certs?: (CertWire | null)[]; handovers?: (HandoverWire | null)[] }
  | { t: "prop"; epoch: string; kind: "t" | "c" | "p"; owner: string; to: string; until: number; blocks: [number, number][] }
  | { t: "prom"; epoch: string; blocks: [number, number][]; sigs?: Uint8Array[]; pk?: Uint8Array; m?: number }
  | { t: "members"; epoch: string; records: MemberRecordWire[] }
  | { t: "req"; epoch: string }
  | { t: "nak"; epoch: string };

/** The grant that added a member: [blockIndex, version, ...cert of the transfer naming it]. */
export type AddProofWire = [number, number, ...CertWire];
/**
 * Why a member was removed: [reason, by, pk, sig] (signed by `by`: signing.ts CTX_MEMBER; for "op" sig is
 * the operator's signature, CTX_REMOVE, and by/pk name the agent the operator ran the release on).
 */
export type RemovalReason = "leave" | "gone" | "op";
export type RemovalWire = [RemovalReason, string, Uint8Array, Uint8Array];
/** One record of the member list: an addition (with the grant behind it) or a removal. */
export type MemberRecordWire = [string, "m", AddProofWire | null] | [string, "x", RemovalWire | null];
/** member records per `members` message (each may carry a majority's promises) */
export const MEMBERS_CHUNK = 64;

export type IpamWire = { v: number; t: string } & Record<string, unknown>;

/** A heartbeat as relayed: [node, beat] or, signed by its origin, [node, beat, pk, sig]. */
export type BeatRecord = [string, number] | [string, number, Uint8Array, Uint8Array];

/**
 * Who wrote an entry and with what right (signing.ts): [from, by, pk, sig, proof?, op?] — `from` the owner
 * before, `by` the writer, its signature of the entry, for claims and grants the promises of a
 * majority: [[acceptor, pk, sig]] (null when absent), and for an operator's force release the operator's
 * signature of the release (64 bytes).
 */
export type CertWire = [string, string, Uint8Array, Uint8Array, ([string, Uint8Array, Uint8Array, number][] | null)?, Uint8Array?];
/** The last change of owner behind an owner's own entry: [owner, version, kind, ...cert]. */
export type HandoverWire = [string, number, EntryKind, ...CertWire];

function decodeSigned(x: unknown): [string, Uint8Array, Uint8Array, number] {
  if (!Array.isArray(x) || x.length < 4) throw new ProtocolError("ERR_INVALID", "promise signature must be [node, pk, sig, members]");
  const [n, pk, sig, m] = x as unknown[];
  if (typeof n !== "string" || !NODE_ID_RE.test(n)) throw new ProtocolError("ERR_INVALID", "signer is not a node id");
  if (typeof m !== "number" || !Number.isInteger(m) || m < 1 || m > MAX_BLOCKS) throw new ProtocolError("ERR_INVALID", "promise member count out of range");
  return [n, keyBytes(pk, 32, "pk"), keyBytes(sig, 64, "sig"), m];
}

export function decodeCert(x: unknown): CertWire {
  if (!Array.isArray(x) || x.length < 4) throw new ProtocolError("ERR_INVALID", "cert must be [from, by, pk, sig, proof?]");
  const [from, by, pk, sig, proof, op] = x as unknown[];
  if (typeof from !== "string" || !NODE_ID_RE.test(from) || typeof by !== "string" || !NODE_ID_RE.test(by)) throw new ProtocolError("ERR_INVALID", "cert from/by must be node ids");
  const base: [string, string, Uint8Array, Uint8Array] = [from, by, keyBytes(pk, 32, "cert pk"), keyBytes(sig, 64, "cert sig")];
  const opSig = op === undefined || op === null ? undefined : keyBytes(op, 64, "cert operator sig");
  if (proof === undefined || proof === null) return opSig ? [...base, null, opSig] : base;
  if (!Array.isArray(proof) || proof.length > 1024) throw new ProtocolError("ERR_INVALID", "cert proof must be a list of at most 1024 signatures");
  return opSig ? [...base, proof.map(decodeSigned), opSig] : [...base, proof.map(decodeSigned)];
}

function decodeHandover(x: unknown): HandoverWire {
  if (!Array.isArray(x) || x.length < 7) throw new ProtocolError("ERR_INVALID", "handover must be [owner, version, kind, ...cert]");
  const [owner, version, kind, ...rest] = x as unknown[];
  if (typeof owner !== "string" || !NODE_ID_RE.test(owner)) throw new ProtocolError("ERR_INVALID", "handover owner is not a node id");
  if (typeof version !== "number" || !Number.isSafeInteger(version) || version < 1) throw new ProtocolError("ERR_INVALID", "handover version must be a positive integer");
  if (kind !== "t" && kind !== "p" && kind !== "c" && kind !== "f" && kind !== "o") throw new ProtocolError("ERR_INVALID", "handover kind must be t, p, c, f or o");
  return [owner, version, kind, ...decodeCert(rest)];
}

function decodeMemberRecord(x: unknown): MemberRecordWire {
  if (!Array.isArray(x) || x.length < 3) throw new ProtocolError("ERR_INVALID", "member record must be [node, kind, proof]");
  const [n, kind, proof] = x as unknown[];
  if (typeof n !== "string" || !NODE_ID_RE.test(n)) throw new ProtocolError("ERR_INVALID", "member record node is not a node id");
  if (kind === "m") {
    if (proof === null || proof === undefined) return [n, "m", null];
    if (!Array.isArray(proof) || proof.length < 6) throw new ProtocolError("ERR_INVALID", "member addition proof must be [block, version, ...cert]");
    const [i, v, ...cert] = proof as unknown[];
    if (typeof i !== "number" || !Number.isInteger(i) || i < 0 || i >= MAX_BLOCKS) throw new ProtocolError("ERR_INVALID", "member addition block out of range");
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 1) throw new ProtocolError("ERR_INVALID", "member addition version must be a positive integer");
    return [n, "m", [i, v, ...decodeCert(cert)]];
  }
  if (kind === "x") {
    if (proof === null || proof === undefined) return [n, "x", null];
    if (!Array.isArray(proof) || proof.length < 4) throw new ProtocolError("ERR_INVALID", "member removal proof must be [reason, by, pk, sig]");
    const [reason, by, pk, sig] = proof as unknown[];
    if (reason !== "leave" && reason !== "gone" && reason !== "op") throw new ProtocolError("ERR_INVALID", "member removal reason must be leave, gone or op");
    if (typeof by !== "string" || !NODE_ID_RE.test(by)) throw new ProtocolError("ERR_INVALID", "member removal signer is not a node id");
    return [n, "x", [reason, by, keyBytes(pk, 32, "removal pk"), keyBytes(sig, 64, "removal sig")]];
  }
  throw new ProtocolError("ERR_INVALID", "member record kind must be m or x");
}

function keyBytes(x: unknown, len: number, what: string): Uint8Array {
  if (!(x instanceof Uint8Array) || x.byteLength !== len) throw new ProtocolError("ERR_INVALID", `${what} must be ${len} bytes`);
  return x;
}

export function encodeIpamMessage(m: IpamMessage): IpamWire {
  switch (m.t) {
    case "hello":
      return { v: IPAM_WIRE_VERSION, t: "hello", epoch: m.epoch ? { ...m.epoch } : null, beat: m.beat, ...(m.sig ? { pk: m.pk, sig: m.sig } : {}), beats: m.beats, free: m.free, digest: m.digest, promised: m.promised };
    case "state":
      return { v: IPAM_WIRE_VERSION, t: "state", epoch: m.epoch, entries: m.entries, ...(m.certs ? { certs: m.certs } : {}), ...(m.handovers ? { handovers: m.handovers } : {}) };
    case "prop":
      return { v: IPAM_WIRE_VERSION, t: "prop", epoch: m.epoch, kind: m.kind, owner: m.owner, to: m.to, until: m.until, blocks: m.blocks };
    case "prom":
      return { v: IPAM_WIRE_VERSION, t: "prom", epoch: m.epoch, blocks: m.blocks, ...(m.sigs ? { sigs: m.sigs, pk: m.pk, m: m.m } : {}) };
    case "members":
      return { v: IPAM_WIRE_VERSION, t: "members", epoch: m.epoch, records: m.records };
    case "req":
    case "nak":
      return { v: IPAM_WIRE_VERSION, t: m.t, epoch: m.epoch };
  }
}

function uint(m: Record<string, unknown>, k: string, max = Number.MAX_SAFE_INTEGER): number {
  const x = num(m, k);
  if (!Number.isInteger(x) || x < 0 || x > max) throw new ProtocolError("ERR_INVALID", `field ${k} must be an integer in 0..${max}`);
  return x;
}

const EPOCH_ID_RE = /^[0-9a-f]{16}\.[0-9]{1,16}$/;

export function epochId(founder: string, at: number): string {
  return `${founder}.${at}`;
}

function decodeEpoch(x: unknown): EpochInfo {
  if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", "epoch must be a map");
  const founder = nodeId(x, "founder");
  const at = uint(x, "at");
  const id = str(x, "id", 40);
  if (id !== epochId(founder, at)) throw new ProtocolError("ERR_INVALID", "epoch id does not match founder and time");
  const range = str(x, "range", 18);
  const bp = uint(x, "bp", 32);
  return { id, founder, at, range, bp };
}

function epochRef(m: Record<string, unknown>): string {
  const id = str(m, "epoch", 40);
  if (!EPOCH_ID_RE.test(id)) throw new ProtocolError("ERR_INVALID", "field epoch is not an epoch id");
  return id;
}

function decodeEntry(x: unknown): EntryTuple {
  if (!Array.isArray(x) || x.length < 4) throw new ProtocolError("ERR_INVALID", "entry must be [index, owner, version, kind]");
  const [i, owner, version, kind] = x as unknown[];
  if (typeof i !== "number" || !Number.isInteger(i) || i < 0 || i >= MAX_BLOCKS) throw new ProtocolError("ERR_INVALID", "entry index out of range");
  if (typeof owner !== "string" || !NODE_ID_RE.test(owner)) throw new ProtocolError("ERR_INVALID", "entry owner is not a node id");
  if (typeof version !== "number" || !Number.isSafeInteger(version) || version < 0) throw new ProtocolError("ERR_INVALID", "entry version must be a non-negative integer");
  if (kind !== "t" && kind !== "p" && kind !== "c" && kind !== "f" && kind !== "o") throw new ProtocolError("ERR_INVALID", "entry kind must be t, p, c, f or o");
  return [i, owner, version, kind as EntryKind];
}

function decodeBlockVersion(x: unknown): [number, number] {
  if (!Array.isArray(x) || x.length < 2) throw new ProtocolError("ERR_INVALID", "block version must be [index, version]");
  const [i, v] = x as unknown[];
  if (typeof i !== "number" || !Number.isInteger(i) || i < 0 || i >= MAX_BLOCKS) throw new ProtocolError("ERR_INVALID", "block index out of range");
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 1) throw new ProtocolError("ERR_INVALID", "claim version must be a positive integer");
  return [i, v];
}

/** Validate a remote body. Throws ProtocolError; never returns partially checked data. */
export function decodeIpamMessage(body: unknown): IpamMessage {
  if (!isPlainObject(body)) throw new ProtocolError("ERR_MALFORMED", "ipam message is not a map");
  const v = body.v;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) throw new ProtocolError("ERR_MALFORMED", "ipam message has no valid version");
  if (v > IPAM_WIRE_VERSION) throw new ProtocolError("ERR_VERSION", `ipam message version ${v} is newer than ${IPAM_WIRE_VERSION}`);
  const t = body.t;
  switch (t) {
    case "hello": {
      const epoch = body.epoch === null || body.epoch === undefined ? null : decodeEpoch(obj(body, "epoch"));
      const beat = uint(body, "beat");
      const beats = arr(body, "beats", MAX_BEATS).map((x): BeatRecord => {
        if (!Array.isArray(x) || x.length < 2) throw new ProtocolError("ERR_INVALID", "beat must be [node, beat, pk, sig]");
        const [n, b, pk, sig] = x as unknown[];
        if (typeof n !== "string" || !NODE_ID_RE.test(n)) throw new ProtocolError("ERR_INVALID", "beat node is not a node id");
        if (typeof b !== "number" || !Number.isSafeInteger(b) || b < 0) throw new ProtocolError("ERR_INVALID", "beat must be a non-negative integer");
        if (pk === undefined && sig === undefined) return [n, b];
        return [n, b, keyBytes(pk, 32, "beat pk"), keyBytes(sig, 64, "beat sig")];
      });
      const own = body.sig === undefined ? {} : { pk: keyBytes(body.pk, 32, "pk"), sig: keyBytes(body.sig, 64, "sig") };
      const free = uint(body, "free", MAX_BLOCKS);
      const digest = uint(body, "digest", 0xffffffff);
      const promised = body.promised === undefined ? [] : arr(body, "promised", MAX_BLOCKS).map(decodeBlockVersion);
      return { t, epoch, beat, ...own, beats, free, digest, promised };
    }
    case "state": {
      const epoch = epochRef(body);
      const entries = arr(body, "entries", STATE_CHUNK).map(decodeEntry);
      const certs = body.certs === undefined ? undefined : arr(body, "certs", STATE_CHUNK).map((c) => (c === null ? null : decodeCert(c)));
      const handovers = body.handovers === undefined ? undefined : arr(body, "handovers", STATE_CHUNK).map((h) => (h === null ? null : decodeHandover(h)));
      if ((certs && certs.length !== entries.length) || (handovers && handovers.length !== entries.length)) throw new ProtocolError("ERR_INVALID", "certs/handovers must align with entries");
      return { t, epoch, entries, ...(certs ? { certs } : {}), ...(handovers ? { handovers } : {}) };
    }
    case "prop":
      const kind = body.kind;
      if (kind !== "t" && kind !== "c" && kind !== "p") throw new ProtocolError("ERR_INVALID", "proposal kind must be t, c or p");
      return { t, epoch: epochRef(body), kind, owner: nodeId(body, "owner"), to: nodeId(body, "to"), until: uint(body, "until"), blocks: arr(body, "blocks", MAX_BLOCKS).map(decodeBlockVersion) };
    case "prom": {
      const blocks = arr(body, "blocks", MAX_BLOCKS).map(decodeBlockVersion);
      if (body.sigs === undefined) return { t, epoch: epochRef(body), blocks };
      const sigs = arr(body, "sigs", MAX_BLOCKS).map((x) => keyBytes(x, 64, "promise sig"));
      if (sigs.length !== blocks.length) throw new ProtocolError("ERR_INVALID", "promise sigs must align with blocks");
      return { t, epoch: epochRef(body), blocks, sigs, pk: keyBytes(body.pk, 32, "pk"), m: uint(body, "m", MAX_BLOCKS) };
    }
    case "members":
      return { t, epoch: epochRef(body), records: arr(body, "records", MEMBERS_CHUNK).map(decodeMemberRecord) };
    case "req":
    case "nak":
      return { t, epoch: epochRef(body) };
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown ipam message type ${JSON.stringify(t)}`);
  }
}
