// Drives the web view in Debian's headless chromium (playwright-core) the way a person would.
//
//   node tests/browser/web_view.mjs BASE_URL OUT_DIR [EXPECTATIONS]
//
// EXPECTATIONS is a JSON object, inline or the path of a file:
//   {"run_id": "run_...",                       a run the table must list (and that is opened)
//    "filter": {"field": "risk_level", "value": "RED"},   chosen in the filter form
//    "filtered_in": ["run_..."], "filtered_out": ["run_..."],   listed / not listed after it
//    "risk_level": "YELLOW", "advisory_text": "...",       on the run page
//    "extent": {"x_min": 0, "x_max": 100, "y_min": 0, "y_max": 65},   of the G-code plot
//    "cut_length": 263.37, "rapid_length": 186.55, "moves": 13, "tolerance": 1e-6,
//    "min_revisions": 3, "page_size": 2}
// Without expectations it only checks that each view loads and records what it saw.
//
// Prints one JSON object of observations on stdout and exits 0; on any failure prints the
// reason on stderr (and the observations so far on stdout), saves failure.png, exits 1.
// Screenshots go to OUT_DIR. Requests to any other origin than BASE_URL are refused and fail
// the run: the page must work offline.
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [baseArg, outDir, expArg] = process.argv.slice(2);
if (!baseArg || !outDir) {
  console.error('usage: node web_view.mjs BASE_URL OUT_DIR [EXPECTATIONS_JSON_OR_FILE]');
  process.exit(2);
}
const base = baseArg.replace(/\/$/, '');
const origin = new URL(base).origin;
const exp = expArg ? JSON.parse(expArg.trim().startsWith('{') ? expArg : readFileSync(expArg, 'utf8')) : {};
const tol = exp.tolerance ?? 1e-6;
const WAIT = 30000;
mkdirSync(outDir, { recursive: true });

const obs = { base_url: base, steps: [], screenshots: [], external_requests: [], page_errors: [] };
let step = 'launch';
class Failure extends Error {}
function check(cond, why) {
  if (!cond) throw new Failure(`${step}: ${why}`);
}
function near(a, b) {
  return typeof a === 'number' && Math.abs(a - b) <= tol;
}

const profile = mkdtempSync(join(tmpdir(), 'rmos-web-view-'));
let browser;
let page;

async function shot(name) {
  const path = join(outDir, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  obs.screenshots.push(path);
}

async function rowIds() {
  return page.$$eval('#runs-table tbody tr[data-run-id]', (rows) => rows.map((r) => r.dataset.runId));
}

// Waits until the runs list has settled (a table, the empty state or an error).
async function listSettled() {
  await page.waitForSelector('.list-body[data-state]', { timeout: WAIT });
  const state = await page.getAttribute('.list-body', 'data-state');
  if (state === 'error') throw new Failure(`${step}: the runs list shows an error: ${await page.textContent('.list-body .error-box')}`);
  return state;
}

async function main() {
  // A fresh, empty profile (the persistent context's --user-data-dir), removed at the end.
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1440, height: 900 },
    deviceScaleFactor: 1,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const context = browser;
  await context.route('**/*', (route) => {
    const url = route.request().url();
    if (url.startsWith(origin + '/') || url.startsWith('data:') || url.startsWith('blob:')) return route.continue();
    obs.external_requests.push(url);
    return route.abort();
  });
  page = context.pages()[0] || (await context.newPage());
  page.on('pageerror', (e) => obs.page_errors.push(String(e)));

  // 1. The runs table lists the run created over NATS, newest first.
  step = 'load';
  await page.goto(`${base}/`, { waitUntil: 'load' });
  await listSettled();
  const all = await rowIds();
  const created = await page.$$eval('#runs-table tbody tr[data-run-id] time', (ts) => ts.map((t) => t.getAttribute('datetime')));
  obs.listed = all;
  obs.newest_first = created.every((t, i) => i === 0 || created[i - 1] >= t);
  check(obs.newest_first, `the table is not newest first: ${created.join(', ')}`);
  if (exp.run_id) check(all.includes(exp.run_id), `run ${exp.run_id} is not listed (listed: ${all.join(', ') || 'none'})`);
  await shot('01-runs');
  obs.steps.push('listed');

  // 1b. Paging: small pages walked with "Next" cover the same runs, "Previous" comes back.
  if (exp.page_size) {
    step = 'paging';
    await page.goto(`${base}/#/?limit=${exp.page_size}`, { waitUntil: 'load' });
    await listSettled();
    const first = await rowIds();
    const pages = [first];
    while (await page.isEnabled('#page-next')) {
      check(pages.length < 100, 'more than 100 pages');
      const before = (await rowIds()).join(',');
      await page.click('#page-next');
      await page.waitForFunction((b) => {
        const body = document.querySelector('.list-body[data-state]');
        const ids = [...document.querySelectorAll('#runs-table tbody tr[data-run-id]')].map((r) => r.dataset.runId).join(',');
        return body && (body.dataset.state !== 'ok' || ids !== b);
      }, before, { timeout: WAIT });
      await listSettled();
      pages.push(await rowIds());
    }
    obs.paging = { page_size: exp.page_size, pages };
    // The walk covers the first (default-sized) page in the same order, and repeats no run.
    const walked = pages.flat();
    check(new Set(walked).size === walked.length, `a run shows on two pages: ${JSON.stringify(pages)}`);
    check(walked.slice(0, all.length).join(',') === all.join(','), `the pages of ${exp.page_size} do not list what one page shows: ${walked.slice(0, all.length).join(',')} vs ${all.join(',')}`);
    await page.click('#page-first');
    await page.waitForFunction(() => !location.hash.includes('c='), null, { timeout: WAIT });
    await listSettled();
    check((await rowIds()).join(',') === first.join(','), '"First" does not come back to the first page');
    await page.goto(`${base}/`, { waitUntil: 'load' });
    await listSettled();
    obs.steps.push('paged');
  }

  // 2. A filter chosen in the form changes the table; the state survives a reload.
  if (exp.filter) {
    step = 'filter';
    const { field, value } = exp.filter;
    await page.selectOption(`#f-${field}`, value);
    await page.waitForFunction((want) => location.hash.includes(want), `${field}=${encodeURIComponent(value)}`, { timeout: WAIT });
    await page.waitForFunction((prev) => {
      const b = document.querySelector('.list-body[data-state]');
      if (!b) return false;
      const ids = [...document.querySelectorAll('#runs-table tbody tr[data-run-id]')].map((r) => r.dataset.runId).join(',');
      return b.dataset.state !== 'ok' || ids !== prev;
    }, all.join(','), { timeout: WAIT });
    const state = await listSettled();
    const ids = state === 'ok' ? await rowIds() : [];
    obs.filtered = { field, value, hash: await page.evaluate(() => location.hash), listed: ids };
    if (field === 'risk_level') {
      const risks = await page.$$eval('#runs-table tbody tr[data-run-id] [data-risk]', (b) => b.map((x) => x.dataset.risk));
      obs.filtered.risk_levels = risks;
      check(risks.every((r) => r === value), `rows with another risk than ${value}: ${risks.join(', ')}`);
    }
    for (const id of exp.filtered_in || []) check(ids.includes(id), `${id} should be listed with ${field}=${value}`);
    for (const id of exp.filtered_out || []) check(!ids.includes(id), `${id} should not be listed with ${field}=${value}`);
    check(ids.join(',') !== all.join(','), 'the table did not change');
    await shot('02-filtered');
    await page.reload({ waitUntil: 'load' });
    await listSettled();
    obs.filtered.after_reload = await rowIds();
    obs.filtered.select_after_reload = await page.$eval(`#f-${field}`, (s) => s.value);
    check(obs.filtered.select_after_reload === value, 'the filter did not survive a reload');
    check(obs.filtered.after_reload.join(',') === ids.join(','), 'a reload shows other runs');
    step = 'clear filter';
    await page.click('#f-clear');
    await page.waitForFunction((f) => !location.hash.includes(`${f}=`), field, { timeout: WAIT });
    await listSettled();
    obs.steps.push('filtered');
  }

  // 3. The run page, opened by clicking its row.
  const runId = exp.run_id || (await rowIds())[0];
  check(runId, 'no run to open');
  step = 'open run';
  await page.waitForSelector(`#runs-table tr[data-run-id="${runId}"]`, { timeout: WAIT });
  await page.click(`#runs-table tr[data-run-id="${runId}"] td:nth-child(3)`);
  await page.waitForSelector('#risk-badge', { timeout: WAIT });
  obs.run = { run_id: runId, hash: await page.evaluate(() => location.hash), risk_level: await page.getAttribute('#risk-badge', 'data-risk') };
  obs.run.warnings = await page.$$eval('#warnings li', (l) => l.map((x) => x.textContent));
  if (exp.risk_level) check(obs.run.risk_level === exp.risk_level, `risk badge ${obs.run.risk_level}, expected ${exp.risk_level}`);
  const colour = await page.$eval('#risk-badge .badge', (b) => getComputedStyle(b).backgroundColor);
  obs.run.badge_colour = colour;
  if (exp.advisory_text) {
    await page.waitForSelector('.advisory .adv-text, .advisory .error-box', { timeout: WAIT });
    obs.run.advisory_texts = await page.$$eval('.advisory .adv-text', (l) => l.map((x) => x.textContent));
    check(obs.run.advisory_texts.some((t) => t.includes(exp.advisory_text)), `no advisory says ${JSON.stringify(exp.advisory_text)} (shown: ${JSON.stringify(obs.run.advisory_texts)})`);
  }
  await page.waitForSelector('#hashes .verify-summary, #hashes .error-box', { timeout: WAIT });
  obs.run.verify = await page.textContent('#hashes .verify-summary, #hashes .error-box');
  obs.run.hash_checks = await page.$$eval('tr[data-hash] [data-status]', (l) => Object.fromEntries(l.map((x) => [x.closest('tr').dataset.hash, x.dataset.status])));
  await shot('03-run');
  obs.steps.push('run page');

  // 4. The G-code view draws the toolpath; its extent is read from the plot's data attributes.
  step = 'gcode';
  await page.click('#tab-gcode');
  await page.waitForSelector('#gcode-plot[data-state="done"], #gcode-plot[data-state="error"]', { timeout: 120000 });
  const plot = await page.$eval('#gcode-plot', (p) => ({ ...p.dataset }));
  check(plot.state === 'done', `the G-code view failed: ${await page.textContent('.gc-side')}`);
  const num = (k) => Number(plot[k]);
  obs.gcode = {
    x_min: num('xMin'), x_max: num('xMax'), y_min: num('yMin'), y_max: num('yMax'), z_min: num('zMin'), z_max: num('zMax'),
    cut_length: num('cutLength'), rapid_length: num('rapidLength'), moves: num('moves'), lines: num('lines'), units: plot.units,
  };
  // The canvas shows something: count pixels in the two stroke colours.
  obs.gcode.painted = await page.$eval('#gcode-plot canvas', (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let cut = 0, rapid = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] < 60 && d[i + 1] > 80 && d[i + 1] < 130 && d[i + 2] > 140) cut++;
      else if (d[i] > 200 && d[i + 1] > 70 && d[i + 1] < 140 && d[i + 2] < 60) rapid++;
    }
    return { cut_pixels: cut, rapid_pixels: rapid };
  });
  check(obs.gcode.painted.cut_pixels > 50, `the plot shows no cutting moves (${JSON.stringify(obs.gcode.painted)})`);
  if (exp.extent) {
    for (const k of ['x_min', 'x_max', 'y_min', 'y_max']) check(near(obs.gcode[k], exp.extent[k]), `${k} is ${obs.gcode[k]}, expected ${exp.extent[k]}`);
  }
  if (exp.cut_length !== undefined) check(near(obs.gcode.cut_length, exp.cut_length), `cut length ${obs.gcode.cut_length}, expected ${exp.cut_length}`);
  if (exp.rapid_length !== undefined) check(near(obs.gcode.rapid_length, exp.rapid_length), `rapid length ${obs.gcode.rapid_length}, expected ${exp.rapid_length}`);
  if (exp.moves !== undefined) check(obs.gcode.moves === exp.moves, `${obs.gcode.moves} moves, expected ${exp.moves}`);
  await shot('04-gcode');
  obs.steps.push('gcode');

  // 5. The revision history and a diff between two chosen revisions.
  step = 'history';
  await page.click('#tab-history');
  await page.waitForSelector('#revisions tbody tr, #history .error-box, #history p.muted', { timeout: WAIT });
  const revs = await page.$$eval('#revisions tbody tr', (l) => l.map((r) => ({ revision: Number(r.dataset.revision), event: r.querySelector('.chip').textContent })));
  obs.history = { revisions: revs };
  if (exp.min_revisions) check(revs.length >= exp.min_revisions, `${revs.length} revisions shown, expected at least ${exp.min_revisions}`);
  if (revs.length >= 2) {
    await page.waitForSelector('#diff-table, #diff .diff-head, #diff .error-box', { timeout: WAIT });
    const first = revs[0].revision;
    const lastRev = revs[revs.length - 1].revision;
    await page.selectOption('#diff-from', String(first));
    await page.selectOption('#diff-to', String(lastRev));
    await page.click('#diff-go');
    await page.waitForSelector(`#diff[data-from="${first}"][data-to="${lastRev}"], #diff .error-box`, { timeout: WAIT });
    const err = await page.$('#diff .error-box');
    check(!err, `the diff failed: ${err && (await err.textContent())}`);
    obs.history.diff = { from: first, to: lastRev, paths: await page.$$eval('#diff-table tr[data-path]', (l) => l.map((r) => r.dataset.path)) };
    check(obs.history.diff.paths.length > 0, 'the diff between the first and last revision shows no change');
  }
  await shot('05-history');
  obs.steps.push('history');

  // 6. An unknown run shows the API's error, not a blank page.
  step = 'error state';
  await page.goto(`${base}/#/run/run_000000000000`, { waitUntil: 'load' });
  await page.waitForSelector('.error-box', { timeout: WAIT });
  obs.error_state = (await page.textContent('.error-box')).trim();
  check(/not_found/.test(obs.error_state), `the error box does not name the error: ${obs.error_state}`);
  await shot('06-error');
  obs.steps.push('error state');

  step = 'offline';
  check(obs.external_requests.length === 0, `the page asked for other origins: ${obs.external_requests.join(', ')}`);
  check(obs.page_errors.length === 0, `uncaught errors in the page: ${obs.page_errors.join(' | ')}`);
}

let code = 0;
try {
  await main();
  obs.ok = true;
} catch (e) {
  code = 1;
  obs.ok = false;
  obs.failed_step = step;
  obs.error = e instanceof Failure ? e.message : `${step}: ${e.stack || e}`;
  console.error(`web_view: FAILED at ${obs.error}`);
  if (page) await page.screenshot({ path: join(outDir, 'failure.png'), fullPage: true }).catch(() => {});
} finally {
  if (browser) await browser.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(`${JSON.stringify(obs)}\n`);
process.exit(code);
