// The real authorization server for credless's tests: oidc-provider (npm), on loopback, as a
// function: startProvider(cfg, log) serves one provider and returns its issuer and close().
// Run one per process by oidc_server.mjs, or many, one after another, by oidc_host.mjs.
//
// CONFIG (JSON):
//   port            listen port (0: any free port)
//   clients         [{client_id, jwks_uri | jwks, dpop_bound_access_tokens?, scope?}]
//                   client_id is a SPIFFE ID; clients authenticate with private_key_jwt (ES256)
//   resources       {"<MCP URL>": {"format": "jwt"|"opaque", "scope": "a b", "ttl": 300}}
//   dpop            {"enabled": true, "require_nonce": false}
//   registration    {"enabled": true}   dynamic registration (RFC 7591) + management (7592)
//   spiffe_assertion true: also accept client_assertion_type ...:jwt-spiffe (see below)
//   tls             {"cert": PEM chain file, "key": PEM key file}: serve https, issuer
//                   https://localhost:PORT (an authorization server as users meet one). What
//                   it fetches over https (clients' jwks_uri) it verifies against the system
//                   store plus NODE_EXTRA_CA_CERTS, which the test sets to its CA
//
// log(event, fields) gets one call per notable server event (grant.success/error with
// oidc-provider's inner reason, registrations, every URL it fetches: `fetch`, ...), never a
// token or an assertion.
//
// jwt-spiffe: oidc-provider knows RFC 7523 client assertions (jwt-bearer), not the IETF draft
// "OAuth SPIFFE Client Authentication". The middleware below implements the draft's extra
// server-side checks (aud must be exactly the issuer; sub must be a SPIFFE ID of a registered
// client; exp present) and then hands the assertion to oidc-provider's own private_key_jwt
// verification (signature against the client's jwks_uri, iss/sub, jti replay, expiry) by
// re-labelling it jwt-bearer. It extends the real server; it is not a fake of one.

import { readFileSync } from 'node:fs';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { createServer as createTlsServer } from 'node:https';
import { parse as parseQs } from 'node:querystring';
import Provider, { errors } from 'oidc-provider';

const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const JWT_SPIFFE = 'urn:ietf:params:oauth:client-assertion-type:jwt-spiffe';

export async function startProvider(cfg, log) {
  const server = cfg.tls
    ? createTlsServer({ cert: readFileSync(cfg.tls.cert), key: readFileSync(cfg.tls.key) })
    : createServer();
  await new Promise((resolve) => server.listen(cfg.port || 0, '127.0.0.1', resolve));
  const issuer = cfg.tls
    ? `https://localhost:${server.address().port}`
    : `http://127.0.0.1:${server.address().port}`;

  const { privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const signingJwk = { ...privateKey.export({ format: 'jwk' }), kid: 'as-es256', use: 'sig', alg: 'ES256' };
  const resources = cfg.resources || {};
  // a resource server's own client (client_secret), for introspection; every other client is
  // a workload's, authenticating with a JWT-SVID (private_key_jwt)
  const clientFields = (c) => c.client_secret ? ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: [],
    response_types: [],
    redirect_uris: [],
  }) : ({
    client_id: c.client_id,
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: 'ES256',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    ...(c.jwks_uri ? { jwks_uri: c.jwks_uri } : { jwks: c.jwks }),
    ...(c.dpop_bound_access_tokens ? { dpop_bound_access_tokens: true } : {}),
    ...(c.scope ? { scope: c.scope } : {}),
  });

  const loopbackOnly = (url) => {
    const { hostname } = new URL(url);
    if (!['127.0.0.1', 'localhost', '[::1]', '::1'].includes(hostname)) {
      throw new Error(`refusing to fetch ${url}: tests only talk to loopback`);
    }
  };

  const decodePayload = (jwt) => {
    try {
      return JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
    } catch {
      return undefined;
    }
  };

  const provider = new Provider(issuer, {
    clients: (cfg.clients || []).map(clientFields),
    jwks: { keys: [signingJwk] },
    clientDefaults: {
      id_token_signed_response_alg: 'ES256',
      token_endpoint_auth_method: 'private_key_jwt',
      grant_types: ['client_credentials'],
      response_types: [],
    },
    enabledJWA: { clientAuthSigningAlgValues: ['ES256'], dPoPSigningAlgValues: ['ES256'] },
    scopes: [...new Set(Object.values(resources).flatMap((r) => (r.scope || '').split(' ').filter(Boolean)))],
    // jwks_uri of test clients are on loopback: oidc-provider's SSRF guard (rightly) refuses
    // special-use addresses, so this hook allows loopback only and nothing else.
    fetch: (url, options) => {
      loopbackOnly(String(url));
      log('fetch', { url: String(url) });
      const { dispatcher, ...rest } = options;
      return globalThis.fetch(url, rest);
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: {
        enabled: true,
        allowedPolicy: async () => true,
      },
      revocation: { enabled: true },
      dPoP: {
        enabled: cfg.dpop?.enabled !== false,
        ...(cfg.dpop?.require_nonce ? { nonceSecret: randomBytes(32), requireNonce: () => true } : {}),
      },
      registration: {
        enabled: Boolean(cfg.registration?.enabled),
        // client_id = the SPIFFE ID the software statement proves (sub of a JWT signed by a key
        // of the registering client's own JWKS: checked by oidc-provider when the statement's
        // `iss` is accepted below and again on every token request through private_key_jwt).
        idFactory: (ctx) => {
          const sid = ctx.oidc?.body?.spiffe_id;
          return typeof sid === 'string' && sid.startsWith('spiffe://') ? sid : `client-${randomBytes(8).toString('hex')}`;
        },
      },
      registrationManagement: { enabled: Boolean(cfg.registration?.enabled) },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, indicator) => {
          const r = resources[indicator];
          if (!r) throw new errors.InvalidTarget(`unknown resource ${indicator}`);
          return {
            scope: r.scope || '',
            audience: indicator,
            accessTokenTTL: r.ttl || cfg.access_token_ttl || 300,
            accessTokenFormat: r.format === 'opaque' ? 'opaque' : 'jwt',
            ...(r.format === 'opaque' ? {} : { jwt: { sign: { alg: 'ES256' } } }),
          };
        },
      },
    },
    extraClientMetadata: {
      properties: ['spiffe_id', 'software_statement'],
      validator: (ctx, key, value, metadata) => {
        if (key !== 'software_statement' || value === undefined) return;
        // RFC 7591 §2.3: a software statement MUST carry iss. Its sub must be the spiffe_id
        // the registration asks for. (Its signature is checked in the registration route
        // middleware below, against the JWKS the client registers.)
        const claims = decodePayload(value);
        if (!claims?.iss || !claims?.sub || claims.sub !== metadata.spiffe_id) {
          throw new errors.InvalidSoftwareStatement('software_statement must carry iss and sub = spiffe_id');
        }
      },
    },
  });

  const route = (name) => {
    try {
      return new URL(provider.urlFor(name)).pathname;
    } catch {
      return undefined;  // feature disabled: no such route
    }
  };

  // Registration: verify the software statement's signature against the JWKS the client
  // registers (jwks_uri fetched from loopback, or inline jwks).
  provider.use(async (ctx, next) => {
    if (ctx.method === 'POST' && ctx.path === route('registration')) {
      const raw = await new Promise((resolve, reject) => {
        const chunks = [];
        ctx.req.on('data', (c) => chunks.push(c)).on('end', () => resolve(Buffer.concat(chunks).toString())).on('error', reject);
      });
      let meta;
      try { meta = JSON.parse(raw); } catch { meta = undefined; }
      if (meta?.software_statement) {
        const { jwtVerify, createRemoteJWKSet, createLocalJWKSet } = await import('jose');
        try {
          if (meta.jwks_uri) {
            loopbackOnly(meta.jwks_uri);
            log('fetch', { url: meta.jwks_uri });
          }
          const keys = meta.jwks_uri ? createRemoteJWKSet(new URL(meta.jwks_uri)) : createLocalJWKSet(meta.jwks);
          await jwtVerify(meta.software_statement, keys);
        } catch (e) {
          log('registration.error', { error: 'invalid_software_statement', reason: e.message });
          ctx.status = 400;
          ctx.body = { error: 'invalid_software_statement', error_description: `signature check failed: ${e.code || e.message}` };
          return;
        }
      }
      ctx.req.body = meta;
    }
    if (cfg.spiffe_assertion && ctx.method === 'POST' && [route('token'), route('introspection')].includes(ctx.path)) {
      const raw = await new Promise((resolve, reject) => {
        const chunks = [];
        ctx.req.on('data', (c) => chunks.push(c)).on('end', () => resolve(Buffer.concat(chunks).toString())).on('error', reject);
      });
      const form = parseQs(raw);
      if (form.client_assertion_type === JWT_SPIFFE) {
        const claims = decodePayload(String(form.client_assertion || ''));
        const aud = Array.isArray(claims?.aud) ? claims.aud : [claims?.aud];
        let reason;
        if (!claims) reason = 'assertion is not a JWT';
        else if (aud.length !== 1 || aud[0] !== issuer) reason = 'aud must be exactly the issuer identifier (draft-ietf-oauth-spiffe-client-auth)';
        else if (typeof claims.sub !== 'string' || !claims.sub.startsWith('spiffe://')) reason = 'sub must be a SPIFFE ID';
        else if (typeof claims.exp !== 'number') reason = 'exp is required';
        if (reason) {
          log('grant.error', { error: 'invalid_client', reason, client_id: claims?.sub });
          ctx.status = 401;
          ctx.body = { error: 'invalid_client', error_description: 'client authentication failed' };
          return;
        }
        form.client_assertion_type = JWT_BEARER;
        form.client_id = claims.sub;
      }
      ctx.req.body = form;
    }
    return next();
  });

  const safe = (ctx) => ({ client_id: ctx?.oidc?.client?.clientId, path: ctx?.path });
  provider.on('grant.success', (ctx) => log('grant.success', { ...safe(ctx), grant_type: ctx.oidc?.params?.grant_type, resource: ctx.oidc?.params?.resource }));
  provider.on('grant.error', (ctx, err) => log('grant.error', { ...safe(ctx), error: err.error, error_description: err.error_description, reason: err.error_detail || err.cause?.message || err.message }));
  provider.on('introspection.error', (ctx, err) => log('introspection.error', { ...safe(ctx), error: err.error, reason: err.error_detail || err.message }));
  provider.on('registration_create.success', (ctx, client) => log('registration_create.success', { client_id: client.clientId, jwks_uri: client.jwksUri, token_endpoint_auth_method: client.tokenEndpointAuthMethod, grant_types: client.grantTypes }));
  provider.on('registration_create.error', (ctx, err) => log('registration_create.error', { error: err.error, reason: err.error_description }));
  provider.on('registration_delete.success', (ctx, client) => log('registration_delete.success', { client_id: client.clientId }));
  provider.on('server_error', (ctx, err) => log('server_error', { ...safe(ctx), reason: err.message }));

  server.on('request', provider.callback());
  return {
    issuer,
    server,
    // stops listening and drops every open connection at once, as a killed process would
    close: () => new Promise((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    }),
  };
}
