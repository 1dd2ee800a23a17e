// e2e-infra's probe of a Playwright Test config. Run as an added reporter of
// `playwright test --list --pass-with-no-tests <a filter matching no file>`: it writes the config
// as Playwright resolved it (its file, rootDir, the reporters it declares, each project's folders,
// its webServer entries) as JSON to the file E2E_INFRA_PW_PROBE_OUT names. No test file is loaded.
"use strict";
const fs = require("node:fs");

function plain(value) {
  try {
    return JSON.parse(JSON.stringify(value ?? null));
  } catch {
    return null;
  }
}

// The webServer entries: `config.webServer` holds only a single, non-array one; the resolved
// list is on the config's internal twin (a symbol-keyed property). Best effort: [] if not found.
function webServers(config) {
  if (config.webServer) return [config.webServer];
  for (const symbol of Object.getOwnPropertySymbols(config)) {
    const internal = config[symbol];
    if (internal && Array.isArray(internal.webServers)) return internal.webServers;
  }
  return [];
}

class Probe {
  onBegin(config) {
    const out = process.env.E2E_INFRA_PW_PROBE_OUT;
    if (!out || !config) return;
    const document = {
      probe: 1,
      version: config.version,
      configFile: config.configFile ?? null,
      rootDir: config.rootDir,
      reporter: (config.reporter ?? []).map(([name, options]) => [String(name), plain(options) ?? {}]),
      projects: (config.projects ?? []).map((p) => ({
        name: p.name,
        testDir: p.testDir,
        outputDir: p.outputDir,
      })),
      webServer: webServers(config).map((w) => ({
        command: w.command ?? null,
        port: w.port ?? null,
        url: w.url ?? null,
        cwd: w.cwd ?? null,
      })),
    };
    fs.writeFileSync(out, JSON.stringify(document));
  }

  printsToStdio() {
    return false;
  }
}

module.exports = Probe;
