/**
 * STUN Binding responder on UDP (RFC 5389 subset, codec in src/wire/stun.ts): answers each valid
 * Binding request with the sender's address as XOR-MAPPED-ADDRESS. Everything else is dropped and
 * counted; nothing a datagram contains can throw out of the handler.
 */
import { createSocket, type Socket } from "node:dgram";
import { isIPv6 } from "node:net";
import { silentLogger, type Logger } from "../src/log.js";
import { encodeBindingSuccess, parseBindingRequest, type StunRejectReason } from "../src/wire/stun.js";

export interface StunStats {
  requests: number;
  responses: number;
  dropped: number;
  droppedByReason: Partial<Record<StunRejectReason | "send-failed", number>>;
}

export interface StunServer {
  readonly port: number;
  readonly host: string;
  stats(): StunStats;
  close(): Promise<void>;
}

/** Bind a responder on host:port (port 0 = any free port; the bound port is returned). */
export async function startStunServer(opts: { host: string; port: number; logger?: Logger }): Promise<StunServer> {
  const log = opts.logger ?? silentLogger;
  const ipv6 = isIPv6(opts.host) || opts.host === "::";
  const sock: Socket = createSocket({ type: ipv6 ? "udp6" : "udp4", reuseAddr: false });
  const st: StunStats = { requests: 0, responses: 0, dropped: 0, droppedByReason: {} };
  let loggedDrop = false;
  const drop = (reason: StunRejectReason | "send-failed", from: string) => {
    st.dropped++;
    st.droppedByReason[reason] = (st.droppedByReason[reason] ?? 0) + 1;
    if (!loggedDrop) {
      loggedDrop = true;
      log.debug("dropping non-STUN or malformed datagram (further drops are only counted)", { reason, from });
    }
  };

  sock.on("message", (msg, rinfo) => {
    try {
      const req = parseBindingRequest(msg);
      if (!req.ok) return drop(req.reason, rinfo.address);
      st.requests++;
      const res = encodeBindingSuccess(req.value.transactionId, { family: rinfo.family === "IPv6" ? "IPv6" : "IPv4", address: rinfo.address, port: rinfo.port });
      sock.send(res, rinfo.port, rinfo.address, (err) => {
        if (err) drop("send-failed", rinfo.address);
        else st.responses++;
      });
    } catch (e) {
      drop("send-failed", rinfo.address);
      log.debug("stun reply failed", { err: e, from: rinfo.address });
    }
  });

  await new Promise<void>((resolve, reject) => {
    const onErr = (e: Error) => reject(e);
    sock.once("error", onErr);
    sock.bind(opts.port, opts.host, () => {
      sock.off("error", onErr);
      resolve();
    });
  });
  sock.on("error", (e) => log.warn("stun socket error", { err: e }));
  const port = sock.address().port;
  let closed: Promise<void> | undefined;
  return {
    port,
    host: opts.host,
    stats: () => ({ ...st, droppedByReason: { ...st.droppedByReason } }),
    close: () => (closed ??= new Promise<void>((resolve) => sock.close(() => resolve()))),
  };
}
