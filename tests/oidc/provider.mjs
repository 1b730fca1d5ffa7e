// A real OpenID provider for tests/test_oidc.py: oidc-provider (a certified
// implementation) on loopback HTTPS, with its built-in development login and
// consent pages (any password is accepted for the accounts listed).
//
//   node provider.mjs CONFIG.json
//   CONFIG: {"port": N, "cert": PEM path, "key": PEM path,
//            "clients": [client metadata...], "accounts": {"id": {claims}}}
//
// Prints "ready ISSUER" once it listens.  One test-only route: POST
// /test/tamper with a JSON object makes the next token response carry an ID
// token with those claims replaced, re-signed with the provider's own key,
// to play a provider that vouches for the wrong audience or nonce.

import { readFileSync } from 'node:fs';
import https from 'node:https';

import { SignJWT, decodeJwt, exportJWK, generateKeyPair } from 'jose';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `https://127.0.0.1:${config.port}`;
const { privateKey } = await generateKeyPair('RS256', { extractable: true });
const signingKey = { ...(await exportJWK(privateKey)), kid: 'test-key', alg: 'RS256', use: 'sig' };

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: ['meshbox-test-cookie-key'] },
  scopes: ['openid', 'email', 'profile', 'groups'],
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    profile: ['name', 'preferred_username'],
    groups: ['groups'],
  },
  features: { devInteractions: { enabled: true } },
  async findAccount(ctx, id) {
    const claims = config.accounts[id];
    return claims && { accountId: id, claims: async () => ({ sub: id, ...claims }) };
  },
});

let tamper = null;
provider.use(async (ctx, next) => {
  await next();
  if (tamper && ctx.path === '/token' && ctx.body && ctx.body.id_token) {
    const claims = { ...decodeJwt(ctx.body.id_token), ...tamper };
    tamper = null;
    const idToken = await new SignJWT(claims).setProtectedHeader({ alg: 'RS256', kid: 'test-key' }).sign(privateKey);
    ctx.body = { ...ctx.body, id_token: idToken };
  }
});

const serveProvider = provider.callback();
const server = https.createServer({ cert: readFileSync(config.cert), key: readFileSync(config.key) }, (req, res) => {
  if (req.method === 'POST' && req.url === '/test/tamper') {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      tamper = JSON.parse(body);
      res.end('ok\n');
    });
    return;
  }
  serveProvider(req, res);
});
server.listen(config.port, '127.0.0.1', () => console.log(`ready ${issuer}`));
