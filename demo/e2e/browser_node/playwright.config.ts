// Playwright Test configuration of the demo's browser_node project, run by e2e-infra
// (`npx playwright test` in this folder, with BACKEND_URL, FRONTEND_URL and DATABASE_URL set).
// Output settings are Playwright's defaults: test-results/ here, emptied at every run.
import { accessSync, constants } from "node:fs";
import { delimiter, join } from "node:path";
import { defineConfig } from "@playwright/test";

const BROWSER_NAMES = ["chromium", "chromium-headless-shell", "google-chrome"];

function isExecutable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

// One line and exit 1, not a stack trace: the message is the fix.
function fail(message: string): never {
  process.stderr.write(`Error: ${message}\n`);
  process.exit(1);
}

// Playwright cannot download its own browsers here: drive an installed Chromium,
// CHROMIUM_PATH if set, else the first of BROWSER_NAMES on PATH.
function findChromium(): string {
  const configured = (process.env.CHROMIUM_PATH ?? "").trim();
  if (configured) {
    if (isExecutable(configured)) return configured;
    fail(
      `CHROMIUM_PATH=${configured} is not an executable file; point it at the Chromium binary ` +
        "(e.g. /usr/bin/chromium) or unset it to search PATH",
    );
  }
  const dirs = (process.env.PATH ?? "").split(delimiter).filter(Boolean);
  for (const name of BROWSER_NAMES) {
    for (const dir of dirs) {
      if (isExecutable(join(dir, name))) return join(dir, name);
    }
  }
  fail(
    `no Chromium found (CHROMIUM_PATH is unset and none of ${BROWSER_NAMES.join(", ")} is on ` +
      "PATH): install it with `apt-get install chromium` or set CHROMIUM_PATH",
  );
}

export default defineConfig({
  testDir: "./tests",
  forbidOnly: true,
  // The tests share the project's one database and each Chromium takes ~400 MiB: one at a time.
  workers: 1,
  use: {
    launchOptions: { executablePath: findChromium() },
    screenshot: "only-on-failure",
    trace: "retain-on-failure",
  },
});
