(function () {
  "use strict";
  // The page's data: an index of every gallery row (columns), and per-row details in chunk scripts loaded on demand.
  const DATA = JSON.parse(document.getElementById("lgca-data").textContent);
  const INDEX = DATA.index;
  const ROWS = INDEX.keys.length;
  const CHUNK = INDEX.chunkRows;
  const DISPLAY = __DISPLAY_SIDE__;
  const VIEW_SIDE = 640;
  const OK = DATA.statuses.indexOf("ok");
  const $ = (id) => document.getElementById(id);

  // ------------------------------------------------------------ detail chunks (script tags: they load from file://)
  const chunks = {};
  const waiting = {};
  window.lgcaRows = function (n, rows) {
    chunks[n] = rows;
    (waiting[n] || []).forEach((done) => done());
    delete waiting[n];
  };
  function loadChunk(n) {
    if (chunks[n]) return Promise.resolve();
    return new Promise((resolve) => {
      if (waiting[n]) { waiting[n].push(resolve); return; }
      waiting[n] = [resolve];
      const script = document.createElement("script");
      script.src = DATA.filesDir + "/rows/rows-" + String(n).padStart(5, "0") + ".js";
      // A missing file, or one that loads without handing over its rows (cut short, another report's): say so.
      script.onerror = () => { chunks[n] = chunks[n] || "missing"; window.lgcaRows(n, chunks[n]); };
      script.onload = () => { if (!chunks[n]) window.lgcaRows(n, "missing"); };
      document.head.appendChild(script);
    });
  }
  function detail(i) {
    const chunk = chunks[Math.floor(i / CHUNK)];
    return Array.isArray(chunk) ? chunk[i % CHUNK] : null;
  }
  function loadRows(indices) {
    return Promise.all([...new Set(indices.map((i) => Math.floor(i / CHUNK)))].map(loadChunk));
  }

  // ------------------------------------------------------------ state, kept in the URL's hash (links share a view)
  const DEFAULTS = { label: "", status: "", min: "", max: "", bin: "", q: "", sort: "default", page: "0", size: String(DATA.pageSize), view: "" };
  const SORTS = [
    ["default", "label, then confidence \u2191"],
    ["score-asc", "confidence \u2191 (least sure first)"],
    ["score-desc", "confidence \u2193"],
    ["margin-asc", "margin \u2191 (closest call first)"],
    ["margin-desc", "margin \u2193"],
    ["key-asc", "key A\u2013Z"],
  ];
  const state = Object.assign({}, DEFAULTS);
  // The hash holds the gallery's state as key=value pairs; a plain anchor (#gallery, #errors) is not a state.
  const isState = (hash) => hash.indexOf("=") >= 0;
  function readHash() {
    if (!isState(location.hash)) return;
    const params = new URLSearchParams(location.hash.slice(1));
    Object.keys(DEFAULTS).forEach((name) => { state[name] = params.has(name) ? params.get(name) : DEFAULTS[name]; });
  }
  function writeHash() {
    const params = new URLSearchParams();
    Object.keys(DEFAULTS).forEach((name) => { if (state[name] !== DEFAULTS[name]) params.set(name, state[name]); });
    const text = params.toString();
    if (!text && !isState(location.hash)) return;  // keep a plain anchor the reader followed
    history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
  }

  // ------------------------------------------------------------ filtering and sorting over the index
  let selected = [];
  let selectedFor = "";
  function select() {
    const signature = [state.label, state.status, state.min, state.max, state.bin, state.q, state.sort].join("\u0000");
    if (signature === selectedFor) return selected;
    const label = state.label === "" ? null : Number(state.label);
    const status = state.status;
    const min = state.min === "" ? null : Number(state.min);
    const max = state.max === "" ? null : Number(state.max);
    const bin = state.bin === "" ? null : Number(state.bin);
    const query = state.q.trim().toLowerCase();
    const out = [];
    for (let i = 0; i < ROWS; i++) {
      const s = INDEX.status[i];
      if (status === "failed" ? s === OK : status !== "" && s !== Number(status)) continue;
      if (label !== null && INDEX.label[i] !== label) continue;
      const score = INDEX.score[i];
      if ((min !== null || max !== null) && score === null) continue;
      if (min !== null && score < min) continue;
      if (max !== null && score > max) continue;
      if (bin !== null && INDEX.bin[i] !== bin) continue;
      if (query && INDEX.keys[i].toLowerCase().indexOf(query) < 0) continue;
      out.push(i);
    }
    const [column, direction] = state.sort.split("-");
    if (column === "score" || column === "margin") {
      const values = INDEX[column];
      const sign = direction === "desc" ? -1 : 1;
      out.sort((a, b) => {
        const x = values[a], y = values[b];
        if (x === null || y === null) return x === y ? a - b : x === null ? 1 : -1;  // rows without one go last
        return x === y ? a - b : sign * (x - y);
      });
    } else if (column === "key") {
      out.sort((a, b) => (INDEX.keys[a] < INDEX.keys[b] ? -1 : INDEX.keys[a] > INDEX.keys[b] ? 1 : 0));
    }
    selected = out;
    selectedFor = signature;
    return out;
  }

  // ------------------------------------------------------------ drawing
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  const num = (x) => (x === null || x === undefined ? "-" : Number(x).toFixed(3));
  const className = (c) => (c === null || c === undefined ? "?" : DATA.classes[c]);
  const colour = (level) => DATA.colours[((level % DATA.colours.length) + DATA.colours.length) % DATA.colours.length];
  const isLocal = (link) => typeof link === "string" && link.indexOf("file:") === 0;

  // The picture of a row: its thumbnail, else (local images beyond the thumbnail budget) the image itself.
  function picture(d) {
    if (d && d[4] && d[4].src) return { src: d[4].src, w: d[4].w, h: d[4].h };
    if (d && isLocal(d[1]) && d[2] && d[3] && !(d[4] && d[4].error)) return { src: d[1], w: d[2], h: d[3] };
    return null;
  }
  function why(i, d) {
    if (!d) return "details not found (is the _files folder beside the page?)";
    if (INDEX.status[i] !== OK) return DATA.statuses[INDEX.status[i]] + ": no image to show";
    if (d[4] && d[4].error) return "thumbnail failed: " + d[4].error;
    return "no thumbnail: beyond --max-thumbnails " + DATA.maxThumbnails + " (raise it, or open the image)";
  }
  function frame(i, d, side) {
    const wrap = el("div", "frame-wrap");
    const shown = picture(d);
    if (!shown) {
      wrap.appendChild(el("div", "placeholder", why(i, d)));
      return wrap;
    }
    const scale = Math.min(side / shown.w, side / shown.h);
    const box = el("div", "frame");
    box.style.width = Math.round(shown.w * scale) + "px";
    box.style.height = Math.round(shown.h * scale) + "px";
    const img = el("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.alt = INDEX.keys[i];
    img.src = shown.src;
    box.appendChild(img);
    // Grown regions first, so the selected local crop (level 0) is drawn on top.
    d[6].map((b, n) => [b, n]).sort((p, q) => q[0][4] - p[0][4]).forEach(([b, n]) => {
      const node = el("div", "box");
      node.style.left = b[0] * 100 + "%";
      node.style.top = b[1] * 100 + "%";
      node.style.width = (b[2] - b[0]) * 100 + "%";
      node.style.height = (b[3] - b[1]) * 100 + "%";
      node.style.borderColor = colour(b[4]);
      node.dataset.level = b[4];
      node.dataset.box = n;
      node.title = "box " + n + ", level " + b[4] + (b[5] >= 0 ? " (grown from box " + b[5] + ")" : "") + ": " +
        className(b[6]) + " " + num(b[7]) + ", saliency " + num(b[8]);
      box.appendChild(node);
    });
    wrap.appendChild(box);
    return wrap;
  }
  function card(i, position) {
    const d = detail(i);
    const ok = INDEX.status[i] === OK;
    const node = el("div", ok ? "card" : "card failed");
    node.dataset.key = INDEX.keys[i];
    node.dataset.row = i;
    node.dataset.position = position;
    node.appendChild(frame(i, d, DISPLAY));
    const meta = el("div", "meta");
    const keyLine = meta.appendChild(el("div", "key", INDEX.keys[i]));
    keyLine.title = d ? d[0] : INDEX.keys[i];
    if (d && d[1]) {  // the full-size image, without opening the view
      const open = keyLine.insertBefore(el("a", "open", "\u2197"), keyLine.firstChild);
      open.href = d[1];
      open.target = "_blank";
      open.rel = "noopener";
      open.title = "open the full-size image";
      open.addEventListener("click", (event) => event.stopPropagation());
    }
    if (ok) {
      const pred = meta.appendChild(el("div", "pred", className(INDEX.label[i]) + " " + num(INDEX.score[i]) + "  (margin " + num(INDEX.margin[i]) + ")"));
      pred.dataset.label = className(INDEX.label[i]);
      pred.dataset.score = INDEX.score[i];
      pred.dataset.margin = INDEX.margin[i];
      if (d) {
        const list = el("ol");
        d[5].slice(0, 3).forEach(([c, s]) => list.appendChild(el("li", null, className(c) + " " + num(s))));
        meta.appendChild(list);
        node.title = "top-k: " + d[5].map(([c, s]) => className(c) + " " + num(s)).join(", ");
      }
    } else {
      meta.appendChild(el("div", "status", DATA.statuses[INDEX.status[i]])).dataset.status = DATA.statuses[INDEX.status[i]];
      if (d && d[7]) meta.appendChild(el("div", "error", d[7]));
    }
    node.appendChild(meta);
    node.addEventListener("click", () => { state.view = String(i); update(); });
    return node;
  }

  // ------------------------------------------------------------ the gallery page
  const grid = $("gallery-grid");
  const status = $("gallery-status");
  let renders = 0;
  function render() {
    const rows = select();
    const size = Math.max(1, Number(state.size) || DATA.pageSize);
    const pages = Math.max(1, Math.ceil(rows.length / size));
    const page = Math.min(Math.max(0, Number(state.page) || 0), pages - 1);
    state.page = String(page);
    const shown = rows.slice(page * size, page * size + size);
    const ticket = ++renders;
    status.textContent = "loading\u2026";
    return loadRows(shown).then(() => {
      if (ticket !== renders) return;  // a newer render took over
      grid.textContent = "";
      shown.forEach((i, n) => grid.appendChild(card(i, page * size + n)));
      if (!shown.length) grid.appendChild(el("p", "muted", "No rows match these filters."));
      const binned = state.bin === "" ? "" : " \u00b7 score " + (Number(state.bin) / DATA.scoreBins).toFixed(2) + "\u2013" +
        ((Number(state.bin) + 1) / DATA.scoreBins).toFixed(2) + " (a histogram bar; reset to clear)";
      status.textContent = (rows.length ? "page " + (page + 1) + " of " + pages + " \u00b7 rows " + (page * size + 1) + "\u2013" +
        (page * size + shown.length) + " of " + rows.length.toLocaleString() + " matching" : "0 rows match") + binned;
      status.dataset.matching = rows.length;
      status.dataset.page = page;
      status.dataset.pages = pages;
      $("page-first").disabled = $("page-prev").disabled = page === 0;
      $("page-next").disabled = $("page-last").disabled = page >= pages - 1;
      grid.dataset.rendered = ticket;
    });
  }

  // ------------------------------------------------------------ one image: all its boxes and its top-k
  const view = $("view");
  function showView() {
    if (state.view === "") { view.hidden = true; return Promise.resolve(); }
    const i = Number(state.view);
    if (!(i >= 0 && i < ROWS)) { state.view = ""; view.hidden = true; return Promise.resolve(); }
    return loadRows([i]).then(() => {
      if (String(i) !== state.view) return;  // another row was asked for meanwhile: its own call draws it
      const d = detail(i);
      const rows = select();
      const at = rows.indexOf(i);
      $("view-position").textContent = at >= 0 ? "row " + (at + 1) + " of " + rows.length.toLocaleString() + " matching" : "";
      $("view-prev").disabled = at <= 0;
      $("view-next").disabled = at < 0 || at >= rows.length - 1;
      $("view-key").textContent = INDEX.keys[i];
      const image = $("view-image");
      image.textContent = "";
      // The full-size image when it is a local file (sharper), else the thumbnail; boxes are relative, so both fit.
      const full = d && isLocal(d[1]) && d[2] && d[3] ? [d[0], d[1], d[2], d[3], { src: d[1], w: d[2], h: d[3] }, d[5], d[6], d[7]] : d;
      const drawn = frame(i, full, VIEW_SIDE);
      const img = drawn.querySelector("img");
      if (img && full !== d && d && d[4] && d[4].src) img.onerror = () => { img.onerror = null; img.src = d[4].src; };
      image.appendChild(drawn);
      const meta = $("view-meta");
      meta.textContent = "";
      const ok = INDEX.status[i] === OK;
      meta.appendChild(el("strong", null, ok ? className(INDEX.label[i]) + " " + num(INDEX.score[i]) + " (margin " + num(INDEX.margin[i]) + ")" :
        DATA.statuses[INDEX.status[i]]));
      if (d) {
        meta.appendChild(document.createElement("br"));
        if (d[2] && d[3]) meta.appendChild(document.createTextNode(d[2] + " \u00d7 " + d[3] + " px \u00b7 "));
        if (d[1]) {
          const link = el("a", null, "open the full-size image");
          link.href = d[1];
          link.target = "_blank";
          link.rel = "noopener";
          link.id = "view-link";
          meta.appendChild(link);
          meta.appendChild(document.createElement("br"));
        }
        meta.appendChild(el("code", null, d[0]));
        if (d[7]) { meta.appendChild(document.createElement("br")); meta.appendChild(el("span", "error", d[7])); }
      }
      const topk = $("view-topk");
      topk.textContent = "";
      (d ? d[5] : []).forEach(([c, s], n) => {
        const tr = topk.appendChild(el("tr"));
        tr.appendChild(el("td", "num", String(n + 1)));
        tr.appendChild(el("td", null, className(c)));
        tr.appendChild(el("td", "num", num(s)));
        const cell = tr.appendChild(el("td"));
        cell.appendChild(el("span", "topk-bar")).style.width = Math.round(120 * Math.max(0, s || 0)) + "px";
      });
      const boxes = $("view-boxes");
      boxes.textContent = "";
      const head = boxes.appendChild(el("tr"));
      ["box", "level", "parent", "label", "score", "saliency", "x0, y0, x1, y1"].forEach((t) => head.appendChild(el("th", null, t)));
      (d ? d[6] : []).forEach((b, n) => {
        const tr = boxes.appendChild(el("tr"));
        tr.dataset.box = n;
        [String(n), String(b[4]), String(b[5]), className(b[6]), num(b[7]), num(b[8]), b.slice(0, 4).map((v) => v.toFixed(3)).join(", ")]
          .forEach((t, k) => tr.appendChild(el("td", k === 0 || k > 3 ? "num" : null, t)));
        tr.firstChild.style.borderLeft = "4px solid " + colour(b[4]);
        const target = image.querySelector('.box[data-box="' + n + '"]');
        tr.addEventListener("mouseenter", () => { tr.classList.add("hover"); if (target) target.style.outline = "2px dashed #000"; });
        tr.addEventListener("mouseleave", () => { tr.classList.remove("hover"); if (target) target.style.outline = ""; });
      });
      view.hidden = false;
      view.dataset.row = i;
    });
  }
  function step(by) {
    const rows = select();
    const at = rows.indexOf(Number(state.view));
    if (at < 0 || at + by < 0 || at + by >= rows.length) return;
    state.view = String(rows[at + by]);
    state.page = String(Math.floor((at + by) / (Number(state.size) || DATA.pageSize)));  // the gallery follows
    update();
  }

  // ------------------------------------------------------------ controls
  const controls = {
    label: $("filter-label"), status: $("filter-status"), min: $("filter-min"), max: $("filter-max"), q: $("filter-key"),
    sort: $("sort"), size: $("page-size"),
  };
  function option(select, value, text) {
    const node = el("option", null, text);
    node.value = value;
    select.appendChild(node);
  }
  option(controls.label, "", "all labels");
  const perLabel = {};
  INDEX.label.forEach((c) => { if (c !== null) perLabel[c] = (perLabel[c] || 0) + 1; });
  DATA.classes.forEach((name, c) => { if (perLabel[c]) option(controls.label, String(c), name + " (" + perLabel[c].toLocaleString() + ")"); });
  option(controls.status, "", "all statuses");
  option(controls.status, "failed", "any failure");
  const perStatus = {};
  INDEX.status.forEach((s) => { perStatus[s] = (perStatus[s] || 0) + 1; });
  DATA.statuses.forEach((name, s) => option(controls.status, String(s), name + " (" + (perStatus[s] || 0).toLocaleString() + ")"));
  SORTS.forEach(([value, text]) => option(controls.sort, value, text));
  DATA.pageSizes.forEach((n) => option(controls.size, String(n), n + " per page"));
  function showControls() {
    Object.keys(controls).forEach((name) => { controls[name].value = state[name]; });
  }

  // Apply the state to the controls, the gallery, the single view and the hash.
  let drawn = Promise.resolve();
  function update() {
    showControls();
    writeHash();
    drawn = Promise.all([render(), showView()]);
    return drawn;
  }
  function onControl(name, event) {  // a filter, sort or page-size change starts again at page 1
    controls[name].addEventListener(event, () => {
      state[name] = controls[name].value;
      if (name === "min" || name === "max") state.bin = "";  // a score range typed in replaces a histogram bar's
      state.page = "0";
      update();
    });
  }
  onControl("label", "change");
  onControl("status", "change");
  onControl("sort", "change");
  onControl("size", "change");
  onControl("min", "input");
  onControl("max", "input");
  onControl("q", "input");
  $("filter-reset").addEventListener("click", () => { Object.assign(state, DEFAULTS); update(); });
  const go = (page) => () => { state.page = String(page()); update(); };
  $("page-first").addEventListener("click", go(() => 0));
  $("page-prev").addEventListener("click", go(() => Number(state.page) - 1));
  $("page-next").addEventListener("click", go(() => Number(state.page) + 1));
  $("page-last").addEventListener("click", go(() => Number(status.dataset.pages || 1) - 1));
  $("view-close").addEventListener("click", () => { state.view = ""; update(); });
  $("view-prev").addEventListener("click", () => step(-1));
  $("view-next").addEventListener("click", () => step(1));
  view.addEventListener("click", (event) => { if (event.target === view) { state.view = ""; update(); } });
  document.addEventListener("keydown", (event) => {
    if (view.hidden) return;
    if (event.key === "Escape") { state.view = ""; update(); }
    else if (event.key === "ArrowLeft") step(-1);
    else if (event.key === "ArrowRight") step(1);
  });
  // Summary links filter the gallery: a label, a failure status, a histogram bar's score range.
  function filterTo(changes) {
    Object.assign(state, { label: "", status: "", min: "", max: "", bin: "", q: "", page: "0", view: "" }, changes);
    update().then(() => $("gallery").scrollIntoView());
  }
  document.querySelectorAll("[data-filter-label]").forEach((link) => link.addEventListener("click", (event) => {
    event.preventDefault();
    filterTo({ label: String(DATA.classes.indexOf(link.dataset.filterLabel)) });
  }));
  document.querySelectorAll("[data-filter-status]").forEach((link) => link.addEventListener("click", (event) => {
    event.preventDefault();
    filterTo({ status: String(DATA.statuses.indexOf(link.dataset.filterStatus)) });
  }));
  document.querySelectorAll("[data-bin]").forEach((bar) => bar.addEventListener("click", () => {
    filterTo({ status: String(OK), bin: bar.dataset.bin, sort: "score-asc" });
  }));
  // Box levels can be hidden from the legend's checkboxes.
  const hidden = document.createElement("style");
  document.head.appendChild(hidden);
  document.querySelectorAll("[data-toggle-level]").forEach((box) => box.addEventListener("change", () => {
    hidden.textContent = Array.from(document.querySelectorAll("[data-toggle-level]")).filter((b) => !b.checked)
      .map((b) => '.box[data-level="' + b.dataset.toggleLevel + '"]{display:none}').join("\n");
  }));

  window.addEventListener("hashchange", () => { if (isState(location.hash)) { readHash(); update(); } });
  // For scripts and tests: wait until the gallery and the single view are drawn; the rows matching the filters.
  window.lgcaReport = { idle: () => drawn, state: () => Object.assign({}, state), rows: () => select().slice() };
  readHash();
  update();
})();
