/**
 * Structured logging: one JSON object per line on stderr. Quiet by default (level "warn" for daemons
 * started without --verbose / WEFTNET_LOG); each line has time, level, component, msg and fields.
 */
export type Level = "debug" | "info" | "warn" | "error";
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

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

export function createLogger(opts: { level: Level; sink?: Sink; component?: string; fields?: Record<string, unknown> }): Logger {
  const sink: Sink = opts.sink ?? ((line) => process.stderr.write(line + "\n"));
  const base = { ...(opts.fields ?? {}) };
  const component = opts.component ?? "weftnet";
  const emit = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (ORDER[level] < ORDER[opts.level]) return;
    const rec: Record<string, unknown> = { time: new Date().toISOString(), level, component, msg, ...base, ...fields };
    sink(JSON.stringify(rec, (_k, v) => (v instanceof Error ? v.message : typeof v === "bigint" ? v.toString() : v instanceof Uint8Array ? Buffer.from(v).toString("hex") : v)));
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    child: (c, f) => createLogger({ level: opts.level, sink, component: c, fields: { ...base, ...f } }),
  };
}

export const silentLogger: Logger = createLogger({ level: "error", sink: () => {} });
