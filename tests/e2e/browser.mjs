// Drives headless Debian Chromium through the proxy's browser sign-in with a real
// OpenID provider (tests/node/provider.mjs, npm oidc-provider): protected page → provider
// login → consent → back with a session → screenshot → logout at the provider → signed out.
//
//   node tests/e2e/browser.mjs --url https://localhost:PORT/dashboard --screenshot out.png \
//     --user-data-dir /tmp/profile [--user alice]
//
// Prints one JSON line on stdout: {"signedIn": bool, "body": "...", "afterLogout": "url", "steps": [...]}.
// Only loopback requests leave the browser (the provider's pages reference web fonts).

import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const require = createRequire(new URL('../node/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    screenshot: { type: 'string' },
    'user-data-dir': { type: 'string' },
    user: { type: 'string', default: 'alice' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
  },
  strict: true,
});

const steps = [];
const step = (s) => { steps.push(s); process.stderr.write(`browser.mjs: ${s}\n`); };
const loopback = new Set(['127.0.0.1', 'localhost', '[::1]']);

const ctx = await chromium.launchPersistentContext(args['user-data-dir'], {
  executablePath: args.chromium,
  headless: true,
  ignoreHTTPSErrors: true, // the test's dev CA
  viewport: { width: 1000, height: 700 },
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-quic',
  ],
});
const result = { signedIn: false, body: '', afterLogout: '', steps };
try {
  await ctx.route('**/*', (route) => {
    const host = new URL(route.request().url()).hostname;
    return loopback.has(host) ? route.continue() : route.abort();
  });
  const page = ctx.pages()[0] ?? (await ctx.newPage());
  page.setDefaultTimeout(20000);
  const target = new URL(args.url);

  step(`open ${target.href}`);
  await page.goto(target.href);
  step(`at ${new URL(page.url()).origin} (provider login)`);
  await page.fill('input[name=login]', args.user);
  await page.fill('input[name=password]', 'any-password');
  await page.click('button[type=submit]');
  step('submitted login; consent');
  await page.waitForSelector('button[type=submit]');
  if (new URL(page.url()).origin !== target.origin) {
    await page.click('button[type=submit]');
  }
  await page.waitForURL((u) => u.origin === target.origin && u.pathname === target.pathname);
  step(`back at ${page.url()}`);
  result.body = (await page.textContent('body')) ?? '';
  result.signedIn = result.body.includes('"x-portcullis-subject"');
  await page.screenshot({ path: args.screenshot, fullPage: true });
  step(`screenshot ${args.screenshot}`);

  step('logout');
  await page.goto(`${target.origin}/.portcullis/logout`);
  // oidc-provider asks to confirm RP-initiated logout.
  await page.click('button[value=yes]');
  // Back at the proxy's `/`, which (signed out everywhere) sends us to the provider login.
  await page.waitForSelector('input[name=login]');
  result.afterLogout = page.url();
  step(`after logout at ${result.afterLogout}`);
} catch (e) {
  result.error = String(e && e.message ? e.message : e).split('\n')[0];
} finally {
  await ctx.close();
}
process.stdout.write(`${JSON.stringify(result)}\n`);
