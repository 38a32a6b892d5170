// A Node.js backend-for-frontend written the way teams usually write one — the peer coatcheck is
// benchmarked against in bench/run. Bench only; not part of coatcheck.
//
//   express + express-session (the default in-process MemoryStore)
//   + openid-client (authorization code + PKCE against the same test provider)
//   + http-proxy-middleware (forwards /api/* to the upstream with the session's access token).
//
// Env: PORT, PUBLIC_ORIGIN (https://localhost:PORT), ISSUER, CLIENT_ID, CLIENT_SECRET, UPSTREAM
// (http://127.0.0.1:9100), TLS_CERT, TLS_KEY, SESSION_SECRET.
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import express from 'express';
import session from 'express-session';
import { createProxyMiddleware } from 'http-proxy-middleware';
import * as client from 'openid-client';

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};

const PORT = Number(env('PORT', '8600'));
const PUBLIC_ORIGIN = env('PUBLIC_ORIGIN', `https://localhost:${PORT}`);
const REDIRECT_URI = `${PUBLIC_ORIGIN}/callback`;
const UPSTREAM = env('UPSTREAM', 'http://127.0.0.1:9100');

// The provider is plain http on loopback in the benchmark (as it is for coatcheck).
const oidc = await client.discovery(
  new URL(env('ISSUER')),
  env('CLIENT_ID', 'node-bff'),
  env('CLIENT_SECRET', 'node-bff-secret'),
  undefined,
  { execute: [client.allowInsecureRequests] },
);

const app = express();
app.disable('x-powered-by');

app.use(
  session({
    name: 'sid',
    secret: env('SESSION_SECRET', 'bench-only-session-secret'),
    resave: false,
    saveUninitialized: false,
    cookie: { httpOnly: true, secure: true, sameSite: 'lax' },
  }),
);

app.get('/login', async (req, res, next) => {
  try {
    const codeVerifier = client.randomPKCECodeVerifier();
    const state = client.randomState();
    req.session.login = { codeVerifier, state };
    const url = client.buildAuthorizationUrl(oidc, {
      redirect_uri: REDIRECT_URI,
      scope: 'openid profile email offline_access',
      code_challenge: await client.calculatePKCECodeChallenge(codeVerifier),
      code_challenge_method: 'S256',
      state,
    });
    res.redirect(url.href);
  } catch (e) {
    next(e);
  }
});

app.get('/callback', async (req, res, next) => {
  try {
    const login = req.session.login;
    if (!login) return res.status(400).send('no login in progress');
    const tokens = await client.authorizationCodeGrant(oidc, new URL(req.originalUrl, PUBLIC_ORIGIN), {
      pkceCodeVerifier: login.codeVerifier,
      expectedState: login.state,
    });
    // New session id after login (fixation).
    req.session.regenerate((err) => {
      if (err) return next(err);
      req.session.user = tokens.claims();
      req.session.tokens = {
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        id_token: tokens.id_token,
        expires_at: Date.now() + (tokens.expires_in ?? 60) * 1000,
      };
      res.redirect('/');
    });
  } catch (e) {
    next(e);
  }
});

function requireSession(req, res, next) {
  if (!req.session.tokens) return res.status(401).json({ error: 'unauthenticated' });
  if (!req.get('x-csrf')) return res.status(403).json({ error: 'csrf' });
  next();
}

app.use(
  '/api',
  requireSession,
  createProxyMiddleware({
    target: `${UPSTREAM}/api`,
    changeOrigin: true,
    // Keep-alive to the upstream, like nginx's `keepalive` and coatcheck's pool.
    agent: new http.Agent({ keepAlive: true, maxSockets: 256 }),
    on: {
      proxyReq: (proxyReq, req) => {
        proxyReq.removeHeader('cookie');
        proxyReq.setHeader('authorization', `Bearer ${req.session.tokens.access_token}`);
      },
    },
  }),
);

app.get('/healthz', (req, res) => res.json({ status: 'ok' }));

https
  .createServer({ cert: fs.readFileSync(env('TLS_CERT')), key: fs.readFileSync(env('TLS_KEY')) }, app)
  .listen(PORT, '127.0.0.1', () => console.error(`node-bff listening on ${PUBLIC_ORIGIN}`));
