/**
 * Structured logging, one record per line on stderr. Each record has time, level, component, msg and
 * fields, written in one of two formats:
 *   json  `{"time":"…","level":"info","component":"mesh","msg":"peer connected","peer":"…"}` — for
 *         pipes, files and log collectors (the default when stderr is not a terminal)
 *   text  `17:42:01.123 INFO  mesh  peer connected peer=… peerName=b` — for people at a terminal,
 *         coloured when `color` is set (the CLI sets it for a TTY unless NO_COLOR is set)
 * Daemons log at "info" by default: one line per event an operator cares about (a peer up or down, a
 * path change, start and stop), nothing per packet or per heartbeat.
 */
export type Level = "debug" | "info" | "warn" | "error";
export type LogFormat = "json" | "text";
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };
export const LEVELS: readonly Level[] = ["debug", "info", "warn", "error"];

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(component: string, fields?: Record<string, unknown>): Logger;
}

export type Sink = (line: string) => void;

export function parseLevel(s: string | undefined, fallback: Level): Level {
  return s === "debug" || s === "info" || s === "warn" || s === "error" ? s : fallback;
}

export interface LoggerOptions {
  level: Level;
  sink?: Sink;
  component?: string;
  fields?: Record<string, unknown>;
  /** default json */
  format?: LogFormat;
  /** ANSI colours in the text format (default off) */
  color?: boolean;
}

const replacer = (_k: string, v: unknown) => (v instanceof Error ? v.message : typeof v === "bigint" ? v.toString() : v instanceof Uint8Array ? Buffer.from(v).toString("hex") : v);

const COLOR: Record<Level, string> = { debug: "\x1b[90m", info: "\x1b[32m", warn: "\x1b[33m", error: "\x1b[31m" };
const DIM = "\x1b[2m";
const RESET = "\x1b[0m";

/** key=value; values with spaces, quotes or '=' are JSON-quoted, objects are JSON. */
function fmtValue(v: unknown): string {
  if (v === undefined) return "-";
  if (typeof v === "string") return v !== "" && !/[\s"=]/.test(v) ? v : JSON.stringify(v);
  if (typeof v === "number" || typeof v === "boolean" || v === null) return String(v);
  return JSON.stringify(v, replacer) ?? String(v);
}

function pad2(n: number, w = 2): string {
  return String(n).padStart(w, "0");
}

/** One record in the text format (exported for tests). */
export function formatText(rec: { time: Date; level: Level; component: string; msg: string; fields: Record<string, unknown> }, color = false): string {
  const t = rec.time;
  const ts = `${pad2(t.getHours())}:${pad2(t.getMinutes())}:${pad2(t.getSeconds())}.${pad2(t.getMilliseconds(), 3)}`;
  const lvl = rec.level.toUpperCase().padEnd(5);
  const kv = Object.entries(rec.fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${fmtValue(replacer(k, v))}`)
    .join(" ");
  if (!color) return `${ts} ${lvl} ${rec.component}  ${rec.msg}${kv ? `  ${kv}` : ""}`;
  return `${DIM}${ts}${RESET} ${COLOR[rec.level]}${lvl}${RESET} ${DIM}${rec.component}${RESET}  ${rec.level === "error" || rec.level === "warn" ? COLOR[rec.level] + rec.msg + RESET : rec.msg}${kv ? `  ${DIM}${kv}${RESET}` : ""}`;
}

export function createLogger(opts: LoggerOptions): Logger {
  const sink: Sink = opts.sink ?? ((line) => process.stderr.write(line + "\n"));
  const base = { ...(opts.fields ?? {}) };
  const component = opts.component ?? "weftnet";
  const format = opts.format ?? "json";
  const emit = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (ORDER[level] < ORDER[opts.level]) return;
    const time = new Date();
    if (format === "text") {
      sink(formatText({ time, level, component, msg, fields: { ...base, ...fields } }, !!opts.color));
      return;
    }
    const rec: Record<string, unknown> = { time: time.toISOString(), level, component, msg, ...base, ...fields };
    sink(JSON.stringify(rec, replacer));
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    child: (c, f) => createLogger({ ...opts, sink, component: c, fields: { ...base, ...f } }),
  };
}

export const silentLogger: Logger = createLogger({ level: "error", sink: () => {} });
