// tenure service map: plain JavaScript and SVG, no library.
//
// Data: GET /v1/dependencies (the whole cluster, merged by the node that serves this page)
// and GET /v1/cluster. Layout: layered (callers left of callees), computed in O(V + E) so
// that a thousand workloads render without freezing the page; no force simulation.
'use strict';

(function () {
  const SVG_NS = 'http://www.w3.org/2000/svg';
  // Rows per column before a layer wraps into another column, so that a layer of a
  // thousand backends makes a block, not a strip thousands of pixels tall. The block is
  // kept roughly square: rows grow with the square root of the largest layer.
  const ROWS_PER_COLUMN_MIN = 30;
  const ROW_PX = 22;
  const COLUMN_PX = 230;
  const LAYER_GAP_PX = 140;
  const MARGIN_PX = 40;
  // Edge widths, in px, for the smallest and the largest edge on the map.
  const EDGE_WIDTH_MIN_PX = 0.8;
  const EDGE_WIDTH_MAX_PX = 10;
  const REFRESH_MS = 10000;
  const LABEL_CHARS_MAX = 30;

  const $ = (id) => document.getElementById(id);
  const state = { data: null, graph: null, selected: null, view: null, timer: null };
  const errors = [];

  function reportError(message) {
    errors.push(String(message));
    $('errors').textContent = 'errors: ' + errors.join(' | ');
    document.body.dataset.errors = String(errors.length);
  }
  window.addEventListener('error', (e) => reportError(e.message));
  window.addEventListener('unhandledrejection', (e) => reportError(e.reason));

  function esc(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({
      '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;',
    })[c]);
  }
  function fmtInt(n) { return Number(n).toLocaleString('en-US'); }
  function fmtBytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + ' ' + units[i];
  }
  function fmtPct(x) { return (100 * x).toFixed(x > 0 && x < 0.001 ? 3 : 1) + '%'; }
  function fmtTime(ms) { return new Date(ms).toLocaleString(); }
  function toLocalInput(ms) {
    const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
    return d.toISOString().slice(0, 16);
  }

  // The key of a map node: kind and name (a workload may be named like a pseudo-node).
  const keyOf = (kind, name) => kind + '\u0000' + name;

  function windowParams() {
    const range = $('range').value;
    if (range === 'custom') {
      const since = Date.parse($('since').value);
      const until = Date.parse($('until').value);
      if (Number.isNaN(since) || Number.isNaN(until)) {
        return { error: 'pick both ends of the custom window' };
      }
      if (until < since) return { error: 'the window ends before it starts' };
      return { since, until };
    }
    const until = Date.now();
    return { since: until - Number(range), until };
  }

  async function getJson(path) {
    const response = await fetch(path, { headers: { accept: 'application/json' } });
    let body;
    try {
      body = await response.json();
    } catch (e) {
      throw new Error(path + ': HTTP ' + response.status + ', not JSON');
    }
    if (!response.ok) throw new Error(path + ': ' + (body.error || ('HTTP ' + response.status)));
    return body;
  }

  async function load() {
    const t0 = performance.now();
    const w = windowParams();
    if (w.error) { showBanner(w.error); return; }
    let deps, cluster;
    try {
      [deps, cluster] = await Promise.all([
        getJson('/v1/dependencies?since=' + w.since + '&until=' + w.until),
        getJson('/v1/cluster'),
      ]);
    } catch (e) {
      showBanner('could not load: ' + e.message);
      return;
    }
    const t1 = performance.now();
    state.data = deps;
    state.graph = buildGraph(deps.edges);
    layout(state.graph);
    render();
    renderSummary(deps);
    renderHealth(cluster, deps);
    if (state.selected && state.graph.nodes.has(state.selected)) select(state.selected);
    else renderDetail(null);
    const t2 = performance.now();
    $('timing').textContent = 'fetched in ' + Math.round(t1 - t0) + ' ms, drawn in ' +
      Math.round(t2 - t1) + ' ms (' + state.graph.nodes.size + ' nodes, ' +
      state.graph.edges.length + ' edges); page ready at ' + Math.round(t2) + ' ms';
    // Read by the browser test: the time from navigation start to the first full map.
    if (!document.body.dataset.readyMs) document.body.dataset.readyMs = String(Math.round(t2));
    document.body.dataset.nodes = String(state.graph.nodes.size);
    document.body.dataset.edges = String(state.graph.edges.length);
  }

  function showBanner(text) {
    const b = $('banner');
    b.textContent = text;
    b.hidden = !text;
  }

  function buildGraph(edges) {
    const nodes = new Map();
    const node = (kind, name) => {
      const key = keyOf(kind, name);
      let n = nodes.get(key);
      if (!n) {
        n = { key, kind, name, out: [], in: [], flows: 0, bytes: 0, unattributed: 0, layer: 0, order: 0, x: 0, y: 0 };
        nodes.set(key, n);
      }
      return n;
    };
    const list = edges.map((e) => {
      const from = node(e.from_kind, e.from);
      const to = node(e.to_kind, e.to);
      const edge = { from, to, data: e, i: 0 };
      from.out.push(edge);
      to.in.push(edge);
      for (const n of [from, to]) {
        n.flows += e.flows;
        n.bytes += e.bytes;
        n.unattributed += e.unattributed_flows;
      }
      return edge;
    });
    list.forEach((e, i) => { e.i = i; });
    return { nodes, edges: list };
  }

  // Layers: a breadth-first walk from the workloads nobody calls, each node placed once
  // (so cycles cannot loop); pseudo-nodes go last, after every workload.
  function layout(graph) {
    const workloads = [...graph.nodes.values()].filter((n) => n.kind === 'workload');
    const pseudo = [...graph.nodes.values()].filter((n) => n.kind !== 'workload');
    const seen = new Set();
    const queue = [];
    const start = (n) => { if (!seen.has(n)) { seen.add(n); n.layer = 0; queue.push(n); } };
    workloads.filter((n) => n.in.every((e) => e.from.kind !== 'workload') && n.out.length > 0).forEach(start);
    let head = 0;
    const drain = () => {
      while (head < queue.length) {
        const n = queue[head++];
        for (const e of n.out) {
          const m = e.to;
          if (m.kind === 'workload' && !seen.has(m)) {
            seen.add(m);
            m.layer = n.layer + 1;
            queue.push(m);
          }
        }
      }
    };
    drain();
    // Whatever is left sits on cycles or is only called: start from the busiest.
    workloads.filter((n) => !seen.has(n)).sort((a, b) => b.flows - a.flows).forEach((n) => { start(n); drain(); });
    let maxLayer = 0;
    for (const n of workloads) maxLayer = Math.max(maxLayer, n.layer);
    for (const n of pseudo) n.layer = maxLayer + 1;

    const layers = [];
    for (const n of graph.nodes.values()) (layers[n.layer] = layers[n.layer] || []).push(n);
    // Order within a layer: by name first, then two barycentre sweeps against the callers
    // so that edges cross less.
    layers.forEach((l) => l.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)));
    layers.forEach((l) => l.forEach((n, i) => { n.order = i; }));
    for (let sweep = 0; sweep < 2; sweep++) {
      for (let i = 1; i < layers.length; i++) {
        const l = layers[i] || [];
        for (const n of l) {
          const callers = n.in.filter((e) => e.from.layer < n.layer);
          n.bary = callers.length ? callers.reduce((s, e) => s + e.from.order, 0) / callers.length : n.order;
        }
        l.sort((a, b) => a.bary - b.bary || b.flows - a.flows);
        l.forEach((n, k) => { n.order = k; });
      }
    }
    // Positions: a layer of more than `rowsMax` nodes wraps into columns; every layer is
    // centred vertically on the tallest one.
    const largest = Math.max(1, ...layers.map((l) => (l || []).length));
    const rowsMax = Math.max(ROWS_PER_COLUMN_MIN, Math.ceil(Math.sqrt((largest * COLUMN_PX) / ROW_PX)));
    const heights = layers.map((l) => Math.min((l || []).length, rowsMax));
    const tallest = Math.max(1, ...heights);
    let x = MARGIN_PX;
    let width = 0;
    layers.forEach((l = [], i) => {
      const columns = Math.max(1, Math.ceil(l.length / rowsMax));
      const top = MARGIN_PX + ((tallest - heights[i]) * ROW_PX) / 2;
      l.forEach((n, k) => {
        n.x = x + Math.floor(k / rowsMax) * COLUMN_PX;
        n.y = top + (k % rowsMax) * ROW_PX;
      });
      width = x + columns * COLUMN_PX;
      x += columns * COLUMN_PX + LAYER_GAP_PX;
    });
    graph.width = Math.max(width + MARGIN_PX, 400);
    graph.height = Math.max(MARGIN_PX * 2 + tallest * ROW_PX, 300);
  }

  function render() {
    const g = state.graph;
    const svg = $('map');
    const by = $('sizeby').value;
    let max = 1;
    let min = Infinity;
    for (const e of g.edges) { max = Math.max(max, e.data[by]); min = Math.min(min, e.data[by]); }
    const lmin = Math.log1p(Number.isFinite(min) ? min : 0);
    const lmax = Math.log1p(max);
    const width = (v) => EDGE_WIDTH_MIN_PX + (EDGE_WIDTH_MAX_PX - EDGE_WIDTH_MIN_PX) *
      (lmax > lmin ? (Math.log1p(v) - lmin) / (lmax - lmin) : 0.5);
    let maxFlows = 1;
    for (const n of g.nodes.values()) maxFlows = Math.max(maxFlows, n.flows);
    const parts = [];
    parts.push('<g id="edges">');
    g.edges.forEach((e, i) => {
      const a = e.from;
      const b = e.to;
      const dx = Math.max(40, (b.x - a.x) / 2);
      const cls = e.to.kind !== 'workload' ? ' e-' + e.to.kind : e.from.kind !== 'workload' ? ' e-' + e.from.kind : '';
      parts.push('<path class="edge' + cls + '" data-i="' + i + '" stroke-width="' + width(e.data[by]).toFixed(2) +
        '" d="M' + a.x.toFixed(1) + ',' + a.y.toFixed(1) + ' C' + (a.x + dx).toFixed(1) + ',' + a.y.toFixed(1) + ' ' +
        (b.x - dx).toFixed(1) + ',' + b.y.toFixed(1) + ' ' + b.x.toFixed(1) + ',' + b.y.toFixed(1) + '"><title>' +
        esc(e.from.name + ' → ' + e.to.name + ': ' + fmtInt(e.data.flows) + ' flows, ' + fmtBytes(e.data.bytes)) +
        '</title></path>');
    });
    parts.push('</g><g id="nodes">');
    let i = 0;
    const index = [];
    for (const n of g.nodes.values()) {
      index.push(n);
      n.i = i;
      const r = 3 + 7 * Math.sqrt(n.flows / maxFlows);
      const label = n.name.length > LABEL_CHARS_MAX ? n.name.slice(0, LABEL_CHARS_MAX - 1) + '…' : n.name;
      parts.push('<g class="node n-' + esc(n.kind) + '" data-n="' + i + '" transform="translate(' + n.x.toFixed(1) + ',' +
        n.y.toFixed(1) + ')"><circle r="' + r.toFixed(1) + '"></circle><text x="' + (r + 3).toFixed(1) +
        '" dy="3.5">' + esc(label) + '</text><title>' + esc(n.name) + ' (' + esc(n.kind) + '): ' + fmtInt(n.flows) +
        ' flows</title></g>');
      i++;
    }
    parts.push('</g>');
    svg.innerHTML = parts.join('');
    state.index = index;
    if (!state.view || state.view.fitted) fit();
    else applyView();
    svg.classList.remove('focus');
  }

  function fit() {
    const g = state.graph;
    state.view = { x: 0, y: 0, w: g.width, h: g.height, fitted: true };
    applyView();
  }
  function applyView() {
    const v = state.view;
    $('map').setAttribute('viewBox', v.x + ' ' + v.y + ' ' + v.w + ' ' + v.h);
  }

  function renderSummary(d) {
    const t = d.totals;
    const workloads = [...state.graph.nodes.values()].filter((n) => n.kind === 'workload').length;
    const reasons = Object.entries(t.unattributed_reasons || {}).map(([r, n]) => esc(r) + ' ' + fmtInt(n)).join(', ');
    // Flows whose local end the exporter vouched for no workload on are edges of the
    // unattributed node, never of the local IP's owner.
    const local = Object.entries(t.local_unattributed_reasons || {}).map(([r, n]) => esc(r) + ' ' + fmtInt(n)).join(', ');
    $('summary').innerHTML = '<b>' + fmtInt(workloads) + '</b> workloads, <b>' + fmtInt(state.graph.edges.length) +
      '</b> edges, <b>' + fmtInt(t.flows) + '</b> flows, <b>' + fmtBytes(t.bytes) + '</b> from ' +
      esc(fmtTime(d.since_ms)) + ' to ' + esc(fmtTime(d.until_ms)) + '. <span class="unknown">' +
      fmtPct(t.unattributed_share) + ' unattributed</span>' + (reasons ? ' (' + reasons + ')' : '') +
      (local ? '; local end unattributed: ' + local : '') +
      (d.edges_truncated ? '; ' + fmtInt(d.edges_truncated) + ' smallest edges left out' : '') +
      (d.edges_dropped ? '; ' + fmtInt(d.edges_dropped) + ' edges dropped at full tables' : '');
    if (d.partial) {
      showBanner('Partial answer: ' + d.nodes_missing.length + ' node(s) did not answer (' +
        d.nodes_missing.map((m) => m.node_id + ': ' + m.error).join('; ') + '). Their flows are missing from the map.');
    } else {
      showBanner('');
    }
  }

  function renderHealth(c, deps) {
    const regions = new Map();
    const add = (region, id, status) => {
      if (!regions.has(region)) regions.set(region, new Map());
      const m = regions.get(region);
      if (!m.has(id) || status !== 'alive') m.set(id, status);
    };
    add(c.region, c.node_id, 'alive');
    for (const m of c.wan_members || []) add(m.region, m.node_id, 'alive');
    for (const m of c.members_seen || []) if (m.state !== 'alive') add(m.region, m.node_id, 'down');
    for (const m of deps.nodes_missing || []) add(m.region, m.node_id, 'missing');
    const rows = [...regions.keys()].sort().map((region) => {
      const members = [...regions.get(region).entries()].sort();
      const alive = members.filter(([, s]) => s === 'alive').length;
      return '<div class="region"><b>' + esc(region) + '</b> ' + alive + '/' + members.length + ' alive<br>' +
        members.map(([id, s]) => '<span class="pill ' + s + '" title="' + esc(s) + '">' + esc(id) +
          (id === c.node_id ? ' (this node)' : '') + (s !== 'alive' ? ' — ' + s : '') + '</span>').join('') + '</div>';
    });
    $('health').innerHTML = '<h2>cluster</h2>' + rows.join('') +
      '<p class="hint">This node: ' + esc(c.node_id) + ', ' + (c.ready ? 'ready' : 'not ready (handoff pending)') +
      '; ring of ' + esc(c.region) + ': ' + (c.ring && c.ring.members ? c.ring.members.length : 0) + ' members.</p>';
  }

  function tableOf(title, edges, pick) {
    if (!edges.length) return '<h3>' + title + '</h3><p class="hint">none</p>';
    const rows = edges.slice().sort((a, b) => b.data.flows - a.data.flows).map((e) => {
      const other = pick(e);
      const unknown = e.data.unattributed_flows;
      return '<tr><td>' + (other.kind === 'workload' ? '<a href="#" data-key="' + esc(other.key) + '">' + esc(other.name) + '</a>' :
        '<i class="unknown-cell">' + esc(other.name) + '</i>') + '</td><td class="n">' + fmtInt(e.data.flows) +
        '</td><td class="n">' + fmtBytes(e.data.bytes) + '</td><td class="n' + (unknown ? ' unknown-cell' : '') + '">' +
        fmtPct(e.data.unattributed_share) + '</td></tr>';
    });
    return '<h3>' + title + ' (' + edges.length + ')</h3><table><thead><tr><th>' + (title === 'callers' ? 'caller' : 'callee') +
      '</th><th class="n">flows</th><th class="n">bytes</th><th class="n">unattr.</th></tr></thead><tbody>' +
      rows.join('') + '</tbody></table>';
  }

  function renderDetail(n) {
    const el = $('detail');
    if (!n) {
      el.innerHTML = '<h2>workload</h2><p class="hint">Click a workload on the map.</p>';
      return;
    }
    const share = n.flows ? n.unattributed / n.flows : 0;
    el.innerHTML = '<h2>' + esc(n.kind) + '</h2><p><b id="detail-name">' + esc(n.name) + '</b><br>' + fmtInt(n.flows) +
      ' flows, ' + fmtBytes(n.bytes) + ', <span class="unknown-cell">' + fmtPct(share) + ' unattributed</span></p>' +
      tableOf('callers', n.in, (e) => e.from) + tableOf('callees', n.out, (e) => e.to);
  }

  function select(key) {
    const n = state.graph.nodes.get(key);
    state.selected = n ? key : null;
    const svg = $('map');
    svg.querySelectorAll('.hl, .selected').forEach((el) => el.classList.remove('hl', 'selected'));
    if (!n) { svg.classList.remove('focus'); renderDetail(null); return; }
    svg.classList.add('focus');
    const nodeEls = svg.querySelectorAll('#nodes > g');
    const mark = (m) => { const el = nodeEls[m.i]; if (el) el.classList.add('hl'); return el; };
    const own = mark(n);
    if (own) own.classList.add('selected');
    const edgeEls = svg.querySelectorAll('#edges > path');
    for (const e of n.in.concat(n.out)) {
      const el = edgeEls[e.i];
      if (el) el.classList.add('hl');
      mark(e.from);
      mark(e.to);
    }
    renderDetail(n);
  }

  // Interaction: click to select, wheel to zoom, drag to pan.
  function setup() {
    const svg = $('map');
    let drag = null;
    svg.addEventListener('click', (ev) => {
      if (drag && drag.moved) return;
      const g = ev.target.closest('.node');
      if (g) select(state.index[Number(g.dataset.n)].key);
      else select(null);
    });
    svg.addEventListener('wheel', (ev) => {
      ev.preventDefault();
      const v = state.view;
      if (!v) return;
      const rect = svg.getBoundingClientRect();
      const scale = Math.max(v.w / rect.width, v.h / rect.height);
      const px = v.x + (ev.clientX - rect.left) * scale;
      const py = v.y + (ev.clientY - rect.top) * scale;
      const k = ev.deltaY > 0 ? 1.2 : 1 / 1.2;
      state.view = { x: px - (px - v.x) * k, y: py - (py - v.y) * k, w: v.w * k, h: v.h * k, fitted: false };
      applyView();
    }, { passive: false });
    svg.addEventListener('mousedown', (ev) => {
      drag = { x: ev.clientX, y: ev.clientY, view: state.view, moved: false };
      svg.classList.add('dragging');
    });
    window.addEventListener('mousemove', (ev) => {
      if (!drag || !drag.view || ev.buttons === 0) return;
      const rect = svg.getBoundingClientRect();
      const v = drag.view;
      const scale = Math.max(v.w / rect.width, v.h / rect.height);
      const dx = (ev.clientX - drag.x) * scale;
      const dy = (ev.clientY - drag.y) * scale;
      if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
      state.view = { x: v.x - dx, y: v.y - dy, w: v.w, h: v.h, fitted: false };
      applyView();
    });
    window.addEventListener('mouseup', () => {
      svg.classList.remove('dragging');
      setTimeout(() => { drag = null; }, 0);
    });
    $('detail').addEventListener('click', (ev) => {
      const a = ev.target.closest('a[data-key]');
      if (!a) return;
      ev.preventDefault();
      select(a.dataset.key);
    });
    $('window').addEventListener('submit', (ev) => { ev.preventDefault(); load(); });
    $('range').addEventListener('change', () => {
      const custom = $('range').value === 'custom';
      $('custom').hidden = !custom;
      if (custom && !$('since').value) {
        const now = Date.now();
        $('since').value = toLocalInput(now - 3600000);
        $('until').value = toLocalInput(now);
      }
      if (!custom) load();
    });
    $('sizeby').addEventListener('change', () => { if (state.graph) { render(); if (state.selected) select(state.selected); } });
    $('fit').addEventListener('click', () => { if (state.graph) fit(); });
    $('auto').addEventListener('change', schedule);
    schedule();
  }

  function schedule() {
    clearInterval(state.timer);
    state.timer = $('auto').checked ? setInterval(() => { if ($('range').value !== 'custom') load(); }, REFRESH_MS) : null;
  }

  setup();
  load();
})();
