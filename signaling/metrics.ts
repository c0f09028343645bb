/**
 * Prometheus metrics for the signaling server: GET /metrics on the hono app, behind the cluster token
 * like /v1/nodes (app.ts). One prom-client Registry per app (never the global one); values are read
 * from hub.stats() and the STUN responder's counters at scrape time.
 *
 *   weftnet_signal_agents                           registered agents (connected and past hello)
 *   weftnet_signal_sessions                         open WebSocket sessions, registered or not
 *   weftnet_signal_accepted_total                   registrations accepted
 *   weftnet_signal_replaced_total                   registrations that replaced a dead session of the same node
 *   weftnet_signal_relayed_messages_total           signal messages relayed between agents
 *   weftnet_signal_unroutable_messages_total        signal messages for a node that is not connected
 *   weftnet_signal_bad_frames_total{code}           undecodable or invalid frames, by error code
 *   weftnet_signal_refusals_total{reason}           bad_token | bad_identity | duplicate_id | hello_timeout | protocol
 *   weftnet_signal_stun_requests_total              valid STUN Binding requests
 *   weftnet_signal_stun_responses_total             Binding responses sent
 *   weftnet_signal_stun_dropped_total{reason}       datagrams dropped by the STUN responder
 *   weftnet_signal_relayed_bytes_total              data relayed for agents without a direct path
 *   weftnet_signal_relay_dropped_total              relay frames dropped (rate limit, --no-relay, unknown peer)
 */
import { Counter, Gauge, Registry } from "prom-client";
import type { SignalHub } from "./hub.js";
import type { StunStats } from "./stun.js";

export interface SignalMetricsOptions {
  hub: SignalHub;
  /** the STUN responder's counters; undefined when STUN is off */
  stunStats?: () => StunStats | undefined;
}

export function createSignalMetrics(opts: SignalMetricsOptions): { registry: Registry; scrape(): Promise<string>; contentType: string } {
  const registry = new Registry();
  const registers = [registry];
  const hub = opts.hub;
  const counter = (name: string, help: string, value: () => number) =>
    new Counter({
      name,
      help,
      registers,
      collect() {
        this.reset();
        this.inc(value());
      },
    });

  new Gauge({
    name: "weftnet_signal_agents",
    help: "Agents registered with this server right now.",
    registers,
    collect() {
      this.set(hub.size);
    },
  });
  new Gauge({
    name: "weftnet_signal_sessions",
    help: "Open WebSocket sessions, registered or still in the hello handshake.",
    registers,
    collect() {
      this.set(hub.stats().sessions);
    },
  });
  counter("weftnet_signal_accepted_total", "Registrations accepted.", () => hub.stats().accepted);
  counter("weftnet_signal_replaced_total", "Registrations that replaced a dead session of the same node.", () => hub.stats().replaced);
  counter("weftnet_signal_relayed_messages_total", "Signal messages (offers, answers, candidates) relayed between agents.", () => hub.stats().relayed);
  counter("weftnet_signal_unroutable_messages_total", "Signal messages addressed to a node that is not connected.", () => hub.stats().noPeer);
  new Counter({
    name: "weftnet_signal_bad_frames_total",
    help: "Frames that did not decode or validate, by error code.",
    labelNames: ["code"],
    registers,
    collect() {
      this.reset();
      for (const [code, n] of Object.entries(hub.stats().badFramesByCode)) this.inc({ code }, n);
    },
  });
  new Counter({
    name: "weftnet_signal_refusals_total",
    help: "Sessions refused or closed: bad token, node id not derived from its key or bad signature, id held by a live agent, no hello in time, too many bad frames.",
    labelNames: ["reason"],
    registers,
    collect() {
      this.reset();
      const s = hub.stats();
      this.inc({ reason: "bad_token" }, s.badToken);
      this.inc({ reason: "bad_identity" }, s.badIdentity);
      this.inc({ reason: "duplicate_id" }, s.duplicateId);
      this.inc({ reason: "hello_timeout" }, s.helloTimeouts);
      this.inc({ reason: "protocol" }, s.protocolCloses);
    },
  });
  counter("weftnet_signal_stun_requests_total", "Valid STUN Binding requests received.", () => opts.stunStats?.()?.requests ?? 0);
  counter("weftnet_signal_stun_responses_total", "STUN Binding responses sent.", () => opts.stunStats?.()?.responses ?? 0);
  new Counter({
    name: "weftnet_signal_stun_dropped_total",
    help: "Datagrams the STUN responder dropped, by reason.",
    labelNames: ["reason"],
    registers,
    collect() {
      this.reset();
      for (const [reason, n] of Object.entries(opts.stunStats?.()?.droppedByReason ?? {})) this.inc({ reason }, n ?? 0);
    },
  });
  counter("weftnet_signal_relayed_bytes_total", "Data bytes relayed for agents without a direct or multi-hop path.", () => hub.stats().relayBytes);
  counter("weftnet_signal_relay_dropped_total", "Relay frames dropped (rate limit, relay disabled, unknown destination).", () => hub.stats().relayDropped);

  return { registry, scrape: () => registry.metrics(), contentType: registry.contentType };
}
