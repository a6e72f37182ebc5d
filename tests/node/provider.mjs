// A real, OpenID Certified provider (oidc-provider) for portcullis interop tests.
//
// Serves HTTPS on loopback with the certificate it is given, issues RS256 JWT access tokens
// through client_credentials (RFC 8707 resource indicators), and can rotate its signing key on
// command so tests can prove the proxy follows rotation through discovery + JWKS. It also
// carries the authorization-code + PKCE setup (web client, email/groups in ID tokens, dev
// login pages) that the browser SSO tests use.
//
// Usage (all flags optional except --cert/--key):
//   node provider.mjs --cert server.pem --key server-key.pem [--port 0] [--host 127.0.0.1]
//     [--public-host 127.0.0.1] [--control-port 0] [--audience https://portcullis.test]...
//     [--redirect-uri https://127.0.0.1:8443/.portcullis/callback]... [--accounts accounts.json]
//     [--stdin-control]
//
// Stdout, one line each, in this order (everything else goes to stderr):
//   control http://127.0.0.1:<control-port>
//   ready https://<public-host>:<port>          <- the issuer URL
//
// Control (plain HTTP on its own loopback port; JSON answers):
//   GET  /keys               {"kids":[...]}     first kid signs new tokens
//   POST /rotate             new key first, old ones still published (tokens they signed verify)
//   POST /retire             drop every key but the first (the current signing key)
//   POST /rotate?retire=1    both at once: only the new key is published
//   POST /shutdown           exit 0
// With --stdin-control, the same commands come as lines on stdin (`keys`, `rotate`, `retire`,
// `rotate-retire`), each answered by one stdout line `keys {"kids":[...]}`; end of stdin exits,
// so a provider started by a test dies with the test's handle on it.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as readline from 'node:readline';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    cert: { type: 'string' },
    key: { type: 'string' },
    port: { type: 'string', default: process.env.PORTCULLIS_OIDC_PORT ?? '0' },
    host: { type: 'string', default: '127.0.0.1' },
    'public-host': { type: 'string' },
    'control-port': { type: 'string', default: process.env.PORTCULLIS_OIDC_CONTROL_PORT ?? '0' },
    audience: { type: 'string', multiple: true },
    'redirect-uri': { type: 'string', multiple: true },
    accounts: { type: 'string' },
    'stdin-control': { type: 'boolean', default: false },
  },
  strict: true,
});

function fail(message) {
  process.stderr.write(`provider.mjs: ${message}\n`);
  process.exit(2);
}

const certPath = args.cert ?? process.env.PORTCULLIS_OIDC_CERT;
const keyPath = args.key ?? process.env.PORTCULLIS_OIDC_KEY;
if (!certPath || !keyPath) fail('--cert and --key (PEM files) are required');

const audiences = args.audience ?? ['https://portcullis.test'];
const redirectUris = args['redirect-uri'] ?? ['https://127.0.0.1:8443/.portcullis/callback'];

// Test accounts for the dev login pages (any login name works; these get groups).
const accounts = {
  alice: { email: 'alice@example.test', name: 'Alice', groups: ['release-managers', 'engineering'] },
  bob: { email: 'bob@example.test', name: 'Bob', groups: ['engineering'] },
  ...(args.accounts ? JSON.parse(fs.readFileSync(args.accounts, 'utf8')) : {}),
};

// Clients. Secrets are fixed test values: this provider only ever listens on loopback.
const clients = [
  {
    client_id: 'ci-client',
    client_secret: 'ci-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'portcullis-web',
    client_secret: 'web-secret',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: redirectUris,
    post_logout_redirect_uris: redirectUris.map((u) => new URL('/', u).href),
    token_endpoint_auth_method: 'client_secret_basic',
  },
];

// --- signing keys -----------------------------------------------------------------------------

let keyCounter = 0;
function newSigningKey() {
  keyCounter += 1;
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `k${keyCounter}-${crypto.randomBytes(4).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

// Newest first: oidc-provider signs with the first key that fits the algorithm.
let keys = [newSigningKey()];
const kids = () => keys.map((k) => k.kid);

// --- provider -----------------------------------------------------------------------------------

// Cookie keys outlive provider instances, so a browser session survives a key rotation.
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

function makeProvider(issuer) {
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    cookies: { keys: cookieKeys },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      groups: ['groups'],
      profile: ['name'],
    },
    // Put scope-granted claims (email, groups) into ID tokens, not only into userinfo.
    conformIdTokenClaims: false,
    async findAccount(_ctx, id) {
      const known = accounts[id] ?? {};
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            email: known.email ?? `${id}@example.test`,
            email_verified: true,
            name: known.name ?? id,
            groups: known.groups ?? [],
          };
        },
      };
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // A token request without `resource` is for the first configured audience.
        async defaultResource(_ctx, _client, oneOf) {
          return oneOf ?? audiences[0];
        },
        async useGrantedResource() {
          return true;
        },
        async getResourceServerInfo(_ctx, resourceIndicator) {
          if (!audiences.includes(resourceIndicator)) {
            throw new errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
          }
          return {
            scope: 'api:read api:write',
            audience: resourceIndicator,
            accessTokenTTL: 5 * 60,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
  });
  return provider.callback();
}

// --- servers -------------------------------------------------------------------------------------

function listen(server, port, host) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(Number(port), host, () => resolve(server.address().port));
  });
}

let handler = null;
let issuer = null;
const tlsServer = https.createServer(
  { cert: fs.readFileSync(certPath), key: fs.readFileSync(keyPath) },
  (req, res) => handler(req, res),
);
const port = await listen(tlsServer, args.port, args.host);
issuer = `https://${args['public-host'] ?? args.host}:${port}`;
handler = makeProvider(issuer);

function rotate({ retire }) {
  keys = retire ? [newSigningKey()] : [newSigningKey(), ...keys];
  handler = makeProvider(issuer);
  process.stderr.write(`provider.mjs: rotated, kids now ${kids().join(',')}\n`);
}

function retire() {
  keys = keys.slice(0, 1);
  handler = makeProvider(issuer);
  process.stderr.write(`provider.mjs: retired old keys, kids now ${kids().join(',')}\n`);
}

const control = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://control');
  const answer = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  if (req.method === 'GET' && url.pathname === '/keys') return answer(200, { kids: kids() });
  if (req.method === 'POST' && url.pathname === '/rotate') {
    rotate({ retire: url.searchParams.get('retire') === '1' });
    return answer(200, { kids: kids() });
  }
  if (req.method === 'POST' && url.pathname === '/retire') {
    retire();
    return answer(200, { kids: kids() });
  }
  if (req.method === 'POST' && url.pathname === '/shutdown') {
    answer(200, { bye: true });
    return setImmediate(() => process.exit(0));
  }
  return answer(404, { error: 'unknown control command' });
});
const controlPort = await listen(control, args['control-port'], '127.0.0.1');

if (args['stdin-control']) {
  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    switch (line.trim()) {
      case 'rotate': rotate({ retire: false }); break;
      case 'rotate-retire': rotate({ retire: true }); break;
      case 'retire': retire(); break;
      case 'keys': break;
      case '': return;
      default: process.stderr.write(`provider.mjs: unknown command ${line}\n`); return;
    }
    process.stdout.write(`keys ${JSON.stringify({ kids: kids() })}\n`);
  });
  lines.on('close', () => process.exit(0));
}

process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

process.stdout.write(`control http://127.0.0.1:${controlPort}\n`);
process.stdout.write(`ready ${issuer}\n`);
