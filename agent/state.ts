/**
 * The agent's state directory: identity key, local API socket, later IPAM state.
 * Default: /var/lib/weftnet as root, else $XDG_STATE_HOME/weftnet (~/.local/state/weftnet).
 * Files are written atomically (write to a temp file, fsync, rename, fsync the directory), so a crash
 * mid-write leaves either the old or the new content, never a torn file.
 */
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, renameSync, writeSync, existsSync, chmodSync, statSync } from "node:fs";
import { homedir } from "node:os";
import { join, dirname } from "node:path";
import { generateIdentity, identityFromPem, identityToPem, type Identity } from "../src/identity.js";
import { WeftError } from "../src/errors.js";

export function defaultStateDir(app = "weftnet"): string {
  if (process.getuid?.() === 0) return `/var/lib/${app}`;
  const xdg = process.env.XDG_STATE_HOME;
  return join(xdg && xdg.startsWith("/") ? xdg : join(homedir(), ".local", "state"), app);
}

/** Create the state dir 0700, and force an existing one to 0700 (it holds the node key and the API socket). */
export function ensureDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    if ((statSync(dir).mode & 0o777) !== 0o700) chmodSync(dir, 0o700);
  } catch (e) {
    throw new WeftError("ERR_STATE_DIR", `cannot create state dir ${dir}: ${(e as Error).message} (pass --state-dir to use another directory)`);
  }
}

export function writeFileAtomic(path: string, data: string | Uint8Array, mode = 0o600): void {
  const tmp = `${path}.tmp-${process.pid}-${Date.now()}`;
  const fd = openSync(tmp, "w", mode);
  try {
    writeSync(fd, typeof data === "string" ? Buffer.from(data) : data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  try {
    const dfd = openSync(dirname(path), "r");
    try {
      fsyncSync(dfd);
    } finally {
      closeSync(dfd);
    }
  } catch {
    // directory fsync is best effort (not supported on every filesystem)
  }
}

export const IDENTITY_FILE = "identity.pem";
export const API_SOCKET = "agent.sock";

/** Load the node key, creating it on first start. */
export function loadOrCreateIdentity(stateDir: string): { identity: Identity; created: boolean } {
  ensureDir(stateDir);
  const path = join(stateDir, IDENTITY_FILE);
  if (existsSync(path)) {
    let pem: string;
    try {
      pem = readFileSync(path, "utf8");
    } catch (e) {
      throw new WeftError("ERR_STATE_DIR", `cannot read ${path}: ${(e as Error).message}`);
    }
    try {
      return { identity: identityFromPem(pem), created: false };
    } catch (e) {
      throw new WeftError("ERR_IDENTITY", `${path} is not a valid weftnet identity key (${(e as Error).message}); move it away to create a new identity`);
    }
  }
  const identity = generateIdentity();
  writeFileAtomic(path, identityToPem(identity), 0o600);
  chmodSync(path, 0o600);
  return { identity, created: true };
}

export function apiSocketPath(stateDir: string): string {
  return join(stateDir, API_SOCKET);
}
