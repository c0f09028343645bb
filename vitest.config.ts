import { defineConfig } from "vitest/config";

// npm test runs three passes one after the other (see package.json): unit + property tests in parallel,
// then integration and e2e files one at a time — they start real agents, WebRTC peers and network
// namespaces, and on a 2-core machine two such files at once starve each other's heartbeats.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    exclude: ["dist/**", "node_modules/**"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    maxWorkers: 2,
  },
});
