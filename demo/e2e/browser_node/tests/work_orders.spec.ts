// Log in through the real frontend in Chromium, read seeded data, change it, check it in SQL.
import { test as base, expect, type Page } from "@playwright/test";
import pg from "pg";

function requireEnv(name: string, why: string): string {
  const value = (process.env[name] ?? "").trim();
  if (!value) {
    throw new Error(
      `environment variable ${name} is not set (${why}); the demo e2e suites are run by ` +
        "e2e-infra, which starts the project's servers and database and exports it",
    );
  }
  return value;
}

const test = base.extend<{ frontendUrl: string }, { db: pg.Client }>({
  frontendUrl: async ({}, use) => {
    await use(requireEnv("FRONTEND_URL", "this suite loads the frontend pages").replace(/\/$/, ""));
  },
  db: [
    async ({}, use) => {
      const client = new pg.Client({
        connectionString: requireEnv("DATABASE_URL", "this suite checks the project's database"),
        application_name: `e2e-${process.env.E2E_PROJECT ?? "browser_node"}`,
      });
      await client.connect();
      await use(client);
      await client.end();
    },
    { scope: "worker" },
  ],
});

const PASSWORDS: Record<string, string> = { operator: "operator-pass" }; // demo/seeds/default
// The default seed's work orders WO-000001..600 cycle through statuses by n % 10: 60 are on hold,
// the first of them WO-000007.
const ON_HOLD = 60;
const FIRST_ON_HOLD = "WO-000007";

async function logIn(page: Page, frontendUrl: string, username: string): Promise<void> {
  await page.goto(`${frontendUrl}/login.html`);
  await page.getByLabel("Username").fill(username);
  await page.getByLabel("Password").fill(PASSWORDS[username]);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.waitForURL(`${frontendUrl}/`);
  await expect(page.locator("#whoami")).toHaveText(`logged in as ${username}`);
}

test("login shows the dashboard of the seeded database", async ({ page, frontendUrl }) => {
  await logIn(page, frontendUrl, "operator");
  await expect(page.locator('[data-stat="quality.fail"]')).toHaveText("50");
  await expect(page.locator('[data-stat="inventory.items"]')).toHaveText("240");
});

test("resuming an on-hold work order in the page writes the database", async ({
  page,
  frontendUrl,
  db,
}) => {
  await logIn(page, frontendUrl, "operator");
  await page.getByRole("link", { name: "Work orders" }).click();
  await page.getByLabel("Status").selectOption("on_hold");
  await page.getByRole("button", { name: "Filter" }).click();
  await expect(page.locator("#total")).toHaveText(`${ON_HOLD} work orders`);
  const row = page.locator("#work-orders tbody tr").filter({ hasText: FIRST_ON_HOLD });
  await expect(row.locator("td").nth(3)).toHaveText("on_hold");

  await row.getByRole("button", { name: "in_progress" }).click();

  // The page reloads the on-hold list: one fewer, and that order is no longer in it.
  await expect(page.locator("#total")).toHaveText(`${ON_HOLD - 1} work orders`);
  await expect(row).toHaveCount(0);
  const { rows } = await db.query(
    `SELECT w.status, u.username AS changed_by
     FROM work_orders w
     JOIN work_order_status_history h ON h.work_order_id = w.id AND h.to_status = 'in_progress'
     JOIN users u ON u.id = h.changed_by
     WHERE w.number = $1 AND h.from_status = 'on_hold'`,
    [FIRST_ON_HOLD],
  );
  expect(rows).toEqual([{ status: "in_progress", changed_by: "operator" }]);
});
