/** Client side of the local API (agent/api.ts): HTTP over the agent's unix socket. */
import { request } from "node:http";
import { WeftError } from "../src/errors.js";

export function apiRequest<T = unknown>(socketPath: string, method: "GET" | "POST" | "DELETE", path: string, body?: unknown, timeoutMs = 10_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const req = request(
      { socketPath, method, path, headers: payload ? { "content-type": "application/json", "content-length": payload.length } : {}, timeout: timeoutMs },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          let json: unknown;
          try {
            json = JSON.parse(text);
          } catch {
            reject(new WeftError("ERR_API", `agent answered with something that is not JSON (HTTP ${res.statusCode})`));
            return;
          }
          if ((res.statusCode ?? 500) >= 400) {
            const err = (json as { error?: { code?: string; message?: string } }).error;
            reject(new WeftError(err?.code ?? "ERR_API", err?.message ?? `agent answered HTTP ${res.statusCode}`));
            return;
          }
          resolve(json as T);
        });
      },
    );
    req.on("timeout", () => req.destroy(new WeftError("ERR_TIMEOUT", `the agent did not answer within ${timeoutMs} ms`)));
    req.on("error", (e: NodeJS.ErrnoException) => {
      if (e instanceof WeftError) reject(e);
      else if (e.code === "ENOENT" || e.code === "ECONNREFUSED")
        reject(new WeftError("ERR_NO_AGENT", `no agent is running with this state dir (nothing answers on ${socketPath}); start one with \`weftnet agent\` or pass --state-dir`));
      else if (e.code === "EACCES") reject(new WeftError("ERR_NO_AGENT", `permission denied on ${socketPath}; run as the agent's user (root for a system agent)`));
      else reject(new WeftError("ERR_API", `cannot reach the agent on ${socketPath}: ${e.message}`));
    });
    if (payload) req.write(payload);
    req.end();
  });
}
