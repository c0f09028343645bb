import { readFileSync } from "node:fs";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError, WeftError } from "../../src/errors.js";

export type Options = NonNullable<ParseArgsConfig["options"]>;

/** parseArgs in strict mode, with errors turned into one-line UsageErrors that name the command. */
export function parse<O extends Options>(cmd: string, argv: string[], options: O, allowPositionals = false) {
  try {
    return parseArgs({ args: argv, options, strict: true, allowPositionals });
  } catch (e) {
    const msg = (e as Error).message.replace(/\. To specify a positional argument.*$/s, "");
    throw new UsageError(`weftnet ${cmd}: ${msg} (see \`weftnet ${cmd} --help\`)`);
  }
}

/** --token, --token-file or $WEFTNET_TOKEN, in that order. */
export function resolveToken(cmd: string, token: string | undefined, tokenFile: string | undefined): string | undefined {
  if (token !== undefined && tokenFile !== undefined) throw new UsageError(`weftnet ${cmd}: give --token or --token-file, not both`);
  if (tokenFile !== undefined) {
    let t: string;
    try {
      t = readFileSync(tokenFile, "utf8").trim();
    } catch (e) {
      throw new UsageError(`weftnet ${cmd}: cannot read --token-file ${tokenFile}: ${(e as Error).message}`);
    }
    if (!t) throw new UsageError(`weftnet ${cmd}: --token-file ${tokenFile} is empty`);
    return t;
  }
  if (token !== undefined) {
    if (!token.trim()) throw new UsageError(`weftnet ${cmd}: --token is empty`);
    return token.trim();
  }
  const env = process.env.WEFTNET_TOKEN?.trim();
  return env ? env : undefined;
}

export function positiveInt(cmd: string, flag: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`weftnet ${cmd}: ${flag} must be a positive integer, got ${JSON.stringify(v)}`);
  return n;
}

export function errorLine(e: unknown): string {
  if (e instanceof WeftError) return `weftnet: ${e.message}`;
  return `weftnet: unexpected error: ${(e as Error)?.stack ?? String(e)}`;
}

export function fmtDuration(ms: number | null): string {
  if (ms === null) return "-";
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d${Math.floor((s % 86400) / 3600)}h`;
}

export function fmtBytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let x = n;
  while (x >= 1024 && i < u.length - 1) {
    x /= 1024;
    i++;
  }
  return i === 0 ? `${n}B` : `${x.toFixed(1)}${u[i]}`;
}

export function table(rows: string[][]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join("  ")).join("\n");
}
