// End-to-end login through coatcheck in headless Chromium (Debian's /usr/bin/chromium driven by
// playwright-core; no browser is ever downloaded).
//
//   E2E_APP_URL=https://localhost:8443/ E2E_USER=alice E2E_PASSWORD=alice-pw node tests/e2e/login.mjs
//
// Walks the app of examples/sample_api.rs (a "Log in" link, then #signed-in with #user, #call-api,
// #api-result and #logout buttons): opens the app through coatcheck, clicks "Log in", fills the
// provider's login and consent forms, lands back on the app, checks the session cookie's flags
// through the browser, calls the API with `fetch` from the page, logs out (through the provider's
// sign-out page) and checks that the API now answers 401.
//
// Prints one JSON line on stdout: {"ok": true, ...facts} — or {"ok": false, "step", "error", "url"}
// with exit status 1. Tokens in the output are cut to a short prefix.
//
// Environment:
//   E2E_APP_URL        the app's URL through coatcheck (required)
//   E2E_USER           default alice
//   E2E_PASSWORD       default alice-pw
//   E2E_COOKIE         session cookie name, default __Host-coatcheck
//   E2E_CHROMIUM       browser executable, default /usr/bin/chromium
//   E2E_TIMEOUT_MS     per-step timeout, default 20000
//   E2E_RELOGIN=1      after the API calls, log in again (address-bar navigation to /bff/login)
//                      and report whether the first session survived the second login
//   E2E_HEADED=1       show the browser (needs a display)
//   E2E_DEBUG=1        log the page's requests, responses and console to stderr

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { chromium } from 'playwright-core';

const env = (name, dflt) => process.env[name] || dflt;
const appUrl = env('E2E_APP_URL');
const user = env('E2E_USER', 'alice');
const password = env('E2E_PASSWORD', 'alice-pw');
const cookieName = env('E2E_COOKIE', '__Host-coatcheck');
const executablePath = env('E2E_CHROMIUM', '/usr/bin/chromium');
const timeout = Number.parseInt(env('E2E_TIMEOUT_MS', '20000'), 10);

const started = Date.now();
let step = 'start';
let page;
let lastUrl = null;

// Names the step under way (for the failure report, and E2E_DEBUG's timeline).
function go(name) {
  step = name;
  if (process.env.E2E_DEBUG) process.stderr.write(`${String(Date.now() - started).padStart(6)} ms == ${name}\n`);
}

class Failure extends Error {}
const check = (cond, message) => {
  if (!cond) throw new Failure(message);
};

// `Bearer eyJhbGciOiJSUzI1NiIs…`: enough to see what kind of token went by, not enough to use it.
function redact(value) {
  return JSON.parse(JSON.stringify(value ?? null), (_key, v) => {
    if (typeof v !== 'string') return v;
    const m = v.match(/^Bearer\s+(\S+)$/i);
    return m && m[1].length > 16 ? `Bearer ${m[1].slice(0, 16)}…` : v;
  });
}

// The Authorization value an upstream answer reports: `authorization` (examples/sample_api.rs)
// or the `headers` list of tests/support/upstream.rs's echo.
function authorizationIn(body) {
  if (typeof body?.authorization === 'string') return body.authorization;
  const pair = Array.isArray(body?.headers) && body.headers.find(([n]) => n.toLowerCase() === 'authorization');
  return pair ? pair[1] : null;
}

// `fetch` from inside the page, as the app's own JavaScript would.
async function pageFetch(url, init) {
  return page.evaluate(async ([u, i]) => {
    const res = await fetch(u, i);
    const text = await res.text();
    let body = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    return { status: res.status, body };
  }, [url, init]);
}

async function main() {
  check(appUrl, 'E2E_APP_URL is required (the app\'s URL through coatcheck, e.g. https://localhost:8443/)');
  check(
    fs.existsSync(executablePath),
    `${executablePath} not found: install Chromium (Debian: apt-get install -y chromium) or set E2E_CHROMIUM`,
  );
  const app = new URL(appUrl);
  const onApp = (u) => u.origin === app.origin && !u.pathname.startsWith('/bff/');

  go('launch chromium');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'coatcheck-e2e-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: !process.env.E2E_HEADED,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-quic',
      '--no-first-run',
      '--disable-component-update',
      '--disable-sync',
    ].filter((a) => a !== '--headless' || !process.env.E2E_HEADED),
    // coatcheck's certificate comes from a development CA the fresh profile does not trust.
    ignoreHTTPSErrors: true,
    timeout,
  });
  context.setDefaultTimeout(timeout);
  context.setDefaultNavigationTimeout(timeout);
  try {
    page = context.pages()[0] ?? (await context.newPage());
    if (process.env.E2E_DEBUG) {
      // Every request and response, query strings cut (they carry codes and states).
      const short = (u) => u.split('?')[0];
      const log = (line) => process.stderr.write(`${String(Date.now() - started).padStart(6)} ms ${line}\n`);
      page.on('request', (r) => log(`> ${r.method()} ${short(r.url())}`));
      page.on('response', (r) => log(`< ${r.status()} ${short(r.url())}`));
      page.on('requestfailed', (r) => log(`! ${short(r.url())} ${r.failure()?.errorText}`));
      page.on('console', (m) => log(`console.${m.type()}: ${m.text()}`));
    }
    const result = { ok: false, user };

    go('open the app');
    await page.goto(app.href);
    result.browser = (await page.evaluate(() => navigator.userAgent)).match(/Chrome\/\S+/)?.[0] ?? null;
    await page.getByRole('link', { name: 'Log in' }).waitFor();
    result.anonymous_user = await pageFetch('/bff/user', { headers: { 'X-CSRF': '1' } }).then((r) => r.status);
    check(result.anonymous_user === 401, `/bff/user before login answered ${result.anonymous_user}, expected 401`);

    go('click Log in');
    await page.getByRole('link', { name: 'Log in' }).click();
    await page.locator('input[name="login"]').waitFor();
    result.provider = new URL(page.url()).origin;
    check(result.provider !== app.origin, `Log in did not leave for the provider (at ${page.url()})`);

    go('fill the provider\'s login form');
    await page.locator('input[name="login"]').fill(user);
    await page.locator('input[name="password"]').fill(password);
    await page.locator('form:has(input[name="password"]) [type="submit"]').click();

    go('after the login form');
    // Next comes the consent form, or the login form again with an error, or (consent already
    // given) the app itself. Locators, not navigation events: they keep looking across the
    // redirects and the callback's bounce page.
    const consent = page.locator('form[action$="/confirm"] [type="submit"]');
    const refused = page.locator('#error');
    const signedIn = page.locator('#signed-in');
    const next = await Promise.any([
      consent.waitFor().then(() => 'consent'),
      refused.waitFor().then(() => 'refused'),
      signedIn.waitFor().then(() => 'landed'),
    ]).catch(() => 'nothing');
    if (next === 'refused') throw new Failure(`the provider refused the login: ${await refused.textContent()}`);
    check(next !== 'nothing', 'after the login form: no consent form, no error and no way back to the app');
    if (next === 'consent') await consent.click();

    go('land back on the app');
    await signedIn.waitFor();
    result.landed_on = page.url();
    check(onApp(new URL(page.url())), `signed in, but not on the app: ${page.url()}`);
    result.shown_user = (await page.locator('#user').textContent())?.trim();

    go('session cookie flags');
    const cookie = (await context.cookies(app.origin)).find((c) => c.name === cookieName);
    check(cookie, `no ${cookieName} cookie for ${app.origin}`);
    result.cookie = {
      name: cookie.name,
      httpOnly: cookie.httpOnly,
      secure: cookie.secure,
      sameSite: cookie.sameSite,
      path: cookie.path,
      domain: cookie.domain,
      session: cookie.expires === -1,
    };
    check(cookie.httpOnly === true, `${cookieName} is not HttpOnly`);
    check(cookie.secure === true, `${cookieName} is not Secure`);
    check(cookie.sameSite === 'Strict', `${cookieName} is SameSite=${cookie.sameSite}, expected Strict`);
    check(cookie.path === '/', `${cookieName} has Path=${cookie.path}, expected /`);

    go('document.cookie');
    const documentCookie = await page.evaluate(() => document.cookie);
    result.document_cookie_has_session = documentCookie.split(/;\s*/).some((c) => c.startsWith(`${cookieName}=`));
    check(!result.document_cookie_has_session, `document.cookie exposes ${cookieName}`);

    go('fetch /api/whoami');
    const whoami = await pageFetch('/api/whoami', { headers: { 'X-CSRF': '1' } });
    result.whoami = { status: whoami.status, authorization: redact(authorizationIn(whoami.body)), body: redact(whoami.body) };
    check(whoami.status === 200, `/api/whoami answered ${whoami.status}: ${JSON.stringify(result.whoami.body)}`);
    check(
      /^Bearer ey/.test(authorizationIn(whoami.body) ?? ''),
      `the API did not see a bearer JWT: ${JSON.stringify(result.whoami.body)}`,
    );

    go('the app\'s API button');
    await page.locator('#call-api').click();
    await page.locator('#api-result', { hasText: 'HTTP ' }).waitFor();
    result.api_button = (await page.locator('#api-result').textContent()).split('\n')[0];
    check(result.api_button === 'HTTP 200', `the app's API call showed ${result.api_button}`);

    go('an app cookie holding UTF-8 beside the session');
    // Browsers send a cookie's value as it was set, UTF-8 included: the session cookie must still
    // be found, and the app's cookie must reach the API as it was sent.
    await page.evaluate(() => {
      document.cookie = 'e2e-theme=Zo\u00eb\u{1f311}; path=/; secure';
    });
    const withUtf8 = await pageFetch('/api/whoami', { headers: { 'X-CSRF': '1' } });
    result.whoami_with_utf8_cookie = withUtf8.status;
    check(withUtf8.status === 200, `/api/whoami beside a UTF-8 app cookie answered ${withUtf8.status}`);
    const forwarded = Array.isArray(withUtf8.body?.headers)
      ? withUtf8.body.headers.filter(([n]) => n.toLowerCase() === 'cookie').map(([, v]) => v).join('; ')
      : null;
    if (forwarded !== null) {
      result.forwarded_cookie = forwarded;
      check(forwarded.includes('e2e-theme=Zo\u00eb\u{1f311}'), `the API got Cookie: ${forwarded}`);
      check(!forwarded.includes(`${cookieName}=`), `the session cookie reached the API: ${forwarded}`);
    }
    await page.evaluate(() => {
      document.cookie = 'e2e-theme=; path=/; secure; max-age=0';
    });

    if (process.env.E2E_RELOGIN) {
      go('log in again');
      const first = await pageFetch('/bff/user', { headers: { 'X-CSRF': '1' } });
      check(first.status === 200, `/bff/user before the second login answered ${first.status}`);
      result.first_session = first.body.session.id;
      // The provider's own session is forgotten (as when it has expired), so the provider shows
      // its form and the way back to the callback starts on the provider's page: a cross-site
      // navigation, on which the browser withholds the SameSite=Strict session cookie.
      const ours = await context.cookies(app.origin);
      await context.clearCookies();
      await context.addCookies(ours);
      // Typed into the address bar: same-site, so the SameSite=Strict session cookie goes along.
      await page.goto(`${app.origin}/bff/login?returnUrl=%2F`);
      const loginForm = page.locator('input[name="login"]');
      const again = await Promise.any([
        loginForm.waitFor().then(() => 'login'),
        consent.waitFor().then(() => 'consent'),
        signedIn.waitFor().then(() => 'landed'),
      ]).catch(() => 'nothing');
      check(again !== 'nothing', 'the second login went nowhere');
      result.second_login_form = again;
      if (again === 'login') {
        await loginForm.fill(user);
        await page.locator('input[name="password"]').fill(password);
        await page.locator('form:has(input[name="password"]) [type="submit"]').click();
        const afterForm = await Promise.any([
          consent.waitFor().then(() => 'consent'),
          signedIn.waitFor().then(() => 'landed'),
        ]).catch(() => 'nothing');
        if (afterForm === 'consent') await consent.click();
      } else if (again === 'consent') {
        await consent.click();
      }
      await signedIn.waitFor();
      const second = await pageFetch('/bff/user', { headers: { 'X-CSRF': '1' } });
      check(second.status === 200, `/bff/user after the second login answered ${second.status}`);
      result.second_session = second.body.session.id;
      const list = await pageFetch('/bff/sessions', { headers: { 'X-CSRF': '1' } });
      check(list.status === 200, `/bff/sessions answered ${list.status}`);
      result.sessions_after_relogin = list.body.sessions.map((s) => s.id);
    }

    go('log out');
    await page.locator('#logout').click();
    // The app POSTs /bff/logout, then goes to the provider's end-session page: confirm it there.
    const signOut = page.locator('form:has(input[name="xsrf"]) [type="submit"]');
    await signOut.waitFor();
    result.sign_out_page = new URL(page.url()).origin;
    await signOut.click();
    await page.getByRole('link', { name: 'Log in' }).waitFor();
    result.after_logout_url = page.url();
    check(onApp(new URL(page.url())), `after logout the provider did not send the browser back: ${page.url()}`);

    go('after logout');
    const after = await pageFetch('/api/whoami', { headers: { 'X-CSRF': '1' } });
    result.after_logout = { status: after.status, body: redact(after.body) };
    check(after.status === 401, `/api/whoami after logout answered ${after.status}, expected 401`);
    result.cookie_after_logout = (await context.cookies(app.origin)).some((c) => c.name === cookieName);
    check(!result.cookie_after_logout, `${cookieName} is still in the browser after logout`);

    result.ok = true;
    return result;
  } finally {
    lastUrl = page?.url() ?? null;
    await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

try {
  const result = await main();
  process.stdout.write(`${JSON.stringify(result)}\n`);
} catch (err) {
  // An authorization code in the failing page's URL is cut: it is a credential, even in a test.
  const url = lastUrl?.replace(/([?&]code=)[^&#]+/, '$1…') ?? null;
  const message = err instanceof Failure ? err.message : String(err?.stack ?? err);
  process.stdout.write(`${JSON.stringify({ ok: false, step, error: message, url })}\n`);
  process.stderr.write(`e2e login failed at step "${step}"${url ? ` (page ${url})` : ''}: ${message}\n`);
  process.exitCode = 1;
}
