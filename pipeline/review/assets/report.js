(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("lgca-data").textContent);
  var DISPLAY = __DISPLAY_SIDE__;
  var state = { group: 0, page: 0, size: DATA.pageSize };
  var select = document.getElementById("gallery-label");
  var sizeSelect = document.getElementById("gallery-size");
  var grid = document.getElementById("gallery-grid");
  var status = document.getElementById("gallery-status");
  var prev = document.getElementById("gallery-prev");
  var next = document.getElementById("gallery-next");

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function num(x) { return x === null || x === undefined ? "-" : Number(x).toFixed(3); }
  function colour(level) { return DATA.colours[((level % DATA.colours.length) + DATA.colours.length) % DATA.colours.length]; }

  function frameFor(key, thumb) {
    var wrap = el("div", "frame-wrap");
    if (!thumb) {
      wrap.appendChild(el("div", "placeholder", DATA.thumbnailsPerLabel === 0 ? "no thumbnail (--thumbnails-per-label 0)" :
        "no thumbnail (beyond the " + DATA.thumbnailsPerLabel + " lowest-confidence rows of this label; see --thumbnails-per-label)"));
      return wrap;
    }
    if (thumb.error) {
      wrap.appendChild(el("div", "placeholder", "thumbnail failed: " + thumb.error));
      return wrap;
    }
    var scale = Math.min(DISPLAY / thumb.w, DISPLAY / thumb.h);
    var frame = el("div", "frame");
    frame.style.width = Math.round(thumb.w * scale) + "px";
    frame.style.height = Math.round(thumb.h * scale) + "px";
    var img = el("img");
    img.src = thumb.src;
    img.alt = key;
    img.decoding = "async";
    frame.appendChild(img);
    // Grown regions first, so the selected local crop (level 0) is drawn on top.
    var boxes = thumb.boxes.slice().sort(function (a, b) { return b[4] - a[4]; });
    boxes.forEach(function (b) {
      var box = el("div", "box");
      box.style.left = (b[0] * 100) + "%";
      box.style.top = (b[1] * 100) + "%";
      box.style.width = ((b[2] - b[0]) * 100) + "%";
      box.style.height = ((b[3] - b[1]) * 100) + "%";
      box.style.borderColor = colour(b[4]);
      box.dataset.level = b[4];
      box.title = "level " + b[4] + (b[5] >= 0 ? " (grown from box " + b[5] + ")" : "") + ": " + b[6] +
        " " + num(b[7]) + ", saliency " + num(b[8]);
      frame.appendChild(box);
    });
    wrap.appendChild(frame);
    return wrap;
  }

  function card(group, i) {
    var key = group.keys[i];
    var thumb = DATA.thumbs[key];
    var node = el("div", "card");
    node.dataset.key = key;
    node.appendChild(frameFor(key, thumb));
    var meta = el("div", "meta");
    var keyLine = el("div", "key", key);
    keyLine.title = thumb ? thumb.path : key;
    meta.appendChild(keyLine);
    meta.appendChild(el("div", "pred", DATA.classes[group.label] + " " + num(group.scores[i]) +
      "  (margin " + num(group.margins[i]) + ")"));
    var list = el("ol");
    var lines = [];
    group.topk[i].forEach(function (c, j) {
      var text = (c === null ? "?" : DATA.classes[c]) + " " + num(group.topkScores[i][j]);
      lines.push(text);
      list.appendChild(el("li", null, text));
    });
    meta.appendChild(list);
    node.title = "top-k: " + lines.join(", ");
    node.appendChild(meta);
    return node;
  }

  function render() {
    grid.textContent = "";
    var group = DATA.groups[state.group];
    if (!group) {
      status.textContent = "no ok rows";
      prev.disabled = next.disabled = true;
      return;
    }
    var embedded = group.keys.length;
    var pages = Math.max(1, Math.ceil(embedded / state.size));
    state.page = Math.min(Math.max(0, state.page), pages - 1);
    var start = state.page * state.size, end = Math.min(embedded, start + state.size);
    for (var i = start; i < end; i++) grid.appendChild(card(group, i));
    status.textContent = "page " + (state.page + 1) + " of " + pages + " \u00b7 rows " + (start + 1) + "\u2013" + end +
      " of " + group.count + " \u00b7 lowest confidence first" + (embedded < group.count ? " \u00b7 only the " + embedded +
      " lowest-confidence rows are embedded (--max-gallery-rows); lgca export --labels lists them all" : "");
    status.dataset.count = group.count;
    status.dataset.embedded = embedded;
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
  }

  DATA.groups.forEach(function (g, i) {
    var option = el("option", null, DATA.classes[g.label] + " (" + g.count + ")");
    option.value = String(i);
    select.appendChild(option);
  });
  DATA.pageSizes.forEach(function (n) {
    var option = el("option", null, n + " per page");
    option.value = String(n);
    if (n === state.size) option.selected = true;
    sizeSelect.appendChild(option);
  });
  select.addEventListener("change", function () { state.group = Number(select.value); state.page = 0; render(); });
  sizeSelect.addEventListener("change", function () { state.size = Number(sizeSelect.value); state.page = 0; render(); });
  prev.addEventListener("click", function () { state.page -= 1; render(); });
  next.addEventListener("click", function () { state.page += 1; render(); });
  Array.prototype.forEach.call(document.querySelectorAll(".label-link"), function (link) {
    link.addEventListener("click", function () {
      for (var i = 0; i < DATA.groups.length; i++) {
        if (DATA.classes[DATA.groups[i].label] === link.dataset.label) { state.group = i; select.value = String(i); }
      }
      state.page = 0;
      render();
    });
  });
  render();
})();
