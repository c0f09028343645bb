import { mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { startApiServer } from "../../agent/api.js";
import { ensureDir, loadOrCreateIdentity } from "../../agent/state.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), "weft-perms-"));
  dirs.push(d);
  return d;
}

describe("state dir and API socket permissions", () => {
  it("forces an existing state dir to 0700 (it holds the node key and the API socket)", () => {
    const d = join(tmp(), "state");
    mkdirSync(d, { mode: 0o755 });
    expect(statSync(d).mode & 0o777).toBe(0o755);
    loadOrCreateIdentity(d);
    expect(statSync(d).mode & 0o777).toBe(0o700);
    expect(statSync(join(d, "identity.pem")).mode & 0o777).toBe(0o600);
    ensureDir(d);
    expect(statSync(d).mode & 0o777).toBe(0o700);
  });
  it("creates the API socket 0600 and restores the process umask", async () => {
    const d = tmp();
    const before = process.umask();
    const sock = join(d, "agent.sock");
    const srv = await startApiServer(sock, {} as never);
    try {
      expect(statSync(sock).mode & 0o777).toBe(0o600);
      expect(process.umask()).toBe(before);
    } finally {
      await srv.close();
    }
  });
});
