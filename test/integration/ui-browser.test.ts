/**
 * The live topology page in a real browser: Debian's Chromium (headless, driven by playwright-core, no
 * browser download) loads /ui from `weftnet agent --ui-listen` in a 3-agent mesh (libdatachannel,
 * werift, libdatachannel), joins as a WebRTC viewer with the pasted token, shows every node and link,
 * pings a node and shows the path, and keeps showing live RTTs after the signaling server is stopped.
 * A wrong token is refused. The screenshot is kept in test-artifacts/ (WEFTNET_ARTIFACTS overrides).
 * Skipped when /usr/bin/chromium is not installed (CI's set-up installs it: see /work/wt/NEEDS.md).
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Browser } from "playwright-core";
import { waitFor } from "../helpers/cluster.js";
import { agentStatus, ARTIFACTS, expectMeshView, freePort, FULL_VIEW, HAVE_CHROMIUM, launchChromium, linkRows, nodeRows, pingOnPage, recordConsole, waitForPage, startAgents, startSignal, stopAgents, stopCli, waitFullMesh, type Proc, type TestAgent } from "../helpers/ui.js";

const TOKEN = "ui-browser-Zq3v8Kp1Lm7Xr2Tn5Wb9Yc4Hd6Jf0Gs";
const status = agentStatus;
const d = HAVE_CHROMIUM ? describe : describe.skip;

d("live topology page in Chromium", () => {
  let signal: Proc | undefined;
  let agents: TestAgent[] = [];
  let dirs: string[] = [];
  let uiUrl = "";
  let browser: Browser | undefined;

  beforeAll(async () => {
    const s = await startSignal(TOKEN);
    signal = s.proc;
    const uiPort = await freePort();
    agents = startAgents(s.url, TOKEN, [
      ["a", ["--transport", "native", "--ui-listen", `127.0.0.1:${uiPort}`]],
      ["b", ["--transport", "werift"]],
      ["c", ["--transport", "native"]],
    ]);
    dirs = agents.map((a) => a.dir);
    await waitFor(() => /topology page on (http:\S+)/.test(agents[0]!.proc.out()) || agents[0]!.proc.child.exitCode !== null, 15_000, "the topology page");
    uiUrl = /topology page on (http:\S+)/.exec(agents[0]!.proc.out())?.[1] ?? "";
    expect(uiUrl, agents[0]!.proc.out() + agents[0]!.proc.err()).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/ui$/);
    await waitFullMesh(agents);
    browser = await launchChromium();
  }, 90_000);

  afterAll(async () => {
    await browser?.close().catch(() => {});
    await stopAgents(agents);
    await stopCli(signal);
  }, 30_000);

  it("joins over WebRTC, shows every node and link, pings a node with its path, survives the signaling server", async () => {
    const page = await browser!.newPage({ viewport: { width: 1280, height: 760 } });
    const errors: string[] = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const logs = recordConsole(page);
    await page.goto(uiUrl);
    await page.fill("#credential", TOKEN);
    await page.click("#join-btn");
    await waitForPage(page, FULL_VIEW, 40_000, "3 nodes with RTTs and 3 links", logs);
    await expectMeshView(page);

    // the viewer is not a mesh member: the agents' peer lists and routes do not contain it
    for (const dir of dirs) expect(status(dir)!.peers.map((p) => p.name).sort()).toHaveLength(2);

    // ping c from a: the reply names its path
    expect(await pingOnPage(page, "a", "c")).toMatch(/^a → c: \d+(\.\d+)? ms via (direct|turn|relay)( route .+)?$/);

    // the signaling server goes away; RTTs measured by the browser keep coming from all three agents
    await stopCli(signal);
    signal = undefined;
    await waitFor(async () => (await nodeRows(page)).length === 3, 5_000, "rows");
    const before = Object.fromEntries((await nodeRows(page)).map((n) => [n.name, n.pongs]));
    await page.waitForTimeout(3500);
    const after = await nodeRows(page);
    for (const n of after) expect(n.pongs, `${n.name}: pongs after the server stopped`).toBeGreaterThan(before[n.name!]! + 1);
    expect(await linkRows(page)).toHaveLength(3);
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "ui-topology.png"), fullPage: true });
    expect(errors).toEqual([]);
    await page.close();
  }, 90_000);

  it("a wrong token is refused and the page says so", async () => {
    const page = await browser!.newPage();
    await page.goto(uiUrl);
    await page.fill("#credential", "not-the-cluster-token-at-all-0123456789");
    await page.click("#join-btn");
    await page.waitForFunction(`/refused/.test(document.querySelector("#status").textContent)`, undefined, { timeout: 20_000 });
    expect(await page.textContent("#status")).toMatch(/^refused by a: wrong cluster credential/);
    expect(await page.locator("#nodes tbody tr").count()).toBe(0);
    await waitFor(() => /refused a viewer: wrong cluster credential/.test(agents[0]!.proc.err()), 5_000, "the agent logs the refusal");
    await page.close();
  }, 40_000);
});
