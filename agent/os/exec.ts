/**
 * A small command runner for the OS adapters (netconf.ts, pod.ts): execFile with argument arrays (never a
 * shell), errors as CommandError carrying the command line, exit code and stderr.
 *
 * `HostExec` runs everything in one network namespace:
 *   - no `netns` (the real agent): `ip ...`, other tools as they are, /proc/sys via fs;
 *   - `netns: "NAME"` (tests, or an agent managing another namespace): `ip -n NAME ...`, other tools via
 *     `ip netns exec NAME tool ...`, /proc/sys through `ip netns exec NAME cat|tee` (a sysctl under
 *     /proc/sys/net belongs to the namespace of the process that opens it).
 */
import { execFile } from "node:child_process";
import fs from "node:fs/promises";
import { WeftError } from "../../src/errors.js";

/** A command failed (non-zero exit, not found, timed out). `stderr` is what the tool said. */
export class CommandError extends WeftError {
  static override readonly name = "CommandError";
  constructor(
    readonly command: readonly string[],
    readonly exitCode: number | null,
    readonly stderr: string,
    message?: string,
    options?: { cause?: unknown },
  ) {
    super("ERR_COMMAND", message ?? `\`${command.join(" ")}\` failed (exit ${exitCode ?? "?"}): ${stderr.trim() || "no output"}`, options);
  }
}

export interface ExecResult {
  stdout: string;
  stderr: string;
}

/** Run `file args` (no shell). `input` is written to stdin. Throws CommandError. */
export function execCommand(file: string, args: readonly string[], opts: { input?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
  const command = [file, ...args];
  return new Promise((resolve, reject) => {
    const child = execFile(file, args, { encoding: "utf8", timeout: opts.timeoutMs ?? 30_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) {
        const e = err as NodeJS.ErrnoException & { code?: unknown };
        if (e.code === "ENOENT") {
          reject(new CommandError(command, null, "", `\`${file}\` not found: install it (Debian: ${file === "ip" ? "iproute2" : file === "nsenter" ? "util-linux" : file}) or fix PATH`, { cause: err }));
          return;
        }
        reject(new CommandError(command, typeof e.code === "number" ? e.code : null, String(stderr ?? ""), undefined, { cause: err }));
        return;
      }
      resolve({ stdout: String(stdout), stderr: String(stderr) });
    });
    if (opts.input !== undefined) child.stdin?.end(opts.input);
    else child.stdin?.end();
  });
}

/** Commands and /proc/sys access in one network namespace (the current one unless `netns` is given). */
export class HostExec {
  constructor(readonly netns?: string) {}

  /** `ip [-n NS] args...` */
  ip(args: readonly string[]): Promise<ExecResult> {
    return execCommand("ip", this.netns ? ["-n", this.netns, ...args] : [...args]);
  }

  /** `ip -j [-n NS] args...` parsed. An empty output (some `ip -j` versions print nothing) is []. */
  async ipJson<T>(args: readonly string[]): Promise<T[]> {
    const { stdout } = await this.ip(["-j", ...args]);
    const s = stdout.trim();
    if (!s) return [];
    return JSON.parse(s) as T[];
  }

  /** Any other tool, inside the namespace. */
  run(file: string, args: readonly string[], opts: { input?: string } = {}): Promise<ExecResult> {
    if (!this.netns) return execCommand(file, args, opts);
    return execCommand("ip", ["netns", "exec", this.netns, file, ...args], opts);
  }

  /** Read a /proc/sys file; undefined if it does not exist (e.g. br_netfilter not loaded). */
  async readProc(path: string): Promise<string | undefined> {
    if (!this.netns) {
      try {
        return (await fs.readFile(path, "utf8")).trim();
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
        throw e;
      }
    }
    try {
      return (await this.run("cat", [path])).stdout.trim();
    } catch (e) {
      if (e instanceof CommandError && /No such file/i.test(e.stderr)) return undefined;
      throw e;
    }
  }

  async writeProc(path: string, value: string): Promise<void> {
    if (!this.netns) {
      await fs.writeFile(path, value + "\n");
      return;
    }
    await this.run("tee", [path], { input: value + "\n" });
  }
}
