/* vitscope viewer: draws packed ViT attention over an image. Self-contained: no network, no libraries.
 *
 * Data (JSON in <script type="application/json" class="vitscope-data">, written by vitscope/viewer/pack.py; a
 * page for several images holds one such block per image in the same viewer, which then shows an image picker):
 *   attention: [layers, heads, queries, tokens], uint8 (value = byte / 255 * scale[row]) or float16
 *   rollout:   [layers, queries, tokens], cumulative attention rollout through each stored layer (or null)
 *   maps:      [{name, values: rows*cols floats}], maps of their own (gradient maps for a target; may be absent):
 *              shown as methods "map:K", independent of layer, head and query
 * Token layout: [prefix tokens..., patches (row-major), suffix tokens...]; grid = [rows, cols] (height before
 * width); suffix (e.g. YOLOS's "det" tokens) may be absent in older pages.
 *   features (optional): one layer's patch features: pca [rows, cols, 3] float16 colours in [0, 1] (the PCA tab)
 *   and unit [rows, cols, K] float16 unit vectors (the similarity tab: cosine = dot product of two rows).
 * Views (tabs): "attention" (raw attention or rollout), "pca", "similarity" (click a patch: the cosine of its
 * feature to every patch; hovering follows the cursor like the attention query does).
 *   video (optional): frames T', tubelet, input_frames T = T' * tubelet, frame_grid [rows, cols], images (one
 *   data URL per input frame). The patches are then T' frames of rows x cols tokens, time slowest (grid is the
 *   stacked [T' * rows, cols]); a frame slider (and play button) steps over the T input frames, frame f showing
 *   token frame floor(f / tubelet): the overlay is that frame's part of the row, on one colour scale over every
 *   frame; a strip shows every token frame's part and its share of the row's mass (the temporal profile).
 *   Hovering a patch of the shown frame makes that space-time token the query.
 *
 * Each mounted viewer is exposed as window.vitscopeViewers[i]; viewer.current holds what is drawn
 * (image index, values of the patches, query token, layer, head, method), viewer.timings the last redraw
 * times (ms); viewer.show(i) switches to image i of a several-image page.
 */
(function () {
  "use strict";

  var FORMAT = "vitscope-viewer/1";

  function b64bytes(s) {
    var bin = atob(s);
    var out = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  function halfToFloat(h) {
    var s = (h & 0x8000) ? -1 : 1;
    var e = (h >> 10) & 0x1f;
    var f = h & 0x3ff;
    if (e === 0) return s * Math.pow(2, -14) * (f / 1024);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * Math.pow(2, e - 15) * (1 + f / 1024);
  }

  /* One packed array [..., K]; row(i, out) writes flat row i (of K values) into out. */
  function Store(d) {
    this.shape = d.shape;
    this.K = d.shape[d.shape.length - 1];
    this.dtype = d.dtype;
    var bytes = b64bytes(d.data);
    var view, i;
    if (d.dtype === "uint8") {
      this.bytes = bytes;
      var sb = b64bytes(d.scale);
      view = new DataView(sb.buffer);
      this.scale = new Float32Array(sb.length / 4);
      for (i = 0; i < this.scale.length; i++) this.scale[i] = view.getFloat32(4 * i, true) / 255;
    } else if (d.dtype === "float16") {
      view = new DataView(bytes.buffer);
      this.values = new Float32Array(bytes.length / 2);
      for (i = 0; i < this.values.length; i++) this.values[i] = halfToFloat(view.getUint16(2 * i, true));
    } else {
      throw new Error("unknown dtype " + d.dtype);
    }
  }
  Store.prototype.row = function (i, out) {
    var K = this.K, off = i * K, k;
    if (this.dtype === "uint8") {
      var s = this.scale[i], b = this.bytes;
      for (k = 0; k < K; k++) out[k] = b[off + k] * s;
    } else {
      var v = this.values;
      for (k = 0; k < K; k++) out[k] = v[off + k];
    }
    return out;
  };

  function el(tag, attrs, parent) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var key in attrs) {
        if (key === "text") e.textContent = attrs[key];
        else if (key === "className") e.className = attrs[key];
        else e.setAttribute(key, attrs[key]);
      }
    }
    if (parent) parent.appendChild(e);
    return e;
  }

  function fmt(v) {
    if (!isFinite(v)) return String(v);
    if (v === 0) return "0";
    return Math.abs(v) >= 0.01 ? v.toFixed(4) : v.toExponential(2);
  }

  /* DINO's mask (Caron et al. 2021): the largest values whose sum first reaches tau of the total
   * (vitscope.methods.masks.mass_mask, with its 1e-6 slack so a map hitting tau exactly adds no cell). */
  var MASS_SLACK = 1e-6;
  function thresholdMask(values, tau) {
    var n = values.length, order = new Array(n), total = 0, i;
    for (i = 0; i < n; i++) { order[i] = i; total += values[i]; }
    order.sort(function (a, b) { return values[b] - values[a] || a - b; });
    var keep = new Uint8Array(n), before = 0;
    for (i = 0; i < n; i++) {
      var j = order[i];
      keep[j] = (total > 0 ? before / total : 0) < tau - MASS_SLACK ? 1 : 0;
      before += values[j];
    }
    return keep;
  }

  /* root: the .vitscope-viewer element; datas: one packed payload per image (several: an image picker). */
  function Viewer(root, datas) {
    var self = this;
    this.root = root;
    this.datas = datas;
    this.timings = [];
    this.picker = null;
    this.index = -1;
    this.state = {
      layer: null, head: "mean", method: "raw", query: null, follow: true,
      mask: false, tau: 0.6, opacity: 0.6, smooth: false, view: "attention", simPatch: null, frame: 0
    };
    this.player = null;
    root.setAttribute("tabindex", "0");
    if (datas.length > 1) this.buildPicker();
    this.body = el("div", { className: "vs-body" }, root);
    root.addEventListener("keydown", function (e) { self.onKey(e); });
    if (typeof ResizeObserver !== "undefined") {
      this.resizer = new ResizeObserver(function () { self.draw(); });
    } else {
      this.resizer = null;
      window.addEventListener("resize", function () { self.draw(); });
    }
    this.load(0);
  }

  /* Show image i: decode its payload and rebuild the controls, keeping the user's settings (layer position,
     head, method, mask, tau, opacity, smoothing) where the new image has them; the query starts over. */
  Viewer.prototype.load = function (i) {
    var data = this.datas[i];
    if (data.format !== FORMAT) throw new Error("unsupported data format " + data.format);
    var hadFocus = this.body.contains(document.activeElement);
    this.index = i;
    this.data = data;
    this.stop();
    this.video = data.video || null;
    this.T = this.video ? this.video.frames : 1;             // token frames
    this.tubelet = this.video ? this.video.tubelet : 1;
    this.F = this.video ? this.video.input_frames : 1;       // input frames: the slider's steps
    this.rows = this.video ? this.video.frame_grid[0] : data.grid[0];  // one frame's grid
    this.cols = data.grid[1];
    this.NP = this.T * this.rows * this.cols;                 // patch tokens, (T', rows, cols) order
    this.P = data.prefix.length;
    this.N = data.tokens;
    this.suffix = data.suffix || [];
    this.S0 = this.P + this.NP;  // first suffix token: patches are P .. S0 - 1
    this.attn = new Store(data.attention);
    this.roll = data.rollout ? new Store(data.rollout) : null;
    this.maps = data.maps || [];
    this.L = data.layers.length;
    this.H = data.heads.length;
    this.Q = data.queries.length;
    this.qpos = {};
    for (var q = 0; q < this.Q; q++) this.qpos[data.queries[q]] = q;
    this.lut = b64bytes(data.cmap.lut);
    this.feat = null;
    if (data.features) {  // unit vectors renormalised after float16 rounding: a cosine is a dot product
      var f = data.features, unit = new Store(f.unit), K = unit.K, n = this.rows * this.cols, u = unit.values;
      for (var p = 0; p < n; p++) {
        var ss = 0, k;
        for (k = 0; k < K; k++) ss += u[p * K + k] * u[p * K + k];
        ss = ss > 0 ? 1 / Math.sqrt(ss) : 0;
        for (k = 0; k < K; k++) u[p * K + k] *= ss;
      }
      this.feat = { pca: new Store(f.pca).values, unit: u, K: K, layer: f.layer, norm: f.norm };
    }
    this.state.simPatch = null;
    this.buf = new Float32Array(this.N);
    this.acc = new Float32Array(this.N);
    this.hoverKey = null;   // token index of the patch under the cursor
    this.hoverQuery = null; // token used as query while following the cursor
    var cls = data.prefix.indexOf("cls");
    var st = this.state;
    st.query = (cls >= 0 && this.qpos[cls] !== undefined) ? cls : data.queries[0];
    st.follow = true;
    if (st.layer === null) st.layer = this.L - 1;
    this.validate();
    this.body.textContent = "";
    this.build();
    if (this.picker) {
      this.picker.value = String(i);
      this.pickerLab.textContent = (i + 1) + " of " + this.datas.length;
    }
    if (hadFocus) this.focus();
    return this.draw();
  };

  /* Switch to image i (wrapping around) of a several-image page; returns viewer.current. */
  Viewer.prototype.show = function (i) {
    var n = this.datas.length;
    i = ((i % n) + n) % n;
    return i === this.index ? this.current : this.load(i);
  };

  Viewer.prototype.focus = function () {
    try {
      this.root.focus({ preventScroll: true });
    } catch (err) {
      this.root.focus();
    }
  };

  Viewer.prototype.buildPicker = function () {
    var self = this;
    var bar = el("div", { className: "vs-picker" }, this.root);
    var f = el("label", { className: "vs-field" }, bar);
    el("span", { text: "image" }, f);
    this.picker = el("select", { className: "vs-image-select" }, f);
    this.datas.forEach(function (d, i) { el("option", { value: String(i), text: d.title }, self.picker); });
    this.pickerLab = el("output", { className: "vs-image-count" }, bar);
    this.picker.addEventListener("change", function () { self.show(+self.picker.value); });
  };

  Viewer.prototype.tokenLabel = function (t) {
    if (t < this.P) {
      var kind = this.data.prefix[t];
      if (kind === "cls") return "[CLS]";
      if (kind === "dist") return "[DIST]";
      var k = 0;
      for (var i = 0; i < t; i++) if (this.data.prefix[i] === "register") k++;
      return "register " + k;
    }
    if (t >= this.S0) {
      var s = t - this.S0, kind2 = this.suffix[s] || "suffix", j = 0;
      for (var m = 0; m < s; m++) if (this.suffix[m] === kind2) j++;
      return kind2 + " " + j;
    }
    var p = t - this.P, per = this.rows * this.cols, q = p % per;
    var label = "patch (" + Math.floor(q / this.cols) + ", " + (q % this.cols) + ")";
    return this.video ? "frame " + this.frameSpan(Math.floor(p / per)) + " " + label : label;
  };

  /* The input frames token frame tf covers: "4" or "4-5". */
  Viewer.prototype.frameSpan = function (tf) {
    var a = tf * this.tubelet, b = a + this.tubelet - 1;
    return b > a ? a + "-" + b : String(a);
  };

  /* The token frame shown: the one covering the slider's input frame. */
  Viewer.prototype.tokenFrame = function () {
    return this.video ? Math.floor(this.state.frame / this.tubelet) : 0;
  };

  /* Stop playing the frames. */
  Viewer.prototype.stop = function () {
    if (this.player !== null) { clearInterval(this.player); this.player = null; }
    if (this.playBtn) this.playBtn.textContent = "play";
  };

  /* Play or pause the frames (one input frame every 250 ms, looping). */
  Viewer.prototype.togglePlay = function () {
    var self = this;
    if (!this.video) return;
    if (this.player !== null) { this.stop(); return; }
    this.player = setInterval(function () { self.set({ frame: (self.state.frame + 1) % self.F }); }, 250);
    this.playBtn.textContent = "pause";
  };

  Viewer.prototype.build = function () {
    var self = this, d = this.data, root = this.body;
    var head = el("div", { className: "vs-header" }, root);
    el("h1", { text: d.title }, head);
    var sub = (this.video ? this.F + " frames (" + this.T + " token frames of " + this.tubelet + ") x " : "") +
      "grid " + this.rows + " x " + this.cols + " patches, " + this.P + " prefix token" +
      (this.P === 1 ? "" : "s") + (this.suffix.length ? ", " + this.suffix.length + " suffix tokens" : "") +
      ", " + d.num_layers + " layers x " + d.num_heads + " heads";
    if (d.model && d.model !== d.title) sub = d.model + " \u00b7 " + sub;
    el("div", { className: "vs-sub", text: sub }, head);
    (d.labels || []).forEach(function (line) { el("div", { className: "vs-label", text: line }, head); });

    var tabs = el("div", { className: "vs-tabs", role: "tablist" }, root);
    this.tabs = {};
    [["attention", "attention"], ["pca", "PCA"], ["similarity", "similarity"]].forEach(function (t) {
      var b = el("button", { className: "vs-tab vs-tab-" + t[0], type: "button", role: "tab", text: t[1] }, tabs);
      if (t[0] !== "attention" && !self.feat) {
        b.disabled = true;
        b.title = "no features in this page (vitscope.viewer.view packs them)";
      }
      b.addEventListener("click", function () { self.set({ view: t[0] }); });
      self.tabs[t[0]] = b;
    });

    var controls = el("div", { className: "vs-controls" }, root);
    function field(label) {
      var f = el("label", { className: "vs-field" }, controls);
      el("span", { text: label }, f);
      return f;
    }
    var f;
    f = field("method");
    this.methodSel = el("select", { className: "vs-method" }, f);
    el("option", { value: "raw", text: "raw attention" }, this.methodSel);
    var ro = el("option", { value: "rollout", text: "rollout" }, this.methodSel);
    if (!this.roll) ro.disabled = true;
    for (var mk = 0; mk < this.maps.length; mk++) {
      el("option", { value: "map:" + mk, text: this.maps[mk].name }, this.methodSel);
    }

    f = field("layer");
    this.layerIn = el("input", { className: "vs-layer", type: "range", min: "0", max: String(this.L - 1), step: "1" }, f);
    this.layerLab = el("output", { className: "vs-layer-label" }, f);

    f = field("head");
    this.headSel = el("select", { className: "vs-head" }, f);
    el("option", { value: "mean", text: "mean" }, this.headSel);
    if (this.H > 1) el("option", { value: "max", text: "max" }, this.headSel);
    if (!(this.H === 1 && d.heads[0] === "mean")) {
      for (var h = 0; h < this.H; h++) el("option", { value: String(h), text: "head " + d.heads[h] }, this.headSel);
    }

    f = field("query");
    this.querySel = el("select", { className: "vs-query" }, f);
    for (var t = 0; t < this.N; t++) {  // prefix and suffix tokens (patches are picked on the image)
      if (t === this.P) t = this.S0;
      if (t < this.N && this.qpos[t] !== undefined) {
        el("option", { value: String(t), text: this.tokenLabel(t) }, this.querySel);
      }
    }
    this.pinnedOpt = el("option", { value: "", text: "patch" }, this.querySel);
    this.pinnedOpt.hidden = true;

    f = field("follow cursor");
    this.followIn = el("input", { className: "vs-follow", type: "checkbox" }, f);
    if (!this.hasPatchQueries()) { this.followIn.disabled = true; this.state.follow = false; }

    f = field("DINO mask");
    this.maskIn = el("input", { className: "vs-mask", type: "checkbox" }, f);
    this.tauIn = el("input", { className: "vs-tau", type: "range", min: "0.05", max: "1", step: "0.01" }, f);
    this.tauLab = el("output", { className: "vs-tau-label" }, f);

    f = field("opacity");
    this.opacityIn = el("input", { className: "vs-opacity", type: "range", min: "0", max: "1", step: "0.05" }, f);

    f = field("smooth");
    this.smoothIn = el("input", { className: "vs-smooth", type: "checkbox" }, f);

    this.playBtn = null;
    if (this.video) {  // the time axis: play button, frame slider, the token frame it shows
      var time = el("div", { className: "vs-time" }, root);
      this.playBtn = el("button", { className: "vs-play", type: "button", text: "play" }, time);
      f = el("label", { className: "vs-field" }, time);
      el("span", { text: "frame" }, f);
      this.frameIn = el("input", { className: "vs-frame", type: "range", min: "0", max: String(this.F - 1), step: "1" }, f);
      this.frameLab = el("output", { className: "vs-frame-label" }, f);
    }

    var main = el("div", { className: "vs-main" }, root);
    this.stage = el("div", { className: "vs-stage" }, main);
    this.img = el("img", { className: "vs-image", alt: "input image", src: d.image.src, draggable: "false" }, this.stage);
    var longSide = Math.max(d.image.width, d.image.height);
    var s = 560 / longSide;
    this.stage.style.maxWidth = Math.round(d.image.width * s) + "px";
    this.stage.style.aspectRatio = d.image.width + " / " + d.image.height;
    if (longSide < 160) this.img.style.imageRendering = "pixelated";
    this.canvas = el("canvas", { className: "vs-canvas" }, this.stage);
    var side = el("div", { className: "vs-side" }, main);
    this.thumbs = [];
    if (this.video) {  // every token frame's part of the row, and its share of the row's mass
      var strip = el("div", { className: "vs-strip" }, root);
      for (var tf = 0; tf < this.T; tf++) {
        var cell = el("div", { className: "vs-thumb", title: "frames " + this.frameSpan(tf) }, strip);
        var box = el("div", { className: "vs-thumb-stage" }, cell);
        box.style.aspectRatio = d.image.width + " / " + d.image.height;
        el("img", { className: "vs-thumb-image", alt: "", src: this.video.images[tf * this.tubelet], draggable: "false" }, box);
        var tc = el("canvas", { className: "vs-thumb-canvas", width: String(this.cols), height: String(this.rows) }, box);
        var bar = el("div", { className: "vs-profile" }, cell);
        var fill = el("div", { className: "vs-profile-fill" }, bar);
        var lab = el("div", { className: "vs-thumb-label" }, cell);
        (function (t) { cell.addEventListener("click", function () { self.set({ frame: t * self.tubelet }); }); })(tf);
        this.thumbs.push({ cell: cell, canvas: tc, fill: fill, label: lab });
      }
    }
    this.bar = el("canvas", { className: "vs-colorbar", width: "256", height: "12" }, side);
    this.barLab = el("div", { className: "vs-colorbar-label" }, side);
    this.readout = el("div", { className: "vs-readout" }, side);
    this.prefixOut = el("div", { className: "vs-prefix" }, side);
    el("div", {
      className: "vs-help",
      text: "Hover a patch to see where it looks (follow cursor); click to pin it as the query. " +
        "Untick 'follow cursor' to read the values under the cursor. Keys: \u2190 \u2192 layer, \u2191 \u2193 head, " +
        "r rollout, m mask, Esc follow, a / p / s attention / PCA / similarity" + (this.picker ? ", [ ] image" : "") +
        (this.video ? ", , . frame, k play." : ".")
    }, side);
    var notes = el("ul", { className: "vs-notes" }, side);
    (d.notes || []).forEach(function (n) { el("li", { text: n }, notes); });
    this.off = document.createElement("canvas");
    this.off.width = this.cols;
    this.off.height = this.rows;
    this.syncControls();
    this.drawColorbar();

    this.methodSel.addEventListener("change", function () { self.set({ method: self.methodSel.value }); });
    this.layerIn.addEventListener("input", function () { self.set({ layer: +self.layerIn.value }); });
    this.headSel.addEventListener("change", function () {
      var v = self.headSel.value;
      self.set({ head: (v === "mean" || v === "max") ? v : +v });
    });
    this.querySel.addEventListener("change", function () {
      if (self.querySel.value !== "") self.set({ query: +self.querySel.value, follow: false });
    });
    this.followIn.addEventListener("change", function () { self.set({ follow: self.followIn.checked }); });
    this.maskIn.addEventListener("change", function () { self.set({ mask: self.maskIn.checked }); });
    this.tauIn.addEventListener("input", function () { self.set({ tau: +self.tauIn.value }); });
    this.opacityIn.addEventListener("input", function () { self.set({ opacity: +self.opacityIn.value }); });
    this.smoothIn.addEventListener("change", function () { self.set({ smooth: self.smoothIn.checked }); });
    this.canvas.addEventListener("pointermove", function (e) { self.onMove(e); });
    this.canvas.addEventListener("pointerleave", function () {
      self.hoverKey = null;
      self.hoverQuery = null;
      self.draw();
    });
    this.canvas.addEventListener("click", function (e) { self.onClick(e); });
    if (this.video) {
      this.frameIn.addEventListener("input", function () { self.set({ frame: +self.frameIn.value }); });
      this.playBtn.addEventListener("click", function () { self.togglePlay(); });
    }
    if (this.resizer) {
      this.resizer.disconnect();
      this.resizer.observe(this.stage);
    }
  };

  Viewer.prototype.hasPatchQueries = function () {
    return this.qpos[this.P] !== undefined && this.Q >= this.P + this.NP;
  };

  Viewer.prototype.syncControls = function () {
    var st = this.state, features = st.view !== "attention";
    for (var name in this.tabs) {
      this.tabs[name].className = "vs-tab vs-tab-" + name + (name === st.view ? " vs-tab-active" : "");
      this.tabs[name].setAttribute("aria-selected", name === st.view ? "true" : "false");
    }
    [this.methodSel, this.layerIn, this.headSel, this.querySel, this.maskIn].forEach(function (c) { c.disabled = features; });
    this.methodSel.value = st.method;
    this.layerIn.value = String(st.layer);
    var abs = this.data.layers[st.layer];
    this.layerLab.textContent = st.method === "rollout" ? "through " + abs : String(abs);
    this.headSel.value = String(st.head);
    this.headSel.disabled = features || st.method === "rollout" || this.mapIndex() !== null;
    if (st.query >= this.P && st.query < this.S0) {  // a patch query
      this.pinnedOpt.hidden = false;
      this.pinnedOpt.value = String(st.query);
      this.pinnedOpt.textContent = this.tokenLabel(st.query);
    }
    this.querySel.value = String(st.query);
    this.followIn.checked = st.follow;
    this.followIn.disabled = st.view === "pca" || (st.view === "attention" && !this.hasPatchQueries());
    this.maskIn.checked = st.mask;
    this.tauIn.value = String(st.tau);
    this.tauIn.disabled = features || !st.mask;
    this.tauLab.textContent = "tau " + st.tau.toFixed(2);
    this.opacityIn.value = String(st.opacity);
    this.smoothIn.checked = st.smooth;
    if (this.video) {
      var tf = this.tokenFrame();
      this.frameIn.value = String(st.frame);
      this.frameLab.textContent = st.frame + " / " + (this.F - 1) + " \u00b7 token frame " + tf +
        (this.tubelet > 1 ? " (frames " + this.frameSpan(tf) + ")" : "");
      var src = this.video.images[st.frame];
      if (this.img.getAttribute("src") !== src) this.img.setAttribute("src", src);
    }
  };

  /* Update state (validated), refresh the controls and redraw. */
  Viewer.prototype.set = function (patch) {
    var before = this.tokenFrame();
    for (var k in patch) this.state[k] = patch[k];
    this.validate();
    var shift = (this.tokenFrame() - before) * this.rows * this.cols;  // a video's frame changed: the patch under
    if (shift) {                                                        // the cursor is now the new frame's
      if (this.hoverKey !== null) this.hoverKey += shift;
      if (this.hoverQuery !== null) this.hoverQuery += shift;
    }
    this.syncControls();
    return this.draw();
  };

  /* Bring the state within what the current image's data holds. */
  Viewer.prototype.validate = function () {
    var st = this.state;
    st.layer = Math.max(0, Math.min(this.L - 1, st.layer | 0));
    if (st.method === "rollout" && !this.roll) st.method = "raw";
    if (this.mapIndex() !== null && this.mapIndex() >= this.maps.length) st.method = "raw";
    if (typeof st.head === "number" && (st.head < 0 || st.head >= this.H || this.data.heads[0] === "mean")) st.head = "mean";
    if (st.head === "max" && this.H < 2) st.head = "mean";
    if (this.qpos[st.query] === undefined) st.query = this.data.queries[0];
    if (st.view !== "attention" && !this.feat) st.view = "attention";
    if (!this.hasPatchQueries() && st.view !== "similarity") st.follow = false;
    if (st.simPatch !== null && (st.simPatch < this.P || st.simPatch >= this.S0)) st.simPatch = null;
    st.tau = Math.max(0.01, Math.min(1, +st.tau));
    st.opacity = Math.max(0, Math.min(1, +st.opacity));
    st.frame = Math.max(0, Math.min(this.F - 1, st.frame | 0));
  };

  /* Index of the shown map when the method is "map:K", else null. */
  Viewer.prototype.mapIndex = function () {
    var m = String(this.state.method);
    return m.indexOf("map:") === 0 ? (parseInt(m.slice(4), 10) | 0) : null;
  };

  /* The full row (all N keys) of the current method/layer/head for query token t, or null. */
  Viewer.prototype.row = function (t) {
    var st = this.state, qp = this.qpos[t];
    var out = this.buf, mi = this.mapIndex();
    if (mi !== null) {  // a map of its own: patches hold its values, prefix and suffix tokens 0
      out.fill(0);
      var vals = this.maps[mi].values;
      for (var p = 0; p < vals.length; p++) out[this.P + p] = vals[p];
      return out;
    }
    if (qp === undefined) return null;
    if (st.method === "rollout") return this.roll.row(st.layer * this.Q + qp, out);
    var base = st.layer * this.H, N = this.N, k, h;
    if (typeof st.head === "number") return this.attn.row((base + st.head) * this.Q + qp, out);
    var acc = this.acc;
    this.attn.row(base * this.Q + qp, out);
    for (h = 1; h < this.H; h++) {
      this.attn.row((base + h) * this.Q + qp, acc);
      if (st.head === "max") { for (k = 0; k < N; k++) if (acc[k] > out[k]) out[k] = acc[k]; }
      else { for (k = 0; k < N; k++) out[k] += acc[k]; }
    }
    if (st.head === "mean" && this.H > 1) for (k = 0; k < N; k++) out[k] /= this.H;
    return out;
  };

  Viewer.prototype.patchAt = function (e) {
    var r = this.canvas.getBoundingClientRect();
    var x = (e.clientX - r.left) / r.width, y = (e.clientY - r.top) / r.height;
    if (x < 0 || y < 0 || x >= 1 || y >= 1) return null;
    var row = Math.min(this.rows - 1, Math.floor(y * this.rows));
    var col = Math.min(this.cols - 1, Math.floor(x * this.cols));
    return this.P + (this.tokenFrame() * this.rows + row) * this.cols + col;  // a video: the shown frame's token
  };

  Viewer.prototype.onMove = function (e) {
    var t = this.patchAt(e);
    if (t === this.hoverKey) return;
    this.hoverKey = t;
    var similarity = this.state.view === "similarity";
    this.hoverQuery = (t !== null && this.state.follow && (similarity || this.qpos[t] !== undefined)) ? t : null;
    this.draw();
  };

  Viewer.prototype.onClick = function (e) {
    var t = this.patchAt(e);
    if (t !== null && this.state.view === "similarity") {  // pin this patch; a second click follows again
      if (!this.state.follow && this.state.simPatch === t) { this.set({ follow: true }); return; }
      this.hoverQuery = null;
      this.set({ simPatch: t, follow: false });
      return;
    }
    if (t === null || this.qpos[t] === undefined) return;
    if (!this.state.follow && this.state.query === t) { this.set({ follow: true }); return; }
    this.hoverQuery = null;
    this.set({ query: t, follow: false });
  };

  Viewer.prototype.onKey = function (e) {
    var st = this.state, heads = ["mean"];
    if (this.H > 1) heads.push("max");
    if (this.data.heads[0] !== "mean") for (var h = 0; h < this.H; h++) heads.push(h);
    var i = heads.indexOf(st.head);
    if (this.picker && e.target === this.picker && e.key.indexOf("Arrow") === 0) return;  // the picker's own
    if (this.picker && (e.key === "]" || e.key === "[")) this.show(this.index + (e.key === "]" ? 1 : -1));
    else if (e.key === "ArrowRight") this.set({ layer: st.layer + 1 });
    else if (e.key === "ArrowLeft") this.set({ layer: st.layer - 1 });
    else if (e.key === "ArrowDown") this.set({ head: heads[(i + 1) % heads.length] });
    else if (e.key === "ArrowUp") this.set({ head: heads[(i - 1 + heads.length) % heads.length] });
    else if (e.key === "r") this.set({ method: st.method === "raw" ? "rollout" : "raw" });
    else if (e.key === "m") this.set({ mask: !st.mask });
    else if (e.key === "Escape") this.set({ follow: true });
    else if (e.key === "a") this.set({ view: "attention" });
    else if (e.key === "p" && this.feat) this.set({ view: "pca" });
    else if (e.key === "s" && this.feat) this.set({ view: "similarity" });
    else if (this.video && (e.key === "," || e.key === ".")) this.set({ frame: (st.frame + (e.key === "." ? 1 : this.F - 1)) % this.F });
    else if (this.video && e.key === "k") this.togglePlay();
    else return;
    e.preventDefault();
  };

  Viewer.prototype.drawColorbar = function () {
    var ctx = this.bar.getContext("2d"), im = ctx.createImageData(256, 1);
    for (var i = 0; i < 256; i++) {
      im.data[4 * i] = this.lut[3 * i];
      im.data[4 * i + 1] = this.lut[3 * i + 1];
      im.data[4 * i + 2] = this.lut[3 * i + 2];
      im.data[4 * i + 3] = 255;
    }
    for (var y = 0; y < 12; y++) ctx.putImageData(im, 0, y);
  };

  Viewer.prototype.outline = function (ctx, t, cw, ch, colour, width) {
    var per = this.rows * this.cols, p = t - this.P;
    if (Math.floor(p / per) !== this.tokenFrame()) return;  // a video: a token of another frame is not shown here
    p = p % per;
    var r = Math.floor(p / this.cols), c = p % this.cols;
    var pw = cw / this.cols, ph = ch / this.rows;
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.strokeRect(c * pw + width / 2, r * ph + width / 2, pw - width, ph - width);
  };

  /* RGBA pixels px (rows x cols) for values[off .. off + rows * cols) on the scale lo .. hi in the colormap, at the
     opacity; cells outside the mask (when there is one) darkened. */
  Viewer.prototype.colour = function (px, values, mask, off, lo, hi) {
    var n = this.rows * this.cols, span = hi > lo ? hi - lo : 0, alpha = Math.round(255 * this.state.opacity);
    for (var i = 0; i < n; i++) {
      var idx = span > 0 ? Math.round((values[off + i] - lo) / span * 255) : 0;
      if (mask && !mask[off + i]) {
        px[4 * i] = 0; px[4 * i + 1] = 0; px[4 * i + 2] = 0; px[4 * i + 3] = 200;
      } else {
        px[4 * i] = this.lut[3 * idx]; px[4 * i + 1] = this.lut[3 * idx + 1]; px[4 * i + 2] = this.lut[3 * idx + 2];
        px[4 * i + 3] = mask ? Math.max(alpha, 1) : alpha;
      }
    }
  };

  /* A video's strip: each token frame's part of the row (same scale as the overlay) and its share of the row's
     patch mass (negative values count 0); the query's frame is marked. Returns the shares (the temporal profile). */
  Viewer.prototype.drawStrip = function (values, mask, lo, hi, query) {
    var per = this.rows * this.cols, mass = [], total = 0, top = 0, tf, i;
    for (tf = 0; tf < this.T; tf++) {
      var m = 0;
      for (i = 0; i < per; i++) m += Math.max(0, values[tf * per + i]);
      mass.push(m);
      total += m;
    }
    var shown = this.tokenFrame(), qf = query >= this.P && query < this.S0 ? Math.floor((query - this.P) / per) : -1;
    for (tf = 0; tf < this.T; tf++) {
      mass[tf] = total > 0 ? mass[tf] / total : 1 / this.T;  // nothing positive: uniform, as temporal_profile
      if (mass[tf] > top) top = mass[tf];
    }
    for (tf = 0; tf < this.T; tf++) {
      var th = this.thumbs[tf], ctx = th.canvas.getContext("2d"), im = ctx.createImageData(this.cols, this.rows);
      this.colour(im.data, values, mask, tf * per, lo, hi);
      ctx.putImageData(im, 0, 0);
      th.fill.style.width = (top > 0 ? 100 * mass[tf] / top : 0).toFixed(1) + "%";
      th.label.textContent = "frames " + this.frameSpan(tf) + " \u00b7 " + (100 * mass[tf]).toFixed(1) + "%";
      th.cell.className = "vs-thumb" + (tf === shown ? " vs-thumb-active" : "") + (tf === qf ? " vs-thumb-query" : "");
    }
    return mass;
  };

  /* Paint one RGBA image (rows x cols, row-major) over the picture; returns the canvas's 2-d context. */
  Viewer.prototype.paint = function (im) {
    var octx = this.off.getContext("2d");
    octx.putImageData(im, 0, 0);
    var dpr = window.devicePixelRatio || 1;
    var cw = Math.max(1, Math.round(this.canvas.clientWidth * dpr));
    var ch = Math.max(1, Math.round(this.canvas.clientHeight * dpr));
    if (this.canvas.width !== cw || this.canvas.height !== ch) { this.canvas.width = cw; this.canvas.height = ch; }
    var ctx = this.canvas.getContext("2d");
    ctx.clearRect(0, 0, cw, ch);
    ctx.imageSmoothingEnabled = this.state.smooth;
    ctx.drawImage(this.off, 0, 0, cw, ch);
    return ctx;
  };

  /* The PCA and similarity tabs: one layer's patch features (data.features). */
  Viewer.prototype.drawFeatures = function (t0) {
    var st = this.state, P = this.P, n = this.rows * this.cols, i, k;
    var dpr = window.devicePixelRatio || 1, alpha = Math.round(255 * st.opacity);
    var im = this.off.getContext("2d").createImageData(this.cols, this.rows), px = im.data;
    var f = this.feat, about = "layer " + f.layer + " features" + (f.norm ? " after the final norm (" + f.norm + ")" : "");
    var values = null, rgb = null, query = null, lo = 0, hi = 0, text;
    if (st.view === "pca") {
      rgb = f.pca;
      for (i = 0; i < n; i++) {
        for (k = 0; k < 3; k++) px[4 * i + k] = Math.round(Math.max(0, Math.min(1, rgb[3 * i + k])) * 255);
        px[4 * i + 3] = alpha;
      }
      text = "PCA of the " + about + ": the first three components as red, green, blue";
      if (this.hoverKey !== null) {
        var h = this.hoverKey - P;
        text += " \u00b7 " + this.tokenLabel(this.hoverKey) + ": " + fmt(rgb[3 * h]) + ", " + fmt(rgb[3 * h + 1]) + ", " +
          fmt(rgb[3 * h + 2]);
      }
    } else {
      query = this.hoverQuery !== null ? this.hoverQuery :
        (st.simPatch !== null ? st.simPatch : P + Math.floor(this.rows / 2) * this.cols + Math.floor(this.cols / 2));
      var K = f.K, u = f.unit, q = (query - P) * K;
      values = new Float32Array(n);
      lo = Infinity; hi = -Infinity;
      for (i = 0; i < n; i++) {
        var dot = 0;
        for (k = 0; k < K; k++) dot += u[q + k] * u[i * K + k];
        values[i] = dot;
        if (dot < lo) lo = dot;
        if (dot > hi) hi = dot;
      }
      var span = hi > lo ? hi - lo : 0;
      for (i = 0; i < n; i++) {
        var idx = span > 0 ? Math.round((values[i] - lo) / span * 255) : 0;
        px[4 * i] = this.lut[3 * idx]; px[4 * i + 1] = this.lut[3 * idx + 1]; px[4 * i + 2] = this.lut[3 * idx + 2];
        px[4 * i + 3] = alpha;
      }
      text = "cosine similarity to " + this.tokenLabel(query) + " \u00b7 " + about;
      if (this.hoverKey !== null) text += " \u00b7 " + this.tokenLabel(this.hoverKey) + ": " + fmt(values[this.hoverKey - P]);
    }
    var ctx = this.paint(im), cw = this.canvas.width, ch = this.canvas.height;
    if (query !== null) this.outline(ctx, query, cw, ch, "#00e5ff", Math.max(1, 2 * dpr));
    if (this.hoverKey !== null && this.hoverKey !== query) this.outline(ctx, this.hoverKey, cw, ch, "#ffffff", Math.max(1, dpr));
    this.readout.textContent = text;
    this.barLab.textContent = values ? fmt(lo) + " \u2013 " + fmt(hi) : "PCA colours";
    this.bar.style.visibility = values ? "visible" : "hidden";
    this.prefixOut.textContent = "";
    this.current = {
      image: this.index, title: this.data.title, view: st.view, layer: f.layer, query: query, hoverKey: this.hoverKey,
      values: values ? Array.prototype.slice.call(values) : null, rgb: rgb ? Array.prototype.slice.call(rgb) : null,
      min: lo, max: hi, mask: null
    };
    this.timings.push(performance.now() - t0);
    if (this.timings.length > 200) this.timings.shift();
    return this.current;
  };

  /* Compute the current map and paint it. Returns viewer.current. */
  Viewer.prototype.draw = function () {
    var t0 = performance.now();
    if (this.state.view !== "attention" && this.feat) return this.drawFeatures(t0);
    this.bar.style.visibility = "visible";
    var st = this.state, P = this.P, n = this.NP, per = this.rows * this.cols, f0 = this.tokenFrame() * per;
    var query = this.hoverQuery !== null ? this.hoverQuery : st.query;
    var full = this.row(query);
    var values = new Float32Array(n), lo = Infinity, hi = -Infinity, i;  // every patch (of every frame)
    if (full) {
      for (i = 0; i < n; i++) {
        var v = full[P + i];
        values[i] = v;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    } else { lo = 0; hi = 0; }
    var mask = st.mask ? thresholdMask(values, st.tau) : null;  // a video's: over the whole clip

    var octx = this.off.getContext("2d"), im = octx.createImageData(this.cols, this.rows);
    this.colour(im.data, values, mask, f0, lo, hi);  // the shown frame's part
    var ctx = this.paint(im), cw = this.canvas.width, ch = this.canvas.height;
    var profile = this.video ? this.drawStrip(values, mask, lo, hi, query) : null;
    var dpr = window.devicePixelRatio || 1;
    if (query >= P) this.outline(ctx, query, cw, ch, "#00e5ff", Math.max(1, 2 * dpr));
    if (this.hoverKey !== null && this.hoverKey !== query) this.outline(ctx, this.hoverKey, cw, ch, "#ffffff", Math.max(1, dpr));

    var abs = this.data.layers[st.layer];
    var mi = this.mapIndex();
    var what = mi !== null ? this.maps[mi].name :
      st.method === "rollout" ? "rollout through layer " + abs : "layer " + abs + ", head " + st.head;
    var text = "query " + this.tokenLabel(query) + " \u00b7 " + what;
    if (!full) text += " \u00b7 (this query row was not stored)";
    else if (this.hoverKey !== null) {
      text += " \u00b7 key " + this.tokenLabel(this.hoverKey) + ": " + fmt(values[this.hoverKey - P]);
    }
    this.readout.textContent = text;
    this.barLab.textContent = fmt(lo) + " \u2013 " + fmt(hi);
    var parts = [];
    if (full) for (i = 0; i < P; i++) parts.push(this.tokenLabel(i) + " " + fmt(full[i]));
    if (full && this.S0 < this.N) {  // suffix tokens: their total (YOLOS has 100 detection tokens)
      var rest = 0;
      for (i = this.S0; i < this.N; i++) rest += full[i];
      parts.push((this.N - this.S0) + " suffix tokens " + fmt(rest));
    }
    var other = this.S0 < this.N ? "to prefix and suffix tokens: " : "to prefix tokens: ";
    this.prefixOut.textContent = parts.length ? other + parts.join(", ") : "";

    this.current = {
      image: this.index, title: this.data.title, view: "attention", method: st.method, layer: abs, head: st.method === "rollout" ? "mean" : st.head, query: query,
      hoverKey: this.hoverKey, values: Array.prototype.slice.call(values, f0, f0 + per), min: lo, max: hi,
      mask: mask ? Array.prototype.slice.call(mask, f0, f0 + per) : null
    };
    if (this.video) {  // the shown frame, and the row over every token frame
      this.current.frame = st.frame;
      this.current.tokenFrame = this.tokenFrame();
      this.current.frameValues = Array.prototype.slice.call(values);
      this.current.profile = profile;
    }
    var ms = performance.now() - t0;
    this.timings.push(ms);
    if (this.timings.length > 200) this.timings.shift();
    return this.current;
  };

  function mount(root) {
    var scripts = root.querySelectorAll("script.vitscope-data");
    if (!scripts.length || root.vitscope) return root.vitscope || null;
    var datas = [];
    for (var i = 0; i < scripts.length; i++) datas.push(JSON.parse(scripts[i].textContent));
    var v = new Viewer(root, datas);
    root.vitscope = v;
    (window.vitscopeViewers = window.vitscopeViewers || []).push(v);
    return v;
  }

  /* Nothing focused: the page itself (body) or no element at all. */
  function nothingFocused() {
    var a = document.activeElement;
    return !a || a === document.body || a === document.documentElement;
  }

  /* Keyboard shortcuts work on load, without a click: the first viewer takes the focus when nothing else
     has it (never stealing it from a field, e.g. a notebook cell), and keys typed while nothing is focused
     (after a click on the page's background) go to the first viewer as well. */
  function focusFirst() {
    var vs = window.vitscopeViewers || [];
    if (vs.length && nothingFocused()) vs[0].focus();
  }

  function mountAll() {
    var roots = document.querySelectorAll(".vitscope-viewer");
    for (var i = 0; i < roots.length; i++) {
      try {
        mount(roots[i]);
      } catch (err) {
        var box = document.createElement("pre");
        box.className = "vs-error";
        box.textContent = "vitscope viewer: " + err.message;
        roots[i].appendChild(box);
        throw err;
      }
    }
    focusFirst();
    if (!document.vitscopeKeys) {
      document.vitscopeKeys = true;
      document.addEventListener("keydown", function (e) {
        var vs = window.vitscopeViewers || [];
        if (vs.length && !e.defaultPrevented && (e.target === document.body || e.target === document.documentElement)) {
          vs[0].onKey(e);
        }
      });
    }
  }

  window.vitscopeThresholdMask = thresholdMask;
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", mountAll);
  else mountAll();
})();
