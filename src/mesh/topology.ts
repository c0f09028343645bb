/**
 * Topology gossip: a link-state database replicated to every agent over the mesh (weaveworks/mesh style).
 * Pure and sans-I/O: no timers, no clock reads. Time is always the caller's `now` (wall-clock ms, the
 * agent passes Date.now()); the agent owns the sockets and the timers.
 *
 * ## Record layout (one per origin node)
 *
 *   node       origin node id (16 lowercase hex chars)
 *   seq        version of this origin's record: a positive safe integer, strictly increasing per origin
 *   links      [{peer, rttMs}] the origin's live direct links, sorted by peer, no duplicates, no self link;
 *              rttMs is the origin's *advertised* RTT (sticky: see "RTT stickiness" below)
 *   prefixes   canonical CIDR strings the origin owns/advertises (its IPAM blocks, extra routes), sorted
 *   updatedAt  origin's wall clock when it made this version (informational only: never used for
 *              ordering or aging, so clock skew between hosts does not matter)
 *   stun       optional: STUN servers the origin answers on (`weftnet agent --stun-port`), "IP:PORT" /
 *              "[IPv6]:PORT" literals, at most MAX_STUN_PER_RECORD, sorted. Covered by the signature like
 *              every field; a record without it has exactly the content key (and signature) it had
 *              before the field existed. Agents from before the field ignore the extra tuple element, so
 *              they see a signature that does not match and refuse such records (counted as forged): run
 *              --stun-port only once every agent understands it.
 *   pub, sig   the origin's raw Ed25519 public key (its hash is the node id) and its signature over
 *              (CTX_TOPO, node, recordKey(record)) — identity.ts signRecord/verifyRecord
 *
 * ## Trust (every record speaks only for its origin)
 * A Topology built with the node's `identity` signs every record it originates and accepts a remote record
 * only with a valid signature by the record's own node: checked before merge, so nothing unverified is
 * ever stored, forwarded (the delta is the forward set) or used for routing. A forged record for X (no X
 * key) is refused whatever its seq, so it can neither replace X's record nor outbid it; a forged record for
 * OURSELVES can no longer push our counter up either. seq may step forward only by MAX_SEQ_STEP_MS past
 * max(the version we hold, its tombstone, our clock): X itself (or a replay of a compromised X) cannot burn
 * the counter space with 2^53-1. Replays of old versions lose to the current one; a replay of a dead
 * node's last record after it aged out only brings back links its neighbours no longer report (routing
 * needs both ends) — harmless. Refusals are typed (ERR_UNSIGNED, ERR_BAD_SIGNATURE, ERR_SEQ_JUMP) and
 * returned in `rejected` for the caller to count. Without an identity (simulations, unit tests of the
 * merge algebra) records are neither signed nor checked: the agent always passes one (Router).
 *
 * Wire body on the mesh app channel "topo" (plain maps/arrays for msgpack; see encode/decode below):
 *   { v: 1, t: "recs", recs: [[node, seq, [[peer, rttMs], ...], [cidr, ...], updatedAt | null, pub, sig, stun?], ...] }
 * Decoders ignore unknown map fields and extra trailing tuple elements, so newer senders may append.
 * A message carries at most MAX_RECORDS_PER_MESSAGE records and stays under ~192 KiB
 * (encodeTopologyMessages chunks), below the control channel's 256 KiB limit.
 *
 * ## Merge
 * For each origin the record with the highest seq wins; an equal seq with different content (only after a
 * restart that lost its counter, see below) is settled by comparing a canonical content key, so merge is a
 * join: commutative, associative, idempotent. merge() returns exactly the records that changed our state
 * (the delta); the agent forwards only that (flooding with delta suppression): each version of each record
 * crosses every link at most once per direction.
 *
 * ## seq across restarts (chosen design: wall-clock floor + self-correction, persistence optional)
 * A new local version gets seq = max(seq + 1, floor(now)). With `now` in wall-clock ms a restarted node
 * starts above every seq it issued before (it never issues more than one version per ms on average, and
 * clocks do not run back by more than the time the node was down). Two safety nets make this robust anyway:
 *   1. the agent may persist `topology.seq` and pass it back as `initialSeq` (like the IPAM heartbeat);
 *   2. if gossip ever brings back a record with OUR id and a seq >= ours (an older incarnation the mesh
 *      still remembers, a backwards clock), we jump past it and re-originate at once; the new record is
 *      part of merge()'s delta so it floods out and overrides the stale one everywhere.
 *
 * ## Aging
 * Origins re-announce every `refreshMs` (default 10 s; refresh() bumps seq even when nothing changed) and
 * on every change (setLocal). A remote record whose seq has not advanced for `maxAgeMs` (default 60 s,
 * measured on OUR clock from when we accepted that version) is removed by expire(). The removed version
 * leaves a tombstone (origin -> seq) for `tombstoneMs` so a neighbour that has not yet aged it out cannot
 * gossip it straight back; any higher seq (the node came back) is accepted at once. Our own record never
 * ages. Routing additionally only uses links both ends report, so a dead node stops carrying traffic as
 * soon as its neighbours drop their link to it (well before it ages out).
 *
 * ## RTT stickiness (hysteresis at the source)
 * setLocal() re-originates when the set of links or prefixes changes, or when a link's measured RTT rose
 * above the advertised value by more than max(rttChangeRatio x advertised, rttChangeMinMs) (default
 * 20% / 2 ms), or fell below it by more than rttChangeRatio x advertised (and 0.1 ms). Otherwise the
 * advertised value stays, and periodic refreshes repeat it. Every node therefore computes routes from
 * identical, slowly changing weights: RTT jitter never floods the mesh and never flips paths. Falls need no
 * 2 ms floor: the advertised value ratchets down to the lowest RTT seen (each step a 20% fall, so a few
 * floods at most) and only a real rise moves it back up. With the floor on falls too, a new link's first,
 * high sample (taken while the link was still settling, e.g. 2.3 ms on a 0.5 ms LAN) stuck forever, and with
 * the 2 ms hop penalty and 20% path hysteresis a 2-hop path kept the traffic over a healed direct link
 * (dataplane e2e 'back to direct' failed 1 in 2 at load 4). (paths.ts adds a per-destination hysteresis on top.)
 *
 * ## How an agent drives it
 *   const topo = new Topology(selfId, { initialSeq: persisted.topoSeq });
 *   const flood = (recs, except?) => { for (const p of mesh.connectedPeers()) if (p !== except)
 *       for (const body of encodeTopologyMessages(recs)) mesh.sendApp(p, "topo", body); };
 *   const local = (now) => { const r = topo.setLocal(linksWithRtt(), myPrefixes(), now); if (r) flood([r]); };
 *   mesh.onPeerUp(p => { local(now);                                   // our link set changed
 *                        for (const b of encodeTopologyMessages(topo.fullSync())) mesh.sendApp(p, "topo", b); });
 *   mesh.onPeerDown(p => local(now));
 *   mesh.onApp("topo", (from, body) => {
 *     let recs; try { recs = decodeTopologyMessage(body); } catch (e) { counters.bad++; return; }
 *     const { delta, originated, rejected } = topo.mergeDetailed(recs, now);   // count `rejected`
 *     flood(delta.filter(r => r !== originated), from);  // not back to the sender: it has them
 *     if (originated) flood([originated]);               // our re-originated record (restart case,
 *     if (delta.length) recompute routes;                // see above) goes to everyone, sender too
 *   });
 *   every ~1 s: local(now) (new RTT samples);
 *               const r = topo.refresh(now); if (r) flood([r]);
 *               if (topo.expire(now).length) recompute routes;
 *   persist topo.seq now and then (optional, see above).
 *   recompute routes (paths.ts): table = computeRoutes(selfId, topo.records(), {}, table);
 *               packetRoutes.replaceAll(nextHopEntries(topo.records(), table));   // prefix -> next hop
 * The control channel is reliable and ordered, so deltas are not lost while a link is up; a link that
 * goes down and up again gets a fresh full sync.
 */
import { ProtocolError, WeftError } from "../errors.js";
import { CTX_TOPO, signRecord, verifyRecord, type Identity } from "../identity.js";
import { formatCidr, parseCidr } from "../packet/ip.js";
import { NODE_ID_RE, arr, isPlainObject } from "../wire/codec.js";

export const TOPO_WIRE_VERSION = 1;
/** Mesh app channel the agent uses for topology gossip. */
export const TOPO_CHANNEL = "topo";
export const MAX_NODES = 1024;
export const MAX_LINKS_PER_RECORD = 256;
export const MAX_PREFIXES_PER_RECORD = 256;
export const MAX_RECORDS_PER_MESSAGE = MAX_NODES;
export const MAX_RTT_MS = 60_000;
export const MAX_STUN_PER_RECORD = 4;
/**
 * Largest forward step of an origin's seq past max(held version, tombstone, our clock). seq is the origin's
 * wall clock in ms, so this is also the clock skew tolerated between hosts (a day).
 */
export const MAX_SEQ_STEP_MS = 24 * 3600 * 1000;
/** Per-message budget for encodeTopologyMessages (estimated msgpack bytes). */
export const MESSAGE_BUDGET_BYTES = 192 * 1024;

export interface TopologyLink {
  readonly peer: string;
  readonly rttMs: number;
}

export interface TopologyRecord {
  readonly node: string;
  readonly seq: number;
  readonly links: readonly TopologyLink[];
  readonly prefixes: readonly string[];
  readonly updatedAt?: number;
  /** STUN servers the origin serves ("IP:PORT", "[IPv6]:PORT"), sorted; absent when none */
  readonly stun?: readonly string[];
  /** origin's public key and signature (identity.ts signRecord); absent only in unsigned mode */
  readonly pub?: Uint8Array;
  readonly sig?: Uint8Array;
}

/** Input to setLocal: one live direct link; rttMs undefined until the first measurement. */
export interface LocalLink {
  readonly peer: string;
  readonly rttMs?: number | undefined;
}

export interface TopologyOptions {
  /** remote records not advanced for this long are removed (default 60 s) */
  maxAgeMs?: number;
  /** refresh() re-originates our record after this long (default 10 s) */
  refreshMs?: number;
  /** how long an aged-out version blocks re-entry of the same or older seq (default = maxAgeMs) */
  tombstoneMs?: number;
  /** most nodes we keep, ourselves included (default MAX_NODES); records of further origins are rejected */
  maxNodes?: number;
  /** advertised RTT changes only beyond max(ratio x advertised, minMs) (defaults 0.2, 2 ms) */
  rttChangeRatio?: number;
  rttChangeMinMs?: number;
  /** RTT advertised for a link that has no measurement yet (default 100 ms: measured paths win) */
  unknownRttMs?: number;
  /** last seq this node issued, if the agent persisted it */
  initialSeq?: number;
  /** this node's key: sign our records, accept remote ones only when signed by their origin (the agent always sets it) */
  identity?: Identity;
  /** largest forward seq step accepted (default MAX_SEQ_STEP_MS) */
  maxSeqStepMs?: number;
}

/**
 * Whether a measured RTT moved far enough from the advertised one to re-originate (see the header):
 * up by more than max(ratio x advertised, minMs), down by more than ratio x advertised (and 0.1 ms).
 */
export function rttMoved(measured: number, advertised: number, ratio: number, minMs: number): boolean {
  if (measured > advertised) return measured - advertised > Math.max(ratio * advertised, minMs);
  return advertised - measured > Math.max(ratio * advertised, 0.1);
}

/** Semantic refusals of remote data (ProtocolError covers malformed data). Count and drop. */
export class TopologyError extends WeftError {
  static override readonly name = "TopologyError";
  constructor(code: "ERR_TOO_MANY_NODES" | "ERR_CONFIG" | "ERR_UNSIGNED" | "ERR_BAD_SIGNATURE" | "ERR_SEQ_JUMP", message: string) {
    super(code, message);
  }
}

export interface MergeResult {
  /** records that changed our state, in input order (plus our re-originated record, if any, last) */
  readonly delta: TopologyRecord[];
  /** our own record, re-originated because the mesh still held an older incarnation with a seq >= ours:
   *  send it to every peer, including the one the stale copy came from */
  readonly originated: TopologyRecord | undefined;
  /** remote records refused (invalid, or over the node limit); the rest was merged */
  readonly rejected: (ProtocolError | TopologyError)[];
}

export interface TopologySnapshot {
  readonly self: string;
  readonly seq: number;
  readonly records: (TopologyRecord & { readonly receivedAt: number })[];
  readonly tombstones: { readonly node: string; readonly seq: number; readonly at: number }[];
}

interface Entry {
  rec: TopologyRecord;
  key: string;
  receivedAt: number;
}

// ---- record helpers (pure) -------------------------------------------------------------------------

/** Canonical content key: equal records (in any field order) have equal keys. */
export function recordKey(r: TopologyRecord): string {
  const k: unknown[] = [r.node, r.seq, r.links.map((l) => [l.peer, l.rttMs]), r.prefixes, r.updatedAt ?? null];
  // appended only when present: records without it keep the key (and signatures) they always had
  if (r.stun && r.stun.length > 0) k.push(r.stun);
  return JSON.stringify(k);
}

/** "IP:PORT" / "[IPv6]:PORT" with a canonical IP literal and a port 1..65535, else undefined. */
export function canonicalStunAddress(s: unknown): string | undefined {
  if (typeof s !== "string" || s.length > 64) return undefined;
  const m = /^(?:\[([0-9a-f:.]+)\]|(\d{1,3}(?:\.\d{1,3}){3})):(\d{1,5})$/.exec(s);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (!(port >= 1 && port <= 65535) || String(port) !== m[3]) return undefined;
  const ip = m[1] ?? m[2]!;
  const c = parseCidr(`${ip}/${m[1] !== undefined ? 128 : 32}`);
  if (!c) return undefined;
  const text = formatCidr(c).replace(/\/\d+$/, "");
  if (text !== ip) return undefined;
  return m[1] !== undefined ? `[${text}]:${port}` : `${text}:${port}`;
}

function canonicalStunList(v: unknown, what: string): string[] | undefined {
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || v.length > MAX_STUN_PER_RECORD) throw new ProtocolError("ERR_TOO_LARGE", `${what} stun must be an array of at most ${MAX_STUN_PER_RECORD}`);
  const out = new Set<string>();
  for (const s of v as unknown[]) {
    const c = canonicalStunAddress(s);
    if (c === undefined || c !== s) throw new ProtocolError("ERR_INVALID", `${what} stun entry is not a canonical IP:PORT`);
    if (out.has(c)) throw new ProtocolError("ERR_INVALID", `duplicate ${what} stun entry`);
    out.add(c);
  }
  return out.size ? [...out].sort() : undefined;
}

/** Total order on versions of one origin: >0 when a is newer than b. */
export function compareRecords(a: TopologyRecord, b: TopologyRecord): number {
  if (a.seq !== b.seq) return a.seq - b.seq;
  const ka = recordKey(a);
  const kb = recordKey(b);
  return ka < kb ? -1 : ka > kb ? 1 : 0;
}

function canonicalPrefix(p: string): string | undefined {
  if (typeof p !== "string" || p.length > 64) return undefined;
  const c = parseCidr(p);
  return c ? formatCidr(c) : undefined;
}

/**
 * Validate and canonicalise a record (links sorted by peer, prefixes sorted). Throws ProtocolError.
 * Non-canonical prefix text (host bits set, uppercase hex...) is refused, not repaired: the origin
 * always sends canonical text, so anything else is a bug or an attack.
 */
export function validateRecord(r: unknown): TopologyRecord {
  if (!isPlainObject(r)) throw new ProtocolError("ERR_INVALID", "topology record must be a map");
  const { node, seq, links, prefixes, updatedAt } = r as Record<string, unknown>;
  if (typeof node !== "string" || !NODE_ID_RE.test(node)) throw new ProtocolError("ERR_INVALID", "record node is not a node id");
  if (typeof seq !== "number" || !Number.isSafeInteger(seq) || seq < 1) throw new ProtocolError("ERR_INVALID", "record seq must be a positive safe integer");
  if (!Array.isArray(links) || links.length > MAX_LINKS_PER_RECORD) throw new ProtocolError("ERR_TOO_LARGE", `record links must be an array of at most ${MAX_LINKS_PER_RECORD}`);
  if (!Array.isArray(prefixes) || prefixes.length > MAX_PREFIXES_PER_RECORD) throw new ProtocolError("ERR_TOO_LARGE", `record prefixes must be an array of at most ${MAX_PREFIXES_PER_RECORD}`);
  if (updatedAt !== undefined && (typeof updatedAt !== "number" || !Number.isFinite(updatedAt) || updatedAt < 0)) throw new ProtocolError("ERR_INVALID", "record updatedAt must be a non-negative number");
  const seen = new Set<string>();
  const outLinks: TopologyLink[] = [];
  for (const l of links as unknown[]) {
    if (!isPlainObject(l)) throw new ProtocolError("ERR_INVALID", "link must be a map");
    const { peer, rttMs } = l;
    if (typeof peer !== "string" || !NODE_ID_RE.test(peer)) throw new ProtocolError("ERR_INVALID", "link peer is not a node id");
    if (peer === node) throw new ProtocolError("ERR_INVALID", "record links to itself");
    if (seen.has(peer)) throw new ProtocolError("ERR_INVALID", "duplicate link peer");
    if (typeof rttMs !== "number" || !Number.isFinite(rttMs) || rttMs < 0 || rttMs > MAX_RTT_MS) throw new ProtocolError("ERR_INVALID", `link rttMs must be within 0..${MAX_RTT_MS}`);
    seen.add(peer);
    outLinks.push({ peer, rttMs });
  }
  outLinks.sort((a, b) => (a.peer < b.peer ? -1 : a.peer > b.peer ? 1 : 0));
  const ps = new Set<string>();
  for (const p of prefixes as unknown[]) {
    const c = typeof p === "string" ? canonicalPrefix(p) : undefined;
    if (c === undefined || c !== p) throw new ProtocolError("ERR_INVALID", "record prefix is not a canonical CIDR");
    if (ps.has(c)) throw new ProtocolError("ERR_INVALID", "duplicate record prefix");
    ps.add(c);
  }
  const stun = canonicalStunList((r as Record<string, unknown>).stun, "record");
  const { pub, sig } = r as Record<string, unknown>;
  if (pub !== undefined && !(pub instanceof Uint8Array && pub.byteLength === 32)) throw new ProtocolError("ERR_INVALID", "record pub must be 32 bytes");
  if (sig !== undefined && !(sig instanceof Uint8Array && sig.byteLength === 64)) throw new ProtocolError("ERR_INVALID", "record sig must be 64 bytes");
  const out: TopologyRecord = { node, seq, links: outLinks, prefixes: [...ps].sort(), ...(updatedAt === undefined ? {} : { updatedAt }), ...(stun ? { stun } : {}) };
  return pub && sig ? { ...out, pub: pub as Uint8Array, sig: sig as Uint8Array } : out;
}

/** What a record's signature covers: its canonical content (recordKey), under CTX_TOPO and the origin id. */
export function signTopologyRecord(idn: Identity, r: TopologyRecord): TopologyRecord {
  if (r.node !== idn.id) throw new TopologyError("ERR_CONFIG", "a node signs only its own record");
  const { pub, sig } = signRecord(idn, CTX_TOPO, recordKey(r));
  return { ...r, pub, sig };
}

export function verifyTopologyRecord(r: TopologyRecord): boolean {
  return verifyRecord(r.node, r, CTX_TOPO, recordKey(r));
}

// ---- wire ------------------------------------------------------------------------------------------

export type TopologyWire = { v: number; t: "recs"; recs: unknown[] };

function recordTuple(r: TopologyRecord): unknown[] {
  const t: unknown[] = [r.node, r.seq, r.links.map((l) => [l.peer, l.rttMs]), [...r.prefixes], r.updatedAt ?? null];
  if (r.pub && r.sig) t.push(r.pub, r.sig);
  if (r.stun && r.stun.length > 0) {
    if (!(r.pub && r.sig)) t.push(null, null);
    t.push([...r.stun]);
  }
  return t;
}

function estimateBytes(r: TopologyRecord): number {
  let n = 48 + 100;
  n += r.links.length * 30;
  for (const p of r.prefixes) n += p.length + 2;
  for (const s of r.stun ?? []) n += s.length + 2;
  return n;
}

/** Encode records as one or more bodies for mesh.sendApp(peer, "topo", body), each under the budget. */
export function encodeTopologyMessages(records: readonly TopologyRecord[], budgetBytes = MESSAGE_BUDGET_BYTES): TopologyWire[] {
  const out: TopologyWire[] = [];
  let cur: unknown[] = [];
  let size = 16;
  for (const r of records) {
    const b = estimateBytes(r);
    if (cur.length > 0 && (size + b > budgetBytes || cur.length >= MAX_RECORDS_PER_MESSAGE)) {
      out.push({ v: TOPO_WIRE_VERSION, t: "recs", recs: cur });
      cur = [];
      size = 16;
    }
    cur.push(recordTuple(r));
    size += b;
  }
  if (cur.length > 0) out.push({ v: TOPO_WIRE_VERSION, t: "recs", recs: cur });
  return out;
}

/** Validate a remote body. Throws ProtocolError; never returns partially checked data. */
export function decodeTopologyMessage(body: unknown): TopologyRecord[] {
  if (!isPlainObject(body)) throw new ProtocolError("ERR_MALFORMED", "topology message is not a map");
  const v = body.v;
  if (typeof v !== "number" || !Number.isInteger(v) || v < 1) throw new ProtocolError("ERR_MALFORMED", "topology message has no valid version");
  if (v > TOPO_WIRE_VERSION) throw new ProtocolError("ERR_VERSION", `topology message version ${v} is newer than ${TOPO_WIRE_VERSION}`);
  if (body.t !== "recs") throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown topology message type ${JSON.stringify(body.t)}`);
  return arr(body, "recs", MAX_RECORDS_PER_MESSAGE).map((x) => {
    if (!Array.isArray(x) || x.length < 4) throw new ProtocolError("ERR_INVALID", "record must be [node, seq, links, prefixes, updatedAt?]");
    const [node, seq, links, prefixes, updatedAt, pub, sig, stun] = x as unknown[];
    if (!Array.isArray(links) || links.length > MAX_LINKS_PER_RECORD) throw new ProtocolError("ERR_TOO_LARGE", `record links must be an array of at most ${MAX_LINKS_PER_RECORD}`);
    const ls = links.map((l) => {
      if (!Array.isArray(l) || l.length < 2) throw new ProtocolError("ERR_INVALID", "link must be [peer, rttMs]");
      return { peer: l[0], rttMs: l[1] };
    });
    const proof = pub === undefined || pub === null ? {} : { pub: toBytes(pub), sig: toBytes(sig) };
    return validateRecord({ node, seq, links: ls, prefixes, ...(updatedAt === null || updatedAt === undefined ? {} : { updatedAt }), ...proof, ...(stun === null || stun === undefined ? {} : { stun }) });
  });
}

/** msgpack hands bin fields back as Buffer (a Uint8Array) or Uint8Array; anything else stays as is and fails validation. */
function toBytes(x: unknown): unknown {
  return x instanceof Uint8Array ? new Uint8Array(x.buffer, x.byteOffset, x.byteLength) : x;
}

// ---- the database ----------------------------------------------------------------------------------

export class Topology {
  private readonly entries = new Map<string, Entry>();
  private readonly tombs = new Map<string, { seq: number; at: number }>();
  private seqNo: number;
  private lastOriginated = -Infinity;
  /** advertised RTTs (sticky) and the last inputs, so refresh() can re-originate the same content */
  private advertised = new Map<string, number>();
  private localPrefixes: string[] = [];
  private localStun: string[] = [];
  private hasLocal = false;
  private readonly o: Required<Omit<TopologyOptions, "initialSeq" | "identity">>;
  private readonly identity: Identity | undefined;

  constructor(
    readonly selfId: string,
    opts: TopologyOptions = {},
  ) {
    if (!NODE_ID_RE.test(selfId)) throw new TopologyError("ERR_CONFIG", `node id ${JSON.stringify(selfId)} is not 16 lowercase hex chars`);
    const maxAgeMs = opts.maxAgeMs ?? 60_000;
    this.o = {
      maxAgeMs,
      refreshMs: opts.refreshMs ?? 10_000,
      tombstoneMs: opts.tombstoneMs ?? maxAgeMs,
      maxNodes: opts.maxNodes ?? MAX_NODES,
      rttChangeRatio: opts.rttChangeRatio ?? 0.2,
      rttChangeMinMs: opts.rttChangeMinMs ?? 2,
      unknownRttMs: opts.unknownRttMs ?? 100,
      maxSeqStepMs: opts.maxSeqStepMs ?? MAX_SEQ_STEP_MS,
    };
    this.identity = opts.identity;
    if (this.identity && this.identity.id !== selfId) throw new TopologyError("ERR_CONFIG", "identity does not match the node id");
    if (!(this.o.maxAgeMs > 0 && this.o.refreshMs > 0 && this.o.refreshMs < this.o.maxAgeMs && this.o.tombstoneMs >= 0 && this.o.maxNodes >= 1)) {
      throw new TopologyError("ERR_CONFIG", "need 0 < refreshMs < maxAgeMs, tombstoneMs >= 0, maxNodes >= 1");
    }
    const s = opts.initialSeq ?? 0;
    if (!Number.isSafeInteger(s) || s < 0) throw new TopologyError("ERR_CONFIG", "initialSeq must be a non-negative safe integer");
    this.seqNo = s;
  }

  /** Highest seq this node has issued (or seen for itself): persist it if you like. */
  get seq(): number {
    return this.seqNo;
  }

  get size(): number {
    return this.entries.size;
  }

  get(node: string): TopologyRecord | undefined {
    return this.entries.get(node)?.rec;
  }

  /** All live records (ours included), sorted by node id. */
  records(): TopologyRecord[] {
    return [...this.entries.keys()].sort().map((k) => this.entries.get(k)!.rec);
  }

  /** What to send a newly connected peer: every live record. */
  fullSync(): TopologyRecord[] {
    return this.records();
  }

  snapshot(): TopologySnapshot {
    return {
      self: this.selfId,
      seq: this.seqNo,
      records: this.records().map((r) => ({ ...r, links: r.links.map((l) => ({ ...l })), prefixes: [...r.prefixes], receivedAt: this.entries.get(r.node)!.receivedAt })),
      tombstones: [...this.tombs].sort(([a], [b]) => (a < b ? -1 : 1)).map(([node, t]) => ({ node, seq: t.seq, at: t.at })),
    };
  }

  /**
   * Report our live links and prefixes. Returns the new record when it differs from the advertised one
   * (flood it), else undefined. RTTs are sticky (see the header). `stun`: the STUN servers this node
   * serves (IP:PORT literals; see the record layout).
   */
  setLocal(links: readonly LocalLink[], prefixes: readonly string[], now: number, stun: readonly string[] = []): TopologyRecord | undefined {
    const next = new Map<string, number>();
    for (const l of links) {
      if (!NODE_ID_RE.test(l.peer) || l.peer === this.selfId) throw new TopologyError("ERR_CONFIG", `bad local link peer ${JSON.stringify(l.peer)}`);
      const measured = l.rttMs === undefined || !Number.isFinite(l.rttMs) ? undefined : Math.min(MAX_RTT_MS, Math.max(0, Math.round(l.rttMs * 10) / 10));
      const adv = this.advertised.get(l.peer);
      let v: number;
      if (adv === undefined) v = measured ?? this.o.unknownRttMs;
      else if (measured === undefined) v = adv;
      else v = rttMoved(measured, adv, this.o.rttChangeRatio, this.o.rttChangeMinMs) ? measured : adv;
      next.set(l.peer, v);
    }
    if (next.size > MAX_LINKS_PER_RECORD) throw new TopologyError("ERR_CONFIG", `more than ${MAX_LINKS_PER_RECORD} local links`);
    const ps = new Set<string>();
    for (const p of prefixes) {
      const c = canonicalPrefix(p);
      if (c === undefined) throw new TopologyError("ERR_CONFIG", `bad local prefix ${JSON.stringify(p)}`);
      ps.add(c);
    }
    if (ps.size > MAX_PREFIXES_PER_RECORD) throw new TopologyError("ERR_CONFIG", `more than ${MAX_PREFIXES_PER_RECORD} local prefixes`);
    const nextPrefixes = [...ps].sort();
    let nextStun: string[];
    try {
      nextStun = canonicalStunList([...new Set(stun.map((s) => canonicalStunAddress(s) ?? s))], "local") ?? [];
    } catch (e) {
      throw new TopologyError("ERR_CONFIG", `bad local STUN address list ${JSON.stringify(stun)}: ${(e as Error).message}`);
    }
    const changed =
      !this.hasLocal ||
      next.size !== this.advertised.size ||
      [...next].some(([p, v]) => this.advertised.get(p) !== v) ||
      nextPrefixes.length !== this.localPrefixes.length ||
      nextPrefixes.some((p, i) => this.localPrefixes[i] !== p) ||
      nextStun.join(",") !== this.localStun.join(",");
    if (!changed) return undefined;
    this.advertised = next;
    this.localPrefixes = nextPrefixes;
    this.localStun = nextStun;
    this.hasLocal = true;
    return this.originate(now);
  }

  /** Periodic re-announcement: a new version of our record once refreshMs has passed (or when forced). */
  refresh(now: number, force = false): TopologyRecord | undefined {
    if (!this.hasLocal) return undefined;
    if (!force && now - this.lastOriginated < this.o.refreshMs) return undefined;
    return this.originate(now);
  }

  private originate(now: number): TopologyRecord {
    this.seqNo = Math.max(this.seqNo + 1, Number.isFinite(now) ? Math.floor(now) : 0);
    const links = [...this.advertised].map(([peer, rttMs]) => ({ peer, rttMs })).sort((a, b) => (a.peer < b.peer ? -1 : 1));
    const plain: TopologyRecord = { node: this.selfId, seq: this.seqNo, links, prefixes: [...this.localPrefixes], updatedAt: Math.max(0, now), ...(this.localStun.length ? { stun: [...this.localStun] } : {}) };
    const rec = this.identity ? signTopologyRecord(this.identity, plain) : plain;
    this.entries.set(this.selfId, { rec, key: recordKey(rec), receivedAt: now });
    this.lastOriginated = now;
    return rec;
  }

  merge(records: readonly TopologyRecord[], now: number): TopologyRecord[] {
    return this.mergeDetailed(records, now).delta;
  }

  /** Merge remote records; returns the delta to forward and what was refused (count it). */
  mergeDetailed(records: readonly TopologyRecord[], now: number): MergeResult {
    const delta: TopologyRecord[] = [];
    const rejected: (ProtocolError | TopologyError)[] = [];
    let selfConflict = false;
    for (const raw of records) {
      let r: TopologyRecord;
      try {
        r = validateRecord(raw);
      } catch (e) {
        rejected.push(e as ProtocolError);
        continue;
      }
      if (this.identity && !(r.pub && r.sig)) {
        rejected.push(new TopologyError("ERR_UNSIGNED", `unsigned topology record for ${r.node}`));
        continue;
      }
      if (r.node === this.selfId) {
        // An older incarnation of us (or a lost counter): jump past it and re-originate below — only for a
        // record that really is ours (signed with our key) and within the step bound.
        const mine = this.entries.get(this.selfId);
        if (r.seq > this.seqNo || (mine && r.seq === mine.rec.seq && recordKey(r) !== mine.key)) {
          const why = this.refuse(r, this.seqNo, now);
          if (why) {
            rejected.push(why);
            continue;
          }
          this.seqNo = Math.max(this.seqNo, r.seq);
          selfConflict = true;
        }
        continue;
      }
      const tomb = this.tombs.get(r.node);
      if (tomb && r.seq <= tomb.seq) continue;
      const cur = this.entries.get(r.node);
      if (cur && compareRecords(r, cur.rec) <= 0) continue;
      // Only now (it would change our state) pay for the checks: stale duplicates cost nothing.
      const why = this.refuse(r, Math.max(cur?.rec.seq ?? 0, tomb?.seq ?? 0), now);
      if (why) {
        rejected.push(why);
        continue;
      }
      if (!cur && this.remoteCount() >= this.o.maxNodes - 1) {
        rejected.push(new TopologyError("ERR_TOO_MANY_NODES", `topology already holds ${this.o.maxNodes} nodes; dropping ${r.node}`));
        continue;
      }
      if (tomb) this.tombs.delete(r.node);
      this.entries.set(r.node, { rec: r, key: recordKey(r), receivedAt: now });
      delta.push(r);
    }
    const originated = selfConflict && this.hasLocal ? this.originate(now) : undefined;
    if (originated) delta.push(originated);
    return { delta, originated, rejected };
  }

  /** Why a record that would win must still be refused (seq jump, bad signature), or undefined. */
  private refuse(r: TopologyRecord, held: number, now: number): TopologyError | undefined {
    const limit = Math.max(held, Number.isFinite(now) ? Math.floor(now) : 0) + this.o.maxSeqStepMs;
    if (r.seq > limit) return new TopologyError("ERR_SEQ_JUMP", `record for ${r.node} jumps to seq ${r.seq}, past ${limit}`);
    if (this.identity && !verifyTopologyRecord(r)) return new TopologyError("ERR_BAD_SIGNATURE", `record for ${r.node} is not signed by ${r.node}`);
    return undefined;
  }

  private remoteCount(): number {
    return this.entries.size - (this.entries.has(this.selfId) ? 1 : 0);
  }

  /** Age out remote records not advanced for maxAgeMs; returns the removed origins (sorted). */
  expire(now: number): string[] {
    const removed: string[] = [];
    for (const [node, e] of this.entries) {
      if (node === this.selfId) continue;
      if (now - e.receivedAt > this.o.maxAgeMs) {
        this.entries.delete(node);
        this.tombs.set(node, { seq: e.rec.seq, at: now });
        removed.push(node);
      }
    }
    for (const [node, t] of this.tombs) if (now - t.at > this.o.tombstoneMs) this.tombs.delete(node);
    return removed.sort();
  }
}
