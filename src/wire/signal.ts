/**
 * Signaling protocol: agent <-> signaling server, over one WebSocket (binary frames, msgpack, see codec.ts).
 *
 * Flow
 *   agent                                   server
 *     |  ---- WS upgrade GET /v1/signal ----> |
 *     |  <--- challenge {nonce}  ------------ |   32 random bytes, fresh per connection
 *     |  ---- hello {id,pub,name,instance,    |
 *     |          meta, mac, sig} -----------> |   mac = HMAC(token, CTX_HELLO|nonce|id|instance)
 *     |                                       |   sig = Ed25519(CTX_HELLO|nonce|id|instance)
 *     |                                       |   id must equal deriveNodeId(pub)
 *     |  <--- welcome {you, peers, stunPort} - |   or close 4001/4002/4009 (see CLOSE_CODES)
 *     |       optional: stunAltPort (second STUN port, netcheck), iceServers [{urls, username?,
 *     |       credential?}] (TURN REST credentials for this node); absent = none; old agents ignore them
 *     |  <--- join {peer} / leave {id} ------ |   presence of every other member; several within the
 *     |  <--- presence {join:[peer], leave:[id]} |  server's batch window come as one `presence` frame
 *     |                                       |   (apply leaves, then joins); a welcome's peers beyond
 *     |                                       |   ~48 KiB follow at once as presence frames
 *     |  ---- signal {to, data} ------------> |   forwarded verbatim as signal {from, data};
 *     |  <--- signal {from, data} ----------- |   unknown `to` -> error {code:"ERR_NO_PEER", ref:to}
 *     |  <--- error {code, msg} ------------- |   protocol complaints that do not close the socket
 *     |  ---- relay {to, data} -------------> |   last-resort data path: opaque bytes (a relay link's
 *     |  <--- relay {from, data} ------------ |   AEAD-sealed frames, see agent/transport/relay.ts),
 *     |                                       |   rate-limited per agent, refused when relay is off
 *     |  <--- viewer-offer {ref, sdp} ------- |   a browser of the server's /ui page wants a viewer link
 *     |  ---- viewer-answer {ref, sdp,        |   (agent/ui/viewer.ts); sent only to agents whose hello
 *     |         candidates} | {ref, error} -> |   meta has `ui`; the viewer proves its credential to the
 *     |                                       |   agent on the link itself, never to the server
 *
 * The server never sees the cluster token (only its MAC over a fresh nonce) and never sees peer traffic.
 * Signal payloads (SignalData) are opaque to the server; agents authenticate them end to end:
 * offers and answers carry sig = Ed25519(CTX_SDP|from|to|conn|fingerprint) and
 * mac = HMAC(token, same), so a signaling server that swaps an SDP fingerprint (man in the middle) or
 * invents a node is detected by the receiving agent.
 *
 * Limits: a frame is at most MAX_SIGNAL_BYTES; oversize, malformed or unknown-type frames are counted
 * and answered with `error`; a client that keeps sending garbage (MAX_BAD_FRAMES) is disconnected.
 */
import { ProtocolError } from "../errors.js";
import { PROTOCOL_VERSION, arr, bytes, decodeEnvelope, encodeMessage, isPlainObject, nodeId, num, obj, optStr, str, type WireMap } from "./codec.js";

export const MAX_SIGNAL_BYTES = 64 * 1024;
/**
 * Relay frames (last-resort data path through the server) may carry one 64 KiB GSO frame plus the
 * relay link's header and AEAD tag; every other message stays within MAX_SIGNAL_BYTES.
 */
export const MAX_RELAY_BYTES = 80 * 1024;
export const MAX_BAD_FRAMES = 20;
export const SIGNAL_PATH = "/v1/signal";

export const CLOSE_CODES = {
  BAD_TOKEN: 4001,
  BAD_IDENTITY: 4002,
  PROTOCOL: 4003,
  HELLO_TIMEOUT: 4008,
  DUPLICATE_ID: 4009,
  REPLACED: 4010,
  SHUTDOWN: 1001,
  /** server full, too many sessions from one address, or a slow consumer: reconnect later (backoff) */
  TRY_AGAIN: 1013,
} as const;

export interface PeerInfo {
  id: string;
  name: string;
  pub: Uint8Array;
  /** free-form metadata an agent announces (version, cluster label...). Small. */
  meta: Record<string, string>;
}

export type IceCandidateInit = { candidate: string; sdpMid?: string; sdpMLineIndex?: number };

export type SignalData =
  | {
      kind: "offer" | "answer";
      conn: string;
      sdp: string;
      sig: Uint8Array;
      mac: Uint8Array;
      /** transport of this link: absent = WebRTC, "relay" = through the signaling server */
      tr?: "relay";
      /** an upgrade attempt: keep the current link until this one is open (make-before-break) */
      probe?: boolean;
    }
  | { kind: "candidate"; conn: string; candidate: IceCandidateInit | null }
  /** sig: Ed25519_from(CTX_BYE | from | to | conn) (identity.ts signRecord); unsigned byes are ignored for links that are up */
  | { kind: "bye"; conn: string; sig?: Uint8Array };

/** A STUN/TURN server handed out in `welcome` (TURN REST credentials, see turn-rest.ts). */
export type WelcomeIceServer = { urls: string | string[]; username?: string; credential?: string };

function welcomeIceServers(m: Record<string, unknown>): WelcomeIceServer[] | undefined {
  if (m.iceServers === undefined || m.iceServers === null) return undefined;
  const list = arr(m, "iceServers", 8);
  return list.map((x) => {
    if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", "iceServers entries must be maps");
    const urls = Array.isArray(x.urls) ? arr(x, "urls", 8).map((u) => str({ u }, "u", 512)) : str(x, "urls", 512);
    const out: WelcomeIceServer = { urls };
    const username = optStr(x, "username", 512);
    const credential = optStr(x, "credential", 512);
    if (username !== undefined) out.username = username;
    if (credential !== undefined) out.credential = credential;
    return out;
  });
}

export type ServerMsg =
  | { t: "challenge"; nonce: Uint8Array; server: string }
  | { t: "welcome"; you: { id: string; addr: string }; peers: PeerInfo[]; stunPort: number; stunAltPort?: number; iceServers?: WelcomeIceServer[] }
  | { t: "join"; peer: PeerInfo }
  | { t: "leave"; id: string }
  | { t: "presence"; join: PeerInfo[]; leave: string[] }
  | { t: "signal"; from: string; data: SignalData }
  | { t: "relay"; from: string; data: Uint8Array }
  /** a topology-page browser's WebRTC offer, introduced by the server (answer with viewer-answer, same ref) */
  | { t: "viewer-offer"; ref: string; sdp: string }
  | { t: "error"; code: string; msg: string; ref?: string };

export type ClientMsg =
  | { t: "hello"; id: string; pub: Uint8Array; name: string; instance: string; meta: Record<string, string>; mac: Uint8Array; sig: Uint8Array }
  | { t: "signal"; to: string; data: SignalData }
  | { t: "relay"; to: string; data: Uint8Array }
  | ViewerAnswerMsg;

/** An agent's answer to a viewer-offer: the SDP answer and its candidates, or why not. */
export type ViewerAnswerMsg = { t: "viewer-answer"; ref: string; sdp?: string; candidates?: IceCandidateInit[]; error?: string };

function iceCandidate(x: unknown): IceCandidateInit {
  if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", "a candidate must be a map");
  const cand: IceCandidateInit = { candidate: str(x, "candidate", 1024) };
  const mid = optStr(x, "sdpMid", 64);
  if (mid !== undefined) cand.sdpMid = mid;
  if (x.sdpMLineIndex !== undefined && x.sdpMLineIndex !== null) cand.sdpMLineIndex = num(x, "sdpMLineIndex");
  return cand;
}

export function decodeViewerAnswer(m: Record<string, unknown>): ViewerAnswerMsg {
  const out: ViewerAnswerMsg = { t: "viewer-answer", ref: str(m, "ref", 64) };
  const sdp = optStr(m, "sdp", 32 * 1024);
  const error = optStr(m, "error", 512);
  if (sdp !== undefined) out.sdp = sdp;
  if (error !== undefined) out.error = error;
  if (m.candidates !== undefined && m.candidates !== null) out.candidates = arr(m, "candidates", 64).map(iceCandidate);
  if (sdp === undefined && error === undefined) throw new ProtocolError("ERR_INVALID", "viewer-answer needs sdp or error");
  return out;
}

export function encodeSignal(msg: ServerMsg | ClientMsg): Uint8Array {
  return encodeMessage({ v: PROTOCOL_VERSION, ...msg } as WireMap);
}

function meta(m: Record<string, unknown>, k: string): Record<string, string> {
  if (m[k] === undefined) return {};
  const o = obj(m, k);
  const out: Record<string, string> = {};
  const keys = Object.keys(o);
  if (keys.length > 32) throw new ProtocolError("ERR_INVALID", "meta has too many keys");
  for (const key of keys) out[key.slice(0, 64)] = str(o, key, 256);
  return out;
}

function peerInfo(x: unknown): PeerInfo {
  if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", "peer must be a map");
  return { id: nodeId(x, "id"), name: str(x, "name", 64), pub: bytes(x, "pub", 32), meta: meta(x, "meta") };
}

export function decodeSignalData(x: unknown): SignalData {
  if (!isPlainObject(x)) throw new ProtocolError("ERR_INVALID", "signal data must be a map");
  const kind = str(x, "kind", 16);
  const conn = str(x, "conn", 64);
  switch (kind) {
    case "offer":
    case "answer":
    {
      const out: SignalData = { kind, conn, sdp: str(x, "sdp", 32 * 1024), sig: bytes(x, "sig", 64), mac: bytes(x, "mac", 32) };
      if (x.tr === "relay") out.tr = "relay";
      if (x.probe === true) out.probe = true;
      return out;
    }
    case "candidate": {
      if (x.candidate === null || x.candidate === undefined) return { kind, conn, candidate: null };
      const c = obj(x, "candidate");
      const cand: IceCandidateInit = { candidate: str(c, "candidate", 1024) };
      const mid = optStr(c, "sdpMid", 64);
      if (mid !== undefined) cand.sdpMid = mid;
      if (c.sdpMLineIndex !== undefined && c.sdpMLineIndex !== null) cand.sdpMLineIndex = num(c, "sdpMLineIndex");
      return { kind, conn, candidate: cand };
    }
    case "bye":
      return x.sig === undefined || x.sig === null ? { kind, conn } : { kind, conn, sig: bytes(x, "sig", 64) };
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown signal kind ${JSON.stringify(kind)}`);
  }
}

/** Relay frames may use MAX_RELAY_BYTES; every other type MAX_SIGNAL_BYTES. */
function envelope(data: Uint8Array): WireMap {
  const m = decodeEnvelope(data, MAX_RELAY_BYTES);
  if (m.t !== "relay" && data.byteLength > MAX_SIGNAL_BYTES) throw new ProtocolError("ERR_TOO_LARGE", `message of ${data.byteLength} bytes exceeds the ${MAX_SIGNAL_BYTES}-byte limit`);
  return m;
}

export function decodeClientMsg(data: Uint8Array): ClientMsg {
  const m = envelope(data);
  switch (m.t) {
    case "hello":
      return {
        t: "hello",
        id: nodeId(m, "id"),
        pub: bytes(m, "pub", 32),
        name: str(m, "name", 64),
        instance: str(m, "instance", 64),
        meta: meta(m, "meta"),
        mac: bytes(m, "mac", 32),
        sig: bytes(m, "sig", 64),
      };
    case "signal":
      return { t: "signal", to: nodeId(m, "to"), data: decodeSignalData(m.data) };
    case "relay":
      return { t: "relay", to: nodeId(m, "to"), data: bytes(m, "data", undefined, MAX_RELAY_BYTES) };
    case "viewer-answer":
      return decodeViewerAnswer(m);
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown client message type ${JSON.stringify(m.t)}`);
  }
}

export function decodeServerMsg(data: Uint8Array): ServerMsg {
  const m = envelope(data);
  switch (m.t) {
    case "challenge":
      return { t: "challenge", nonce: bytes(m, "nonce", 32), server: str(m, "server", 64) };
    case "welcome": {
      const you = obj(m, "you");
      const w: ServerMsg = { t: "welcome", you: { id: nodeId(you, "id"), addr: str(you, "addr", 128) }, peers: arr(m, "peers").map(peerInfo), stunPort: num(m, "stunPort") };
      if (typeof m.stunAltPort === "number") w.stunAltPort = num(m, "stunAltPort");
      const ice = welcomeIceServers(m);
      if (ice !== undefined) w.iceServers = ice;
      return w;
    }
    case "join":
      return { t: "join", peer: peerInfo(m.peer) };
    case "leave":
      return { t: "leave", id: nodeId(m, "id") };
    case "presence":
      return { t: "presence", join: arr(m, "join", 10_000).map(peerInfo), leave: arr(m, "leave", 10_000).map((id) => nodeId({ id }, "id")) };
    case "signal":
      return { t: "signal", from: nodeId(m, "from"), data: decodeSignalData(m.data) };
    case "relay":
      return { t: "relay", from: nodeId(m, "from"), data: bytes(m, "data", undefined, MAX_RELAY_BYTES) };
    case "viewer-offer":
      return { t: "viewer-offer", ref: str(m, "ref", 64), sdp: str(m, "sdp", 32 * 1024) };
    case "error": {
      const out: ServerMsg = { t: "error", code: str(m, "code", 64), msg: str(m, "msg", 1024) };
      const ref = optStr(m, "ref", 64);
      if (ref !== undefined) out.ref = ref;
      return out;
    }
    default:
      throw new ProtocolError("ERR_UNKNOWN_TYPE", `unknown server message type ${JSON.stringify(m.t)}`);
  }
}
