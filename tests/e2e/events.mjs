// The session-ended push in headless Chromium (Debian's /usr/bin/chromium via playwright-core):
// two tabs of one browser on the legacy SPA behind coatcheck. Tab A logs in; tab B opens an
// EventSource on /bff/events; tab A logs out with fetch; tab B's EventSource must get
// `session-ended`. Prints one JSON line: {"ok": true, "data": <event data>, "latency_ms": n}.
//
//   E2E_APP_URL=https://localhost:PORT/ node tests/e2e/events.mjs

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { chromium } from 'playwright-core';

const appUrl = process.env.E2E_APP_URL;
const executablePath = process.env.E2E_CHROMIUM || '/usr/bin/chromium';
const timeout = Number.parseInt(process.env.E2E_TIMEOUT_MS || '20000', 10);

let context;
try {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'coatcheck-e2e-events-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic'],
    ignoreHTTPSErrors: true,
    timeout,
  });
  context.setDefaultTimeout(timeout);
  const a = context.pages()[0] ?? (await context.newPage());
  await a.goto(appUrl);
  await a.fill('#username', 'alice');
  await a.fill('#password', 'alice-pw');
  await a.click('#login');
  await a.waitForFunction(() => document.querySelector('#done')?.textContent === 'yes');

  const b = await context.newPage();
  await b.goto(appUrl);
  await b.evaluate(
    () =>
      new Promise((resolve, reject) => {
        window.ended = null;
        const es = new EventSource('/bff/events');
        es.addEventListener('session-ended', (e) => {
          window.ended = { data: e.data, at: Date.now() };
          es.close();
        });
        es.onopen = () => resolve();
        es.onerror = () => reject(new Error('EventSource failed to open'));
      }),
  );
  const sent = await a.evaluate(async () => {
    const t = Date.now();
    const r = await fetch('/bff/logout', { method: 'POST', headers: { 'X-CSRF': '1' } });
    if (r.status !== 200) throw new Error(`logout answered ${r.status}`);
    return t;
  });
  await b.waitForFunction(() => window.ended !== null, null, { timeout: 5000 });
  const ended = await b.evaluate(() => window.ended);
  process.stdout.write(`${JSON.stringify({ ok: true, data: ended.data, latency_ms: ended.at - sent })}\n`);
  await context.close();
} catch (e) {
  process.stdout.write(`${JSON.stringify({ ok: false, error: String(e) })}\n`);
  if (context) await context.close().catch(() => {});
  process.exit(1);
}
