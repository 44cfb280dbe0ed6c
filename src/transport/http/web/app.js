// rmos-runs web view. Plain script, no build step, no external resources.
//
// The same file runs in two places: as the page's script, and as the Web Worker that parses a
// run's G-code (new Worker('/assets/app.js')), so that a program of hundreds of thousands of
// lines never blocks the page. Everything the page shows comes from the JSON API on the same
// origin (/api/rmos/runs...); all of it is inserted as text, never as HTML.
'use strict';

// ============================================================================================
// G-code parsing (pure; runs in the worker, or on the page in time slices when no worker)
// ============================================================================================
//
// Parsing rules (what the plot, the extent and the lengths mean):
// - The tool starts at X0 Y0 Z0 of the program's coordinate system (the work origin), before
//   the first line. The first move therefore leaves from the origin, and the origin is part of
//   the extent as soon as there is one move.
// - Comments "( ... )" and "; ..." are ignored, as are "%" lines, N line numbers, a leading "/"
//   (block delete: the block is kept) and the words F S T M H D P Q L E.
// - Motion is modal: G0 (rapid), G1 (linear cut), G2 / G3 (clockwise / counter-clockwise arc
//   cut) stay in force until another motion code; a line with axis words and no motion code
//   moves in the current mode. G80 cancels it (axis words then move nothing).
// - G90 / G91: absolute / incremental X Y Z. Arc centres I J are offsets from the arc's start
//   (G91.1, the default) or absolute with G90.1; "R" arcs are accepted (negative R: the long way).
//   An arc whose end equals its start is a full circle.
// - G20 / G21: inches / millimetres. Everything is reported in the unit of the first G20 / G21
//   that comes before the first move (millimetres when none does); a later switch converts.
// - Arcs are exact for the extent (the bounding box includes the circle's extreme points that
//   the sweep passes) and the length (radius x sweep; a helix adds its Z travel); they are drawn
//   as chords of at most 5 degrees. Arcs outside the XY plane (G18 / G19) count as straight
//   lines, and are listed in the notes.
// - A move is one block that changes the position. Lengths are 3-D (Z travel counts), the
//   extent is X / Y (and Z) of every position a move passes through.
// - Not drawn, listed in the notes, position unchanged: G28 / G30 (home), G53 (machine
//   coordinates), G92 (offset), G10, G4 (dwell). Canned cycles (G73, G81-G89) move to their X Y
//   as rapids; the drilling itself is not drawn.
// - What is drawn is decimated (points closer than ~1/2000 of the extent are merged, corners
//   between rapid and cut kept); the figures above are computed from every move, not from the
//   drawing.

const TAU = Math.PI * 2;
const ARC_STEP = Math.PI / 36; // 5 degrees per chord
const MAX_DRAWN_POINTS = 150000;

// A polyline list (x, y pairs, NaN pairs between lines) with points closer than eps to the
// last kept one dropped; each line's first and last points are kept.
function decimate(b, eps) {
  const out = [];
  let lx = 0, ly = 0, px = 0, py = 0, pend = false;
  for (let i = 0; i < b.length; i += 2) {
    const x = b[i], y = b[i + 1];
    if (x !== x) {
      if (pend) out.push(px, py);
      pend = false;
      out.push(NaN, NaN);
      lx = NaN;
      continue;
    }
    if (lx !== lx || Math.abs(x - lx) > eps || Math.abs(y - ly) > eps) {
      if (pend && lx === lx) out.push(px, py);
      pend = false;
      out.push(x, y);
      lx = x;
      ly = y;
    } else {
      pend = true;
      px = x;
      py = y;
    }
  }
  if (pend) out.push(px, py);
  return out;
}

class GcodeParser {
  constructor() {
    this.pos = [0, 0, 0];
    this.motion = 0; // 0 1 2 3, 'cycle', or null after G80
    this.absolute = true;
    this.arcAbsolute = false;
    this.plane = 17;
    this.reportInch = null; // fixed at the first units code before the first move, or mm
    this.inputInch = false;
    this.anyMove = false;
    this.lines = 0;
    this.moves = 0;
    this.cutMoves = 0;
    this.rapidMoves = 0;
    this.arcs = 0;
    this.cutLength = 0;
    this.rapidLength = 0;
    this.ext = { xMin: Infinity, xMax: -Infinity, yMin: Infinity, yMax: -Infinity, zMin: Infinity, zMax: -Infinity };
    this.seen = {}; // modal codes seen: G90, G91, G20, G21, G17...
    this.notes = {}; // what was not drawn, with counts
    this.gbuf = [];
    this.wbuf = new Float64Array(26);
    // Decimated drawing: per kind (0 rapid, 1 cut) a list of x, y pairs; NaN, NaN breaks a polyline.
    this.out = [[], []];
    this.sent = [0, 0];
    this.kind = -1;
    this.lastX = 0;
    this.lastY = 0;
    this.hasPending = false;
    this.pendX = 0;
    this.pendY = 0;
    this.pos0x = 0;
    this.pos0y = 0;
    this.eps = 0;
  }

  note(what) {
    this.notes[what] = (this.notes[what] || 0) + 1;
  }

  scale() {
    if (this.reportInch === null) return this.inputInch ? 25.4 : 1;
    if (this.inputInch === this.reportInch) return 1;
    return this.inputInch ? 25.4 : 1 / 25.4;
  }

  include(x, y, z) {
    const e = this.ext;
    if (x < e.xMin) e.xMin = x;
    if (x > e.xMax) e.xMax = x;
    if (y < e.yMin) e.yMin = y;
    if (y > e.yMax) e.yMax = y;
    if (z < e.zMin) e.zMin = z;
    if (z > e.zMax) e.zMax = z;
  }

  // Drawing: start or continue a polyline of `kind` and add a point, merging points closer
  // than eps to the last one kept (the last merged point is kept when the polyline ends).
  // Every kept point stays in this.out (the worker's copy), so that the whole drawing can be
  // decimated again, coarser, when it grows past MAX_DRAWN_POINTS.
  emit(kind, x, y) {
    const buf = this.out[kind];
    if (kind !== this.kind) {
      this.flushPending();
      this.kind = kind;
      buf.push(NaN, NaN, this.pos0x, this.pos0y);
      this.lastX = this.pos0x;
      this.lastY = this.pos0y;
    }
    if (Math.abs(x - this.lastX) > this.eps || Math.abs(y - this.lastY) > this.eps) {
      this.flushPending();
      buf.push(x, y);
      this.lastX = x;
      this.lastY = y;
    } else {
      this.hasPending = true;
      this.pendX = x;
      this.pendY = y;
    }
  }

  flushPending() {
    if (this.hasPending && this.kind >= 0) {
      this.out[this.kind].push(this.pendX, this.pendY);
      this.lastX = this.pendX;
      this.lastY = this.pendY;
    }
    this.hasPending = false;
  }

  // What was drawn since the last call, as Float32Arrays (transferable): {replace: false}
  // with the new points (from the last point sent, so that lines join), or {replace: true}
  // with the whole drawing after it was decimated again.
  take() {
    this.flushPending();
    const e = this.ext;
    let replace = false;
    if (isFinite(e.xMin)) {
      const want = Math.hypot(e.xMax - e.xMin, e.yMax - e.yMin) / 2000;
      const total = () => (this.out[0].length + this.out[1].length) / 2;
      if (want > this.eps * 4 || total() > MAX_DRAWN_POINTS) {
        this.eps = Math.max(want, this.eps);
        this.out = this.out.map((b) => decimate(b, this.eps));
        while (total() > MAX_DRAWN_POINTS) {
          this.eps *= 2;
          this.out = this.out.map((b) => decimate(b, this.eps));
        }
        if (this.kind >= 0) {
          const b = this.out[this.kind];
          this.lastX = b[b.length - 2];
          this.lastY = b[b.length - 1];
        }
        this.sent = [0, 0];
        replace = true;
      } else if (want > this.eps) this.eps = want;
    }
    const r = this.out.map((b, k) => Float32Array.from(b.slice(Math.max(0, this.sent[k] - 2))));
    this.sent = [this.out[0].length, this.out[1].length];
    return { replace, rapid: r[0], cut: r[1] };
  }

  stats() {
    const e = this.ext;
    const has = isFinite(e.xMin);
    return {
      lines: this.lines,
      moves: this.moves,
      cutMoves: this.cutMoves,
      rapidMoves: this.rapidMoves,
      arcs: this.arcs,
      cutLength: this.cutLength,
      rapidLength: this.rapidLength,
      extent: has ? { ...e } : null,
      end: [this.pos[0], this.pos[1]],
      units: this.reportInch ? 'in' : 'mm',
      seen: Object.keys(this.seen).sort(),
      notes: { ...this.notes },
    };
  }

  // One line of G-code. A hand-written scanner (no regular expressions, no allocation per
  // word): a 200 MB program is millions of lines.
  feedLine(raw) {
    this.lines++;
    const n = raw.length;
    const g = this.gbuf;
    g.length = 0;
    const w = this.wbuf; // values by letter index (A=0), NaN when absent
    w.fill(NaN);
    let i = 0;
    let words = 0;
    while (i < n) {
      let c = raw.charCodeAt(i);
      if (c === 40) { // "(" comment up to ")"
        const e = raw.indexOf(')', i + 1);
        i = e < 0 ? n : e + 1;
        continue;
      }
      if (c === 59) break; // ";" comment to the end of the line
      if (c >= 97 && c <= 122) c -= 32;
      if (c < 65 || c > 90) { i++; continue; }
      // A letter: read its number (spaces allowed between them).
      let j = i + 1;
      while (j < n && raw.charCodeAt(j) === 32) j++;
      let sign = 1;
      let d = raw.charCodeAt(j);
      if (d === 45 || d === 43) { if (d === 45) sign = -1; j++; d = raw.charCodeAt(j); }
      let v = 0, digits = 0;
      while (d >= 48 && d <= 57) { v = v * 10 + (d - 48); digits++; j++; d = raw.charCodeAt(j); }
      if (d === 46) {
        j++;
        d = raw.charCodeAt(j);
        let frac = 0, div = 1;
        while (d >= 48 && d <= 57) { frac = frac * 10 + (d - 48); div *= 10; digits++; j++; d = raw.charCodeAt(j); }
        v += frac / div;
      }
      if (digits) {
        v *= sign;
        if (c === 71) g.push(Math.round(v * 10) / 10);
        else w[c - 65] = v;
        words++;
      }
      i = j > i + 1 ? j : i + 1;
    }
    if (!words) return;
    this.block(g, w);
  }

  // One block: its G codes and its word values (by letter index).
  block(g, w) {
    let nonModal = null;
    for (let q = 0; q < g.length; q++) {
      const c = g[q];
      if (c === 0 || c === 1 || c === 2 || c === 3) this.motion = c;
      else if (c === 90) { this.absolute = true; this.seen.G90 = 1; }
      else if (c === 91) { this.absolute = false; this.seen.G91 = 1; }
      else if (c === 90.1) { this.arcAbsolute = true; this.seen['G90.1'] = 1; }
      else if (c === 91.1) { this.arcAbsolute = false; this.seen['G91.1'] = 1; }
      else if (c === 20 || c === 21) {
        this.inputInch = c === 20;
        this.seen['G' + c] = 1;
        if (this.reportInch === null && !this.anyMove) this.reportInch = this.inputInch;
      } else if (c === 17 || c === 18 || c === 19) { this.plane = c; this.seen['G' + c] = 1; }
      else if (c === 80) this.motion = null;
      else if (c === 73 || (c >= 81 && c <= 89)) { this.motion = 'cycle'; this.note('canned cycles (G73, G81-G89): positioning drawn as rapids, drilling not drawn'); }
      else if (c === 4 || c === 10 || c === 28 || c === 30 || c === 53 || c === 92 || c === 28.1 || c === 30.1 || c === 92.1) nonModal = c;
    }
    if (nonModal !== null) {
      if (nonModal !== 4) this.note(`G${nonModal} (not drawn; position unchanged)`);
      return; // its axis words are not a move
    }
    const X = w[23], Y = w[24], Z = w[25];
    if ((X !== X && Y !== Y && Z !== Z) || this.motion === null) return; // no axis word (NaN)
    if (this.reportInch === null) this.reportInch = this.inputInch;
    this.anyMove = true;
    const k = this.scale();
    const p = this.pos;
    const t = [p[0], p[1], p[2]];
    if (X === X) t[0] = this.absolute ? X * k : p[0] + X * k;
    if (Y === Y) t[1] = this.absolute ? Y * k : p[1] + Y * k;
    if (Z === Z) t[2] = this.absolute ? Z * k : p[2] + Z * k;
    if (this.motion === 'cycle') {
      t[2] = p[2];
      this.line(t, 0);
    } else if (this.motion === 2 || this.motion === 3) {
      if (this.plane !== 17) {
        this.note('arcs outside the XY plane (G18 / G19): counted as straight lines');
        this.line(t, 1);
      } else this.arc(t, w[8], w[9], w[17], k, this.motion === 2);
    } else this.line(t, this.motion === 0 ? 0 : 1);
  }

  line(t, kind) {
    const p = this.pos;
    const d = Math.hypot(t[0] - p[0], t[1] - p[1], t[2] - p[2]);
    if (d === 0) return;
    this.countMove(kind, d);
    this.include(p[0], p[1], p[2]);
    this.include(t[0], t[1], t[2]);
    this.pos0x = p[0];
    this.pos0y = p[1];
    this.emit(kind, t[0], t[1]);
    this.pos = t;
  }

  countMove(kind, d) {
    this.moves++;
    if ((this.moves & 1023) === 0) {
      // Coarsen as the extent grows, so that even the first chunk sent stays small.
      const e = this.ext;
      this.eps = Math.max(this.eps, Math.hypot(e.xMax - e.xMin, e.yMax - e.yMin) / 2000);
    }
    if (kind === 0) { this.rapidMoves++; this.rapidLength += d; } else { this.cutMoves++; this.cutLength += d; }
  }

  arc(t, I, J, R, k, cw) {
    const p = this.pos;
    let cx, cy;
    if (R === R && I !== I && J !== J) {
      const r = R * k;
      const dx = t[0] - p[0], dy = t[1] - p[1];
      const d = Math.hypot(dx, dy);
      if (d === 0 || d > 2 * Math.abs(r) + 1e-9) {
        this.note('R arcs that cannot reach their end point: counted as straight lines');
        return this.line(t, 1);
      }
      const h = Math.sqrt(Math.max(0, r * r - (d / 2) * (d / 2)));
      // Centre to the right of the chord for a short clockwise arc, to the left for ccw.
      const sign = (cw ? 1 : -1) * (r < 0 ? -1 : 1);
      cx = p[0] + dx / 2 + (sign * h * dy) / d;
      cy = p[1] + dy / 2 - (sign * h * dx) / d;
    } else {
      const i = (I === I ? I : 0) * k, j = (J === J ? J : 0) * k;
      cx = this.arcAbsolute ? i : p[0] + i;
      cy = this.arcAbsolute ? j : p[1] + j;
    }
    const r = Math.hypot(p[0] - cx, p[1] - cy);
    if (r === 0) return this.line(t, 1);
    const a0 = Math.atan2(p[1] - cy, p[0] - cx);
    const a1 = Math.atan2(t[1] - cy, t[0] - cx);
    let sweep = cw ? a0 - a1 : a1 - a0;
    sweep = ((sweep % TAU) + TAU) % TAU;
    if (sweep < 1e-9) sweep = TAU; // end on start: a full circle
    const dz = t[2] - p[2];
    this.arcs++;
    this.countMove(1, Math.hypot(r * sweep, dz));
    this.include(p[0], p[1], p[2]);
    this.include(t[0], t[1], t[2]);
    for (let q = 0; q < 4; q++) {
      const th = (q * Math.PI) / 2;
      const off = cw ? a0 - th : th - a0;
      if (((off % TAU) + TAU) % TAU <= sweep) this.include(cx + r * Math.cos(th), cy + r * Math.sin(th), p[2]);
    }
    this.pos0x = p[0];
    this.pos0y = p[1];
    // Chords of at most 5 degrees, and none shorter than what the drawing keeps anyway.
    const n = Math.max(1, Math.min(Math.ceil(sweep / ARC_STEP), Math.ceil((r * sweep) / (this.eps || 1e-9))));
    for (let s = 1; s < n; s++) {
      const a = cw ? a0 - (sweep * s) / n : a0 + (sweep * s) / n;
      this.emit(1, cx + r * Math.cos(a), cy + r * Math.sin(a));
    }
    this.emit(1, t[0], t[1]);
    this.pos = t;
  }
}

// Streams `url` through a parser, calling post(message) with progress (every ~150 ms), then
// 'done' or 'error'. On the page (sliceMs set) it yields to the event loop every sliceMs.
async function streamGcode(url, post, sliceMs) {
  const parser = new GcodeParser();
  let res;
  try {
    res = await fetch(url, { headers: { Accept: 'text/plain' } });
  } catch (e) {
    post({ type: 'error', message: `could not reach the server: ${e.message}` });
    return;
  }
  if (!res.ok) {
    const text = await res.text().catch(() => '');
    let msg = `${res.status} ${res.statusText}`;
    try {
      const err = JSON.parse(text).error;
      if (err && err.message) msg = `${err.code || res.status}: ${err.message}`;
    } catch (_) {
      if (text) msg += `: ${text.slice(0, 300)}`;
    }
    post({ type: 'error', message: msg, status: res.status });
    return;
  }
  const total = Number(res.headers.get('Content-Length')) || null;
  const decoder = new TextDecoder('utf-8');
  const reader = res.body.getReader();
  let rest = '';
  let bytes = 0;
  let lastPost = Date.now();
  let sliceStart = Date.now();
  const progress = (type) => {
    const { replace, rapid, cut } = parser.take();
    post({ type, bytes, total, stats: parser.stats(), replace, rapid, cut }, [rapid.buffer, cut.buffer]);
  };
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    bytes += value.byteLength;
    const text = rest + decoder.decode(value, { stream: true });
    const lines = text.split(/\r\n|\n|\r/);
    rest = lines.pop();
    for (let i = 0; i < lines.length; i++) {
      parser.feedLine(lines[i]);
      if (sliceMs && (i & 1023) === 0 && Date.now() - sliceStart > sliceMs) {
        await new Promise((r) => setTimeout(r, 0));
        sliceStart = Date.now();
      }
    }
    if (Date.now() - lastPost > 150) {
      progress('progress');
      lastPost = Date.now();
    }
  }
  rest += decoder.decode();
  if (rest !== '') parser.feedLine(rest);
  progress('done');
}

if (typeof document === 'undefined') {
  // Web Worker: one message {url} starts a parse; results go back as messages.
  self.onmessage = (ev) => {
    streamGcode(ev.data.url, (msg, transfer) => self.postMessage(msg, transfer || []), 0).catch((e) =>
      self.postMessage({ type: 'error', message: `G-code parse failed: ${e.message}` }),
    );
  };
} else {
  // The page; see below.
  const SCRIPT_URL = (document.currentScript && document.currentScript.src) || '/assets/app.js';
  window.addEventListener('DOMContentLoaded', () => startPage(SCRIPT_URL));
}

// ============================================================================================
// The page
// ============================================================================================

const API = '/api/rmos/runs';
const STATUSES = ['OK', 'BLOCKED', 'ERROR'];
const RISKS = ['GREEN', 'YELLOW', 'RED', 'UNKNOWN', 'ERROR'];
const EXPLANATIONS = ['NONE', 'PENDING', 'READY', 'ERROR'];
const LIST_FILTERS = ['mode', 'tool_id', 'status', 'risk_level', 'explanation_status', 'since', 'until', 'order', 'limit'];
const HASH_NAMES = ['feasibility_sha256', 'toolpaths_sha256', 'gcode_sha256', 'opplan_sha256'];

let workerUrl = '/assets/app.js';
let view = { gen: 0, cleanup: null };

class ApiError extends Error {
  constructor(code, message, requestId, status) {
    super(message);
    this.code = code;
    this.requestId = requestId;
    this.status = status;
  }
}

// GET (or other) a JSON endpoint; a non-2xx reply becomes an ApiError carrying the API's own
// code, message and request id.
async function api(path) {
  let res;
  setConn('busy');
  try {
    res = await fetch(path, { headers: { Accept: 'application/json' } });
  } catch (e) {
    setConn('down');
    throw new ApiError('unreachable', `could not reach the server (${e.message})`, null, 0);
  }
  const rid = res.headers.get('X-Request-Id');
  const text = await res.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = undefined;
  }
  if (!res.ok) {
    setConn('error');
    const err = body && body.error;
    throw new ApiError(
      (err && err.code) || `http_${res.status}`,
      (err && err.message) || (text ? text.slice(0, 400) : res.statusText),
      (err && err.request_id) || rid,
      res.status,
    );
  }
  setConn('ok');
  if (body === undefined || body === null) throw new ApiError('bad_reply', 'the reply is not JSON', rid, res.status);
  return body;
}

function setConn(state) {
  const el = document.getElementById('conn');
  if (!el) return;
  el.dataset.state = state;
  el.textContent = { busy: 'loading…', ok: 'connected', error: 'request failed', down: 'offline' }[state] || '';
}

// ---- DOM helpers ---------------------------------------------------------------------------

// h('div.card#x', {attrs}, children...): text children are text nodes, never HTML.
function h(spec, attrs, ...kids) {
  const m = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec);
  const el = document.createElement((m && m[1]) || 'div');
  if (m && m[2]) {
    for (const part of m[2].match(/[.#][\w-]+/g)) {
      if (part[0] === '.') el.classList.add(part.slice(1));
      else el.id = part.slice(1);
    }
  }
  if (attrs && (typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs))) {
    kids.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, kids);
  return el;
}

function append(el, kids) {
  for (const k of kids.flat(Infinity)) {
    if (k === null || k === undefined || k === false) continue;
    el.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return el;
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function fmtTime(s) {
  if (!s) return '—';
  const d = new Date(s);
  if (isNaN(d)) return String(s);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z').replace(/Z$/, ' UTC');
}

function ago(s) {
  const d = new Date(s);
  if (isNaN(d)) return '';
  let t = (Date.now() - d.getTime()) / 1000;
  const future = t < 0;
  t = Math.abs(t);
  const units = [[60, 's'], [60, 'min'], [24, 'h'], [365, 'd'], [Infinity, 'y']];
  let v = t, u = 's';
  for (const [n, name] of units) {
    u = name;
    if (v < n) break;
    v /= n;
  }
  const txt = `${Math.floor(v)} ${u}`;
  return future ? `in ${txt}` : `${txt} ago`;
}

function timeEl(s) {
  return h('time', { datetime: s || '', title: s ? `${s} (${ago(s)})` : '' }, fmtTime(s));
}

function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const u = ['B', 'kB', 'MB', 'GB'];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(n < 10 ? 2 : 1) : n} ${u[i]}`;
}

function fmtNum(x, digits = 3) {
  if (typeof x !== 'number' || !isFinite(x)) return '—';
  return Number(x.toFixed(digits)).toLocaleString('en-US', { maximumFractionDigits: digits });
}

function shortHash(s) {
  return s ? `${s.slice(0, 16)}…` : '—';
}

function hashEl(s) {
  if (!s) return h('span.muted', '—');
  return h('code.hash', { title: `${s} (click to copy)`, onclick: () => copy(s) }, shortHash(s));
}

function copy(text) {
  if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
}

function badge(level) {
  const l = level || 'UNKNOWN';
  return h(`span.badge.risk-${l.toLowerCase()}`, { 'data-risk': l }, l);
}

function chip(kind, value) {
  const v = value || '—';
  return h(`span.chip.${kind}-${String(v).toLowerCase()}`, v);
}

function errorBox(e, retry) {
  const isApi = e instanceof ApiError;
  return h(
    'div.error-box',
    { role: 'alert' },
    h('div.error-title', isApi ? `Error: ${e.code}${e.status ? ` (HTTP ${e.status})` : ''}` : 'Error'),
    h('div.error-message', e.message || String(e)),
    isApi && e.requestId ? h('div.error-rid', 'request id ', h('code', e.requestId)) : null,
    retry ? h('button.btn', { onclick: retry }, 'Retry') : null,
  );
}

function card(title, ...body) {
  return h('section.card', h('h2', title), ...body);
}

// A JSON value as a compact key/value table; nested objects one level deep, deeper as JSON.
function valueEl(v, depth = 0) {
  if (v === null || v === undefined) return h('span.muted', 'null');
  if (typeof v === 'boolean') return h(`span.bool.${v}`, String(v));
  if (typeof v === 'number') return h('span.num', String(v));
  if (typeof v === 'string') return h('span.str', v);
  if (Array.isArray(v)) {
    if (v.length === 0) return h('span.muted', '[]');
    if (v.every((x) => x === null || typeof x !== 'object')) return h('span', v.map((x) => JSON.stringify(x)).join(', '));
  } else if (Object.keys(v).length === 0) return h('span.muted', '{}');
  if (depth >= 1 || Array.isArray(v)) return h('pre.json', JSON.stringify(v, null, 2));
  return kvTable(v, depth + 1);
}

function kvTable(obj, depth = 0) {
  const keys = Object.keys(obj || {});
  if (keys.length === 0) return h('p.muted.empty', 'empty');
  return h('table.kv', h('tbody', keys.map((k) => h('tr', h('th', k), h('td', valueEl(obj[k], depth))))));
}

// ---- routing -------------------------------------------------------------------------------
//
// State lives in the hash so that a view can be linked and reloaded:
//   #/?status=OK&risk_level=RED&c=<cursor>&c=<cursor>   the runs table (c: cursors of the pages
//                                                        walked, the last one is shown)
//   #/run/<id>                                           a run
//   #/run/<id>/gcode                                     its G-code view
//   #/run/<id>/history?from=N&to=M                       its revisions and a diff

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const q = raw.indexOf('?');
  const path = q >= 0 ? raw.slice(0, q) : raw;
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '') };
}

function hashFor(path, params) {
  const q = params ? params.toString() : '';
  return `#${path}${q ? `?${q}` : ''}`;
}

function go(path, params) {
  const next = hashFor(path, params);
  if (location.hash === next) route();
  else location.hash = next;
}

function route() {
  if (view.cleanup) view.cleanup();
  view = { gen: view.gen + 1, cleanup: null };
  const { parts, params } = parseHash();
  const app = clear(document.getElementById('app'));
  window.scrollTo(0, 0);
  if (parts[0] === 'run' && parts[1]) runPage(app, parts[1], parts[2] || 'overview', params, view);
  else listPage(app, params, view);
}

function crumbs(...items) {
  const nav = clear(document.getElementById('crumbs'));
  items.filter(Boolean).forEach((it, i) => {
    if (i) nav.appendChild(h('span.sep', '/'));
    nav.appendChild(it.href ? h('a', { href: it.href }, it.text) : h('span', it.text));
  });
}

function startPage(scriptUrl) {
  workerUrl = scriptUrl;
  window.addEventListener('hashchange', route);
  route();
}

// ---- the runs table ------------------------------------------------------------------------

// A datetime-local value (taken as UTC) to RFC 3339, and back.
function localToIso(v) {
  if (!v) return '';
  return `${v.length === 16 ? `${v}:00` : v}Z`;
}
function isoToLocal(v) {
  if (!v) return '';
  const d = new Date(v);
  return isNaN(d) ? '' : d.toISOString().slice(0, 19);
}

function listPage(app, params, me) {
  crumbs({ text: 'Runs' });
  document.title = 'Runs · rmos-runs';
  const cursors = params.getAll('c');
  const setParam = (name, value) => {
    const next = new URLSearchParams(params);
    next.delete('c'); // a new filter starts from the first page
    if (value) next.set(name, value);
    else next.delete(name);
    go('/', next);
  };
  const select = (name, label, options) =>
    h(
      'label.field',
      h('span', label),
      h(
        `select#f-${name}`,
        { name, onchange: (e) => setParam(name, e.target.value) },
        h('option', { value: '' }, 'any'),
        options.map((o) => h('option', { value: o, selected: params.get(name) === o }, o)),
      ),
    );
  const text = (name, label, placeholder) =>
    h(
      'label.field',
      h('span', label),
      h(`input#f-${name}`, { name, value: params.get(name) || '', placeholder, spellcheck: 'false', autocomplete: 'off', onchange: (e) => setParam(name, e.target.value.trim()) }),
    );
  const when = (name, label) =>
    h(
      'label.field',
      h('span', label),
      h(`input#f-${name}`, { type: 'datetime-local', step: '1', name, value: isoToLocal(params.get(name)), onchange: (e) => setParam(name, localToIso(e.target.value)) }),
    );
  const presets = [['', 'any time'], ['3600', 'last hour'], ['86400', 'last 24 h'], ['604800', 'last 7 days'], ['2592000', 'last 30 days']];
  const range = h(
    'label.field',
    h('span', 'Range'),
    h(
      'select#f-range',
      {
        onchange: (e) => {
          const next = new URLSearchParams(params);
          next.delete('c');
          next.delete('until');
          if (e.target.value) next.set('since', new Date(Date.now() - Number(e.target.value) * 1000).toISOString().replace(/\.\d+Z$/, 'Z'));
          else next.delete('since');
          go('/', next);
        },
      },
      presets.map(([v, t]) => h('option', { value: v }, t)),
    ),
  );
  const active = LIST_FILTERS.filter((f) => params.get(f) && f !== 'limit' && f !== 'order');
  const filters = h(
    'form.filters',
    { onsubmit: (e) => e.preventDefault() },
    text('mode', 'Mode', 'e.g. cam'),
    text('tool_id', 'Tool', 'e.g. T102'),
    select('status', 'Status', STATUSES),
    select('risk_level', 'Risk', RISKS),
    select('explanation_status', 'Explanation', EXPLANATIONS),
    range,
    when('since', 'Since (UTC)'),
    when('until', 'Until (UTC)'),
    h(
      'label.field',
      h('span', 'Order'),
      h(
        'select#f-order',
        { onchange: (e) => setParam('order', e.target.value === 'newest' ? '' : e.target.value) },
        ['newest', 'oldest', 'id'].map((o) => h('option', { value: o, selected: (params.get('order') || 'newest') === o }, o === 'id' ? 'run id' : `${o} first`)),
      ),
    ),
    h(
      'label.field',
      h('span', 'Per page'),
      h(
        'select#f-limit',
        { onchange: (e) => setParam('limit', e.target.value === '50' ? '' : e.target.value) },
        ['20', '50', '100', '200'].map((o) => h('option', { value: o, selected: (params.get('limit') || '50') === o }, o)),
      ),
    ),
    active.length ? h('button.btn.ghost#f-clear', { type: 'button', onclick: () => go('/', null) }, `Clear ${active.length} filter${active.length > 1 ? 's' : ''}`) : null,
  );
  const body = h('div.list-body', h('div.loading', 'Loading runs…'));
  app.appendChild(h('div.page', h('div.page-head', h('h1', 'Runs'), h('span.muted#list-summary')), filters, body));

  const q = new URLSearchParams();
  for (const f of LIST_FILTERS) if (params.get(f)) q.set(f, params.get(f));
  if (!q.has('limit')) q.set('limit', '50');
  if (cursors.length) q.set('cursor', cursors[cursors.length - 1]);
  const load = () => {
    clear(body).appendChild(h('div.loading', 'Loading runs…'));
    api(`${API}?${q}`)
      .then((page) => {
        if (me !== view) return;
        renderList(body, page, params, cursors, Number(q.get('limit')));
      })
      .catch((e) => {
        if (me !== view) return;
        clear(body).appendChild(errorBox(e, load));
        body.dataset.state = 'error';
      });
  };
  load();
}

function renderList(body, page, params, cursors, limit) {
  clear(body);
  const runs = page.runs || [];
  const first = cursors.length * limit + 1;
  const summary = document.getElementById('list-summary');
  if (summary) summary.textContent = runs.length ? `showing ${first}–${first + runs.length - 1}${page.next_cursor ? '' : ' (end)'}` : '';
  if (page.index_complete === false) body.appendChild(h('div.notice', 'The run index is still being built: this listing may miss runs for now.'));
  if (page.skipped_corrupt) body.appendChild(h('div.notice.warn', `${page.skipped_corrupt} run(s) left out because their record could not be read (see verify).`));
  if (runs.length === 0) {
    body.dataset.state = 'empty';
    const filtered = LIST_FILTERS.some((f) => params.get(f) && f !== 'limit' && f !== 'order');
    body.appendChild(
      h(
        'div.empty-state#runs-empty',
        h('div.empty-title', filtered ? 'No runs match these filters.' : cursors.length ? 'No more runs.' : 'No runs recorded yet.'),
        filtered ? h('button.btn', { onclick: () => go('/', null) }, 'Clear filters') : h('p.muted', 'Runs appear here as the feasibility engine publishes them.'),
      ),
    );
  } else {
    body.dataset.state = 'ok';
    const rows = runs.map((r) =>
      h(
        'tr.run-row',
        { 'data-run-id': r.run_id, tabindex: '0', onclick: (e) => { if (!e.target.closest('a')) go(`/run/${r.run_id}`); }, onkeydown: (e) => { if (e.key === 'Enter') go(`/run/${r.run_id}`); } },
        h('td.t', timeEl(r.created_at_utc)),
        h('td', h('a.run-link.mono', { href: `#/run/${encodeURIComponent(r.run_id)}` }, r.run_id)),
        h('td', r.mode),
        h('td.mono', r.tool_id),
        h('td', chip('status', r.status)),
        h('td', badge(r.risk_level)),
        h('td', chip('expl', r.explanation_status)),
        h('td.num', r.revision),
        h('td.t', r.updated_at_utc ? h('span', { title: r.updated_at_utc }, ago(r.updated_at_utc)) : h('span.muted', '—')),
      ),
    );
    body.appendChild(
      h(
        'div.table-wrap',
        h(
          'table.runs#runs-table',
          h('thead', h('tr', ['Created', 'Run', 'Mode', 'Tool', 'Status', 'Risk', 'Explanation', 'Rev', 'Updated'].map((t) => h('th', t)))),
          h('tbody', rows),
        ),
      ),
    );
  }
  const pageTo = (stack) => {
    const next = new URLSearchParams(params);
    next.delete('c');
    for (const c of stack) next.append('c', c);
    go('/', next);
  };
  body.appendChild(
    h(
      'div.pager',
      h('button.btn#page-first', { disabled: !cursors.length, onclick: () => pageTo([]) }, '⇤ First'),
      h('button.btn#page-prev', { disabled: !cursors.length, onclick: () => pageTo(cursors.slice(0, -1)) }, '← Previous'),
      h('span.muted', `page ${cursors.length + 1}`),
      h('button.btn#page-next', { disabled: !page.next_cursor, onclick: () => pageTo([...cursors, page.next_cursor]) }, 'Next →'),
    ),
  );
}

// ---- a run ---------------------------------------------------------------------------------

function runPage(app, runId, tab, params, me) {
  const base = `/run/${encodeURIComponent(runId)}`;
  crumbs({ text: 'Runs', href: '#/' }, { text: runId, href: `#${base}` }, tab !== 'overview' ? { text: tab === 'gcode' ? 'G-code' : 'History' } : null);
  document.title = `${runId} · rmos-runs`;
  const head = h('div.run-head', h('h1.mono', runId), h('div.loading', 'Loading run…'));
  const tabs = h(
    'nav.tabs',
    [['overview', 'Overview', base], ['gcode', 'G-code', `${base}/gcode`], ['history', 'History', `${base}/history`]].map(([id, label, href]) =>
      h(`a.tab#tab-${id}`, { href: `#${href}`, 'aria-current': id === tab ? 'page' : null }, label),
    ),
  );
  const body = h('div.run-body');
  app.appendChild(h('div.page', head, tabs, body));
  const rid = encodeURIComponent(runId);
  const load = () =>
    api(`${API}/${rid}`)
      .then((a) => {
        if (me !== view) return;
        renderRunHead(head, a);
        if (tab === 'gcode') gcodeView(body, a, me);
        else if (tab === 'history') historyView(body, a, params, me);
        else overview(body, a, me);
      })
      .catch((e) => {
        if (me !== view) return;
        clear(head).appendChild(h('h1.mono', runId));
        clear(body).appendChild(errorBox(e, () => route()));
      });
  load();
}

function renderRunHead(head, a) {
  const d = a.decision || {};
  clear(head).append(
    h(
      'div.run-title',
      h('div.risk-big#risk-badge', { 'data-risk': d.risk_level || 'UNKNOWN' }, badge(d.risk_level)),
      h('div', h('h1.mono', a.run_id), h('div.run-sub', chip('status', a.status), ' ', h('span', 'mode ', h('b', a.mode)), ' · ', h('span', 'tool ', h('b.mono', a.tool_id)), ' · ', h('span', `revision ${a.revision ?? 1}`))),
    ),
    h(
      'dl.facts',
      h('div', h('dt', 'Created'), h('dd', timeEl(a.created_at_utc))),
      h('div', h('dt', 'Updated'), h('dd', a.updated_at_utc ? timeEl(a.updated_at_utc) : '—')),
      h('div', h('dt', 'Score'), h('dd', d.score === null || d.score === undefined ? '—' : fmtNum(d.score, 2))),
      h('div', h('dt', 'Explanation'), h('dd', chip('expl', a.explanation_status))),
      h('div', h('dt', 'Request id'), h('dd.mono', (a.meta && a.meta.request_id) || '—')),
    ),
  );
}

function overview(body, a, me) {
  const d = a.decision || {};
  const rid = encodeURIComponent(a.run_id);
  const warnings = d.warnings || [];
  const decision = card(
    'Decision',
    d.block_reason ? h('div.block-reason#block-reason', h('b', 'Blocked: '), d.block_reason) : null,
    h('div.warnings#warnings', warnings.length ? h('ul', warnings.map((w) => h('li', w))) : h('p.muted', 'No warnings.')),
    h('table.kv', h('tbody', h('tr', h('th', 'risk level'), h('td', badge(d.risk_level))), h('tr', h('th', 'score'), h('td', d.score ?? '—')))),
    Object.keys(d.details || {}).length ? [h('h3', 'Details'), kvTable(d.details)] : null,
  );
  const advisories = h('div.advisories#advisories');
  const advCard = card('Explanation and advisories', a.explanation_summary ? h('p.summary#explanation-summary', a.explanation_summary) : null, advisories);
  const list = a.advisory_inputs || [];
  if (!list.length) advisories.appendChild(h('p.muted', 'No advisories attached.'));
  for (const ref of list) {
    const text = h('div.adv-body', h('span.muted', 'loading…'));
    advisories.appendChild(
      h(
        'article.advisory',
        { 'data-advisory-id': ref.advisory_id },
        h('header', chip('kind', ref.kind), h('code.mono', ref.advisory_id), h('span.muted', [ref.engine_id, ref.engine_version].filter(Boolean).join(' ')), h('span.spacer'), timeEl(ref.created_at_utc)),
        text,
      ),
    );
    if (!ref.body) {
      clear(text).appendChild(h('p.muted', 'No body stored (recorded by the original service).'));
      continue;
    }
    api(`${API}/${rid}/advisories/${encodeURIComponent(ref.advisory_id)}`)
      .then((b) => {
        if (me !== view) return;
        clear(text);
        if (b && typeof b === 'object' && typeof b.text === 'string') {
          text.appendChild(h('p.adv-text', b.text));
          const rest = { ...b };
          delete rest.text;
          if (Object.keys(rest).length) text.appendChild(kvTable(rest, 1));
        } else text.appendChild(typeof b === 'string' ? h('p.adv-text', b) : valueEl(b, 1));
      })
      .catch((e) => me === view && clear(text).appendChild(errorBox(e)));
  }
  const hashes = h('div#hashes', h('p.muted', 'Verifying…'));
  const hashRows = h('tbody', HASH_NAMES.map((n) => h('tr', { 'data-hash': n }, h('th', n.replace('_sha256', '')), h('td', hashEl((a.hashes || {})[n])), h('td.verify', h('span.muted', '…')))));
  const hashCard = card('Hashes', h('table.kv.hashes', hashRows), hashes);
  api(`${API}/${rid}/hashes`)
    .then((rep) => {
      if (me !== view) return;
      renderVerify(hashes, hashRows, rep);
    })
    .catch((e) => me === view && clear(hashes).appendChild(errorBox(e)));

  const o = a.outputs || {};
  const gsize = o.gcode_blob ? o.gcode_blob.size_bytes : typeof o.gcode_text === 'string' ? new TextEncoder().encode(o.gcode_text).length : null;
  const hasGcode = gsize !== null;
  const otherOut = { ...o };
  for (const k of ['gcode_text', 'gcode_blob', 'opplan_json', 'opplan_blob']) delete otherOut[k];
  for (const k of Object.keys(otherOut)) if (otherOut[k] === null) delete otherOut[k];
  const outputs = card(
    'Outputs',
    h(
      'table.kv',
      h(
        'tbody',
        h('tr', h('th', 'G-code'), h('td', hasGcode ? [fmtBytes(gsize), o.gcode_blob ? ' (stored as blob) ' : ' ', h('a.btn.small#open-gcode', { href: `#/run/${rid}/gcode` }, 'Draw toolpath'), ' ', h('a.small', { href: `${API}/${rid}/outputs/gcode`, download: `${a.run_id}.nc` }, 'download')] : h('span.muted', 'none'))),
        h('tr', h('th', 'op plan'), h('td', o.opplan_blob ? [fmtBytes(o.opplan_blob.size_bytes), ' ', h('a.small', { href: `${API}/${rid}/outputs/opplan` }, 'open JSON')] : o.opplan_json ? h('details', h('summary', `JSON, ${Object.keys(o.opplan_json).length} key${Object.keys(o.opplan_json).length === 1 ? '' : 's'}`), h('pre.json', JSON.stringify(o.opplan_json, null, 2))) : h('span.muted', 'none'))),
        Object.entries(otherOut).map(([k, v]) => h('tr', h('th', k), h('td', valueEl(v, 1)))),
      ),
    ),
  );
  body.appendChild(
    h(
      'div.grid',
      h('div.col', decision, advCard, card('Feasibility', kvTable(a.feasibility)), card('Request summary', kvTable(a.request_summary))),
      h('div.col', hashCard, outputs, card('Meta', kvTable(a.meta))),
    ),
  );
}

function renderVerify(box, rows, rep) {
  clear(box);
  const checks = rep.checks || [];
  const byName = {};
  for (const c of checks) byName[c.name] = c;
  for (const tr of rows.querySelectorAll('tr[data-hash]')) {
    const c = byName[`hashes.${tr.dataset.hash}`];
    const cell = clear(tr.querySelector('td.verify'));
    cell.appendChild(c ? verifyMark(c.status, c.actual && c.actual !== c.expected ? `content hashes to ${c.actual}` : '') : h('span.muted', 'not checked'));
  }
  const others = checks.filter((c) => !c.name.startsWith('hashes.'));
  const chain = rep.chain;
  box.append(
    h('div.verify-summary', { 'data-ok': String(!!rep.ok) }, rep.ok ? '✓ Every hash and the revision chain verify.' : '✗ Integrity check failed.'),
    others.length ? h('table.kv.checks', h('tbody', others.map((c) => h('tr', h('th.mono', c.name.length > 40 ? `${c.name.slice(0, 40)}…` : c.name), h('td', verifyMark(c.status)))))) : null,
    chain
      ? h(
          'p.chain',
          chain.ok ? verifyMark('ok') : verifyMark('mismatch'),
          ` hash chain: ${chain.revisions} revision${chain.revisions === 1 ? '' : 's'}`,
          chain.starts_at && chain.starts_at > 1 ? `, from revision ${chain.starts_at}` : '',
          chain.signatures_checked ? ', signatures checked' : '',
          chain.pending ? `, revision ${chain.pending} pending` : '',
          chain.broken ? h('span.bad', ` — revision ${chain.broken.revision}: ${chain.broken.reason} (${chain.broken.detail})`) : '',
        )
      : null,
  );
}

function verifyMark(status, why) {
  const label = { ok: '✓ ok', mismatch: '✗ mismatch', missing: '⚠ missing' }[status] || status;
  return h(`span.verify-${status}`, { title: why || status, 'data-status': status }, label);
}

// ---- the G-code view -----------------------------------------------------------------------

function gcodeView(body, a, me) {
  const rid = encodeURIComponent(a.run_id);
  const o = a.outputs || {};
  if (!o.gcode_blob && typeof o.gcode_text !== 'string') {
    body.appendChild(h('div.empty-state', h('div.empty-title', 'This run has no G-code.')));
    return;
  }
  const total = o.gcode_blob ? o.gcode_blob.size_bytes : null;
  const bar = h('div.progress-bar');
  const progress = h('div.progress#gc-progress', bar, h('span.progress-text', 'Fetching G-code…'));
  const stats = h('dl.facts.gc-stats#gc-stats');
  const notes = h('div.gc-notes');
  const canvas = h('canvas');
  const plotEl = h('div.plot#gcode-plot', { 'data-state': 'loading' }, canvas);
  const toolbar = h(
    'div.plot-tools',
    h('span.legend', h('i.sw.cut'), 'cut (G1 G2 G3)', h('i.sw.rapid'), 'rapid (G0)', h('i.sw.start'), 'start', h('i.sw.end'), 'end'),
    h('span.spacer'),
    h('span.muted', 'wheel: zoom · drag: pan · double-click: fit'),
    h('button.btn.small', { onclick: () => plot.fit() }, 'Fit'),
    h('a.btn.small', { href: `${API}/${rid}/outputs/gcode`, download: `${a.run_id}.nc` }, 'Download'),
  );
  body.appendChild(h('div.gcode', h('div.gc-side', progress, stats, notes), h('div.gc-main', toolbar, plotEl)));
  const plot = new Plot(canvas);
  let last = null;
  const show = (m, done) => {
    const s = m.stats;
    last = s;
    if (m.replace) plot.clear();
    plot.add(m.rapid, m.cut);
    if (s.extent) plot.setExtent(s.extent);
    plot.endPoint = s.end;
    plot.schedule();
    const pct = m.total || total ? Math.min(100, (m.bytes / (m.total || total)) * 100) : null;
    bar.style.width = done ? '100%' : pct !== null ? `${pct.toFixed(1)}%` : '30%';
    progress.querySelector('.progress-text').textContent = done
      ? `Parsed ${fmtBytes(m.bytes)}, ${s.lines.toLocaleString('en-US')} lines`
      : `Parsing… ${fmtBytes(m.bytes)}${pct !== null ? ` (${pct.toFixed(0)}%)` : ''}, ${s.lines.toLocaleString('en-US')} lines`;
    renderGcodeStats(stats, notes, s);
  };
  const finish = (m) => {
    show(m, true);
    progress.classList.add('done');
    const s = m.stats;
    const e = s.extent;
    Object.assign(plotEl.dataset, {
      state: 'done',
      moves: String(s.moves),
      cutMoves: String(s.cutMoves),
      rapidMoves: String(s.rapidMoves),
      cutLength: String(s.cutLength),
      rapidLength: String(s.rapidLength),
      lines: String(s.lines),
      units: s.units,
    });
    if (e) {
      Object.assign(plotEl.dataset, { xMin: String(e.xMin), xMax: String(e.xMax), yMin: String(e.yMin), yMax: String(e.yMax), zMin: String(e.zMin), zMax: String(e.zMax) });
    }
    plot.drawNow();
  };
  const fail = (m) => {
    plotEl.dataset.state = 'error';
    progress.classList.add('failed');
    progress.querySelector('.progress-text').textContent = 'Could not draw the G-code';
    body.querySelector('.gc-side').insertBefore(errorBox(new ApiError(m.status ? `http_${m.status}` : 'gcode', m.message, null, m.status || 0)), stats);
  };
  const onMessage = (m) => {
    if (me !== view) return;
    if (m.type === 'progress') show(m, false);
    else if (m.type === 'done') finish(m);
    else if (m.type === 'error') fail(m);
  };
  const url = `${API}/${rid}/outputs/gcode`;
  let worker = null;
  try {
    worker = new Worker(workerUrl);
  } catch (_) {
    worker = null; // no workers here (policy): parse on the page in short slices
  }
  if (worker) {
    worker.onmessage = (ev) => onMessage(ev.data);
    worker.onerror = (ev) => onMessage({ type: 'error', message: `G-code worker failed: ${ev.message || 'error'}` });
    worker.postMessage({ url: new URL(url, location.href).href });
    me.cleanup = () => worker.terminate();
  } else {
    streamGcode(url, onMessage, 12);
  }
  plot.onResize = () => last && plot.schedule();
}

function renderGcodeStats(dl, notes, s) {
  const e = s.extent;
  const u = s.units;
  const row = (id, label, ...val) => h('div', { id }, h('dt', label), h('dd', ...val));
  clear(dl).append(
    row('gc-x', 'X extent', e ? `${fmtNum(e.xMin)} … ${fmtNum(e.xMax)} ${u}` : '—'),
    row('gc-y', 'Y extent', e ? `${fmtNum(e.yMin)} … ${fmtNum(e.yMax)} ${u}` : '—'),
    row('gc-z', 'Z range', e ? `${fmtNum(e.zMin)} … ${fmtNum(e.zMax)} ${u}` : '—'),
    row('gc-size', 'Size (X × Y)', e ? `${fmtNum(e.xMax - e.xMin)} × ${fmtNum(e.yMax - e.yMin)} ${u}` : '—'),
    row('gc-cut', 'Cut length', h('span.cut-text', `${fmtNum(s.cutLength)} ${u}`), h('span.muted', ` · ${s.cutMoves.toLocaleString('en-US')} moves, ${s.arcs.toLocaleString('en-US')} arcs`)),
    row('gc-rapid', 'Rapid length', h('span.rapid-text', `${fmtNum(s.rapidLength)} ${u}`), h('span.muted', ` · ${s.rapidMoves.toLocaleString('en-US')} moves`)),
    row('gc-lines', 'Lines', s.lines.toLocaleString('en-US')),
    row('gc-modes', 'Modes seen', s.seen.length ? s.seen.join(' ') : h('span.muted', 'none (G21 G90 assumed)')),
  );
  const n = Object.entries(s.notes || {});
  clear(notes);
  if (n.length) notes.appendChild(h('div.notice', h('b', 'Not drawn exactly'), h('ul', n.map(([k, v]) => h('li', `${k}: ${v}×`)))));
  notes.appendChild(h('p.muted.small', 'Start at X0 Y0 Z0 (work origin). Lengths are 3-D; arcs are exact, drawn as 5° chords; the drawing is decimated, the figures are not.'));
}

// A zoomable XY plot of decimated polylines (Float32Array chunks, NaN pairs break a line).
class Plot {
  constructor(canvas) {
    this.canvas = canvas;
    this.chunks = [[], []];
    this.points = [0, 0];
    this.drawMs = 0;
    this.ext = null;
    this.view = null; // {cx, cy, s} once the user zooms or pans; null: fit the extent
    this.pending = false;
    this.lastDraw = 0;
    this.onResize = null;
    const ro = new ResizeObserver(() => this.drawNow());
    ro.observe(canvas);
    canvas.addEventListener('wheel', (e) => {
      e.preventDefault();
      const t = this.transform();
      if (!t) return;
      const r = canvas.getBoundingClientRect();
      const mx = e.clientX - r.left, my = e.clientY - r.top;
      const wx = (mx - t.ox) / t.s, wy = (t.oy - my) / t.s;
      const s = t.s * Math.exp(-e.deltaY * 0.0015);
      this.view = { s, ox: mx - wx * s, oy: my + wy * s };
      this.drawNow();
    }, { passive: false });
    let drag = null;
    canvas.addEventListener('pointerdown', (e) => {
      const t = this.transform();
      if (!t) return;
      drag = { x: e.clientX, y: e.clientY, t };
      canvas.setPointerCapture(e.pointerId);
    });
    canvas.addEventListener('pointermove', (e) => {
      if (!drag) return;
      this.view = { s: drag.t.s, ox: drag.t.ox + e.clientX - drag.x, oy: drag.t.oy + e.clientY - drag.y };
      this.drawNow();
    });
    canvas.addEventListener('pointerup', () => { drag = null; });
    canvas.addEventListener('dblclick', () => this.fit());
  }
  fit() {
    this.view = null;
    this.drawNow();
  }
  clear() {
    this.chunks = [[], []];
    this.points = [0, 0];
  }
  add(rapid, cut) {
    if (rapid && rapid.length) { this.chunks[0].push(rapid); this.points[0] += rapid.length / 2; }
    if (cut && cut.length) { this.chunks[1].push(cut); this.points[1] += cut.length / 2; }
  }
  setExtent(e) {
    this.ext = e;
  }
  // Redraws while a program streams in, leaving the page at least 80% of its time.
  schedule() {
    if (this.pending) return;
    this.pending = true;
    const wait = Math.max(0, Math.max(250, this.drawMs * 5) - (Date.now() - this.lastDraw));
    setTimeout(() => requestAnimationFrame(() => { this.pending = false; this.drawNow(); }), wait);
  }
  size() {
    const dpr = window.devicePixelRatio || 1;
    const w = this.canvas.clientWidth, hgt = this.canvas.clientHeight;
    if (this.canvas.width !== Math.round(w * dpr) || this.canvas.height !== Math.round(hgt * dpr)) {
      this.canvas.width = Math.round(w * dpr);
      this.canvas.height = Math.round(hgt * dpr);
    }
    return { w, h: hgt, dpr };
  }
  // Screen = (ox + x * s, oy - y * s), in CSS pixels.
  transform() {
    const { w, h: hgt } = this.size();
    if (this.view) return this.view;
    const e = this.ext;
    if (!e || !w || !hgt) return null;
    const m = 48;
    const ew = e.xMax - e.xMin, eh = e.yMax - e.yMin;
    const s = ew === 0 && eh === 0 ? 1 : Math.min(ew ? (w - 2 * m) / ew : Infinity, eh ? (hgt - 2 * m) / eh : Infinity);
    return { s, ox: w / 2 - ((e.xMin + e.xMax) / 2) * s, oy: hgt / 2 + ((e.yMin + e.yMax) / 2) * s };
  }
  drawNow() {
    const t0 = performance.now();
    this.paint();
    this.canvas.getContext('2d').getImageData(0, 0, 1, 1); // the raster happens here, timed
    this.lastDraw = Date.now();
    this.drawMs = performance.now() - t0;
    this.canvas.dataset.drawMs = String(Math.round(this.drawMs));
  }
  paint() {
    const { w, h: hgt, dpr } = this.size();
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, hgt);
    const t = this.transform();
    if (!t) return;
    this.grid(ctx, t, w, hgt);
    const styles = [
      { color: '#e8590c', width: 1, dash: [4, 4], alpha: 0.75 },
      { color: '#1864ab', width: 1.25, dash: [], alpha: 1 },
    ];
    for (let k = 0; k < 2; k++) {
      const st = styles[k];
      ctx.strokeStyle = st.color;
      ctx.lineWidth = st.width;
      // Dashes cost as much again to raster: a dense drawing gets plain rapids.
      ctx.setLineDash(this.points[k] < 20000 ? st.dash : []);
      ctx.globalAlpha = st.alpha;
      for (const c of this.chunks[k]) {
        ctx.beginPath();
        let pen = false;
        for (let i = 0; i < c.length; i += 2) {
          const x = c[i], y = c[i + 1];
          if (x !== x) { pen = false; continue; } // NaN: a break
          const sx = t.ox + x * t.s, sy = t.oy - y * t.s;
          if (pen) ctx.lineTo(sx, sy);
          else { ctx.moveTo(sx, sy); pen = true; }
        }
        ctx.stroke();
      }
    }
    ctx.setLineDash([]);
    ctx.globalAlpha = 1;
    // Start (the origin) and end markers.
    const endpoints = this.endpoints();
    if (endpoints) {
      const [s, e] = endpoints;
      ctx.fillStyle = '#2b8a3e';
      ctx.beginPath();
      ctx.arc(t.ox + s[0] * t.s, t.oy - s[1] * t.s, 4, 0, TAU);
      ctx.fill();
      ctx.fillStyle = '#c92a2a';
      ctx.fillRect(t.ox + e[0] * t.s - 3.5, t.oy - e[1] * t.s - 3.5, 7, 7);
    }
  }
  endpoints() {
    if (!this.chunks[0].length && !this.chunks[1].length) return null;
    return [[0, 0], this.endPoint || [0, 0]];
  }
  grid(ctx, t, w, hgt) {
    const step = niceStep(70 / t.s);
    const x0 = (0 - t.ox) / t.s, x1 = (w - t.ox) / t.s;
    const y0 = (t.oy - hgt) / t.s, y1 = t.oy / t.s;
    ctx.lineWidth = 1;
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = '#868e96';
    for (let x = Math.ceil(x0 / step) * step; x <= x1; x += step) {
      const sx = Math.round(t.ox + x * t.s) + 0.5;
      ctx.strokeStyle = Math.abs(x) < step / 2 ? '#adb5bd' : '#eef0f3';
      ctx.beginPath(); ctx.moveTo(sx, 0); ctx.lineTo(sx, hgt); ctx.stroke();
      ctx.fillText(fmtTick(x, step), sx + 3, hgt - 5);
    }
    for (let y = Math.ceil(y0 / step) * step; y <= y1; y += step) {
      const sy = Math.round(t.oy - y * t.s) + 0.5;
      ctx.strokeStyle = Math.abs(y) < step / 2 ? '#adb5bd' : '#eef0f3';
      ctx.beginPath(); ctx.moveTo(0, sy); ctx.lineTo(w, sy); ctx.stroke();
      ctx.fillText(fmtTick(y, step), 4, sy - 3);
    }
    const e = this.ext;
    if (e) {
      // The extent as a thin box.
      ctx.strokeStyle = '#94d82d';
      ctx.setLineDash([2, 3]);
      ctx.strokeRect(t.ox + e.xMin * t.s, t.oy - e.yMax * t.s, (e.xMax - e.xMin) * t.s, (e.yMax - e.yMin) * t.s);
      ctx.setLineDash([]);
    }
  }
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

function fmtTick(v, step) {
  const d = Math.max(0, -Math.floor(Math.log10(step)));
  return (Math.abs(v) < step / 1e6 ? 0 : v).toFixed(d);
}

// ---- revision history and diffs ------------------------------------------------------------

async function allRevisions(rid) {
  let revisions = [];
  let cursor = null;
  for (let pages = 0; pages < 50; pages++) {
    const q = new URLSearchParams({ limit: '200' });
    if (cursor) q.set('cursor', cursor);
    const page = await api(`${API}/${rid}/history?${q}`);
    revisions = revisions.concat(page.revisions || []);
    cursor = page.next_cursor;
    if (!cursor) return { revisions, more: false };
  }
  return { revisions, more: true };
}

function historyView(body, a, params, me) {
  const rid = encodeURIComponent(a.run_id);
  const base = `/run/${rid}/history`;
  const latest = a.revision || 1;
  let to = Number(params.get('to')) || latest;
  let from = params.has('from') ? Number(params.get('from')) : to - 1;
  const tableBox = h('div#history', h('div.loading', 'Loading history…'));
  const diffBox = h('div#diff');
  body.appendChild(h('div.history', card('Revisions', tableBox), card('Changes', diffBox)));
  allRevisions(rid)
    .then(({ revisions, more }) => {
      if (me !== view) return;
      clear(tableBox);
      if (!revisions.length) {
        tableBox.appendChild(h('p.muted', 'No revision history kept for this run (recorded before history was kept).'));
        return;
      }
      const hasActor = revisions.some((r) => r.actor);
      const rows = revisions.map((r, i) => {
        const prev = revisions[i - 1];
        const linked = i === 0 ? r.prev_sha256 === null || r.prev_sha256 === undefined || r.revision > 1 : prev.artifact_sha256 === r.prev_sha256;
        return h(
          'tr.rev-row',
          { 'data-revision': r.revision, class: r.revision === to ? 'rev-row selected' : 'rev-row' },
          h('td.num', h('b', r.revision)),
          h('td', chip('event', r.event)),
          h('td.t', timeEl(r.at)),
          h('td.mono.small', r.request_id || h('span.muted', '—')),
          hasActor ? h('td', r.actor || h('span.muted', '—')) : null,
          h('td', hashEl(r.artifact_sha256)),
          h('td', r.prev_sha256 ? [linked ? h('span.verify-ok', { title: 'points at the revision before' }, '✓ ') : h('span.verify-mismatch', { title: 'does not match the revision before' }, '✗ '), hashEl(r.prev_sha256)] : h('span.muted', 'start')),
          h('td', r.revision > revisions[0].revision ? h('a.btn.small', { href: hashFor(base, new URLSearchParams({ from: r.revision - 1, to: r.revision })) }, 'diff') : null),
        );
      });
      tableBox.appendChild(
        h(
          'div.table-wrap',
          h(
            'table.runs.revisions#revisions',
            h('thead', h('tr', ['Rev', 'Event', 'At', 'Request id', hasActor ? 'Actor' : null, 'Record sha256', 'Previous', ''].filter((x) => x !== null).map((t) => h('th', t)))),
            h('tbody', rows),
          ),
        ),
      );
      if (more) tableBox.appendChild(h('p.muted', 'Only the first 10,000 revisions are shown.'));
      const revs = revisions.map((r) => r.revision);
      const pick = (id, value) => h(`select#${id}`, revs.map((r) => h('option', { value: r, selected: r === value }, `rev ${r}`)));
      const fromSel = pick('diff-from', from);
      const toSel = pick('diff-to', to);
      diffBox.before(
        h(
          'form.diff-pick',
          { onsubmit: (e) => { e.preventDefault(); go(base, new URLSearchParams({ from: fromSel.value, to: toSel.value })); } },
          'Compare ', fromSel, ' with ', toSel, ' ', h('button.btn.small#diff-go', { type: 'submit' }, 'Show changes'),
        ),
      );
    })
    .catch((e) => me === view && clear(tableBox).appendChild(errorBox(e)));

  if (latest < 2 && !params.has('from')) {
    diffBox.appendChild(h('p.muted', 'Only one revision: nothing changed since the run was created.'));
    return;
  }
  diffBox.appendChild(h('div.loading', 'Loading changes…'));
  api(`${API}/${rid}/diff?from=${from}&to=${to}`)
    .then((d) => {
      if (me !== view) return;
      renderDiff(diffBox, d);
    })
    .catch((e) => me === view && clear(diffBox).appendChild(errorBox(e)));
}

function renderDiff(box, d) {
  clear(box);
  const changes = d.changes || [];
  const fr = d.from || {}, to = d.to || {};
  box.dataset.from = fr.revision;
  box.dataset.to = to.revision;
  box.appendChild(h('p.diff-head', h('b', `revision ${fr.revision} → ${to.revision}`), `: ${changes.length} change${changes.length === 1 ? '' : 's'}`));
  if (!changes.length) return;
  const cell = (v, side) => {
    if (v === undefined) return h(`td.diff-${side}.absent`, side === 'before' ? '(added)' : '(removed)');
    if (v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 2 && 'sha256' in v && 'size_bytes' in v)
      return h(`td.diff-${side}`, h('span.muted', `‹${fmtBytes(v.size_bytes)}, sha256 ${shortHash(v.sha256)}›`));
    const text = typeof v === 'string' ? JSON.stringify(v) : JSON.stringify(v, null, 1);
    return h(`td.diff-${side}`, h('code.val', text));
  };
  box.appendChild(
    h(
      'div.table-wrap',
      h(
        'table.diff#diff-table',
        h('thead', h('tr', h('th', 'Path'), h('th', 'Before'), h('th', 'After'))),
        h('tbody', changes.map((c) => h('tr.diff-row', { 'data-path': c.path }, h('td.mono.path', c.path), cell(c.before, 'before'), cell(c.after, 'after')))),
      ),
    ),
  );
}
