/**
 * --k8s-node-watch against a fake kube-apiserver (no cluster here): an HTTPS server with a self-signed
 * certificate (openssl) that checks the Bearer token, serves LIST /api/v1/nodes and a WATCH stream of
 * newline-delimited JSON events, and can emit ADDED/DELETED/BOOKMARK, refuse with 401/403 and answer an
 * old resourceVersion with a 410 ERROR event. Three real agents (werift on loopback, a real signaling
 * server) own IPAM blocks; the mesh reclaim is set to 10 minutes, so anything released here was released
 * by the watcher.
 */
import { execFileSync } from "node:child_process";
import { rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:https";
import type { ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { createLogger } from "../../src/log.js";
import { Cluster, fullMesh, startServer, TEST_TIMING, tmpDir, waitFor } from "../helpers/cluster.js";

const TOKEN = "k8s-watch-integration-token";
const IPAM = { reclaimAfterMs: 600_000, safetyMarginMs: 1000, resyncMs: 800, claimSettleMs: 500, bootstrapWaitMs: 500 };

/** A tiny kube-apiserver: Node objects only. */
class FakeApiServer {
  readonly nodes = new Set<string>();
  rv = 1000;
  token = "sa-token-1";
  forbid = false;
  /** watches from an older resourceVersion get a 410 ERROR event (etcd compaction) */
  compactedBelow = 0;
  readonly watches = new Set<ServerResponse>();
  readonly log: { method: string; path: string; status: number; auth: string }[] = [];
  private server!: Server;
  port = 0;

  async start(key: Buffer | string, cert: Buffer | string): Promise<void> {
    this.server = createServer({ key, cert }, (req, res) => {
      const url = new URL(req.url ?? "/", "https://x");
      const auth = req.headers.authorization ?? "";
      const answer = (status: number, body: unknown) => {
        this.log.push({ method: req.method ?? "", path: req.url ?? "", status, auth });
        res.writeHead(status, { "content-type": "application/json" }).end(JSON.stringify(body));
      };
      if (auth !== `Bearer ${this.token}`) return answer(401, { kind: "Status", apiVersion: "v1", status: "Failure", message: "Unauthorized", reason: "Unauthorized", code: 401 });
      if (this.forbid)
        return answer(403, { kind: "Status", apiVersion: "v1", status: "Failure", message: 'nodes is forbidden: User "system:serviceaccount:weftnet:weftnet" cannot list resource "nodes"', reason: "Forbidden", code: 403 });
      if (req.method !== "GET" || url.pathname !== "/api/v1/nodes") return answer(404, { kind: "Status", code: 404 });
      if (url.searchParams.get("watch") !== "1")
        return answer(200, { kind: "NodeList", apiVersion: "v1", metadata: { resourceVersion: String(this.rv) }, items: [...this.nodes].map((n) => this.node(n)) });
      this.log.push({ method: "WATCH", path: req.url ?? "", status: 200, auth });
      res.writeHead(200, { "content-type": "application/json", "transfer-encoding": "chunked" });
      res.flushHeaders();
      if (Number(url.searchParams.get("resourceVersion")) < this.compactedBelow) {
        res.end(JSON.stringify({ type: "ERROR", object: { kind: "Status", apiVersion: "v1", status: "Failure", message: "too old resource version", reason: "Expired", code: 410 } }) + "\n");
        return;
      }
      this.watches.add(res);
      res.on("close", () => this.watches.delete(res));
    });
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    this.port = (this.server.address() as AddressInfo).port;
  }

  private node(name: string) {
    return { kind: "Node", apiVersion: "v1", metadata: { name, resourceVersion: String(this.rv) } };
  }

  emit(type: "ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK", name: string): void {
    this.rv++;
    if (type === "ADDED") this.nodes.add(name);
    if (type === "DELETED") this.nodes.delete(name);
    const obj = type === "BOOKMARK" ? { kind: "Node", apiVersion: "v1", metadata: { resourceVersion: String(this.rv) } } : this.node(name);
    for (const w of this.watches) w.write(JSON.stringify({ type, object: obj }) + "\n");
  }

  /** end every open watch (as the API server does at timeoutSeconds, or on a restart) */
  endWatches(): void {
    for (const w of this.watches) w.end();
    this.watches.clear();
  }

  watchCount(): number {
    return this.watches.size;
  }

  close(): Promise<void> {
    for (const w of this.watches) w.destroy();
    return new Promise((r) => this.server.close(() => r()));
  }
}

const owners = (a: Agent) => new Map(a.ipamStatus().blocks.filter((b) => b.owner).map((b) => [b.cidr, b.owner]));
const sameView = (as: Agent[]) => as.every((a) => JSON.stringify([...owners(a)].sort()) === JSON.stringify([...owners(as[0]!)].sort()));

describe("--k8s-node-watch: a deleted Kubernetes Node's address blocks are released", () => {
  let c: Cluster;
  let api: FakeApiServer;
  let dir: string;
  let tokenPath: string;
  const agents: Agent[] = [];
  const logs: Record<string, unknown>[] = [];

  beforeAll(async () => {
    dir = tmpDir("weft-k8s-");
    const key = join(dir, "apiserver.key");
    const cert = join(dir, "ca.crt");
    execFileSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=kube-apiserver", "-addext", "subjectAltName=IP:127.0.0.1,DNS:kubernetes.default.svc"], { stdio: "ignore" });
    api = new FakeApiServer();
    const { readFileSync } = await import("node:fs");
    await api.start(readFileSync(key), readFileSync(cert));
    tokenPath = join(dir, "token");
    writeFileSync(tokenPath, `${api.token}\n`);
    for (const n of ["k1", "k2", "k3"]) api.nodes.add(n);

    c = new Cluster(await startServer(TOKEN), TOKEN);
    for (const n of ["k1", "k2", "k3"]) {
      const logger = createLogger({ level: "info", sink: (l) => logs.push({ agent: n, ...(JSON.parse(l) as Record<string, unknown>) }) });
      agents.push(
        await c.agent(n, {
          ipam: IPAM,
          logger,
          // a deleted Node whose agent is reachable is re-checked for pendingMs and released as soon as its
          // link is down: with the test timing's 2 s dead-after, a loaded box (load 15+) dropped k3's link for
          // a moment and k1 released k3's block in the "still connected" case. Production-like dead-after.
          timing: { ...TEST_TIMING, deadAfterMs: 15_000 },
          // the CA is the self-signed certificate itself: the watcher verifies the server against it
          k8sNodeWatch: { host: "127.0.0.1", port: api.port, tokenPath, caPath: cert, backoff: { baseMs: 100, maxMs: 400, minMs: 50 }, pendingMs: 3000 },
        }),
      );
    }
    await waitFor(() => fullMesh(agents), 30_000, "full mesh");
    await Promise.all(agents.map((a, i) => a.allocate(`pod-${i}`, 20_000)));
    await waitFor(() => sameView(agents), 10_000, "same IPAM view everywhere");
    await waitFor(() => api.watchCount() === 3, 10_000, "three agents watching");
  }, 90_000);

  afterAll(async () => {
    await c?.cleanup();
    await api?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("lists Nodes, then watches from the list's resourceVersion with bookmarks, with the service-account token", () => {
    const lists = api.log.filter((r) => r.method === "GET" && r.status === 200);
    const watches = api.log.filter((r) => r.method === "WATCH");
    expect(lists.length).toBeGreaterThanOrEqual(3);
    expect(watches.length).toBeGreaterThanOrEqual(3);
    for (const r of [...lists, ...watches]) expect(r.auth).toBe(`Bearer ${api.token}`);
    for (const w of watches) {
      const q = new URL(w.path, "https://x").searchParams;
      expect(q.get("watch")).toBe("1");
      expect(q.get("allowWatchBookmarks")).toBe("true");
      expect(q.get("resourceVersion")).toBe("1000");
    }
    for (const a of agents) expect([...a.k8s!.nodes].sort()).toEqual(["k1", "k2", "k3"]);
  });

  it("a DELETED Node whose agent is still connected is ignored", async () => {
    const k3 = agents[2]!;
    const k3Blocks = [...owners(agents[0]!)].filter(([, o]) => o === k3.id).map(([b]) => b);
    expect(k3Blocks.length).toBeGreaterThan(0);
    const forced = agents.map((a) => a.ipamStatus().counters.forced);
    // Nothing was released: no agent force-released a block (the watcher's only way to release), and every
    // block k3 held is still k3's in every view, unless k3 itself granted it away: IPAM keeps running (an
    // agent short of free pinned space asks for a block, and an owner grants one), so the rest of the
    // ownership map may change meanwhile (under load a grant of the set-up can still be completing).
    const nothingReleased = () => {
      for (const [i, a] of agents.entries()) {
        expect(a.ipamStatus().counters.forced, `force releases at agent ${i + 1}`).toBe(forced[i]);
        const view = new Map(a.ipamStatus().blocks.map((b) => [b.cidr, b]));
        for (const b of k3Blocks) expect(view.get(b)?.owner === k3.id || view.get(b)?.kind === "t", `${b} at agent ${i + 1}: ${JSON.stringify(view.get(b))}`).toBe(true);
      }
    };
    api.emit("BOOKMARK", "");
    api.emit("DELETED", "k3");
    await waitFor(() => agents.every((a) => !a.k8s!.nodes.has("k3")), 5000, "every watcher saw the deletion");
    await new Promise((r) => setTimeout(r, 1500));
    nothingReleased();
    expect(logs.some((l) => l.agent === "k1" && /still connected; not releasing/.test(String(l.msg)) && l.k8sNode === "k3")).toBe(true);
    // the Node comes back (kubelet re-registers): nothing pending any more
    api.emit("ADDED", "k3");
    await waitFor(() => agents.every((a) => a.k8s!.nodes.has("k3")), 5000, "every watcher saw k3 again");
    await new Promise((r) => setTimeout(r, 1500));
    nothingReleased();
  }, 20_000);

  it("a DELETED Node whose agent left the mesh: its blocks are released at once, and the others agree", async () => {
    const [k1, k2, k3] = agents as [Agent, Agent, Agent];
    const goneBlocks = k3.ipam.localBlocks();
    expect(goneBlocks.length).toBeGreaterThan(0);
    await k3.stop();
    await waitFor(() => [k1, k2].every((a) => !a.mesh.connectedPeers().includes(k3.id)), 30_000, "k3 gone from the mesh");
    const t0 = Date.now();
    api.emit("DELETED", "k3");
    // (one status per agent per poll: k3 may own most of the range's 1024 blocks)
    const released = (a: Agent) => {
      const o = owners(a);
      return goneBlocks.every((b) => o.get(b) !== undefined && o.get(b) !== k3.id);
    };
    await waitFor(() => [k1, k2].every(released), 15_000, "k3's blocks released");
    // on who holds k3's blocks now (the rest of the map may still be moving: grants, pins)
    const sameOwners = () => {
      const [o1, o2] = [owners(k1), owners(k2)];
      return goneBlocks.every((b) => o1.get(b) === o2.get(b));
    };
    await waitFor(sameOwners, 30_000, "k1 and k2 agree on k3's blocks");
    const took = Date.now() - t0;
    expect(took).toBeLessThan(IPAM.reclaimAfterMs / 10);
    // each block has exactly one live owner, and that owner has it in its own blocks
    const view = owners(k1);
    const local = new Map([k1, k2].map((a) => [a.id, new Set(a.ipam.localBlocks())]));
    for (const b of goneBlocks) {
      const o = view.get(b)!;
      expect([k1.id, k2.id]).toContain(o);
      for (const [id, blocks] of local) expect(blocks.has(b)).toBe(id === o);
    }
    expect(logs.some((l) => /released the address blocks of a deleted Kubernetes Node/.test(String(l.msg)) && l.k8sNode === "k3")).toBe(true);
    // pods still allocate
    expect((await k1.allocate("after-k3", 10_000)).ip).toMatch(/^10\.40\./);
  }, 120_000);

  it("401 and 403 are logged as warnings, not fatal; a rotated token file is re-read on reconnect", async () => {
    const [k1, k2] = agents as [Agent, Agent];
    const authErrors = () => k1.k8s!.counters.authErrors + k2.k8s!.counters.authErrors;
    api.token = "sa-token-2"; // the API server now wants the rotated token; the file still has the old one
    api.endWatches();
    await waitFor(() => k1.k8s!.counters.authErrors > 0 && k2.k8s!.counters.authErrors > 0, 10_000, "401s");
    expect(logs.some((l) => l.level === "warn" && l.component === "k8s" && l.status === 401 && /401/.test(String(l.msg)))).toBe(true);
    writeFileSync(tokenPath, "sa-token-2\n");
    api.forbid = true;
    await waitFor(() => logs.some((l) => l.level === "warn" && l.status === 403 && /get\/list\/watch on nodes/.test(String(l.msg))), 10_000, "403 warning");
    const n = authErrors();
    api.forbid = false;
    await waitFor(() => api.watchCount() === 2, 10_000, "both agents watching again");
    expect(api.log.filter((r) => r.method === "WATCH").at(-1)!.auth).toBe("Bearer sa-token-2");
    expect(authErrors()).toBeGreaterThanOrEqual(n);
    // still alive and still working
    for (const a of [k1, k2]) expect(a.signal.up).toBe(true);
    expect(logs.some((l) => l.level === "error" && l.component === "k8s")).toBe(false);
  }, 30_000);

  it("410 Gone makes the watcher list again; a Node deleted during the gap is released", async () => {
    const [k1, k2] = agents as [Agent, Agent];
    const lists = k1.k8s!.counters.lists;
    const k2Blocks = k2.ipam.localBlocks();
    expect(k2Blocks.length).toBeGreaterThan(0);
    await k2.stop();
    await waitFor(() => !k1.mesh.connectedPeers().includes(k2.id), 15_000, "k2 gone from the mesh");
    // k2's Node is deleted while k1 is not watching, and the history is compacted
    api.endWatches();
    api.nodes.delete("k2");
    api.rv += 10;
    api.compactedBelow = api.rv;
    await waitFor(() => k1.k8s!.counters.relists > 0 && k1.k8s!.counters.lists > lists, 10_000, "a re-list after 410");
    await waitFor(() => { const o = owners(k1); return k2Blocks.every((b) => o.get(b) === k1.id); }, 10_000, "k2's blocks released to k1");
    expect([...k1.k8s!.nodes]).toEqual(["k1"]); // k3 was deleted earlier, k2 in the gap
    // and it watches again from the new list's resourceVersion
    await waitFor(() => api.watchCount() === 1, 10_000, "k1 watching again");
    const last = new URL(api.log.filter((r) => r.method === "WATCH").at(-1)!.path, "https://x").searchParams;
    expect(Number(last.get("resourceVersion"))).toBe(api.rv);
  }, 40_000);
});
