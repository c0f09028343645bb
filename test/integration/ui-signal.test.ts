/**
 * The live topology page served by `weftnet signal` at /ui, in Debian's Chromium (headless, playwright-core):
 * against a 3-agent mesh (libdatachannel, werift, libdatachannel) the browser joins through the signaling
 * server — once with the pasted cluster token, once with an invite from `weftnet invite` — shows every node
 * and link, pings a node, and keeps showing live RTTs measured by the browser after the server is stopped.
 * A wrong token, a forged invite and an expired invite are refused by the server. Screenshots go to
 * test-artifacts/ (WEFTNET_ARTIFACTS overrides). Skipped without /usr/bin/chromium.
 */
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import type { Browser } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { generateIdentity } from "../../src/identity.js";
import { loadInviteKey, mintInvite } from "../../agent/ui/invite.js";
import { tmpDir, waitFor } from "../helpers/cluster.js";
import { ARTIFACTS, expectMeshView, FULL_VIEW, HAVE_CHROMIUM, launchChromium, linkRows, mustStatus, nodeRows, pingOnPage, recordConsole, runCli, waitForPage, startAgents, startSignal, stopAgents, stopCli, waitFullMesh, type Proc, type TestAgent } from "../helpers/ui.js";

const TOKEN = "ui-signal-Hd6Jf0GsZq3v8Kp1Lm7Xr2Tn5Wb9Yc4";
const d = HAVE_CHROMIUM ? describe : describe.skip;

d("live topology page at weftnet signal's /ui", () => {
  let signal: Proc | undefined;
  let agents: TestAgent[] = [];
  let uiUrl = "";
  let browser: Browser | undefined;
  const keyDir = tmpDir("weft-ui-invite-");
  const keyFile = join(keyDir, "invite.pem");

  beforeAll(async () => {
    const s = await startSignal(TOKEN, ["--invite-key-file", keyFile]);
    signal = s.proc;
    // printed after the "listening on" line startSignal waits for (the invite key's line last): on a loaded
    // box they can come a moment later
    await waitFor(() => /--ui-invite-key [0-9a-f]{64}\n/.test(s.proc.out()) || s.proc.child.exitCode !== null, 15_000, "the topology page's URL and the invite key");
    uiUrl = /topology page on (http:\S+)/.exec(signal.out())?.[1] ?? "";
    expect(uiUrl, signal.out()).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/ui$/);
    const pub = /--ui-invite-key ([0-9a-f]{64})/.exec(signal.out())?.[1];
    expect(pub, signal.out()).toBeDefined();
    // no agent serves a page of its own: the server's is the only way in
    agents = startAgents(s.url, TOKEN, [
      ["a", ["--transport", "native", "--ui-invite-key", pub!]],
      ["b", ["--transport", "werift", "--ui-invite-key", pub!]],
      ["c", ["--transport", "native", "--ui-invite-key", pub!]],
    ]);
    await waitFullMesh(agents);
    browser = await launchChromium();
  }, 90_000);

  afterAll(async () => {
    await browser?.close().catch(() => {});
    await stopAgents(agents);
    await stopCli(signal);
    rmSync(keyDir, { recursive: true, force: true });
  }, 30_000);

  it("refuses a wrong token, a forged invite and an expired invite", async () => {
    const page = await browser!.newPage();
    const tryWith = async (credential: string) => {
      await page.goto(uiUrl);
      await page.fill("#credential", credential);
      await page.click("#join-btn");
      await page.waitForFunction(`/refused|cannot join/.test(document.querySelector("#status").textContent)`, undefined, { timeout: 20_000 });
      expect(await page.locator("#nodes tbody tr").count()).toBe(0);
      return page.textContent("#status");
    };
    expect(await tryWith("not-the-cluster-token-at-all-0123456789")).toBe("refused by the signaling server: wrong cluster token");
    expect(await tryWith(mintInvite(generateIdentity(), 600_000).invite)).toBe("refused by the signaling server: the invite was not signed by this server");
    const { key } = loadInviteKey(keyFile, false);
    expect(await tryWith(mintInvite(key, 60_000, Date.now() - 120_000).invite)).toMatch(/^refused by the signaling server: the invite expired \d+ s ago$/);
    await page.close();
  }, 60_000);

  it("joins through the server with the token and with an invite, shows every node and link, pings, survives the server", async () => {
    const errors: string[] = [];
    // the operator's page: pasted token
    const byToken = await browser!.newPage({ viewport: { width: 1280, height: 760 } });
    byToken.on("pageerror", (e) => errors.push(e.message));
    const logs = new Map([[byToken, recordConsole(byToken)]]);
    await byToken.goto(uiUrl);
    await byToken.fill("#credential", TOKEN);
    await byToken.click("#join-btn");
    // a guest's page: the link `weftnet invite --url` prints, which joins by itself
    const inv = runCli(["invite", "--invite-key-file", keyFile, "--ttl", "10m", "--url", uiUrl]);
    expect(inv.status, inv.stderr).toBe(0);
    const link = /^(http:\S+#invite=wv1\.\S+)$/m.exec(inv.stdout)?.[1];
    expect(link, inv.stdout).toBeDefined();
    const byInvite = await browser!.newPage({ viewport: { width: 1280, height: 760 } });
    byInvite.on("pageerror", (e) => errors.push(e.message));
    logs.set(byInvite, recordConsole(byInvite));
    await byInvite.goto(link!);

    for (const page of [byToken, byInvite]) {
      await waitForPage(page, FULL_VIEW, 40_000, `${page === byToken ? "token" : "invite"} page: 3 nodes with RTTs and 3 links`, logs.get(page));
      await expectMeshView(page);
    }
    // the invite never showed the agents the token: its page holds only the invite
    expect(await byInvite.inputValue("#credential")).toMatch(/^wv1\./);
    // viewers are not mesh members
    for (const a of agents) expect(mustStatus(a.dir).peers.map((p) => p.name).sort()).toEqual(["a", "b", "c"].filter((n) => n !== a.name));
    const joined = agents.map((a) => a.proc.err()).join("\n");
    expect(joined).toMatch(/viewer joined.*cluster token/);
    expect(joined).toMatch(/viewer joined.*invite/);

    // ping c from b (the werift agent), on the invited page: the reply names its path
    expect(await pingOnPage(byInvite, "b", "c")).toMatch(/^b → c: \d+(\.\d+)? ms via (direct|turn|relay)( route .+)?$/);

    // the signaling server goes away; both pages keep getting RTTs from all three agents
    await stopCli(signal);
    signal = undefined;
    const before = await Promise.all([byToken, byInvite].map(async (p) => Object.fromEntries((await nodeRows(p)).map((n) => [n.name, n.pongs]))));
    for (const [i, page] of [byToken, byInvite].entries()) {
      await waitFor(async () => (await nodeRows(page)).every((n) => n.pongs > before[i]![n.name!]! + 2), 15_000, "pongs after the server stopped");
      const after = await nodeRows(page);
      expect(after).toHaveLength(3);
      for (const n of after) expect(n.rtt).toMatch(/^\d+(\.\d+)? ms$/);
      expect(await linkRows(page)).toHaveLength(3);
    }
    mkdirSync(ARTIFACTS, { recursive: true });
    await byToken.screenshot({ path: join(ARTIFACTS, "ui-signal-topology.png"), fullPage: true });
    await byInvite.screenshot({ path: join(ARTIFACTS, "ui-signal-invite.png"), fullPage: true });
    expect(errors).toEqual([]);
    await byToken.close();
    await byInvite.close();
  }, 120_000);
});
