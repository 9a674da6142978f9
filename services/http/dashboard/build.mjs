// Builds the dashboard into a folder (default: services/http/static/): app.js (the
// TypeScript bundled and minified by esbuild), app.css and index.html.
// `make dashboard` writes the checked-in copy; `make check-dashboard` builds into a
// temporary folder and compares (esbuild's output is the same for the same inputs
// and version).
import { build } from "esbuild";
import { copyFile, mkdir } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, "..", "static"));
await mkdir(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  outfile: join(out, "app.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  charset: "utf8",
  logLevel: "warning",
});
await build({
  entryPoints: [join(here, "styles.css")],
  outfile: join(out, "app.css"),
  bundle: true,
  minify: true,
  logLevel: "warning",
});
await copyFile(join(here, "index.html"), join(out, "index.html"));
