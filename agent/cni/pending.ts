/**
 * Releases that DEL could not hand to the agent (the agent was down or restarting): one small file per
 * pod id in STATEDIR/cni-pending-release/. DEL still succeeds (the interface is gone, which is what the
 * runtime waits for); the address stays allocated in the agent until one of these frees it:
 *   - the next plugin run that reaches the agent (ADD, DEL, GC) sends the pending releases first;
 *   - GC frees every `cni/` allocation whose container is not in cni.dev/valid-attachments anyway.
 * An ADD for the same pod id drops its pending release before allocating (the runtime serialises
 * operations on one attachment, so that ADD came after the DEL), so a late flush never frees an address
 * a live pod uses. Writes are atomic (state.ts writeFileAtomic); concurrent plugin runs touch different
 * files, and a release sent twice is harmless (free of an unknown pod id is a no-op in the agent).
 */
import { createHash } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, unlinkSync } from "node:fs";
import { join } from "node:path";
import { writeFileAtomic } from "../state.js";

export const PENDING_DIR = "cni-pending-release";

export interface PendingStore {
  add(podId: string): void;
  remove(podId: string): void;
  list(): string[];
}

export class FilePendingStore implements PendingStore {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = join(stateDir, PENDING_DIR);
  }

  private file(podId: string): string {
    return join(this.dir, createHash("sha256").update(podId).digest("hex").slice(0, 24) + ".json");
  }

  add(podId: string): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    writeFileAtomic(this.file(podId), JSON.stringify({ podId, since: new Date().toISOString() }) + "\n", 0o600);
  }

  remove(podId: string): void {
    try {
      unlinkSync(this.file(podId));
    } catch {
      // not pending
    }
  }

  list(): string[] {
    let names: string[];
    try {
      names = readdirSync(this.dir);
    } catch {
      return [];
    }
    const out: string[] = [];
    for (const n of names) {
      if (!n.endsWith(".json")) continue;
      try {
        const j = JSON.parse(readFileSync(join(this.dir, n), "utf8")) as { podId?: unknown };
        if (typeof j.podId === "string") out.push(j.podId);
      } catch {
        // torn or foreign file: ignore
      }
    }
    return out.sort();
  }
}
