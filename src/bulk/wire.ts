/**
 * Bulk link wire formats.
 *
 * 1. Datagrams on the bulk UDP socket (WireGuard's transport message; all integers little-endian):
 *
 *   offset size  field
 *   0      1     type: DATA (4). STUN messages share the socket and start with 0x00/0x01 (STUN answers).
 *   1      3     zero (senders write 0, receivers ignore)
 *   4      4     receiver index: which of the receiver's keypairs opens it (random u32 per handshake)
 *   8      8     counter: the nonce, strictly increasing per keypair; the replay window (replay.ts) at the
 *                receiver accepts each value once
 *   16     n+16  AEAD(key of this direction, nonce = 0^4 | counter, aad = bytes 0..16) of the inner
 *                message, then the 16-byte tag
 *
 *   Inner message, by its first byte:
 *     0x10  one data-plane frame (src/packet/frame.ts) carrying exactly ONE packet record: a pod packet
 *           (vnet header + IP) no larger than the path allows. GSO super-packets are segmented before
 *           sealing (segment.ts), so a lost datagram costs one inner packet, never a burst.
 *     0x11  one whole frame sealed end to end for a node behind this peer (FLAG_SEALED, src/packet/seal.ts),
 *           carried opaque: the receiver hands it to the forwarder unchanged (which forwards it by its
 *           clear header or opens it). Its sender sized it to fit one datagram of the path (the forwarder
 *           segments and packs sealed frames to BulkService.sealedBudget), so it holds one or a few small
 *           packets. Other flag bits, a frame shorter than its header + one record (+ the seal's counter
 *           and tag when sealed), or longer than MAX_INNER_FRAME are dropped and counted (`bad-flags`,
 *           `truncated`, `oversize`); any other first byte is `bad-inner`.
 *     0x01  path MTU probe: [1][4 id, LE][zero padding]: the datagram has the size being tried
 *     0x02  probe ack: [2][4 id][2 size of the probe datagram] (small), sent back to where the probe came from.
 *           The sender's search (src/mesh/pmtu.ts, driven by session.ts; the socket sets Don't Fragment):
 *           1200 bytes first (the link is up once one size is acked), then the link's largest datagram, then
 *           ascending coarse/fine steps, never above the kernel's route MTU; the link never sends more than the
 *           largest acked size (gso.ts segments TCP to fit; a larger non-TCP packet takes the WebRTC link).
 *           A probe of pathMax every 5 s (black holes), a search on every path change, on EMSGSIZE, and
 *           upwards every 10 minutes. `id` names the search: acks of no search of ours are typed drops.
 *     0x00  keepalive (KEEPALIVE_LEN bytes): [0]=0 [1] flags (bit0: I heard a keepalive
 *           from you within the dead interval) [2..10) f64 my clock [10..18) f64 the clock of the last
 *           keepalive I got from you [18..26) f64 ms I held it [26..28) u16 LE the largest datagram I
 *           received from you in my last two keepalive intervals (0: none; absent from older agents, whose
 *           keepalives are 26 bytes). Sent every keepalive interval on an established path (NAT mappings
 *           stay open; RTT = now - echo - held), to every candidate while punching. A sender whose larger
 *           datagrams go unreported probes its path MTU at once (session.ts: quick check).
 *
 * 2. Control-channel messages (mesh app channel "bulk", msgpack via wire/control.ts), handshake flow:
 *
 *   I -> R  init {v, hs, idx, eph, cands, sig}    I = the lower node id; hs = handshake id, idx = I's
 *                                                  receiver index, eph = X25519 ephemeral public key,
 *                                                  cands = ["a.b.c.d:port", ...] I can be reached on
 *   R -> I  resp {v, hs, idx, eph, cands, sig}    keys = HKDF(X25519(eI, eR), ids, hs, eI, eR): crypto.ts
 *   either  cands {v, cands}                       new candidates (a STUN answer came in); R also sends it
 *                                                  when it starts, so a peer without a bulk link answers off
 *   R -> I  rekey {v}                              R's sending key is due for rotation: I starts a handshake
 *   either  off {v, reason}                        bulk is disabled or failed here: stop trying
 *
 *   sig = Ed25519 signature by the sender's node identity over the domain-separated fields
 *   ("init", I, R, hs, idx, eph, cands) resp. ("resp", I, R, hs, I's idx, I's eph, idx, eph, cands):
 *   the keys are bound to both node identities, on top of the control channel's own authentication.
 *   Unknown fields are ignored; a bad message is a typed error, counted, and changes nothing.
 */
import { ProtocolError } from "../errors.js";
import { FRAME_HEADER_LEN, MIN_RECORD_LEN, RECORD_HEADER_LEN } from "../packet/frame.js";
import { SEAL_OVERHEAD as E2E_SEAL_OVERHEAD } from "../packet/seal.js";
import { VNET_HDR_LEN } from "../packet/vnet.js";

export const TYPE_DATA = 4;
export const HEADER_LEN = 16;
export const TAG_LEN = 16;
/** Header + tag: what sealing adds to an inner message. */
export const SEAL_OVERHEAD = HEADER_LEN + TAG_LEN;
export const INNER_KEEPALIVE = 0;
/** Path MTU probe: [1][u32 id][zero padding to the size tried]; answered by INNER_PROBE_ACK [2][u32 id][u16 datagram size]. */
export const INNER_PROBE = 1;
export const INNER_PROBE_ACK = 2;
/** The shortest keepalive accepted (older agents); ours carry the received-size report too (KEEPALIVE_RX_LEN). */
export const KEEPALIVE_LEN = 26;
export const KEEPALIVE_RX_LEN = 28;
/** The largest pod MTU an agent accepts (--mtu). */
export const MAX_POD_MTU = 9000;
/**
 * The largest inner frame a bulk datagram may carry: one MAX_POD_MTU packet with its virtio header and
 * record length, the frame header, and an end-to-end seal's counter and tag (8 + 16, src/packet/seal.ts).
 */
export const MAX_INNER_FRAME = FRAME_HEADER_LEN + RECORD_HEADER_LEN + VNET_HDR_LEN + MAX_POD_MTU + E2E_SEAL_OVERHEAD;
/** The smallest: the frame header and one minimal record (plus, sealed, the counter and tag). */
export const MIN_INNER_FRAME = FRAME_HEADER_LEN + RECORD_HEADER_LEN + MIN_RECORD_LEN;
export const MIN_SEALED_INNER_FRAME = MIN_INNER_FRAME + E2E_SEAL_OVERHEAD;
export const BULK_WIRE_VERSION = 1;
export const BULK_CHANNEL = "bulk";
export const MAX_CANDIDATES = 8;

export type BulkControl =
  | { t: "init" | "resp"; v: number; hs: number; idx: number; eph: Uint8Array; cands: string[]; sig: Uint8Array }
  | { t: "cands"; v: number; cands: string[] }
  | { t: "rekey"; v: number }
  | { t: "off"; v: number; reason: string };

function u32(m: Record<string, unknown>, k: string): number {
  const x = m[k];
  if (typeof x !== "number" || !Number.isInteger(x) || x < 0 || x > 0xffff_ffff) throw new ProtocolError("ERR_INVALID", `bulk: field ${k} must be a u32`);
  return x;
}

function bytes(m: Record<string, unknown>, k: string, len: number): Uint8Array {
  const x = m[k];
  if (!(x instanceof Uint8Array) || x.byteLength !== len) throw new ProtocolError("ERR_INVALID", `bulk: field ${k} must be ${len} bytes`);
  return new Uint8Array(x);
}

const CAND_RE = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3}):(\d{1,5})$/;

export interface Endpoint {
  /** IPv4 address as an unsigned 32-bit number */
  addr: number;
  port: number;
}

export function parseCandidate(s: string): Endpoint | undefined {
  const m = CAND_RE.exec(s);
  if (!m) return undefined;
  const o = [m[1], m[2], m[3], m[4]].map(Number);
  const port = Number(m[5]);
  if (o.some((x) => x! > 255) || port < 1 || port > 65535) return undefined;
  return { addr: ((o[0]! << 24) | (o[1]! << 16) | (o[2]! << 8) | o[3]!) >>> 0, port };
}

export function formatEndpoint(e: Endpoint): string {
  return `${e.addr >>> 24}.${(e.addr >>> 16) & 255}.${(e.addr >>> 8) & 255}.${e.addr & 255}:${e.port}`;
}

function cands(m: Record<string, unknown>): string[] {
  const x = m.cands;
  if (!Array.isArray(x) || x.length > MAX_CANDIDATES || !x.every((c) => typeof c === "string" && parseCandidate(c))) {
    throw new ProtocolError("ERR_INVALID", `bulk: cands must be up to ${MAX_CANDIDATES} "a.b.c.d:port" strings`);
  }
  return x as string[];
}

/** Validate a control body from a peer (hostile input): a typed ProtocolError when it is not one of ours. */
export function decodeBulkControl(body: unknown): BulkControl {
  if (typeof body !== "object" || body === null || Array.isArray(body)) throw new ProtocolError("ERR_INVALID", "bulk: body must be a map");
  const m = body as Record<string, unknown>;
  const v = m.v;
  if (typeof v !== "number" || v < 1) throw new ProtocolError("ERR_INVALID", "bulk: missing version");
  switch (m.t) {
    case "init":
    case "resp":
      return { t: m.t, v, hs: u32(m, "hs"), idx: u32(m, "idx"), eph: bytes(m, "eph", 32), cands: cands(m), sig: bytes(m, "sig", 64) };
    case "cands":
      return { t: "cands", v, cands: cands(m) };
    case "rekey":
      return { t: "rekey", v };
    case "off":
      return { t: "off", v, reason: typeof m.reason === "string" ? m.reason.slice(0, 200) : "" };
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `bulk: unknown message type ${JSON.stringify(m.t)}`);
  }
}
