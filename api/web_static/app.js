// carbonx web page: market, projects, the neutrality wizard and certificate verification.
// Plain ES modules; everything comes from this exchange's public REST API and its websocket feed.
// Routes live in the URL fragment (#/market/SYMBOL, #/projects/CODE, #/neutrality, #/verify/CODE);
// a fragment "#key=…" (what `carbonx serve --demo` prints) hands the page a member's API key.

import { Feed } from './feed.js';
import { initialLang, lang, setLang, t } from './i18n.js';

const KEY_STORE = 'carbonx.key';
const state = {
  key: sessionStorage.getItem(KEY_STORE),
  account: null,
  instruments: [],
  feed: null,
  feedStatus: 'connecting',
  view: null, // cleanup of the current view
  wizard: null, // the neutrality wizard's state survives a language switch
};

// ---- small helpers -------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'value') node.value = v;
    else if (k === 'checked') node.checked = v;
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.detail || `HTTP ${status}`);
    this.status = status;
    this.code = body?.code || (status === 0 ? 'network' : 'error');
    this.detail = body?.detail || this.message;
    this.title = body?.title || '';
  }
}

async function api(path, { method = 'GET', body, auth = false, idempotencyKey } = {}) {
  const headers = { Accept: 'application/json' };
  if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (auth && state.key) headers.Authorization = `Bearer ${state.key}`;
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, { detail: t('error_network', { detail: e.message }) });
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

/** A decimal string with thousands separators, digits kept exactly as sent. */
function num(s) {
  if (s === null || s === undefined || s === '') return '—';
  const [i, f] = String(s).split('.');
  const neg = i.startsWith('-');
  const digits = (neg ? i.slice(1) : i).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
  return (neg ? '-' : '') + digits + (f !== undefined ? `.${f}` : '');
}

/** Integer kilograms from a tonnes string with at most 3 decimals ("1.2" -> 1200). */
function kgOf(tonnes) {
  const [i, f = ''] = String(tonnes).split('.');
  return Number(i) * 1000 + Number((f + '000').slice(0, 3));
}
/** Tonnes with up to 6 decimals as kilograms with up to 3 ("0.006974" -> "6.974"), exactly. */
function kgText(tonnes) {
  const [i, f = ''] = String(tonnes).split('.');
  const padded = (f + '000000').slice(0, 6);
  const kg = String(Number(i) * 1000 + Number(padded.slice(0, 3)));
  const frac = padded.slice(3).replace(/0+$/, '');
  return num(frac ? `${kg}.${frac}` : kg);
}
const tonnesOf = (kg) => `${Math.floor(kg / 1000)}.${String(kg % 1000).padStart(3, '0')}`;
const fenOf = (cny) => { const [i, f = ''] = String(cny).split('.'); return Number(i) * 100 + Number((f + '00').slice(0, 2)); };
const cnyOf = (fen) => `${Math.floor(fen / 100)}.${String(fen % 100).padStart(2, '0')}`;

function clock(when) {
  const d = typeof when === 'number' ? new Date(when / 1000) : new Date(when);
  return d.toLocaleTimeString(lang() === 'zh' ? 'zh-CN' : 'en-GB', { hour12: false });
}
function day(when) {
  return new Date(when).toLocaleString(lang() === 'zh' ? 'zh-CN' : 'en-GB', { dateStyle: 'medium', timeStyle: 'short' });
}
/** A value the server names by a key, in the visitor's language when the page knows it. */
const label = (prefix, v) => { const k = `${prefix}_${v}`; const s = t(k); return s === k ? v : s; };
const methodology = (m) => label('m', m);

function problemBox(err) {
  // A refusal, the exchange out of reach, or a fault of the page itself: each says which (every
  // error without a status read "Feed offline", with nothing under it: review31).
  const title = !(err instanceof ApiError) ? t('error_page') : err.status ? t('error_title') : t('error_unreachable');
  // What the code means, in the visitor's language (the server's detail, with its figures, is English).
  const meaning = err.code && err.status ? label('code', err.code) : null;
  return h('div', { class: 'alert error', role: 'alert' },
    h('strong', { text: title }),
    err.code && err.status ? h('code', { class: 'code', text: err.code }) : null,
    meaning && meaning !== err.code ? h('p', { class: 'meaning', text: meaning }) : null,
    h('p', { class: 'detail', text: err.detail ?? err.message ?? String(err) }));
}

function panel(title, ...body) {
  return h('section', { class: 'panel' }, title ? h('h2', { text: title }) : null, ...body);
}

function table(headers, rows, { cls = '', numeric = [] } = {}) {
  return h('table', { class: `grid ${cls}` },
    h('thead', {}, h('tr', {}, headers.map((x, i) => h('th', { class: numeric.includes(i) ? 'num' : '', text: x })))),
    h('tbody', {}, rows));
}

async function loadInstruments() {
  state.instruments = await api('/v1/instruments');
  return state.instruments;
}

// ---- the API key ---------------------------------------------------------------------------

function takeKeyFromFragment() {
  const m = location.hash.match(/(?:^#|[&?])key=([^&#/]+)/);
  if (!m) return;
  state.key = decodeURIComponent(m[1]);
  sessionStorage.setItem(KEY_STORE, state.key);
  // "#key=K", "#key=K#/neutrality" and "#/neutrality&key=K" all leave the route without the key:
  // the key must not stay in the address bar (screenshots, shared links).
  const rest = location.hash.replace(/(^#|[&?])key=[^&#/]+&?/, '$1').replace(/^#+/, '').replace(/[&?]$/, '');
  history.replaceState(null, '', location.pathname + location.search + (rest ? `#${rest}` : '#/market'));
}

async function checkKey() {
  const button = document.getElementById('key-button');
  const status = document.getElementById('key-status');
  if (!state.key) {
    state.account = null;
    button.textContent = t('key_button_none');
    button.classList.remove('ok');
    status.textContent = t('key_none');
    return;
  }
  try {
    state.account = await api('/v1/account', { auth: true });
    button.textContent = `${state.account.code}`;
    button.classList.add('ok');
    status.textContent = t('key_ok', { code: state.account.code, role: label('role', state.account.role),
      cash: num(state.account.cash_available) });
  } catch (e) {
    state.account = null;
    button.textContent = t('key_button_none');
    button.classList.remove('ok');
    status.textContent = t('key_bad', { detail: e.detail });
  }
}

function setupKeyPanel() {
  const panelEl = document.getElementById('key-panel');
  const input = document.getElementById('key-input');
  document.getElementById('key-button').addEventListener('click', () => {
    panelEl.hidden = !panelEl.hidden;
    if (!panelEl.hidden) input.focus();
  });
  document.getElementById('key-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    state.key = key;
    sessionStorage.setItem(KEY_STORE, key);
    input.value = '';
    await checkKey();
    if (state.account) panelEl.hidden = true;
    if (state.wizard) route();
  });
  document.getElementById('key-forget').addEventListener('click', async () => {
    state.key = null;
    sessionStorage.removeItem(KEY_STORE);
    await checkKey();
    if (state.wizard) route();
  });
  document.getElementById('key-close').addEventListener('click', () => { panelEl.hidden = true; });
}

function openKeyPanel() {
  const panelEl = document.getElementById('key-panel');
  panelEl.hidden = false;
  document.getElementById('key-input').focus();
}

// ---- the feed ------------------------------------------------------------------------------

const feedHandlers = { book: null, trade: null, ticker: null };

async function startFeed() {
  const cfg = await api('/web/config.json');
  if (!cfg.feed_port) { setFeedStatus('offline'); return; }
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const host = location.hostname.includes(':') ? `[${location.hostname}]` : location.hostname;
  state.feed = new Feed(`${scheme}://${host}:${cfg.feed_port}${cfg.feed_path}`, {
    status: setFeedStatus,
    book: (b, m) => feedHandlers.book?.(b, m),
    trade: (m) => feedHandlers.trade?.(m),
    ticker: (m) => feedHandlers.ticker?.(m),
  });
  state.feed.start();
  window.carbonxFeed = state.feed; // for the console (and the browser tests): books, seqs, resyncs
}

function setFeedStatus(s) {
  // Back after an outage: trades while the feed was away are only in the REST history.
  if (s === 'offline') state.feedWasDown = true;
  if (s === 'live' && state.feedWasDown) {
    state.feedWasDown = false;
    if (document.body.dataset.ready === 'market') route();
  }
  state.feedStatus = s;
  const pill = document.getElementById('feed-status');
  pill.textContent = t({ live: 'feed_live', connecting: 'feed_connecting', offline: 'feed_offline',
    resync: 'feed_resync' }[s]);
  pill.dataset.state = s;
}

// ---- market ----------------------------------------------------------------------------------

async function viewMarket(root, [symbolArg]) {
  const instruments = await loadInstruments();
  if (!instruments.length) { root.append(panel(null, h('p', { class: 'muted', text: t('no_instruments') }))); return null; }
  const symbol = instruments.some((i) => i.symbol === symbolArg) ? symbolArg : instruments[0].symbol;
  const inst = instruments.find((i) => i.symbol === symbol);

  const picker = h('div', { class: 'instrument-tabs', role: 'tablist' }, instruments.map((i) =>
    h('a', { href: `#/market/${i.symbol}`, class: i.symbol === symbol ? 'tab active' : 'tab', role: 'tab',
      'data-symbol': i.symbol }, h('span', { class: 'sym', text: i.symbol }),
    h('span', { class: 'tab-sub', text: i.project_name || '' }))));

  const tick = {};
  const stat = (key, id) => h('div', { class: 'stat' }, h('span', { class: 'label', text: t(key) }),
    tick[id] = h('span', { class: 'value num', id: `ticker-${id}`, text: '—' }));
  const tickerBar = h('div', { class: 'ticker-bar' },
    h('div', { class: 'stat main' }, h('span', { class: 'label', text: symbol }),
      tick.last = h('span', { class: 'value big num', id: 'ticker-last', text: '—' })),
    stat('change_24h', 'change'), stat('high_24h', 'high'), stat('low_24h', 'low'), stat('volume_24h', 'volume'),
    stat('vwap_24h', 'vwap'));

  const asksBody = h('tbody', { id: 'book-asks' });
  const bidsBody = h('tbody', { id: 'book-bids' });
  const spreadCell = h('td', { colspan: 3, class: 'spread', id: 'book-spread', text: '—' });
  const seqLine = h('div', { class: 'foot muted', id: 'book-seq' });
  const bookHead = h('thead', {}, h('tr', {}, h('th', { class: 'num', text: t('price_cny') }),
    h('th', { class: 'num', text: t('qty_t') }), h('th', { class: 'num', text: t('total_t') })));
  const bookPanel = panel(t('order_book'), h('table', { class: 'grid book' }, bookHead, asksBody,
    h('tbody', {}, h('tr', {}, spreadCell)), bidsBody), seqLine);
  bookPanel.id = 'book';

  const tradesBody = h('tbody', { id: 'trades-body' });
  const tradesPanel = panel(t('trades'), h('div', { class: 'scroll' }, h('table', { class: 'grid tape' },
    h('thead', {}, h('tr', {}, h('th', { text: t('time') }), h('th', { class: 'num', text: t('price_cny') }),
      h('th', { class: 'num', text: t('qty_t') }))), tradesBody)));
  tradesPanel.id = 'trades';

  const band = inst.price_band ? `${num(inst.price_band.low)} – ${num(inst.price_band.high)}` : '—';
  const dl = (pairs) => h('dl', { class: 'facts' }, pairs.map(([k, v]) => [h('dt', { text: t(k) }), h('dd', {}, v)]));
  const infoPanel = panel(t('instrument_details'), dl([
    ['project', inst.project_name || inst.project || '—'], ['methodology', methodology(inst.methodology)],
    ['vintage', inst.vintage ?? '—'], ['reference_price', num(inst.reference_price)], ['band', band],
    ['tick', inst.tick], ['lot', inst.lot], ['min_qty', inst.min_quantity],
    ['session', h('span', { class: `badge ${inst.session}`, text: t(`session_${inst.session}`) })],
    ['fees', `${inst.maker_fee_bp} / ${inst.taker_fee_bp}`], ['resale', inst.resale_rule]]),
  inst.project ? h('a', { class: 'more', href: `#/projects/${inst.project}`, text: t('view_project') }) : null);

  root.append(picker, tickerBar, h('div', { class: 'market-grid' }, bookPanel, tradesPanel, infoPanel));

  // -- book rendering
  let previous = { bid: new Map(), ask: new Map() };
  function renderBook(book) {
    const asks = book.sorted('ask', 10);
    const bids = book.sorted('bid', 10);
    const max = Math.max(1, ...[...asks, ...bids].map(([, q]) => Number(q)));
    const rows = (levels, side) => {
      let total = 0;
      const out = levels.map(([p, q]) => {
        total += kgOf(q);
        const changed = previous[side].get(p) !== q;
        const tr = h('tr', { class: `${side}${changed ? ' flash' : ''}`, 'data-price': p },
          h('td', { class: 'num price', text: num(p) }), h('td', { class: 'num', text: num(q) }),
          h('td', { class: 'num muted', text: num(tonnesOf(total)) }));
        tr.style.setProperty('--depth', `${(100 * Number(q)) / max}%`);
        return tr;
      });
      return out;
    };
    const askRows = rows(asks, 'ask').reverse(); // the best offer sits next to the spread
    const bidRows = rows(bids, 'bid');
    asksBody.replaceChildren(...(askRows.length ? askRows : [h('tr', { class: 'empty' }, h('td', { colspan: 3, text: t('no_orders') }))]));
    bidsBody.replaceChildren(...(bidRows.length ? bidRows : [h('tr', { class: 'empty' }, h('td', { colspan: 3, text: t('no_orders') }))]));
    if (asks.length && bids.length) {
      const spread = (fenOf(asks[0][0]) - fenOf(bids[0][0]));
      spreadCell.textContent = `${t('spread')} ${cnyOf(spread)}`;
    } else spreadCell.textContent = t('spread') + ' —';
    seqLine.textContent = t('book_seq', { seq: book.seq });
    previous = { bid: new Map(bids), ask: new Map(asks) };
  }

  // -- trades
  const seen = new Set();
  let lastPrice = null;
  function addTrade(tr, live) {
    if (seen.has(tr.trade_id)) return;
    seen.add(tr.trade_id);
    const row = h('tr', { class: `${tr.taker_side === 'buy' ? 'bid' : 'ask'}${live ? ' flash' : ''}`, 'data-trade-id': tr.trade_id },
      h('td', { class: 'muted', text: clock(tr.ts ?? tr.time) }),
      h('td', { class: 'num price', text: num(tr.price) }), h('td', { class: 'num', text: num(tr.quantity) }));
    if (live) tradesBody.prepend(row); else tradesBody.append(row);
    while (tradesBody.children.length > 60) tradesBody.lastChild.remove();
    tradesBody.querySelector('tr.empty')?.remove();
  }
  function renderTicker(tk) {
    const dir = lastPrice && tk.last ? Math.sign(Number(tk.last) - Number(lastPrice)) : 0;
    tick.last.textContent = num(tk.last);
    tick.last.classList.toggle('up', dir > 0);
    tick.last.classList.toggle('down', dir < 0);
    if (tk.last) lastPrice = tk.last;
    if (tk.last && tk.open) {
      const ch = fenOf(tk.last) - fenOf(tk.open);
      const pct = ((100 * ch) / fenOf(tk.open)).toFixed(2);
      tick.change.textContent = `${ch >= 0 ? '+' : '-'}${cnyOf(Math.abs(ch))} (${ch >= 0 ? '+' : ''}${pct}%)`;
      tick.change.className = `value num ${ch > 0 ? 'up' : ch < 0 ? 'down' : ''}`;
    } else tick.change.textContent = '—';
    tick.high.textContent = num(tk.high);
    tick.low.textContent = num(tk.low);
    tick.volume.textContent = num(tk.volume);
    tick.vwap.textContent = num(tk.vwap);
  }

  // Subscribe first, then read the history: a trade in between arrives live (and the history's
  // copy is skipped by trade id) instead of falling into the gap.
  let liveTicker = false;
  feedHandlers.book = (book) => { if (book.symbol === symbol) renderBook(book); };
  feedHandlers.trade = (m) => { if (m.symbol === symbol) addTrade(m, true); };
  feedHandlers.ticker = (m) => { if (m.symbol === symbol) { liveTicker = true; renderTicker(m); } };
  if (state.feed) {
    const book = state.feed.watch(symbol);
    if (book.seq !== null) renderBook(book);
  }
  const [trades, ticker] = await Promise.all([api(`/v1/trades/${symbol}?limit=50`), api(`/v1/ticker/${symbol}`)]);
  for (const tr of trades) addTrade(tr, false);
  if (!tradesBody.children.length) tradesBody.append(h('tr', { class: 'empty' }, h('td', { colspan: 3, text: t('no_trades') })));
  if (!liveTicker) renderTicker(ticker);
  return () => {
    feedHandlers.book = feedHandlers.trade = feedHandlers.ticker = null;
    state.feed?.unwatch(symbol);
  };
}

// ---- projects --------------------------------------------------------------------------------

async function viewProjects(root, [code]) {
  if (code) return viewProject(root, code);
  const list = await api('/v1/registry/projects');
  const details = await Promise.all(list.map((p) => api(`/v1/registry/projects/${encodeURIComponent(p.code)}`)));
  root.append(h('div', { class: 'page-head' }, h('h1', { text: t('projects_title') }), h('p', { class: 'lead', text: t('projects_lead') })));
  const cards = details.map((p) => h('a', { class: 'project-card', href: `#/projects/${p.code}`, 'data-project': p.code },
    h('div', { class: 'card-top' }, h('span', { class: 'sym', text: p.code }), h('span', { class: `badge ${p.status}`, text: label('st', p.status) })),
    h('h3', { text: p.name }),
    h('p', { class: 'muted', text: [methodology(p.methodology), p.region].filter(Boolean).join(' · ') }),
    h('div', { class: 'trio' }, [['issued', p.issued], ['traded', p.traded], ['retired', p.retired]].map(([k, v]) =>
      h('div', {}, h('span', { class: 'label', text: t(k) }), h('span', { class: 'value num', text: num(v) }))))));
  root.append(h('div', { class: 'cards' }, cards.length ? cards : h('p', { class: 'muted', text: t('none_yet') })));
  return null;
}

async function viewProject(root, code) {
  const [p, rets, instruments] = await Promise.all([
    api(`/v1/registry/projects/${encodeURIComponent(code)}`),
    api(`/v1/registry/retirements?project=${encodeURIComponent(code)}&limit=50`), loadInstruments()]);
  const listed = new Set(instruments.map((i) => i.symbol));
  root.append(h('a', { class: 'back', href: '#/projects', text: t('back_projects') }),
    h('div', { class: 'page-head' }, h('h1', {}, p.name, ' ', h('span', { class: 'sym', text: p.code })),
      h('p', { class: 'lead', text: [methodology(p.methodology), p.region, `${t('developer')}: ${p.developer}`,
        label('st', p.status)].filter(Boolean).join(' · ') })),
    h('div', { class: 'stat-cards', id: 'project-stats' }, [['issued', p.issued], ['traded', p.traded], ['retired', p.retired]].map(([k, v]) =>
      h('div', { class: 'stat-card', 'data-stat': k }, h('span', { class: 'label', text: t(k) }), h('span', { class: 'value big num', text: num(v) })))));
  const issRows = p.issuances.map((i) => {
    const symbol = `${p.code}-${i.vintage}`;
    return h('tr', {}, h('td', { text: i.vintage }), h('td', { class: 'mono', text: i.serial }),
      h('td', { class: 'num', text: num(i.quantity) }),
      h('td', {}, listed.has(symbol) ? h('a', { href: `#/market/${symbol}`, text: `${t('trade_it')} ${symbol}` }) : '—'));
  });
  root.append(panel(t('issuances'), table([t('vintage'), t('serial_range'), t('quantity_t'), t('nav_market')], issRows, { numeric: [2] })));
  const retRows = rets.map((r) => h('tr', {}, h('td', { text: day(r.time) }), h('td', { text: r.beneficiary }),
    h('td', { text: r.purpose }), h('td', { class: 'num', text: num(r.quantity) }),
    h('td', {}, h('a', { class: 'mono', href: `#/verify/${r.certificate_code}`, text: r.certificate_code }))));
  root.append(panel(t('retirements'), retRows.length
    ? table([t('date'), t('beneficiary'), t('purpose'), t('quantity_t'), t('certificate')], retRows, { numeric: [3] })
    : h('p', { class: 'muted', text: t('no_retirements') })));
  return null;
}

// ---- the neutrality wizard -------------------------------------------------------------------

const SAMPLE = {
  name: 'Green tech conference', attendees: '300', days: '1', hotel: '',
  electricity: [{ kwh: '10000', region: 'sichuan', year: '2022' }],
  travel: [{ mode: 'metro', people: '150', km: '15', round: true }, { mode: 'high_speed_rail', people: '20', km: '300', round: true }],
  meals: [{ kind: 'standard', count: '300' }], materials: [{ kind: 'paper', kg: '30' }], waste: [{ kind: 'landfill', kg: '100' }],
};

function newWizard() {
  return { step: 1, form: { name: '', attendees: '', days: '', hotel: '', electricity: [{}], travel: [{}], meals: [{}],
    materials: [], waste: [] }, estimate: null, offset: { symbol: null, maxCash: '', beneficiary: '', purpose: '' },
  result: null, error: null, busy: false, pending: null, offsetKey: null };
}

/** The activity object of exchange/neutrality.py from the form; empty rows are left out. */
function activityOf(f) {
  const a = {};
  if (f.attendees !== '') a.attendees = f.attendees.trim();
  if (f.days !== '') a.days = f.days.trim();
  const rows = (list, keep, make) => list.filter(keep).map(make);
  const el = rows(f.electricity, (r) => r.kwh, (r) => ({ kwh: r.kwh.trim(), region: r.region,
    ...(r.year ? { year: Number(r.year) } : {}) }));
  if (el.length) a.electricity = el;
  const tr = rows(f.travel, (r) => r.people || r.km, (r) => ({ mode: r.mode, people: (r.people || '').trim(),
    km_per_person: (r.km || '').trim(), round_trip: !!r.round }));
  if (tr.length) a.travel = tr;
  if (f.hotel !== '') a.hotel_room_nights = f.hotel.trim();
  for (const [name, unit] of [['meals', 'count'], ['materials', 'kg'], ['waste', 'kg']]) {
    const list = rows(f[name], (r) => r[unit], (r) => ({ kind: r.kind, [unit]: r[unit].trim() }));
    if (list.length) a[name] = list;
  }
  return a;
}

let factorsCache = null;

async function viewNeutrality(root) {
  const w = state.wizard ??= newWizard();
  factorsCache ??= await api('/v1/neutrality/factors');
  const opts = factorsCache.options;
  root.append(h('div', { class: 'page-head' }, h('h1', { text: t('wiz_title') }), h('p', { class: 'lead', text: t('wiz_lead') })));
  const steps = ['step_activity', 'step_estimate', 'step_offset', 'step_certificate'];
  root.append(h('ol', { class: 'steps' }, steps.map((s, i) => h('li', { class: i + 1 === w.step ? 'active' : i + 1 < w.step ? 'done' : '' },
    h('span', { class: 'n', text: i + 1 }), t(s)))));
  const body = h('div', { class: 'wizard', id: `wizard-step-${w.step}` });
  root.append(body);
  const rerender = () => route();
  if (w.step === 1) wizardActivity(body, w, opts, rerender);
  else if (w.step === 2) wizardEstimate(body, w, rerender);
  else if (w.step === 3) await wizardOffset(body, w, rerender);
  else wizardResult(body, w, rerender);
  return null;
}

function field(label, input, cls = '') {
  return h('label', { class: `field ${cls}` }, h('span', { text: label }), input);
}
function textInput(obj, key, { name, type = 'text', ph, inputmode = 'decimal' } = {}) {
  return h('input', { type, name, value: obj[key] ?? '', placeholder: ph, inputmode: type === 'text' ? inputmode : null,
    oninput: (e) => { obj[key] = e.target.value; } });
}
function select(obj, key, options, { name, labels } = {}) {
  if (!obj[key] && options.length) obj[key] = options[0];
  return h('select', { name, onchange: (e) => { obj[key] = e.target.value; } },
    options.map((o) => h('option', { value: o, selected: String(obj[key]) === String(o) ? 'selected' : null, text: labels ? labels(o) : o })));
}

/** An option of the factor table in the visitor's language, with its factor ("sichuan" -> "Sichuan grid · 0.1404 kgCO2/kWh"). */
function optionLabel(prefix) {
  return (name) => {
    const k = `o_${name}`;
    const label = t(k) === k ? name.replace(/_/g, ' ') : t(k);
    const f = factorsCache.factors.find((x) => x.key === `${prefix}.${name}`);
    return f ? `${label} · ${f.value} ${f.unit}` : label;
  };
}

function wizardActivity(body, w, opts, rerender) {
  const f = w.form;
  const regions = Object.keys(opts.electricity_regions);
  const section = (cat, list, make, blank) => h('fieldset', { class: 'cat', 'data-cat': cat },
    h('legend', { text: t(`cat_${cat}`) }),
    list.map((row, i) => h('div', { class: 'row' }, make(row, i),
      h('button', { type: 'button', class: 'link remove', onclick: () => { list.splice(i, 1); rerender(); }, text: t('remove_row') }))),
    h('button', { type: 'button', class: 'link add', 'data-add': cat, onclick: () => { list.push({ ...blank }); rerender(); }, text: t('add_row') }));

  const form = h('form', { class: 'activity', id: 'activity-form', onsubmit: async (ev) => {
    ev.preventDefault();
    w.busy = true; w.error = null;
    submit.disabled = true; submit.textContent = t('estimating');
    try {
      w.estimate = await api('/v1/neutrality/estimate', { method: 'POST', body: activityOf(f) });
      w.activity = activityOf(f);
      w.step = 2;
    } catch (e) { w.error = e; }
    w.busy = false;
    rerender();
  } },
  h('div', { class: 'row top' }, field(t('event_name'), textInput(f, 'name', { name: 'event_name', ph: t('event_name_ph') }), 'wide'),
    field(t('attendees'), textInput(f, 'attendees', { name: 'attendees', inputmode: 'numeric' })),
    field(t('days'), textInput(f, 'days', { name: 'days', inputmode: 'numeric' }))),
  section('electricity', f.electricity, (r, i) => {
    const years = () => opts.electricity_regions[r.region || regions[0]] || [];
    const yearSel = h('div', { class: 'year' });
    const drawYears = () => {
      if (!years().map(String).includes(String(r.year))) r.year = String(years().at(-1) ?? '');
      yearSel.replaceChildren(select(r, 'year', years().map(String), { name: `electricity-${i}-year` }));
    };
    const regionSel = select(r, 'region', regions, { name: `electricity-${i}-region`, labels: (x) => (t(`o_${x}`) === `o_${x}` ? x : t(`o_${x}`)) });
    regionSel.addEventListener('change', drawYears);
    drawYears();
    return [field(t('kwh'), textInput(r, 'kwh', { name: `electricity-${i}-kwh` })), field(t('grid_region'), regionSel),
      field(t('year'), yearSel)];
  }, {}),
  section('travel', f.travel, (r, i) => [field(t('mode'), select(r, 'mode', opts.travel_modes, { name: `travel-${i}-mode`, labels: optionLabel('travel') })),
    field(t('people'), textInput(r, 'people', { name: `travel-${i}-people`, inputmode: 'numeric' })),
    field(t('km_per_person'), textInput(r, 'km', { name: `travel-${i}-km` })),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: `travel-${i}-round`, checked: !!r.round,
      onchange: (e) => { r.round = e.target.checked; } }), t('round_trip'))], { round: true }),
  h('fieldset', { class: 'cat', 'data-cat': 'hotel' }, h('legend', { text: t('cat_hotel') }),
    h('div', { class: 'row' }, field(t('room_nights'), textInput(f, 'hotel', { name: 'hotel', inputmode: 'numeric' })))),
  section('meals', f.meals, (r, i) => [field(t('kind'), select(r, 'kind', opts.meal_kinds, { name: `meals-${i}-kind`, labels: optionLabel('meals') })),
    field(t('count'), textInput(r, 'count', { name: `meals-${i}-count`, inputmode: 'numeric' }))], {}),
  section('materials', f.materials, (r, i) => [field(t('kind'), select(r, 'kind', opts.material_kinds, { name: `materials-${i}-kind`, labels: optionLabel('materials') })),
    field(t('kg'), textInput(r, 'kg', { name: `materials-${i}-kg` }))], {}),
  section('waste', f.waste, (r, i) => [field(t('kind'), select(r, 'kind', opts.waste_kinds, { name: `waste-${i}-kind`, labels: optionLabel('waste') })),
    field(t('kg'), textInput(r, 'kg', { name: `waste-${i}-kg` }))], {}));
  const submit = h('button', { type: 'submit', class: 'primary', id: 'estimate-button', text: t('estimate_btn') });
  form.append(w.error ? problemBox(w.error) : '', h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'link', onclick: () => {
      w.form = JSON.parse(JSON.stringify(SAMPLE));
      w.error = null;
      rerender();
    }, text: t('sample') }), submit));
  body.append(form);
}

function wizardEstimate(body, w, rerender) {
  const e = w.estimate;
  const totalKg = kgOf(e.total) || 1;
  const rows = Object.entries(e.categories).map(([c, v]) => {
    const bar = h('div', { class: 'bar' });
    bar.style.setProperty('--w', `${(100 * kgOf(v)) / totalKg}%`);
    return h('tr', { 'data-category': c }, h('td', { text: t(`cat_${c}`) }), h('td', { class: 'num', text: num(v) }), h('td', { class: 'barcell' }, bar));
  });
  const lines = e.lines.map((l) => h('tr', {}, h('td', { class: 'mono', text: l.field }),
    h('td', { class: 'mono', text: `${l.factor} = ${l.factor_value} ${l.factor_unit}` }),
    h('td', { class: 'num', text: `${num(l.quantity)} ${l.quantity_unit}` }), h('td', { class: 'num', text: num(l.co2e) })));
  body.append(h('div', { class: 'estimate-grid' },
    panel(t('footprint'),
      h('div', { class: 'total' }, h('span', { class: 'label', text: t('total_tco2e') }),
        h('span', { class: 'value huge num', id: 'estimate-total', text: num(e.total) }), h('span', { class: 'unit', text: t('tco2e') })),
      e.per_attendee_day ? h('p', { class: 'muted', id: 'per-attendee-day', text: `${t('per_attendee_day')}: ${kgText(e.per_attendee_day)} ${t('co2e_kg')}` }) : null,
      h('p', { class: 'muted small', text: t('factor_version', { version: e.factor_table_version }) })),
    panel(null, table([t('category'), t('tco2e'), ''], rows, { cls: 'categories', numeric: [1] }))),
  h('details', { class: 'panel lines' }, h('summary', { text: t('lines') }),
    table([t('entry'), t('factor'), t('activity'), t('tco2e')], lines, { numeric: [2, 3] }),
    h('p', { class: 'muted small', text: e.rounding })),
  h('div', { class: 'actions' }, h('button', { type: 'button', class: 'link', id: 'back-to-activity', onclick: () => { w.step = 1; rerender(); }, text: t('back_edit') }),
    h('button', { type: 'button', class: 'primary', id: 'to-offset', onclick: () => { w.step = 3; w.error = null; rerender(); }, text: t('to_offset') })));
}

const OFFSET_UNANSWERED = 'carbonx-offset-unanswered';  // sessionStorage: {key, asked} of a try not answered

async function wizardOffset(body, w, rerender) {
  const instruments = await loadInstruments();
  if (!instruments.length) { body.append(h('p', { class: 'muted', text: t('no_instruments') })); return; }
  const o = w.offset;
  if (!instruments.some((i) => i.symbol === o.symbol)) o.symbol = instruments[0]?.symbol;
  const inst = instruments.find((i) => i.symbol === o.symbol);
  const lotKg = kgOf(inst.lot);
  const qtyKg = Math.ceil(kgOf(w.estimate.offset ?? w.estimate.total) / lotKg) * lotKg;
  const book = await api(`/v1/book/${o.symbol}?depth=50`);
  const offered = book.asks.reduce((s, [, q]) => s + kgOf(q), 0);
  // A cap that buys at any price in the band: quantity at the band's top, plus the larger fee.
  const highFen = fenOf(inst.price_band ? inst.price_band.high : (book.asks.at(-1)?.[0] ?? '0'));
  const valueFen = Math.ceil((qtyKg * highFen) / 1000);
  const suggested = cnyOf(valueFen + Math.ceil((valueFen * Math.max(inst.maker_fee_bp, inst.taker_fee_bp)) / 10000));
  // What the page filled in follows the estimate and the event's name; what the person typed
  // stays. Filled in once, a cap, beneficiary and purpose outlived an edited event: refused, or
  // worse, a certificate naming the event before (review31). The date is the person's own day.
  const today = new Date();
  const day = `${today.getFullYear()}-${String(today.getMonth() + 1).padStart(2, '0')}-${String(today.getDate()).padStart(2, '0')}`;
  const auto = { maxCash: suggested, beneficiary: w.form.name || '',
    purpose: `${w.form.name ? `${w.form.name} — ` : ''}${lang() === 'zh' ? '碳中和' : 'carbon neutrality'} ${day}` };
  for (const [k, v] of Object.entries(auto)) if (!o[k] || o[k] === o.auto?.[k]) o[k] = v;
  o.auto = auto;

  const symbolSel = select(o, 'symbol', instruments.map((i) => i.symbol), { name: 'symbol',
    labels: (s) => { const i = instruments.find((x) => x.symbol === s); return `${s} · ${i.project_name || ''}`; } });
  // Another instrument: the last refusal was about the one before, so it goes too.
  // An offset on its way survives a re-render (language, back and forth): its instrument stays
  // shown and nothing can send a second one for the same event.
  symbolSel.disabled = !!w.pending;
  symbolSel.addEventListener('change', () => { o.maxCash = ''; w.error = null; rerender(); });
  const submit = h('button', { type: 'submit', class: 'primary', id: 'offset-button',
    text: w.pending ? t('offsetting') : t('offset_btn'), disabled: !state.key || !!w.pending });
  const refusal = w.error ? problemBox(w.error) : null;
  const form = h('form', { class: 'offset', id: 'offset-form', onsubmit: async (ev) => {
    ev.preventDefault();
    if (w.pending) return;
    const mine = w.pending = {};
    submit.disabled = true; symbolSel.disabled = true; submit.textContent = t('offsetting');
    // While a retry is on its way, the last refusal would read as its answer.
    refusal?.remove();
    w.error = null;
    // One key for this event's offset, kept across tries: a try whose answer was lost (the
    // network, a reload of the answer) is retried safely, and never buys or retires twice.
    // The key of a try whose answer never came is kept in the tab's sessionStorage with what it
    // asked for: the same offset asked again after a reload of the page goes under the same key
    // (it was in memory only, and a reload made a second offset possible: review31).
    // getRandomValues, not randomUUID: the page may be served over plain http on a LAN address.
    const request = { symbol: o.symbol, activity: w.activity, max_cash: o.maxCash.trim(), beneficiary: o.beneficiary.trim(),
      purpose: o.purpose.trim() };
    const asked = JSON.stringify([state.account?.code ?? null, request]);
    let unanswered = null;
    try { unanswered = JSON.parse(sessionStorage.getItem(OFFSET_UNANSWERED) ?? 'null'); } catch { /* none */ }
    w.offsetKey ??= unanswered?.asked === asked ? unanswered.key
      : `web-${[...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
    sessionStorage.setItem(OFFSET_UNANSWERED, JSON.stringify({ key: w.offsetKey, asked }));
    try {
      w.result = await api('/v1/neutrality/offset', { method: 'POST', auth: true, idempotencyKey: w.offsetKey, body: request });
      sessionStorage.removeItem(OFFSET_UNANSWERED);
      w.step = 4;
      checkKey();
    } catch (e) { w.error = e; } finally { if (w.pending === mine) w.pending = null; }
    rerender();
  } },
  h('div', { class: 'offset-facts' },
    h('div', { class: 'stat-card' }, h('span', { class: 'label', text: t('to_buy') }),
      h('span', { class: 'value big num', id: 'offset-quantity', text: `${num(tonnesOf(qtyKg))} t` }),
      h('span', { class: 'muted small', text: t('to_buy_note', { lot: inst.lot }) })),
    h('div', { class: 'stat-card' }, h('span', { class: 'label', text: t('best_ask') }),
      h('span', { class: 'value big num', text: book.asks.length ? num(book.asks[0][0]) : '—' }),
      h('span', { class: 'muted small', text: `${t('offered')}: ${num(tonnesOf(offered))} t` }))),
  h('div', { class: 'row' }, field(t('instrument'), symbolSel, 'wide'),
    field(t('max_cash'), textInput(o, 'maxCash', { name: 'max_cash' }))),
  h('p', { class: 'muted small', text: t('max_cash_note', { qty: tonnesOf(qtyKg) }) + ` (${num(suggested)})` }),
  h('div', { class: 'row' }, field(t('beneficiary'), textInput(o, 'beneficiary', { name: 'beneficiary', ph: t('beneficiary_ph') }), 'wide'),
    field(t('purpose'), textInput(o, 'purpose', { name: 'purpose', ph: t('purpose_ph') }), 'wide')),
  state.key ? null : h('div', { class: 'alert info' }, h('p', { text: t('need_key') }),
    h('button', { type: 'button', class: 'secondary', onclick: openKeyPanel, text: t('set_key') })),
  state.account ? h('p', { class: 'muted small', text: t('key_ok', { code: state.account.code, role: label('role', state.account.role), cash: num(state.account.cash_available) }) }) : null,
  refusal,
  h('div', { class: 'actions' }, h('button', { type: 'button', class: 'link', id: 'back-to-estimate', onclick: () => { w.step = 2; w.error = null; rerender(); }, text: t('back_estimate') }), submit));
  body.append(form);
}

function wizardResult(body, w, rerender) {
  const r = w.result;
  const code = r.retirement.certificate_code;
  body.append(h('div', { class: 'panel success', id: 'offset-result' },
    h('div', { class: 'seal', text: '✓' }),
    h('h2', { text: t('neutral_done') }),
    h('p', { class: 'lead', text: t('done_lead', { qty: r.quantity, beneficiary: r.retirement.beneficiary }) }),
    h('div', { class: 'cert-code' }, h('span', { class: 'label', text: t('cert_code') }), h('span', { class: 'mono big', id: 'certificate-code', text: code })),
    h('dl', { class: 'facts' }, h('dt', { text: t('quantity_t') }), h('dd', { class: 'num', text: num(r.quantity) }),
      h('dt', { text: t('cost') }), h('dd', { class: 'num', text: num(r.cost) }),
      h('dt', { text: t('order') }), h('dd', { class: 'mono', text: r.order_id }),
      h('dt', { text: t('purpose') }), h('dd', { text: r.retirement.purpose }),
      h('dt', { text: t('serials') }), h('dd', {}, r.retirement.serials.map((s) => h('div', { class: 'mono', text: s })))),
    h('div', { class: 'actions' },
      h('a', { class: 'button primary', id: 'download-pdf', href: `/v1/certificates/${code}.pdf`, download: `carbonx-certificate-${code}.pdf`, text: t('download_pdf') }),
      h('a', { class: 'button secondary', href: `/v1/certificates/${code}.html`, target: '_blank', rel: 'noopener', text: t('view_html') }),
      h('a', { class: 'button secondary', id: 'public-verify', href: `/verify/${code}`, target: '_blank', rel: 'noopener', text: t('public_page') }),
      h('a', { class: 'button secondary', id: 'verify-here', href: `#/verify/${code}`, text: t('verify_here') }))),
  h('div', { class: 'actions' }, h('button', { type: 'button', class: 'link', onclick: () => { state.wizard = newWizard(); rerender(); }, text: t('new_estimate') })));
}

// ---- verify ------------------------------------------------------------------------------------

async function viewVerify(root, [codeArg]) {
  let code = codeArg || '';
  try { code = decodeURIComponent(code); } catch { /* not %-encoded as a browser encodes: the server says not found */ }
  const input = h('input', { type: 'text', name: 'code', id: 'verify-code', value: code, placeholder: 'CX-…', autocomplete: 'off', spellcheck: 'false' });
  const out = h('div', { id: 'verify-result' });
  root.append(h('div', { class: 'page-head' }, h('h1', { text: t('verify_title') }), h('p', { class: 'lead', text: t('verify_lead') })),
    h('form', { class: 'verify-form', onsubmit: (ev) => {
      ev.preventDefault();
      const c = input.value.trim();
      if (c) location.hash = `#/verify/${encodeURIComponent(c)}`;
    } }, field(t('cert_code'), input, 'wide'), h('button', { type: 'submit', class: 'primary', id: 'verify-button', text: t('verify_btn') })),
    out);
  if (!code) return null;
  out.append(h('p', { class: 'muted', text: t('loading') }));
  try {
    const c = await api(`/v1/certificates/${encodeURIComponent(code)}`);
    const rows = c.ranges.map((r) => h('tr', {}, h('td', { class: 'mono', text: r.serial }), h('td', { text: `${r.project_name} (${r.project})` }),
      h('td', { text: methodology(r.methodology) }), h('td', { text: r.vintage }), h('td', { class: 'num', text: num(r.quantity) })));
    out.replaceChildren(h('div', { class: 'panel verdict genuine', 'data-verdict': 'genuine' },
      h('div', { class: 'seal', text: '✓' }), h('h2', { text: t('genuine') }),
      h('p', { class: 'lead', text: t('genuine_lead', { qty: c.quantity, beneficiary: c.beneficiary }) }),
      h('dl', { class: 'facts' }, h('dt', { text: t('cert_code') }), h('dd', { class: 'mono', text: c.certificate_code }),
        h('dt', { text: t('beneficiary') }), h('dd', { text: c.beneficiary }), h('dt', { text: t('purpose') }), h('dd', { text: c.purpose }),
        h('dt', { text: t('quantity_t') }), h('dd', { class: 'num', text: num(c.quantity) }),
        h('dt', { text: t('account') }), h('dd', { text: c.account }), h('dt', { text: t('retired_at') }), h('dd', { text: day(c.time) })),
      h('h3', { text: t('backing') }),
      table([t('serial_range'), t('project'), t('methodology'), t('vintage'), t('quantity_t')], rows, { numeric: [4] }),
      h('div', { class: 'actions' },
        h('a', { class: 'button secondary', href: `/verify/${encodeURIComponent(c.certificate_code)}`, target: '_blank', rel: 'noopener', text: t('public_page') }),
        h('a', { class: 'button secondary', href: `/v1/certificates/${encodeURIComponent(c.certificate_code)}.pdf`, download: `carbonx-certificate-${c.certificate_code}.pdf`, text: t('download_pdf') }))));
  } catch (e) {
    if (e.status === 404) {
      out.replaceChildren(h('div', { class: 'panel verdict fake', 'data-verdict': 'not-genuine' },
        h('div', { class: 'seal', text: '✗' }), h('h2', { text: t('not_genuine') }),
        h('p', { class: 'lead', text: t('not_genuine_lead', { code }) })));
    } else out.replaceChildren(problemBox(e));
  }
  return null;
}

// ---- routing -----------------------------------------------------------------------------------

const VIEWS = { market: viewMarket, projects: viewProjects, neutrality: viewNeutrality, verify: viewVerify };
let routing = 0;

async function route() {
  const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
  const name = VIEWS[parts[0]] ? parts[0] : 'market';
  const mine = ++routing;
  if (state.view) { try { state.view(); } catch { /* a view's cleanup never blocks the next */ } state.view = null; }
  for (const a of document.querySelectorAll('nav a')) a.classList.toggle('active', a.dataset.view === name);
  const root = document.getElementById('view');
  const fresh = h('div', { class: `view view-${name}`, 'data-view': name });
  root.replaceChildren(fresh);
  try {
    const cleanup = await VIEWS[name](fresh, parts.slice(1));
    if (mine !== routing) { cleanup?.(); return; }
    state.view = cleanup;
  } catch (e) {
    if (mine !== routing) return;
    fresh.append(problemBox(e), h('button', { class: 'secondary', onclick: route, text: t('retry') }));
  }
  if (mine === routing) document.body.dataset.ready = name; // tests wait for this
}

async function main() {
  takeKeyFromFragment();
  setLang(initialLang());
  for (const b of document.querySelectorAll('[data-lang]')) {
    b.addEventListener('click', () => { setLang(b.dataset.lang, true); setFeedStatus(state.feedStatus); checkKey(); route(); });
  }
  setupKeyPanel();
  setFeedStatus('connecting');
  window.addEventListener('hashchange', () => { takeKeyFromFragment(); route(); });
  await Promise.all([checkKey(), startFeed().catch(() => setFeedStatus('offline'))]);
  await route();
}

main();
