import { existsSync, readFileSync } from "node:fs";
import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError, WeftError } from "../../src/errors.js";
import { LEVELS, parseLevel, type Level, type LogFormat, type LoggerOptions } from "../../src/log.js";
import { apiSocketPath } from "../state.js";

export type Options = NonNullable<ParseArgsConfig["options"]>;

/** Edit distance with adjacent transpositions ("ipma" -> "ipam" is 1): flags and command names. */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)));
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/** The closest candidate to `word` when it is close enough to be a typo, else undefined. */
export function didYouMean(word: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const c of candidates) {
    const dist = c.startsWith(word) && word.length >= 3 ? 1 : editDistance(word, c);
    if (dist < bestD) {
      best = c;
      bestD = dist;
    }
  }
  return best !== undefined && bestD <= Math.max(1, Math.floor(Math.max(word.length, best.length) / 3)) ? best : undefined;
}

/**
 * parseArgs in strict mode, with errors turned into one-line UsageErrors that name the command and the
 * flag, and suggest the closest known flag for an unknown one.
 */
export function parse<O extends Options>(cmd: string, argv: string[], options: O, allowPositionals = false) {
  try {
    return parseArgs({ args: argv, options, strict: true, allowPositionals });
  } catch (e) {
    const raw = (e as Error).message;
    const unknown = /^Unknown option '(-{1,2}[^']+)'/.exec(raw);
    if (unknown) {
      const flag = unknown[1]!;
      const names = Object.keys(options).map((k) => `--${k}`);
      const hint = didYouMean(flag.split("=")[0]!, names);
      throw new UsageError(`weftnet ${cmd}: unknown option ${flag}${hint ? ` (did you mean ${hint}?)` : ""}; see \`weftnet ${cmd} --help\``);
    }
    const missing = /^Option '(-\w, )?(--[\w-]+) <value>' argument missing/.exec(raw);
    if (missing) throw new UsageError(`weftnet ${cmd}: ${missing[2]} needs a value; see \`weftnet ${cmd} --help\``);
    const positional = /^Unexpected argument '([^']*)'/.exec(raw);
    if (positional) throw new UsageError(`weftnet ${cmd}: unexpected argument ${JSON.stringify(positional[1])}; see \`weftnet ${cmd} --help\``);
    const msg = raw.replace(/\. To specify a positional argument.*$/s, "");
    throw new UsageError(`weftnet ${cmd}: ${msg}; see \`weftnet ${cmd} --help\``);
  }
}

/** The log flags every long-running command takes. */
export const LOG_OPTIONS = {
  "log-level": { type: "string" },
  "log-format": { type: "string" },
  verbose: { type: "boolean" },
} as const satisfies Options;

/**
 * --log-level (or env WEFTNET_LOG, default info), --verbose (= debug), --log-format auto|text|json
 * (auto: text on a terminal, JSON otherwise; env WEFTNET_LOG_FORMAT). Text is coloured on a terminal
 * unless NO_COLOR is set.
 */
export function logOptions(cmd: string, v: { "log-level"?: string | undefined; "log-format"?: string | undefined; verbose?: boolean | undefined }, dflt: Level = "info", isTTY = !!process.stderr.isTTY): Pick<LoggerOptions, "level" | "format" | "color"> {
  const lv = v["log-level"];
  if (lv !== undefined && !LEVELS.includes(lv as Level)) throw new UsageError(`weftnet ${cmd}: --log-level ${JSON.stringify(lv)} must be one of ${LEVELS.join(", ")}`);
  if (lv !== undefined && v.verbose) throw new UsageError(`weftnet ${cmd}: give --log-level or --verbose, not both`);
  const level: Level = v.verbose ? "debug" : lv !== undefined ? (lv as Level) : parseLevel(process.env.WEFTNET_LOG, dflt);
  const f = v["log-format"] ?? (process.env.WEFTNET_LOG_FORMAT || "auto");
  if (f !== "auto" && f !== "text" && f !== "json") throw new UsageError(`weftnet ${cmd}: --log-format ${JSON.stringify(f)} must be auto, text or json`);
  const format: LogFormat = f === "auto" ? (isTTY ? "text" : "json") : f;
  return { level, format, color: format === "text" && isTTY && !process.env.NO_COLOR };
}

/** Turn "no agent" into an error with the next step for a non-root user. */
export function noAgentHint(e: unknown, explicitStateDir: boolean): unknown {
  if (!(e instanceof WeftError) || e.code !== "ERR_NO_AGENT" || explicitStateDir || process.getuid?.() === 0) return e;
  const sys = "/var/lib/weftnet";
  const there = existsSync(apiSocketPath(sys));
  return new WeftError(
    "ERR_NO_AGENT",
    `${e.message}. An agent started with sudo keeps its socket in ${sys}${there ? " (and one is there)" : ""}: run this command with sudo too, or pass --state-dir to the agent's state dir`,
  );
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

/** One line for an error: messages of our own already name the command ("weftnet agent: ..."). */
export function errorLine(e: unknown): string {
  if (e instanceof WeftError) return /^weftnet[ :]/.test(e.message) ? e.message : `weftnet: ${e.message}`;
  return `weftnet: unexpected error: ${(e as Error)?.stack ?? String(e)}`;
}

/** An error as JSON (for --json): {error: {code, message}}. */
export function errorJson(e: unknown): string {
  const code = e instanceof WeftError ? e.code : "ERR_INTERNAL";
  const message = e instanceof WeftError ? e.message : ((e as Error)?.message ?? String(e));
  return JSON.stringify({ error: { code, message } });
}

/**
 * RTT as measured, without inventing precision: the heartbeat RTT is in whole milliseconds (printed as
 * "3ms", "<1ms" for 0), ping RTTs are sub-millisecond (printed as "0.42ms", "12.3ms").
 */
export function fmtRtt(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "-";
  if (Number.isInteger(ms)) return ms === 0 ? "<1ms" : `${ms}ms`;
  if (ms < 1) return `${ms.toFixed(2)}ms`;
  if (ms < 100) return `${ms.toFixed(1)}ms`;
  return `${Math.round(ms)}ms`;
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
