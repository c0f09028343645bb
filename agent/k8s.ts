/**
 * In-cluster Kubernetes Node watcher (no client library: node:https and the service-account files).
 *
 *   LIST  /api/v1/nodes                      names of every Node and the list's resourceVersion
 *   WATCH /api/v1/nodes?watch=1&resourceVersion=RV&allowWatchBookmarks=true
 *         newline-delimited JSON events {type: ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, object}
 *
 * A DELETED Node is reported through `onDeleted(name)` (the agent releases the IPAM blocks of the weftnet
 * node of that name: agents run with --name $(NODE_NAME)). "410 Gone" (as an HTTP status or an ERROR
 * event: the resourceVersion is too old) triggers a re-list; Nodes that were in the previous list and are
 * missing from the new one were deleted while we were not watching and are reported as deleted too.
 * Other failures reconnect with backoff; the token file is re-read on every request (bound service-account
 * tokens rotate). 401/403 (missing RBAC, a revoked token) are logged as a warning and retried: never fatal.
 */
import { readFileSync, existsSync } from "node:fs";
import { request, type Agent as HttpsAgent } from "node:https";
import type { ClientRequest, IncomingMessage } from "node:http";
import type { Logger } from "../src/log.js";
import { backoffDelay, type BackoffConfig } from "../src/mesh/backoff.js";

export const SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount";
export const DEFAULT_TOKEN_PATH = `${SA_DIR}/token`;
export const DEFAULT_CA_PATH = `${SA_DIR}/ca.crt`;
const WATCH_BACKOFF: BackoffConfig = { baseMs: 1000, maxMs: 60_000, minMs: 500 };

export interface NodeWatchConfig {
  /** API server host and port (default: env KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT). */
  host?: string;
  port?: number;
  tokenPath?: string;
  caPath?: string;
  backoff?: BackoffConfig;
  /** server-side watch timeout, re-watched from the last resourceVersion (default 5-10 min, random) */
  watchTimeoutSeconds?: number;
  /** how long a Node deleted while its agent is still connected is re-checked (default 2 min) */
  pendingMs?: number;
}

export interface NodeWatchEvents {
  onDeleted(name: string): void;
  /** a Node exists (listed, ADDED, MODIFIED): cancels a pending deletion of that name */
  onPresent?(name: string): void;
}

/** In a pod with a service-account token mounted (the default for --k8s-node-watch). */
export function inClusterAvailable(env: NodeJS.ProcessEnv = process.env, tokenPath = DEFAULT_TOKEN_PATH): boolean {
  return !!env.KUBERNETES_SERVICE_HOST && existsSync(tokenPath);
}

class HttpStatusError extends Error {
  constructor(
    readonly status: number,
    body: string,
  ) {
    super(`HTTP ${status}${body ? `: ${body.slice(0, 200)}` : ""}`);
  }
}
class GoneError extends Error {}

type NodeObj = { metadata?: { name?: string; resourceVersion?: string } };

export class NodeWatcher {
  readonly counters = { lists: 0, watches: 0, events: 0, deleted: 0, authErrors: 0, errors: 0, relists: 0 };
  /** Node names as of the last list plus watch events */
  readonly nodes = new Set<string>();
  private rv = "";
  private listed = false;
  private attempt = 0;
  private timer: NodeJS.Timeout | undefined;
  private req: ClientRequest | undefined;
  private stopped = false;
  private readonly host: string;
  private readonly port: number;
  private readonly tokenPath: string;
  private readonly caPath: string;

  constructor(
    private readonly cfg: NodeWatchConfig,
    private readonly events: NodeWatchEvents,
    private readonly log: Logger,
    private readonly agent?: HttpsAgent,
  ) {
    const host = cfg.host ?? process.env.KUBERNETES_SERVICE_HOST;
    if (!host) throw new Error("no Kubernetes API server: KUBERNETES_SERVICE_HOST is not set");
    this.host = host.replace(/^\[(.*)\]$/, "$1");
    this.port = cfg.port ?? Number(process.env.KUBERNETES_SERVICE_PORT ?? 443);
    this.tokenPath = cfg.tokenPath ?? DEFAULT_TOKEN_PATH;
    this.caPath = cfg.caPath ?? DEFAULT_CA_PATH;
  }

  start(): void {
    this.log.info("watching Kubernetes Node objects: a deleted Node's weftnet address blocks are released", { api: `${this.host}:${this.port}` });
    this.schedule(0);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.req?.destroy();
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => void this.cycle(), ms);
  }

  /** One list (if needed) + one watch; then schedule the next round. */
  private async cycle(): Promise<void> {
    try {
      if (!this.listed) await this.list();
      const t0 = Date.now();
      const events = this.counters.events;
      await this.watch();
      // the server ended the watch (timeoutSeconds): re-watch from the last resourceVersion at once,
      // unless it closed an empty watch right away (a proxy cutting streams): then back off
      if (events === this.counters.events && Date.now() - t0 < 1000) this.schedule(backoffDelay(this.attempt++, this.cfg.backoff ?? WATCH_BACKOFF));
      else {
        this.attempt = 0;
        this.schedule(0);
      }
    } catch (e) {
      if (this.stopped) return;
      if (e instanceof GoneError || (e instanceof HttpStatusError && e.status === 410)) {
        this.counters.relists++;
        this.log.info("Kubernetes API: resourceVersion too old (410 Gone); listing Nodes again", { rv: this.rv });
        this.listed = false;
        this.schedule(0);
        return;
      }
      const delay = backoffDelay(this.attempt++, this.cfg.backoff ?? WATCH_BACKOFF);
      if (e instanceof HttpStatusError && (e.status === 401 || e.status === 403)) {
        this.counters.authErrors++;
        this.log.warn(
          e.status === 401
            ? "Kubernetes API refused the service-account token (401): deleted Nodes' address blocks are not released until it works (the mesh still reclaims them after --reclaim-after); check that the token is mounted (automountServiceAccountToken)"
            : "Kubernetes API forbids watching Nodes (403): give the weftnet service account get/list/watch on nodes (the ClusterRole in examples/kubernetes/weftnet.yaml); until then the mesh reclaims dead nodes' blocks after --reclaim-after",
          { status: e.status, retryInMs: delay },
        );
      } else {
        this.counters.errors++;
        this.log.warn("Kubernetes Node watch failed; retrying", { err: (e as Error).message, retryInMs: delay });
      }
      this.schedule(delay);
    }
  }

  private options(path: string) {
    // re-read every time: bound service-account tokens are rotated by the kubelet
    const token = readFileSync(this.tokenPath, "utf8").trim();
    const ca = existsSync(this.caPath) ? readFileSync(this.caPath) : undefined;
    return {
      host: this.host,
      port: this.port,
      path,
      method: "GET",
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      ...(ca ? { ca } : {}),
      ...(this.agent ? { agent: this.agent } : {}),
    };
  }

  private open(path: string, idleMs: number): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      let req: ClientRequest;
      try {
        req = request(this.options(path), (res) => {
          if (res.statusCode === 200) return resolve(res);
          let body = "";
          res.setEncoding("utf8");
          res.on("data", (d: string) => (body.length < 1000 ? (body += d) : undefined));
          res.on("end", () => reject(new HttpStatusError(res.statusCode ?? 0, body.trim())));
          res.on("error", reject);
        });
      } catch (e) {
        reject(e as Error);
        return;
      }
      this.req = req;
      req.setTimeout(idleMs, () => req.destroy(new Error(`no data from the API server for ${Math.round(idleMs / 1000)} s`)));
      req.on("error", reject);
      req.end();
    });
  }

  private async list(): Promise<void> {
    const names = new Set<string>();
    let cont = "";
    let rv = "";
    do {
      const res = await this.open(`/api/v1/nodes?limit=500${cont ? `&continue=${encodeURIComponent(cont)}` : ""}`, 30_000);
      const body = await readAll(res);
      const list = JSON.parse(body) as { metadata?: { resourceVersion?: string; continue?: string }; items?: NodeObj[] };
      for (const n of list.items ?? []) if (n.metadata?.name) names.add(n.metadata.name);
      rv = list.metadata?.resourceVersion ?? rv;
      cont = list.metadata?.continue ?? "";
    } while (cont);
    this.counters.lists++;
    this.attempt = 0;
    const previous = [...this.nodes];
    this.nodes.clear();
    for (const n of names) this.nodes.add(n);
    this.rv = rv;
    this.listed = true;
    this.log.debug("listed Kubernetes Nodes", { count: names.size, rv });
    for (const n of names) this.events.onPresent?.(n);
    // deleted while we were not watching (the 410 gap, a long outage)
    for (const n of previous) if (!names.has(n)) this.deleted(n);
  }

  private deleted(name: string): void {
    this.counters.deleted++;
    this.log.info("Kubernetes Node deleted", { k8sNode: name });
    try {
      this.events.onDeleted(name);
    } catch (e) {
      this.log.warn("handling a deleted Node failed", { k8sNode: name, err: (e as Error).message });
    }
  }

  private async watch(): Promise<void> {
    const timeout = this.cfg.watchTimeoutSeconds ?? 300 + Math.floor(Math.random() * 300);
    const path = `/api/v1/nodes?watch=1&resourceVersion=${encodeURIComponent(this.rv)}&allowWatchBookmarks=true&timeoutSeconds=${timeout}`;
    const res = await this.open(path, (timeout + 60) * 1000);
    this.counters.watches++;
    await new Promise<void>((resolve, reject) => {
      let buf = "";
      let failed = false;
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => {
        if (failed) return;
        buf += chunk;
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line) continue;
          try {
            this.event(JSON.parse(line) as { type?: string; object?: NodeObj & { code?: number; message?: string } });
          } catch (e) {
            failed = true;
            res.destroy();
            reject(e instanceof GoneError ? e : new Error(`bad watch event: ${(e as Error).message}`));
            return;
          }
        }
      });
      res.on("end", () => resolve());
      res.on("close", () => resolve());
      res.on("error", (e) => reject(e));
    });
  }

  private event(ev: { type?: string; object?: NodeObj & { code?: number; message?: string } }): void {
    this.counters.events++;
    const obj = ev.object ?? {};
    if (ev.type === "ERROR") {
      if (obj.code === 410) throw new GoneError(obj.message ?? "resourceVersion too old");
      throw new Error(`watch error ${obj.code ?? "?"}: ${obj.message ?? ""}`);
    }
    this.attempt = 0;
    const rv = obj.metadata?.resourceVersion;
    if (rv) this.rv = rv;
    const name = obj.metadata?.name;
    if (ev.type === "BOOKMARK" || !name) return;
    if (ev.type === "DELETED") {
      this.nodes.delete(name);
      this.deleted(name);
    } else if (ev.type === "ADDED" || ev.type === "MODIFIED") {
      if (!this.nodes.has(name)) this.log.debug("Kubernetes Node present", { k8sNode: name });
      this.nodes.add(name);
      this.events.onPresent?.(name);
    }
  }
}

function readAll(res: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    let body = "";
    res.setEncoding("utf8");
    res.on("data", (d: string) => (body += d));
    res.on("end", () => resolve(body));
    res.on("error", reject);
  });
}
