// The demo's tour in headless Chromium (Debian's /usr/bin/chromium driven by playwright-core; no
// browser is ever downloaded), against a running `scripts/demo` on https://localhost:8443.
//
//   E2E_MODE=tour      node tests/e2e/demo.mjs   # scripts/demo (short access tokens: DEMO_ACCESS_TOKEN_TTL)
//   E2E_MODE=instances node tests/e2e/demo.mjs   # scripts/demo --instances 3
//   E2E_MODE=capture   node tests/e2e/demo.mjs   # scripts/demo --capture
//
// tour: logs in as alice through the provider's HTML forms and walks every panel of
// examples/sample_app.html — who (user, session end), api (claims of the injected token), token
// (countdown, then a silent refresh), devices (a second and a third browser log in as alice; "log
// out that device" ends the second, whose live line shows `revoked`; "log out everywhere" ends the
// first and the third, whose live lines show `logout`).
// instances: two browsers served by two different coatcheck instances (the page says which);
// a third browser holding the first one's cookie reaches a third instance; "log out everywhere" on
// the first ends the session of the second at once (its live line) and the first's cookie
// everywhere.
// capture: the legacy SPA logs in through coatcheck's session capture; no token reaches the page.
//
// A screenshot of each panel and state goes to $E2E_SCREENSHOTS (<mode>-NN-<what>.png).
// Prints one JSON line on stdout: {"ok": true, ...facts} or {"ok": false, "step", "error"} (exit 1).
//
// Environment: E2E_APP_URL (default https://localhost:8443/), E2E_MODE, E2E_SCREENSHOTS,
// E2E_CHROMIUM (default /usr/bin/chromium), E2E_TIMEOUT_MS (per step, default 20000),
// E2E_REFRESH_WITHIN_MS (how long the tour waits for a silent refresh, default 40000).

import * as fs from 'node:fs';
import * as path from 'node:path';

import { chromium } from 'playwright-core';

const env = (name, dflt) => process.env[name] || dflt;
const appUrl = new URL(env('E2E_APP_URL', 'https://localhost:8443/'));
const mode = env('E2E_MODE', 'tour');
const shots = env('E2E_SCREENSHOTS', path.resolve('demo-screenshots'));
const executablePath = env('E2E_CHROMIUM', '/usr/bin/chromium');
const timeout = Number.parseInt(env('E2E_TIMEOUT_MS', '20000'), 10);
const refreshWithin = Number.parseInt(env('E2E_REFRESH_WITHIN_MS', '40000'), 10);

let step = 'start';
const started = Date.now();
const go = (name) => {
  step = name;
  process.stderr.write(`${String(Date.now() - started).padStart(6)} ms == ${mode}: ${name}\n`);
};
class Failure extends Error {}
const check = (cond, message) => {
  if (!cond) throw new Failure(message);
};

const result = { ok: false, mode, screenshots: [] };
let shotNo = 0;
// A screenshot of a panel (a `data-panel` name) or of the whole page (`null`).
async function shot(page, what, panel = null) {
  shotNo += 1;
  const file = path.join(shots, `${mode}-${String(shotNo).padStart(2, '0')}-${what}.png`);
  if (panel) await page.locator(`[data-panel="${panel}"]`).screenshot({ path: file });
  else await page.screenshot({ path: file, fullPage: true });
  result.screenshots.push(path.basename(file));
}

// `fetch` from inside the page, as the app's own script would.
const pageFetch = (page, url, init) =>
  page.evaluate(async ([u, i]) => {
    const r = await fetch(u, i);
    const text = await r.text();
    try {
      return { status: r.status, body: JSON.parse(text) };
    } catch {
      return { status: r.status, body: text };
    }
  }, [url, init]);
const CSRF = { headers: { 'X-CSRF': '1' } };

// A fresh browser context (a "device": its own cookies, its own connections) on the app.
async function device(browser, label) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true, // the demo's certificate comes from its development CA
    viewport: { width: 1100, height: 900 },
    // The devices panel shows the browser and the part in parentheses: name the device there.
    userAgent: `Mozilla/5.0 (${label}; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/140.0 Safari/537.36`,
  });
  context.setDefaultTimeout(timeout);
  context.setDefaultNavigationTimeout(timeout);
  const page = await context.newPage();
  page.on('console', (m) => m.type() === 'error' && process.stderr.write(`[${label}] console: ${m.text()}\n`));
  await page.goto(appUrl.href);
  return { context, page };
}

// Logs in through the provider's real HTML forms (login, then consent unless already given).
async function login(page, user = 'alice', password = `${user}-pw`) {
  await page.getByRole('link', { name: 'Log in' }).click();
  await page.locator('input[name="login"]').fill(user);
  await page.locator('input[name="password"]').fill(password);
  await page.locator('form:has(input[name="password"]) [type="submit"]').click();
  const consent = page.locator('form[action$="/confirm"] [type="submit"]');
  const signedIn = page.locator('#signed-in');
  const next = await Promise.any([
    consent.waitFor().then(() => 'consent'),
    signedIn.waitFor().then(() => 'landed'),
  ]).catch(() => 'nothing');
  check(next !== 'nothing', `after the login form: no consent form and no way back to the app (${page.url()})`);
  if (next === 'consent') await consent.click();
  await signedIn.waitFor();
  check(new URL(page.url()).origin === appUrl.origin, `signed in, but not on the app: ${page.url()}`);
  await page.locator('#live-line[data-state="connected"]').waitFor();
  const me = await pageFetch(page, '/bff/user', CSRF);
  check(me.status === 200, `/bff/user after login answered ${me.status}`);
  return me.body.session.id;
}

const text = async (page, selector) => (await page.locator(selector).textContent())?.trim();

async function callApi(page) {
  await page.locator('#call-api').click();
  await page.locator('#api-result', { hasText: 'HTTP ' }).waitFor();
  const raw = await text(page, '#api-result');
  const status = raw.split('\n')[0];
  const body = JSON.parse(raw.slice(raw.indexOf('\n') + 1));
  return { status, body };
}

async function endedLine(page, reason, within = 10000) {
  const t = Date.now();
  await page.locator(`#live-line[data-state="ended"][data-reason="${reason}"]`).waitFor({ timeout: within });
  return { text: await text(page, '#live-line'), waited_ms: Date.now() - t };
}

async function tour(browser) {
  go('open the app (anonymous)');
  const a = await device(browser, 'laptop');
  await a.page.getByRole('link', { name: 'Log in' }).waitFor();
  await shot(a.page, 'anonymous');

  go('log in as alice (laptop)');
  const sessionA = await login(a.page);
  result.who = await text(a.page, '#user');
  result.who_until = await text(a.page, '#who-until');
  result.document_cookie = await text(a.page, '#doc-cookie');
  check(result.who.includes('(alice)'), `the who panel shows ${result.who}`);
  await shot(a.page, 'who', 'who');

  go('call the API');
  const api = await callApi(a.page);
  result.api = { status: api.status, sub: api.body.token_claims?.sub, authorization: api.body.authorization };
  result.api_claims_shown = await text(a.page, '#api-claims');
  check(api.status === 'HTTP 200', `the API call showed ${api.status}`);
  check(api.body.token_claims?.sub === 'alice', `the API saw claims ${JSON.stringify(api.body.token_claims)}`);
  check(/^Bearer ey[^.]{0,12}…$/.test(api.body.authorization ?? ''), `authorization shown as ${api.body.authorization}`);
  await shot(a.page, 'api', 'api');

  go('token countdown');
  await a.page.locator('#token-left', { hasText: ' s' }).waitFor();
  result.token_left_first = await text(a.page, '#token-left');
  await shot(a.page, 'token-countdown', 'token');
  go('wait for a silent refresh');
  const refreshed = a.page.locator('[data-event="refreshed"]').first();
  await refreshed.waitFor({ timeout: refreshWithin });
  result.refresh_line = await refreshed.textContent();
  result.token_left_after = await text(a.page, '#token-left');
  await shot(a.page, 'token-refreshed', 'token');
  // The session survived its first access token: the API still answers.
  check((await callApi(a.page)).status === 'HTTP 200', 'the API call after the refresh failed');

  go('live line connected');
  await shot(a.page, 'live-connected', 'live');

  go('a second device (phone) logs in');
  const b = await device(browser, 'phone');
  const sessionB = await login(b.page);
  go('a third device (tablet) logs in');
  const c = await device(browser, 'tablet');
  const sessionC = await login(c.page);
  check(new Set([sessionA, sessionB, sessionC]).size === 3, 'three logins made three sessions');

  go('the laptop lists three devices');
  await a.page.locator('#devices-reload').click();
  await a.page.locator('#devices-list tr').nth(2).waitFor();
  result.devices = await a.page.locator('#devices-list tr').count();
  check(result.devices === 3, `the devices panel lists ${result.devices} sessions, expected 3`);
  await shot(a.page, 'devices', 'devices');

  go('log out that device (the phone)');
  const revoke = a.page.locator(`[data-revoke="${sessionB}"]`);
  const clicked = Date.now();
  await revoke.click();
  result.phone_live = await endedLine(b.page, 'revoked');
  result.phone_live.after_click_ms = Date.now() - clicked;
  const phoneApi = await pageFetch(b.page, '/api/whoami', CSRF);
  result.phone_api_after = phoneApi.status;
  check(phoneApi.status === 401, `the phone's API call after its revocation answered ${phoneApi.status}`);
  await shot(b.page, 'phone-live-revoked', 'live');
  await shot(b.page, 'phone-page-revoked');
  await a.page.locator(`#devices-list tr[data-session="${sessionB}"]`).waitFor({ state: 'detached' });
  await shot(a.page, 'devices-after-revoke', 'devices');

  go('log out everywhere (from the laptop)');
  await a.page.locator('#logout-all').click();
  result.laptop_live = await endedLine(a.page, 'logout');
  result.tablet_live = await endedLine(c.page, 'logout');
  result.logout_all = await text(a.page, '#devices-result');
  check(/ended 2 session/.test(result.logout_all), `log out everywhere said: ${result.logout_all}`);
  const tabletApi = await pageFetch(c.page, '/api/whoami', CSRF);
  result.tablet_api_after = tabletApi.status;
  check(tabletApi.status === 401, `the tablet's API call after "log out everywhere" answered ${tabletApi.status}`);
  await shot(c.page, 'tablet-live-logout', 'live');
  await shot(a.page, 'laptop-page-logged-out-everywhere');
}

async function instances(browser) {
  go('first browser logs in');
  const a = await device(browser, 'browser-1');
  await login(a.page);
  const apiA = await callApi(a.page);
  check(apiA.status === 'HTTP 200', `browser 1's API call showed ${apiA.status}`);
  result.instance_a = apiA.body.instance;
  check(Number.isInteger(result.instance_a), `no instance in the API answer: ${JSON.stringify(apiA.body)}`);
  await shot(a.page, 'browser-1');

  // Every new connection goes to the next instance; a browser keeps its connection. Another
  // context (another connection) lands elsewhere; try a few in case the first takes the same one.
  let b;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    go(`second browser logs in (attempt ${attempt + 1})`);
    b = await device(browser, 'browser-2');
    await login(b.page);
    const apiB = await callApi(b.page);
    check(apiB.status === 'HTTP 200', `browser 2's API call showed ${apiB.status}`);
    result.instance_b = apiB.body.instance;
    if (result.instance_b !== result.instance_a) break;
    await b.context.close();
  }
  check(result.instance_b !== result.instance_a, `both browsers stayed on instance ${result.instance_a}`);
  await shot(b.page, 'browser-2');

  go('the first browser\'s cookie, on a new connection');
  const state = await a.context.storageState();
  let a2;
  for (let attempt = 0; attempt < 4; attempt += 1) {
    a2 = await browser.newContext({ ignoreHTTPSErrors: true, storageState: state });
    a2.setDefaultTimeout(timeout);
    const p = await a2.newPage();
    await p.goto(appUrl.href);
    await p.locator('#signed-in').waitFor();
    const r = await pageFetch(p, '/api/whoami', CSRF);
    check(r.status === 200, `browser 1's cookie on another connection answered ${r.status}`);
    result.instance_a2 = r.body.instance;
    if (result.instance_a2 !== result.instance_a) {
      a2.page = p;
      break;
    }
    await a2.close();
  }
  check(result.instance_a2 !== result.instance_a, 'the copied cookie stayed on the same instance');

  go('log out everywhere on browser 1');
  await a.page.locator('#logout-all').click();
  result.b_live = await endedLine(b.page, 'logout');
  result.a_live = await endedLine(a.page, 'logout');
  const afterA2 = await pageFetch(a2.page, '/api/whoami', CSRF);
  result.a2_after = { status: afterA2.status, error: afterA2.body?.error };
  check(afterA2.status === 401, `browser 1's session still works on instance ${result.instance_a2}: ${afterA2.status}`);
  const afterB = await pageFetch(b.page, '/api/whoami', CSRF);
  result.b_after = afterB.status;
  check(afterB.status === 401, `browser 2's session still works after log out everywhere: ${afterB.status}`);
  await shot(b.page, 'browser-2-live-ended', 'live');
  await shot(b.page, 'browser-2-ended');
  await shot(a.page, 'browser-1-ended');
}

async function capture(browser) {
  go('open the legacy SPA');
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1000, height: 900 } });
  context.setDefaultTimeout(timeout);
  const page = await context.newPage();
  await page.goto(appUrl.href);
  await page.locator('#login').waitFor();
  await shot(page, 'legacy-spa');
  go('log in through the captured JSON login');
  await page.fill('#username', 'alice');
  await page.fill('#password', 'alice-pw');
  await page.click('#login');
  await page.waitForFunction(() => document.querySelector('#done')?.textContent === 'yes');
  const seen = await page.evaluate(() => ({
    login_status: window.loginStatus,
    login_answer: window.loginAnswer,
    api_status: window.apiStatus,
    api_sub: window.apiAnswer?.claims?.sub,
    local_storage: { ...localStorage },
    document_cookie: document.cookie,
  }));
  Object.assign(result, seen);
  check(seen.login_status === 200, `the login answered ${seen.login_status}`);
  check(!('access_token' in seen.login_answer) && !('refresh_token' in seen.login_answer),
    `the login answer reached the page with a token: ${Object.keys(seen.login_answer)}`);
  check(seen.api_status === 200 && seen.api_sub === 'alice', `the API answered ${seen.api_status} for ${seen.api_sub}`);
  check(Object.keys(seen.local_storage).length === 0, 'something landed in localStorage');
  const cookies = await context.cookies(appUrl.origin);
  result.cookie = cookies.find((c) => c.name === '__Host-coatcheck') ?? null;
  check(result.cookie?.httpOnly === true, 'no HttpOnly session cookie after the captured login');
  result.cookie = { httpOnly: result.cookie.httpOnly, secure: result.cookie.secure, sameSite: result.cookie.sameSite };
  await shot(page, 'legacy-spa-logged-in');
}

let browser;
try {
  check(fs.existsSync(executablePath), `${executablePath} not found: install Chromium (apt-get install -y chromium) or set E2E_CHROMIUM`);
  fs.mkdirSync(shots, { recursive: true });
  // This mode's screenshots of an earlier run would pass for this one's.
  for (const f of fs.readdirSync(shots)) if (f.startsWith(`${mode}-`) && f.endsWith('.png')) fs.rmSync(path.join(shots, f));
  go('launch chromium');
  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic'],
    timeout,
  });
  const run = { tour, instances, capture }[mode];
  check(run, `unknown E2E_MODE ${mode}`);
  await run(browser);
  result.ok = true;
  result.screenshot_dir = shots;
  result.ms = Date.now() - started;
  process.stdout.write(`${JSON.stringify(result)}\n`);
} catch (err) {
  const message = err instanceof Failure ? err.message : String(err?.stack ?? err);
  process.stdout.write(`${JSON.stringify({ ok: false, mode, step, error: message, partial: result })}\n`);
  process.stderr.write(`demo.mjs failed at step "${step}": ${message}\n`);
  process.exitCode = 1;
} finally {
  await browser?.close().catch(() => {});
}
