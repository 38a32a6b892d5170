// Test OpenID Provider for coatcheck's integration tests.
//
// A thin wrapper around `oidc-provider` (see README.md next to this file):
//   * listens on 127.0.0.1:$IDP_PORT (0 = any free port), issuer http://127.0.0.1:<port>
//   * prints exactly one line to stdout once listening: {"issuer":"http://127.0.0.1:<port>"}
//   * everything else goes to stderr
//   * configuration comes from $IDP_CONFIG (JSON, every key optional)
//   * real HTML login / consent forms under /interaction/:uid
//   * test-control endpoints under /__test/ (stats, grant revocation, outage simulation)
//   * optional persistence of all provider state + signing keys to a JSON file, so the
//     process can be killed and restarted on the same port without losing refresh tokens.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';

import Provider, { errors } from 'oidc-provider';

const log = (...args) => console.error('[idp]', ...args);
const debugEnabled = !!process.env.IDP_DEBUG;

// ---------------------------------------------------------------------------------------------
// configuration
// ---------------------------------------------------------------------------------------------

let rawConfig = {};
if (process.env.IDP_CONFIG && process.env.IDP_CONFIG.trim() !== '') {
  try {
    rawConfig = JSON.parse(process.env.IDP_CONFIG);
  } catch (err) {
    log('IDP_CONFIG is not valid JSON:', err.message);
    process.exit(2);
  }
}

const num = (value, dflt) => (typeof value === 'number' && Number.isFinite(value) ? value : dflt);

const cfg = {
  accessTokenTTL: num(rawConfig.access_token_ttl, 60),
  idTokenTTL: num(rawConfig.id_token_ttl, 300),
  refreshTokenTTL: num(rawConfig.refresh_token_ttl, 86400),
  sessionTTL: num(rawConfig.session_ttl, 86400),
  grantTTL: num(rawConfig.grant_ttl, 30 * 86400),
  audience: typeof rawConfig.audience === 'string' ? rawConfig.audience : 'urn:coatcheck:api',
  // More resource indicators the provider accepts (same scopes, JWT access tokens with that `aud`).
  extraAudiences: Array.isArray(rawConfig.extra_audiences) ? rawConfig.extra_audiences : [],
  apiScopes: typeof rawConfig.api_scopes === 'string' ? rawConfig.api_scopes : 'api',
  accessTokenAlg: typeof rawConfig.access_token_alg === 'string' ? rawConfig.access_token_alg : 'RS256',
  // true: tokens are bound to the IdP browser session; ending it (RP-initiated logout, session_ttl)
  // revokes the grant and its refresh tokens. false: offline-style tokens that survive IdP logout.
  expiresWithSession: rawConfig.expires_with_session !== false,
  stateFile: typeof rawConfig.state_file === 'string' && rawConfig.state_file !== '' ? rawConfig.state_file : undefined,
  tlsInsecure: rawConfig.tls_insecure === true,
};

if (cfg.tlsInsecure) {
  // Only affects this test process: lets back-channel logout reach an RP with a self-signed cert.
  process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';
}

const defaultClient = {
  client_id: 'coatcheck',
  client_secret: 'coatcheck-secret',
  redirect_uris: ['https://localhost:8443/bff/callback'],
  post_logout_redirect_uris: ['https://localhost:8443/'],
  token_endpoint_auth_method: 'client_secret_basic',
};

const clients = (Array.isArray(rawConfig.clients) ? rawConfig.clients : [defaultClient]).map((c) => {
  const client = {
    grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
    ...c,
  };
  for (const key of Object.keys(client)) {
    if (client[key] === null) delete client[key];
  }
  if (client.backchannel_logout_uri && client.backchannel_logout_session_required === undefined) {
    client.backchannel_logout_session_required = true;
  }
  return client;
});

const defaultUsers = [
  { username: 'alice', password: 'alice-pw', name: 'Alice Liddell', email: 'alice@example.test', roles: ['user'] },
  { username: 'bob', password: 'bob-pw', name: 'Bob Builder', email: 'bob@example.test', roles: ['user'] },
  { username: 'admin', password: 'admin-pw', name: 'Ada Admin', email: 'admin@example.test', roles: ['admin', 'user'] },
];
const users = new Map(
  (Array.isArray(rawConfig.users) ? rawConfig.users : defaultUsers).map((u) => [u.username, {
    email: `${u.username}@example.test`,
    name: u.username,
    roles: [],
    email_verified: true,
    ...u,
  }]),
);

// ---------------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------------

function freshStats() {
  return {
    token_requests: { authorization_code: 0, refresh_token: 0, client_credentials: 0 },
    refresh_token_failures: 0,
    authorization_code_failures: 0,
    client_credentials_failures: 0,
    revocations: 0,
    introspections: 0,
    backchannel_logouts_sent: 0,
    backchannel_logout_errors: 0,
    grants_revoked: 0,
    logins: 0,
    login_failures: 0,
    end_sessions: 0,
    userinfo_requests: 0,
    // The W3C `traceparent` each token and revocation request carried (null: none), in order.
    token_traceparents: [],
    revocation_traceparents: [],
  };
}
let stats = freshStats();

// ---------------------------------------------------------------------------------------------
// storage (adapter) with optional synchronous file persistence
// ---------------------------------------------------------------------------------------------

const epochTime = () => Math.floor(Date.now() / 1000);

class Store {
  constructor(file) {
    this.file = file;
    this.entries = new Map(); // `${model}:${id}` -> { model, id, payload, expiresAt (ms) | null }
    this.keys = undefined; // { jwks: { keys: [...] }, cookieKeys: [...] }
    this.issuer = undefined;
    if (file && fs.existsSync(file)) {
      const data = JSON.parse(fs.readFileSync(file, 'utf8'));
      this.keys = data.keys;
      this.issuer = data.issuer;
      for (const e of data.entries ?? []) {
        this.entries.set(`${e.model}:${e.id}`, e);
      }
      this.purgeExpired();
      log(`loaded ${this.entries.size} stored entries from ${file}`);
    }
  }

  purgeExpired() {
    const now = Date.now();
    for (const [key, e] of this.entries) {
      if (e.expiresAt !== null && e.expiresAt <= now) this.entries.delete(key);
    }
  }

  persist() {
    if (!this.file) return;
    this.purgeExpired();
    const data = {
      version: 1,
      issuer: this.issuer,
      keys: this.keys,
      entries: [...this.entries.values()],
    };
    const tmp = `${this.file}.${process.pid}.tmp`;
    fs.mkdirSync(path.dirname(path.resolve(this.file)), { recursive: true });
    fs.writeFileSync(tmp, JSON.stringify(data));
    fs.renameSync(tmp, this.file);
  }

  get(model, id) {
    const e = this.entries.get(`${model}:${id}`);
    if (!e) return undefined;
    if (e.expiresAt !== null && e.expiresAt <= Date.now()) {
      this.entries.delete(`${model}:${id}`);
      return undefined;
    }
    return e;
  }

  *live(model) {
    const now = Date.now();
    for (const e of this.entries.values()) {
      if ((model === undefined || e.model === model) && (e.expiresAt === null || e.expiresAt > now)) {
        yield e;
      }
    }
  }

  // Removes every stored artifact belonging to grantId (tokens, codes, ...) plus the Grant itself.
  removeGrant(grantId) {
    let removed = false;
    for (const [key, e] of this.entries) {
      if (e.payload?.grantId === grantId) this.entries.delete(key);
      if (e.model === 'Grant' && e.id === grantId) {
        this.entries.delete(key);
        removed = true;
      }
    }
    return removed;
  }
}

const store = new Store(cfg.stateFile);

class Adapter {
  constructor(model) {
    this.model = model;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : null;
    store.entries.set(`${this.model}:${id}`, {
      model: this.model, id, payload: structuredClone(payload), expiresAt,
    });
    store.persist();
  }

  async find(id) {
    const e = store.get(this.model, id);
    return e ? structuredClone(e.payload) : undefined;
  }

  async findByUid(uid) {
    for (const e of store.live(this.model)) {
      if (e.payload.uid === uid) return structuredClone(e.payload);
    }
    return undefined;
  }

  async findByUserCode(userCode) {
    for (const e of store.live(this.model)) {
      if (e.payload.userCode === userCode) return structuredClone(e.payload);
    }
    return undefined;
  }

  async consume(id) {
    const e = store.get(this.model, id);
    if (e) {
      e.payload.consumed = epochTime();
      store.persist();
    }
  }

  async destroy(id) {
    store.entries.delete(`${this.model}:${id}`);
    store.persist();
  }

  async revokeByGrantId(grantId) {
    for (const [key, e] of store.entries) {
      if (e.model === this.model && e.payload?.grantId === grantId) store.entries.delete(key);
    }
    store.persist();
  }
}

// ---------------------------------------------------------------------------------------------
// keys (RS256 + ES256 signing keys, cookie keys)
// ---------------------------------------------------------------------------------------------

function generateKeys() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  const kid = () => crypto.randomBytes(8).toString('hex');
  return {
    jwks: {
      keys: [
        { ...rsa, kid: `rs256-${kid()}`, alg: 'RS256', use: 'sig' },
        { ...ec, kid: `es256-${kid()}`, alg: 'ES256', use: 'sig' },
      ],
    },
    cookieKeys: [crypto.randomBytes(32).toString('base64url')],
  };
}

if (!store.keys) {
  store.keys = generateKeys();
}

// ---------------------------------------------------------------------------------------------
// HTML helpers
// ---------------------------------------------------------------------------------------------

const esc = (s) => String(s ?? '')
  .replace(/&/g, '&amp;')
  .replace(/</g, '&lt;')
  .replace(/>/g, '&gt;')
  .replace(/"/g, '&quot;')
  .replace(/'/g, '&#39;');

function page(title, body) {
  return `<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>${esc(title)}</title></head>
<body>
<h1>${esc(title)}</h1>
${body}
</body>
</html>
`;
}

function loginPage(uid, clientId, error, login) {
  return page('Sign-in', `${error ? `<p id="error" class="error">${esc(error)}</p>\n` : ''}<p>Signing in to <strong>${esc(clientId)}</strong></p>
<form id="login" method="post" action="/interaction/${esc(uid)}/login">
<input type="text" name="login" value="${esc(login ?? '')}" autofocus>
<input type="password" name="password" value="">
<button type="submit">Sign-in</button>
</form>
<p><a href="/interaction/${esc(uid)}/abort">Cancel</a></p>`);
}

function consentPage(uid, clientId, details) {
  const items = [];
  if (details.missingOIDCScope) items.push(`scopes: ${details.missingOIDCScope.join(' ')}`);
  if (details.missingOIDCClaims) items.push(`claims: ${details.missingOIDCClaims.join(' ')}`);
  if (details.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(details.missingResourceScopes)) {
      items.push(`resource ${indicator}: ${scopes.join(' ') || '(no scopes)'}`);
    }
  }
  return page('Authorize', `<p><strong>${esc(clientId)}</strong> is requesting access.</p>
<ul>${items.map((i) => `<li>${esc(i)}</li>`).join('')}</ul>
<form id="consent" method="post" action="/interaction/${esc(uid)}/confirm">
<button type="submit">Allow</button>
</form>
<p><a href="/interaction/${esc(uid)}/abort">Deny</a></p>`);
}

// ---------------------------------------------------------------------------------------------
// accounts
// ---------------------------------------------------------------------------------------------

async function findAccount(ctx, sub) {
  const user = users.get(sub);
  if (!user) return undefined;
  return {
    accountId: sub,
    async claims() {
      return {
        sub,
        name: user.name,
        email: user.email,
        email_verified: user.email_verified,
        roles: [...user.roles],
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// provider
// ---------------------------------------------------------------------------------------------

function buildProvider(issuer) {
  const configuration = {
    adapter: Adapter,
    clients,
    findAccount,
    jwks: store.keys.jwks,
    cookies: {
      keys: store.keys.cookieKeys,
      long: { httpOnly: true, sameSite: 'lax' },
      short: { httpOnly: true, sameSite: 'lax' },
    },
    claims: {
      openid: ['sub', 'roles'],
      profile: ['name'],
      email: ['email', 'email_verified'],
      roles: ['roles'],
    },
    scopes: ['openid', 'offline_access', 'profile', 'email', 'roles'],
    conformIdTokenClaims: false,
    clockTolerance: 5,
    responseTypes: ['code'],
    clientDefaults: {
      grant_types: ['authorization_code', 'refresh_token', 'client_credentials'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'RS256',
    },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post'],
    pkce: { required: () => true },
    clientBasedCORS: () => false,
    features: {
      devInteractions: { enabled: false },
      introspection: { enabled: true, allowedPolicy: async () => true },
      revocation: { enabled: true, allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId },
      userinfo: { enabled: true },
      backchannelLogout: { enabled: true },
      clientCredentials: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          // `form` is `<form id="op.logoutForm" method="post" action="..."><input type="hidden" name="xsrf" .../></form>`.
          // Put the "logout=yes" choice and the submit button inside it so a plain form POST works.
          const inner = form.replace(
            '</form>',
            '<input type="hidden" name="logout" value="yes"/><button type="submit">Yes, sign me out</button></form>',
          );
          ctx.type = 'html';
          ctx.body = page('Sign-out', `<p>Do you want to sign out from ${esc(ctx.host)}?</p>\n${inner}`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.type = 'html';
          ctx.body = page('Signed out', '<p>You have been signed out.</p>');
        },
      },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => cfg.audience,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resourceIndicator) => {
          if (resourceIndicator !== cfg.audience && !cfg.extraAudiences.includes(resourceIndicator)) {
            throw new errors.InvalidTarget();
          }
          return {
            scope: cfg.apiScopes,
            audience: resourceIndicator,
            accessTokenTTL: cfg.accessTokenTTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: cfg.accessTokenAlg } },
          };
        },
      },
    },
    interactions: {
      url: async (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    // Always issue refresh tokens to clients allowed the grant: no offline_access / prompt=consent dance.
    issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
    rotateRefreshToken: true,
    expiresWithSession: async () => cfg.expiresWithSession,
    extraTokenClaims: async (ctx, token) => {
      if (token.kind !== 'AccessToken' || !token.accountId) return undefined;
      const user = users.get(token.accountId);
      return user ? { roles: [...user.roles] } : undefined;
    },
    ttl: {
      AccessToken: cfg.accessTokenTTL,
      AuthorizationCode: 60,
      IdToken: cfg.idTokenTTL,
      RefreshToken: cfg.refreshTokenTTL,
      Session: cfg.sessionTTL,
      Grant: Math.max(cfg.grantTTL, cfg.refreshTokenTTL),
      Interaction: 600,
      ClientCredentials: cfg.accessTokenTTL,
      DeviceCode: 600,
      BackchannelAuthenticationRequest: 600,
      PreAuthorizedCode: 600,
    },
    // oidc-provider refuses to call special-use (loopback/private) addresses; test RPs live on 127.0.0.1.
    fetch: (url, options) => {
      const opts = { ...options };
      delete opts.dispatcher;
      return globalThis.fetch(url, opts);
    },
    async renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Error', Object.entries(out).map(([k, v]) => `<pre><strong>${esc(k)}</strong>: ${esc(v)}</pre>`).join('\n'));
    },
  };

  const provider = new Provider(issuer, configuration);
  provider.proxy = false;

  provider.use(async (ctx, next) => {
    await next();
    const route = ctx.oidc?.route;
    switch (route) {
      case 'token': {
        const gt = ctx.oidc.params?.grant_type ?? 'unknown';
        stats.token_requests[gt] = (stats.token_requests[gt] ?? 0) + 1;
        stats.token_traceparents.push({ grant_type: gt, traceparent: ctx.get('traceparent') || null });
        if (ctx.status !== 200) {
          if (gt === 'refresh_token') stats.refresh_token_failures += 1;
          if (gt === 'authorization_code') stats.authorization_code_failures += 1;
          if (gt === 'client_credentials') stats.client_credentials_failures += 1;
        }
        break;
      }
      case 'revocation':
        if (ctx.status === 200) stats.revocations += 1;
        stats.revocation_traceparents.push(ctx.get('traceparent') || null);
        break;
      case 'introspection':
        stats.introspections += 1;
        break;
      case 'userinfo':
        stats.userinfo_requests += 1;
        break;
      default:
    }
  });

  provider.on('backchannel.success', () => { stats.backchannel_logouts_sent += 1; });
  provider.on('backchannel.error', (ctx, err, client) => {
    stats.backchannel_logout_errors += 1;
    log(`back-channel logout to ${client?.backchannelLogoutUri} failed: ${err?.message}`);
  });
  provider.on('grant.revoked', () => { stats.grants_revoked += 1; });
  provider.on('end_session.success', () => { stats.end_sessions += 1; });
  provider.on('server_error', (ctx, err) => { log('server_error:', err); });
  if (debugEnabled) {
    for (const ev of ['grant.error', 'authorization.error', 'revocation.error', 'introspection.error', 'end_session.error', 'userinfo.error']) {
      provider.on(ev, (ctx, err) => log(ev, err?.message, err?.error_description ?? '', err?.error_detail ?? ''));
    }
  }

  return provider;
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

function readBody(req, limit = 64 * 1024) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > limit) {
        reject(new Error('body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, body, type = 'text/html; charset=utf-8') {
  res.statusCode = status;
  res.setHeader('Content-Type', type);
  res.setHeader('Cache-Control', 'no-store');
  res.end(body);
}

const sendJson = (res, status, obj) => send(res, status, JSON.stringify(obj), 'application/json');

let outage = 'off';
const pendingSlow = new Set();

async function handleTest(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  switch (route) {
    case 'GET /__test/stats':
      return sendJson(res, 200, stats);
    case 'POST /__test/reset-stats':
      stats = freshStats();
      return sendJson(res, 200, stats);
    case 'POST /__test/revoke-grants': {
      const sub = url.searchParams.get('sub');
      if (!sub) return sendJson(res, 400, { error: 'sub query parameter required' });
      const grantIds = [...store.live('Grant')].filter((e) => e.payload.accountId === sub).map((e) => e.id);
      let revoked = 0;
      for (const grantId of grantIds) {
        if (store.removeGrant(grantId)) revoked += 1;
      }
      store.persist();
      stats.grants_revoked += revoked;
      return sendJson(res, 200, { revoked });
    }
    case 'POST /__test/outage': {
      const mode = url.searchParams.get('mode');
      if (!['down', 'error', 'slow', 'off'].includes(mode)) {
        return sendJson(res, 400, { error: 'mode must be one of down|error|slow|off' });
      }
      outage = mode;
      if (mode === 'off') {
        // release requests parked by "slow" so they don't linger
        for (const r of pendingSlow) r.destroy();
        pendingSlow.clear();
      }
      return sendJson(res, 200, { outage });
    }
    default:
      return sendJson(res, 404, { error: 'unknown test endpoint' });
  }
}

function applyOutage(req, res) {
  switch (outage) {
    case 'down':
      req.socket.destroy();
      return true;
    case 'error':
      res.setHeader('Retry-After', '1');
      sendJson(res, 503, { error: 'temporarily_unavailable', error_description: 'simulated outage' });
      return true;
    case 'slow': {
      const sock = req.socket;
      pendingSlow.add(sock);
      const t = setTimeout(() => {
        pendingSlow.delete(sock);
        sock.destroy();
      }, 30_000);
      t.unref();
      sock.once('close', () => {
        clearTimeout(t);
        pendingSlow.delete(sock);
      });
      return true;
    }
    default:
      return false;
  }
}

function interactionHandler(provider) {
  return async function handleInteraction(req, res, url) {
    const m = url.pathname.match(/^\/interaction\/([^/]+)(?:\/(login|confirm|abort))?$/);
    if (!m) return send(res, 404, page('Not found', '<p>unknown interaction route</p>'));
    const [, uid, action] = m;
    try {
      const details = await provider.interactionDetails(req, res);
      if (details.uid !== uid) {
        return send(res, 400, page('Error', '<p>interaction mismatch</p>'));
      }
      const { prompt, params } = details;

      if (!action && req.method === 'GET') {
        if (prompt.name === 'login') {
          return send(res, 200, loginPage(uid, params.client_id, undefined, params.login_hint));
        }
        if (prompt.name === 'consent') {
          return send(res, 200, consentPage(uid, params.client_id, prompt.details));
        }
        return send(res, 400, page('Error', `<p>unsupported prompt ${esc(prompt.name)}</p>`));
      }

      if (action === 'login' && req.method === 'POST') {
        const form = new URLSearchParams(await readBody(req));
        const login = form.get('login') ?? '';
        const password = form.get('password') ?? '';
        if (prompt.name !== 'login') {
          return send(res, 400, page('Error', '<p>not expecting a login</p>'));
        }
        const user = users.get(login);
        if (!user || user.password !== password) {
          stats.login_failures += 1;
          return send(res, 200, loginPage(uid, params.client_id, 'Invalid username or password.', login));
        }
        stats.logins += 1;
        return await provider.interactionFinished(req, res, {
          login: { accountId: login, amr: ['pwd'] },
        }, { mergeWithLastSubmission: false });
      }

      if (action === 'confirm' && req.method === 'POST') {
        await readBody(req);
        if (prompt.name !== 'consent') {
          return send(res, 400, page('Error', '<p>not expecting a consent</p>'));
        }
        const { details: missing } = prompt;
        const { accountId } = details.session;
        let { grantId } = details;
        const grant = grantId
          ? await provider.Grant.find(grantId)
          : new provider.Grant({ accountId, clientId: params.client_id });
        if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
        if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
        if (missing.missingResourceScopes) {
          for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
            grant.addResourceScope(indicator, scopes.join(' '));
          }
        }
        grantId = await grant.save();
        const consent = {};
        if (!details.grantId) consent.grantId = grantId;
        return await provider.interactionFinished(req, res, { consent }, { mergeWithLastSubmission: true });
      }

      if (action === 'abort') {
        return await provider.interactionFinished(req, res, {
          error: 'access_denied',
          error_description: 'End-User aborted interaction',
        }, { mergeWithLastSubmission: false });
      }

      return send(res, 405, page('Error', '<p>method not allowed</p>'));
    } catch (err) {
      if (err instanceof errors.SessionNotFound) {
        return send(res, 400, page('Error', `<p>interaction not found or expired: ${esc(err.error_description ?? err.message)}</p>`));
      }
      log('interaction error:', err);
      return send(res, 500, page('Error', `<p>${esc(err.message)}</p>`));
    }
  };
}

// ---------------------------------------------------------------------------------------------
// boot
// ---------------------------------------------------------------------------------------------

const port = Number.parseInt(process.env.IDP_PORT ?? '0', 10) || 0;
let providerCallback;
let handleInteraction;

const server = http.createServer(async (req, res) => {
  let url;
  try {
    url = new URL(req.url, 'http://127.0.0.1');
  } catch {
    return send(res, 400, 'bad request', 'text/plain');
  }
  if (debugEnabled) log(req.method, req.url);
  try {
    if (url.pathname.startsWith('/__test/')) return await handleTest(req, res, url);
    if (applyOutage(req, res)) return undefined;
    if (url.pathname.startsWith('/interaction/')) return await handleInteraction(req, res, url);
    return providerCallback(req, res);
  } catch (err) {
    log('unhandled error:', err);
    if (!res.headersSent) send(res, 500, 'internal error', 'text/plain');
    else res.destroy();
    return undefined;
  }
});
server.keepAliveTimeout = 5_000;

server.on('error', (err) => {
  log('server error:', err.message);
  process.exit(1);
});

server.listen(port, '127.0.0.1', () => {
  const actualPort = server.address().port;
  const issuer = `http://127.0.0.1:${actualPort}`;
  if (store.issuer && store.issuer !== issuer) {
    log(`warning: state file was written by ${store.issuer}, now serving ${issuer}`);
  }
  store.issuer = issuer;
  store.persist();
  const provider = buildProvider(issuer);
  providerCallback = provider.callback();
  handleInteraction = interactionHandler(provider);
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

function shutdown(signal) {
  log(`received ${signal}, shutting down`);
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
