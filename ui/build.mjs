// Builds the live topology page into dist/agent/ui/assets (served by agent/ui/server.ts): ui/app.ts is
// type-checked by `tsc -p ui` (npm run build) and bundled here by esbuild; index.html is copied.
import { copyFileSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "dist", "agent", "ui", "assets");
mkdirSync(out, { recursive: true });
await build({ entryPoints: [join(here, "app.ts")], bundle: true, format: "esm", target: "es2022", minify: true, outfile: join(out, "app.js"), logLevel: "warning" });
copyFileSync(join(here, "index.html"), join(out, "index.html"));
