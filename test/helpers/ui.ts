/**
 * Shared set-up of the topology-page tests (test/integration/ui-*.test.ts): the real `weftnet` CLI as
 * child processes (signal server, agents), their status, a free port, a viewer link from Node (werift,
 * speaking the viewer protocol of agent/ui/viewer.ts), and Debian's Chromium through playwright-core.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import type { Browser, Page } from "playwright-core";
import { RTCPeerConnection, type RTCDataChannel } from "werift";
import { expect } from "vitest";
import { tmpDir, waitFor } from "./cluster.js";

export const CLI = join(process.cwd(), "dist", "agent", "cli", "main.js");
export const CHROMIUM = process.env.WEFTNET_CHROMIUM ?? "/usr/bin/chromium";
export const HAVE_CHROMIUM = existsSync(CHROMIUM);
/** screenshots and other keepsakes of a run (gitignored) */
export const ARTIFACTS = process.env.WEFTNET_ARTIFACTS ?? join(process.cwd(), "test-artifacts");
/** the children must not pick up the developer's environment */
export const CHILD_ENV = { ...process.env, WEFTNET_TOKEN: "", WEFTNET_SIGNAL: "", WEFTNET_LOG: "", WEFTNET_LOG_FORMAT: "", WEFTNET_JOIN_KEY: "", WEFTNET_ADMIN_TOKEN: "" };

export interface Proc {
  child: ChildProcess;
  out: () => string;
  err: () => string;
  exited: Promise<unknown>;
}

/** `weftnet ARGS...` as a child process, its stdout/stderr collected. */
export function startCli(args: string[]): Proc {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ["ignore", "pipe", "pipe"], env: CHILD_ENV });
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  return { child, out: () => out, err: () => err, exited: new Promise((r) => child.once("exit", r)) };
}

/** SIGTERM and wait for the exit (no-op for undefined or an exited process). */
export async function stopCli(p: Proc | undefined): Promise<void> {
  if (!p) return;
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGTERM");
  await p.exited;
}

/** `weftnet ARGS...` to completion. */
export function runCli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  // generous: a CLI start on a loaded 2-core box takes seconds (a synchronous spawn; the agents are other processes)
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", env: CHILD_ENV, timeout: 30_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });

export interface AgentStatus {
  node: { id: string; name: string };
  peers: { id: string; name: string; state: string }[];
}

/** `weftnet status --json` of the agent with state dir `dir`; undefined while it is not up. */
export function agentStatus(dir: string): AgentStatus | undefined {
  const r = runCli(["status", "--json", "--state-dir", dir]);
  return r.status === 0 ? (JSON.parse(r.stdout) as AgentStatus) : undefined;
}

/** `weftnet status --json` of an agent that must answer: its status, or an error saying why the CLI failed. */
export function mustStatus(dir: string): AgentStatus {
  const r = runCli(["status", "--json", "--state-dir", dir]);
  if (r.status !== 0) throw new Error(`weftnet status --state-dir ${dir} failed (exit ${r.status}): ${r.stderr.slice(-500)}`);
  return JSON.parse(r.stdout) as AgentStatus;
}

export function agentRoutes(dir: string): { dst: string }[] {
  return (JSON.parse(runCli(["status", "routes", "--json", "--state-dir", dir]).stdout) as { routes: { dst: string }[] }).routes;
}

/** A signaling server on loopback (any free port): its process, ws:// URL and the lines it printed. */
export async function startSignal(token: string, extra: string[] = []): Promise<{ proc: Proc; url: string }> {
  const proc = startCli(["signal", "--listen", "127.0.0.1:0", "--stun-port", String(await freePort()), "--token", token, ...extra]);
  await waitFor(() => /listening on ws:\/\/127\.0\.0\.1:\d+/.test(proc.out()) || proc.child.exitCode !== null, 15_000, "signal listening");
  const url = /listening on (ws:\/\/127\.0\.0\.1:\d+)/.exec(proc.out())?.[1];
  if (!url) {
    await stopCli(proc);
    throw new Error(`signal did not start: ${proc.out()} ${proc.err()}`);
  }
  return { proc, url };
}

export interface TestAgent {
  name: string;
  dir: string;
  proc: Proc;
}

/** Agents on loopback without a data plane, one per [name, extra flags]; each gets a fresh state dir. */
export function startAgents(signalUrl: string, token: string, specs: [string, string[]][]): TestAgent[] {
  return specs.map(([name, extra]) => {
    const dir = tmpDir(`weft-ui-${name}-`);
    return { name, dir, proc: startCli(["agent", "--no-tun", "--loopback-only", "--signal", signalUrl, "--token", token, "--name", name, "--state-dir", dir, ...extra]) };
  });
}

export async function stopAgents(agents: TestAgent[]): Promise<void> {
  await Promise.all(agents.map((a) => stopCli(a.proc)));
  for (const a of agents) rmSync(a.dir, { recursive: true, force: true });
}

/** Every agent sees every other one connected. */
export async function waitFullMesh(agents: TestAgent[], timeoutMs = 40_000): Promise<void> {
  await waitFor(() => agents.every((a) => (agentStatus(a.dir)?.peers.filter((p) => p.state === "connected").length ?? 0) === agents.length - 1), timeoutMs, `a full mesh of ${agents.length}`);
}

/**
 * Debian's chromium, headless, no browser download. In a container: no sandbox, no GPU, nothing phoning
 * home; loopback ICE allowed and host candidates not hidden behind mDNS names (agents run --loopback-only).
 */
export async function launchChromium(): Promise<Browser> {
  const { chromium } = await import("playwright-core");
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run", "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns"],
  });
}

// ---- a viewer link from Node (werift), for the protocol-level tests -------------------------------------

export interface NodeViewer {
  pc: RTCPeerConnection;
  control: RTCDataChannel;
  packets: RTCDataChannel;
  msgs: Record<string, unknown>[];
  closed: () => boolean;
}

/** A viewer link to the agent behind `base` (POST /ui/v1/offer), open and past the agent's challenge. */
export async function openNodeViewer(base: string, body: Record<string, unknown> = {}): Promise<NodeViewer> {
  const pc = new RTCPeerConnection({ iceServers: [] });
  const control = pc.createDataChannel("control", { negotiated: true, id: 0, ordered: true });
  const packets = pc.createDataChannel("packets", { negotiated: true, id: 1, ordered: false, maxRetransmits: 0 });
  const msgs: Record<string, unknown>[] = [];
  let isClosed = false;
  control.onMessage.subscribe((d: string | Buffer) => msgs.push(JSON.parse(d.toString()) as Record<string, unknown>));
  control.stateChanged.subscribe((s: string) => {
    if (s === "closed") isClosed = true;
  });
  pc.connectionStateChange.subscribe((s: string) => {
    if (s === "closed" || s === "failed") isClosed = true;
  });
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise<void>((resolve) => {
    const t = setTimeout(resolve, 2000);
    pc.iceGatheringStateChange.subscribe((s: string) => {
      if (s === "complete") {
        clearTimeout(t);
        resolve();
      }
    });
  });
  const res = await fetch(`${base}/ui/v1/offer`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...body, sdp: pc.localDescription!.sdp }) });
  const ans = (await res.json()) as { sdp: string; candidates: { candidate: string; sdpMid?: string; sdpMLineIndex?: number }[] };
  if (res.status !== 200) {
    await pc.close();
    throw new Error(`POST ${base}/ui/v1/offer: HTTP ${res.status} ${JSON.stringify(ans)}`);
  }
  await pc.setRemoteDescription({ type: "answer", sdp: ans.sdp });
  for (const c of ans.candidates) await pc.addIceCandidate(c as never).catch(() => {});
  await waitFor(() => msgs.some((m) => m.t === "challenge"), 15_000, "the agent's challenge");
  return { pc, control, packets, msgs, closed: () => isClosed };
}

export const sendViewer = (v: NodeViewer, m: unknown) => v.control.send(Buffer.from(JSON.stringify(m)));

/** The page's console output (warnings, errors), for failure messages. */
export function recordConsole(page: Page): string[] {
  const lines: string[] = [];
  page.on("console", (m) => lines.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => lines.push(`pageerror: ${e.message}`));
  return lines;
}

/**
 * page.waitForFunction(predicate) that, on timeout, fails with what the page showed: its status line,
 * its node and link rows, and its console (so a CI failure says where the join stopped).
 */
export async function waitForPage(page: Page, predicate: string, timeoutMs: number, what: string, consoleLines: string[] = []): Promise<void> {
  try {
    await page.waitForFunction(predicate, undefined, { timeout: timeoutMs });
  } catch (e) {
    const shown = await page
      .evaluate(`(() => ({ status: document.querySelector("#status")?.textContent, nodes: [...document.querySelectorAll("#nodes tbody tr")].map((r) => r.textContent), links: [...document.querySelectorAll("#links tbody tr")].map((r) => r.textContent) }))()`)
      .catch((x: Error) => `(page gone: ${x.message})`);
    throw new Error(`${what}: not within ${timeoutMs} ms (${(e as Error).message.split("\n")[0]}); the page showed ${JSON.stringify(shown)}; console: ${JSON.stringify(consoleLines.slice(-20))}`);
  }
}

// ---- the topology page (agent/ui, also served by `weftnet signal` at /ui): rows and the checks both UI suites make

export const nodeRows = (page: Page) =>
  page.$$eval("#nodes tbody tr", (rs) => rs.map((r) => ({ id: r.getAttribute("data-node"), pongs: Number(r.getAttribute("data-pongs")), name: r.children[0]!.textContent, transport: r.children[2]!.textContent, rtt: r.querySelector(".rtt")!.textContent })));
export const linkRows = (page: Page) => page.$$eval("#links tbody tr", (rs) => rs.map((r) => ({ key: r.getAttribute("data-link"), path: r.getAttribute("data-path"), why: r.querySelector(".why")!.textContent, text: r.textContent })));
/** the page shows 3 nodes, each with an RTT, and 3 links (page-side predicates are strings: compiled for Node, without the DOM types) */
export const FULL_VIEW = `(() => { const rows = [...document.querySelectorAll("#nodes tbody tr")];
  return rows.length === 3 && rows.every((r) => /ms$/.test(r.querySelector(".rtt").textContent)) && document.querySelectorAll("#links tbody tr").length === 3; })()`;

/**
 * What a joined page shows of the 3-agent test mesh (a: native, b: werift, c: native): the status line,
 * the three nodes with their transports and RTTs, every link with a path (and why, when relayed), and the
 * graph. Returns the node rows.
 */
export async function expectMeshView(page: Page) {
  expect(await page.textContent("#status")).toMatch(/^joined: 3 agent link\(s\), viewer id [0-9a-f]{16}$/);
  const nodes = await nodeRows(page);
  expect(nodes.map((n) => n.name).sort()).toEqual(["a", "b", "c"]);
  expect(nodes.find((n) => n.name === "b")!.transport).toBe("werift");
  expect(nodes.find((n) => n.name === "a")!.transport).toBe("native");
  for (const n of nodes) expect(n.rtt).toMatch(/^\d+(\.\d+)? ms$/);
  for (const l of await linkRows(page)) {
    expect(l.path).toMatch(/^(direct|bulk|turn|relay|via)$/);
    if (l.path === "relay") expect(l.why).toMatch(/relayed through the signaling server: .+/);
  }
  expect(await page.locator("svg#graph g[data-node]").count()).toBe(3);
  expect(await page.locator("svg#graph line[data-link]").count()).toBe(3);
  return nodes;
}

/** Ping `to` from `from` (node names) on the page; returns the result line ("a → c: 1.2 ms via direct"). */
export async function pingOnPage(page: Page, from: string, to: string): Promise<string | null> {
  const ids = Object.fromEntries((await nodeRows(page)).map((n) => [n.name, n.id]));
  await page.selectOption("#ping-from", ids[from]!);
  await page.selectOption("#ping-target", ids[to]!);
  await page.click("#ping");
  await page.waitForFunction(`/: /.test(document.querySelector("#ping-result").textContent)`, undefined, { timeout: 10_000 });
  return page.textContent("#ping-result");
}
