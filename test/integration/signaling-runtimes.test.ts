/**
 * The same signaling suite against the Workers build under workerd (a Durable Object with hibernatable
 * WebSockets), Deno and Bun, each from its npm package's binary. A runtime that cannot run here is
 * reported as a skipped test with the reason, never silently dropped.
 */
import { describe, it } from "vitest";
import { bunRuntime, denoRuntime, workerdRuntime } from "../helpers/signal-runtimes.js";
import { defineSignalingSuite } from "./signaling-suite.js";

for (const rt of [workerdRuntime, denoRuntime, bunRuntime]) {
  const why = rt.unavailable();
  if (why !== undefined) {
    describe(`signaling server (${rt.name})`, () => {
      it.skip(`${rt.name} is not available here: ${why}`, () => {});
    });
    console.warn(`signaling suite: ${rt.name} skipped: ${why}`);
  } else {
    describe(rt.name, () => defineSignalingSuite(rt));
  }
}
