/**
 * Prometheus metrics of the signaling server in the text exposition format (0.0.4), rendered from
 * hub.stats() and the STUN responder's counters at scrape time. Hand-written rather than prom-client:
 * the core runs on workerd, Deno and Bun, and these are a few plain counters and gauges.
 *
 *   weftnet_signal_agents                           registered agents (connected and past hello)
 *   weftnet_signal_sessions                         open WebSocket sessions, registered or not
 *   weftnet_signal_accepted_total                   registrations accepted
 *   weftnet_signal_replaced_total                   registrations that replaced a dead session of the same node
 *   weftnet_signal_relayed_messages_total           signal messages relayed between agents
 *   weftnet_signal_unroutable_messages_total        signal messages for a node that is not connected
 *   weftnet_signal_bad_frames_total{code}           undecodable or invalid frames, by error code
 *   weftnet_signal_refusals_total{reason}           bad_token | bad_identity | duplicate_id | hello_timeout | protocol
 *                                                   | server_full | per_ip | slow_consumer
 *   weftnet_signal_stun_requests_total              valid STUN Binding requests
 *   weftnet_signal_stun_responses_total             Binding responses sent
 *   weftnet_signal_stun_dropped_total{reason}       datagrams dropped by the STUN responder
 *   weftnet_signal_relayed_bytes_total              data relayed for agents without a direct path
 *   weftnet_signal_relay_dropped_total              relay frames dropped (all reasons)
 *   weftnet_signal_relay_dropped_by_reason_total{reason}  disabled | rate | ip_rate | global_rate | congested | no_peer
 *   weftnet_signal_relay_control_frames_total       relay links' control-channel frames forwarded (own budget)
 *   weftnet_signal_relay_control_dropped_total{reason}  control-channel relay frames dropped, by reason
 */
import type { SignalHub } from "./hub.js";

export interface StunStats {
  requests: number;
  responses: number;
  dropped: number;
  droppedByReason: Partial<Record<string, number>>;
}

export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8";

const esc = (v: string) => v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');

export function renderSignalMetrics(hub: SignalHub, stun?: StunStats): string {
  const s = hub.stats();
  const out: string[] = [];
  const metric = (name: string, type: "counter" | "gauge", help: string, samples: [Record<string, string> | undefined, number][]) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of samples) {
      const l = labels && Object.keys(labels).length ? `{${Object.entries(labels).map(([k, x]) => `${k}="${esc(x)}"`).join(",")}}` : "";
      out.push(`${name}${l} ${Number.isFinite(v) ? v : 0}`);
    }
  };
  metric("weftnet_signal_agents", "gauge", "Agents registered with this server right now.", [[undefined, s.members]]);
  metric("weftnet_signal_sessions", "gauge", "Open WebSocket sessions, registered or still in the hello handshake.", [[undefined, s.sessions]]);
  metric("weftnet_signal_accepted_total", "counter", "Registrations accepted.", [[undefined, s.accepted]]);
  metric("weftnet_signal_replaced_total", "counter", "Registrations that replaced a dead session of the same node.", [[undefined, s.replaced]]);
  metric("weftnet_signal_relayed_messages_total", "counter", "Signal messages (offers, answers, candidates) relayed between agents.", [[undefined, s.relayed]]);
  metric("weftnet_signal_unroutable_messages_total", "counter", "Signal messages addressed to a node that is not connected.", [[undefined, s.noPeer]]);
  metric("weftnet_signal_bad_frames_total", "counter", "Frames that did not decode or validate, by error code.", Object.entries(s.badFramesByCode).map(([code, n]) => [{ code }, n]));
  metric("weftnet_signal_refusals_total", "counter", "Sessions refused or closed: bad token, node id not derived from its key or bad signature, id held by a live agent, no hello in time, too many bad frames, server full, too many sessions from one address, slow consumer.", [
    [{ reason: "bad_token" }, s.badToken],
    [{ reason: "bad_identity" }, s.badIdentity],
    [{ reason: "duplicate_id" }, s.duplicateId],
    [{ reason: "hello_timeout" }, s.helloTimeouts],
    [{ reason: "protocol" }, s.protocolCloses],
    [{ reason: "server_full" }, s.refusedFull],
    [{ reason: "per_ip" }, s.refusedPerIp],
    [{ reason: "slow_consumer" }, s.slowConsumers],
  ]);
  metric("weftnet_signal_stun_requests_total", "counter", "Valid STUN Binding requests received.", [[undefined, stun?.requests ?? 0]]);
  metric("weftnet_signal_stun_responses_total", "counter", "STUN Binding responses sent.", [[undefined, stun?.responses ?? 0]]);
  metric("weftnet_signal_stun_dropped_total", "counter", "Datagrams the STUN responder dropped, by reason.", Object.entries(stun?.droppedByReason ?? {}).map(([reason, n]) => [{ reason }, n ?? 0]));
  metric("weftnet_signal_relayed_bytes_total", "counter", "Data bytes relayed for agents without a direct or multi-hop path.", [[undefined, s.relayBytes]]);
  metric("weftnet_signal_relay_dropped_total", "counter", "Data relay frames dropped (rate limits, relay disabled, congested receiver, unknown destination); control-channel drops are counted apart.", [[undefined, s.relayDropped]]);
  metric("weftnet_signal_relay_dropped_by_reason_total", "counter", "Relay frames dropped, by reason.", Object.entries(s.relayDroppedByReason).map(([reason, n]) => [{ reason }, n ?? 0]));
  metric("weftnet_signal_relay_control_frames_total", "counter", "Control-channel relay frames (heartbeats, gossip, IPAM of relay links) forwarded; they have a budget of their own beside the data budget.", [[undefined, s.relayControlFrames]]);
  metric("weftnet_signal_relay_control_dropped_total", "counter", "Control-channel relay frames dropped, by reason (not counted in weftnet_signal_relay_dropped_total).", Object.entries(s.relayControlDroppedByReason).map(([reason, n]) => [{ reason }, n ?? 0]));
  metric("weftnet_signal_viewer_introductions_total", "counter", "Topology-page viewers introduced to an agent (/ui): offers sent, answered, failed (no agent, refused, timeout).", [
    [{ result: "offered" }, s.viewerOffers],
    [{ result: "answered" }, s.viewerAnswers],
    [{ result: "failed" }, s.viewerFailures],
  ]);
  return out.join("\n") + "\n";
}
