// Session capture in headless Chromium (Debian's /usr/bin/chromium driven by playwright-core; no
// browser is ever downloaded): the page's HTML form posts the credentials with `fetch` to the
// legacy API's /auth/login through coatcheck, then calls the API. Reports what the page can see —
// the login answer, document.cookie, localStorage and sessionStorage — and the browser's cookie
// jar (flags only, values cut), as one JSON line on stdout.
//
//   E2E_APP_URL=https://localhost:PORT/ node tests/e2e/capture.mjs
//
// Environment: E2E_APP_URL (required), E2E_USER (alice), E2E_PASSWORD (alice-pw),
// E2E_CHROMIUM (/usr/bin/chromium), E2E_TIMEOUT_MS (20000).

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { chromium } from 'playwright-core';

const env = (name, dflt) => process.env[name] || dflt;
const appUrl = env('E2E_APP_URL');
const timeout = Number.parseInt(env('E2E_TIMEOUT_MS', '20000'), 10);
const executablePath = env('E2E_CHROMIUM', '/usr/bin/chromium');

let context;
try {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'coatcheck-e2e-capture-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic'],
    // coatcheck's certificate comes from a development CA the fresh profile does not trust.
    ignoreHTTPSErrors: true,
    timeout,
  });
  context.setDefaultTimeout(timeout);
  const page = context.pages()[0] ?? (await context.newPage());
  await page.goto(appUrl);
  await page.fill('#username', env('E2E_USER', 'alice'));
  await page.fill('#password', env('E2E_PASSWORD', 'alice-pw'));
  await page.click('#login');
  await page.waitForFunction(() => document.querySelector('#done')?.textContent === 'yes');
  const seen = await page.evaluate(() => ({
    login_status: window.loginStatus,
    login_answer: window.loginAnswer,
    api_status: window.apiStatus,
    api_answer: window.apiAnswer,
    document_cookie: document.cookie,
    local_storage: JSON.stringify({ ...localStorage }),
    session_storage: JSON.stringify({ ...sessionStorage }),
  }));
  const cookies = (await context.cookies()).map((c) => ({
    name: c.name,
    httpOnly: c.httpOnly,
    secure: c.secure,
    sameSite: c.sameSite,
    path: c.path,
  }));
  process.stdout.write(`${JSON.stringify({ ok: true, ...seen, cookies })}\n`);
  await context.close();
} catch (e) {
  process.stdout.write(`${JSON.stringify({ ok: false, error: String(e) })}\n`);
  if (context) await context.close().catch(() => {});
  process.exit(1);
}
