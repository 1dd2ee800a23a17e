#!/bin/sh
# Install the locked npm packages when node_modules does not match package-lock.json (a clean
# checkout, or a changed lock); otherwise do nothing. Playwright's browser download is skipped:
# playwright.config.ts drives the system's Chromium.
set -eu
cd "$(dirname "$0")"
installed() { cmp -s package-lock.json node_modules/.e2e-installed-lock 2>/dev/null; }
if ! installed; then
  # Two runs starting at once in a fresh checkout: one installs, the other waits (util-linux flock).
  if command -v flock >/dev/null 2>&1; then
    exec 9>node_modules.lock
    flock -w 600 9
  fi
  if ! installed; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefer-offline --no-audit --no-fund --loglevel=error >&2
    cp package-lock.json node_modules/.e2e-installed-lock
  fi
fi
