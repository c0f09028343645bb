import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    exclude: ["dist/**", "node_modules/**"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    // Integration tests open real sockets and WebRTC peers; keep files from fighting over 2 cores.
    fileParallelism: true,
    maxWorkers: 2,
  },
});
