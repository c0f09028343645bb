/**
 * Control-channel protocol: messages between two agents on the reliable, ordered `control` data channel
 * (one msgpack map per data-channel message, see codec.ts for the envelope).
 *
 * Flow on a new link (after DTLS; both peers are already authenticated by the signed SDP fingerprints,
 * see mesh/auth.ts):
 *   A -> B  hello {name, instance, version, startedAt}     once, right after the channel opens
 *   A -> B  ping {seq, ts, ack}  every heartbeat interval (both directions)
 *   B -> A  pong {seq, ts, ack}  ts echoed; RTT = now - ts at the sender
 *                                ack (optional): the highest ping seq the sender has received from the
 *                                receiver on this link, so "they hear us" rides every ping and pong
 *                                (cumulative: a lost pong or ping is covered by the next one; half-open
 *                                links, mesh/peer.ts). Only heartbeat pings carry ack and are acked;
 *                                an RPC ping (`weftnet ping`) has none. Agents without it send no ack
 *                                and ignore it.
 *   A -> B  bye {reason}         graceful shutdown: B marks A gone at once instead of waiting
 *   A -> B  app {ch, body}       payload for a higher layer (ch: "ipam", "topo", ...), body is opaque here
 *   A -> B  auth {sig}           FIRST on a DTLS link, both ways: identity proof over the link (mesh/auth.ts
 *                                proveLink); nothing else is accepted on the link until it checks
 *
 * Limits: MAX_CONTROL_BYTES per message. Unknown `t` values and bad fields raise ProtocolError; the
 * receiver counts and drops them (and logs once per peer) — a misbehaving peer never crashes us.
 */
import { ProtocolError } from "../errors.js";
import { PROTOCOL_VERSION, bytes, decodeEnvelope, encodeMessage, num, str, type WireMap } from "./codec.js";

export const MAX_CONTROL_BYTES = 256 * 1024;

export type ControlMsg =
  | { t: "hello"; name: string; instance: string; version: string; startedAt: number }
  | { t: "ping"; seq: number; ts: number; ack?: number }
  | { t: "pong"; seq: number; ts: number; ack?: number }
  | { t: "bye"; reason: string }
  | { t: "app"; ch: string; body: unknown }
  | { t: "auth"; sig: Uint8Array };

export function encodeControl(msg: ControlMsg): Uint8Array {
  const out = encodeMessage({ v: PROTOCOL_VERSION, ...msg } as WireMap);
  if (out.byteLength > MAX_CONTROL_BYTES) throw new ProtocolError("ERR_TOO_LARGE", `control message of ${out.byteLength} bytes exceeds ${MAX_CONTROL_BYTES}`);
  return out;
}

export function decodeControl(data: Uint8Array): ControlMsg {
  const m = decodeEnvelope(data, MAX_CONTROL_BYTES);
  switch (m.t) {
    case "hello":
      return { t: "hello", name: str(m, "name", 64), instance: str(m, "instance", 64), version: str(m, "version", 32), startedAt: num(m, "startedAt") };
    case "ping":
    case "pong":
      return m.ack === undefined || m.ack === null ? { t: m.t, seq: num(m, "seq"), ts: num(m, "ts") } : { t: m.t, seq: num(m, "seq"), ts: num(m, "ts"), ack: num(m, "ack") };
    case "bye":
      return { t: "bye", reason: str(m, "reason", 256) };
    case "app":
      return { t: "app", ch: str(m, "ch", 32), body: m.body };
    case "auth":
      return { t: "auth", sig: bytes(m, "sig", 64) };
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown control message type ${JSON.stringify(m.t)}`);
  }
}
