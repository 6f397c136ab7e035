// timeline.js: one lane per resource (futures on request), its life as a thin bar, each
// callback step as a solid block, an arrow from the trigger's lane at the moment of creation,
// the critical path's lanes marked and shaded while each held the request up, a dark notch
// where the watchdog saw a step block the loop (its stacks are in the resource's details), a
// dashed line where the response had gone out when the handling went on after it. Drawn on a
// canvas, only the lanes in view, so 10,000 lanes scroll smoothly. Ctrl/⌘ + wheel zooms around
// the pointer, dragging pans, 0 resets.
"use strict";

AT.views.timeline = (function () {
  const LANE = 16, LABEL = 260, AXIS = 22;

  function lanesOf(model, withFutures) {
    const out = [];
    const todo = [model.root];
    const seen = new Set();
    while (todo.length) {  // depth-first in causality order, so arrows stay short
      const res = todo.pop();
      if (seen.has(res.id)) continue;
      seen.add(res.id);
      if (withFutures || res.type !== "future") out.push(res);
      for (let i = res.children.length - 1; i >= 0; i--) todo.push(res.children[i]);
    }
    for (const res of model.resources) if (!seen.has(res.id) && (withFutures || res.type !== "future")) out.push(res);
    return out;
  }

  function niceStep(span, target) {
    const raw = span / target;
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }

  function render(section, model) {
    section.replaceChildren();
    const state = { futures: false, t0: 0, t1: Math.max(1, model.duration) };
    const tools = AT.el("div", { id: "timeline-tools" });
    const futures = AT.el("input", { type: "checkbox", id: "tl-futures" });
    const count = AT.el("span", { class: "t" });
    tools.append(
      AT.el("button", { type: "button", onclick: () => zoom(0.5) }, "+"),
      AT.el("button", { type: "button", onclick: () => zoom(2) }, "−"),
      AT.el("button", { type: "button", onclick: () => { state.t0 = 0; state.t1 = Math.max(1, model.duration); paint(); } }, "reset"),
      AT.el("label", {}, futures, " show futures"), count,
      AT.el("span", { class: "t" }, "ctrl/⌘ + wheel: zoom · drag: pan · red: critical path · ▼: blocked the loop here"));
    const scroll = AT.el("div", { id: "timeline-scroll" });
    const spacer = AT.el("div", {});
    const canvas = AT.el("canvas", { id: "timeline" });
    canvas.style.position = "sticky";
    canvas.style.top = "0";
    scroll.append(canvas, spacer);
    section.append(tools, scroll);
    let lanes = [];
    let index = new Map();

    const relayout = () => {
      lanes = lanesOf(model, state.futures);
      index = new Map(lanes.map((r, i) => [r.id, i]));
      spacer.style.height = Math.max(0, lanes.length * LANE + AXIS - scroll.clientHeight) + "px";
      canvas.dataset.lanes = String(lanes.length);
      canvas.dataset.blocked = String(lanes.reduce((n, r) => n + r.samples.length, 0));
      canvas.dataset.answered = String(AT.answered(model) ?? "");
      count.textContent = `${lanes.length} lanes`;
      paint();
    };
    futures.addEventListener("change", () => { state.futures = futures.checked; relayout(); });

    function xOf(t, width) { return LABEL + ((t - state.t0) / (state.t1 - state.t0)) * (width - LABEL - 10); }

    function paint() {
      const width = Math.max(400, scroll.clientWidth - 4);
      const height = Math.max(120, scroll.clientHeight - 4);
      const ratio = window.devicePixelRatio || 1;
      canvas.width = width * ratio; canvas.height = height * ratio;
      canvas.style.width = width + "px"; canvas.style.height = height + "px";
      const g = canvas.getContext("2d");
      g.setTransform(ratio, 0, 0, ratio, 0, 0);
      g.clearRect(0, 0, width, height);
      g.font = "11px system-ui, sans-serif";
      const first = Math.floor(scroll.scrollTop / LANE);
      const visible = Math.ceil((height - AXIS) / LANE) + 1;
      // axis
      const step = niceStep(state.t1 - state.t0, 8);
      g.fillStyle = "#6a737d"; g.strokeStyle = "#e3e6e9";
      for (let t = Math.ceil(state.t0 / step) * step; t <= state.t1; t += step) {
        const x = xOf(t, width);
        g.beginPath(); g.moveTo(x, AXIS - 4); g.lineTo(x, height); g.stroke();
        g.fillText(AT.fmt(t), x + 2, 12);
      }
      const answered = AT.answered(model);  // the response out: a dashed line, where it matters
      if (answered !== null && model.duration - answered >= Math.max(1e6, model.duration / 20)) {
        const x = xOf(answered, width);
        if (x >= LABEL && x <= width) {
          g.save(); g.setLineDash([4, 3]); g.strokeStyle = "#2e7d32";
          g.beginPath(); g.moveTo(x, AXIS - 4); g.lineTo(x, height); g.stroke(); g.restore();
          g.fillStyle = "#2e7d32"; g.fillText("response sent", x + 3, height - 6);
        }
      }
      for (let i = first; i < Math.min(lanes.length, first + visible); i++) {
        const res = lanes[i];
        const y = AXIS + (i - first) * LANE;
        const critical = model.critical.has(res.id);
        if (critical) {  // shaded while it was what held the request up, not its whole lane
          g.fillStyle = "rgba(214,45,32,.12)";
          for (const [s, e] of model.criticalSpans.get(res.id) || []) {
            const a = Math.max(LABEL, xOf(s, width)), b = Math.min(width, xOf(e, width));
            if (b >= LABEL && a <= width) g.fillRect(a, y, Math.max(2, b - a), LANE);
          }
        }
        g.fillStyle = critical ? "#d62d20" : "#1d2329";
        const text = `${res.type} ${res.label}`;
        g.fillText(text.length > 42 ? text.slice(0, 41) + "…" : text, 4, y + 12);
        const colour = AT.colour(res.type);
        const x0 = Math.max(LABEL, xOf(res.created, width)), x1 = Math.min(width, xOf(res.end, width));
        if (x1 >= LABEL && x0 <= width) {
          g.fillStyle = colour; g.globalAlpha = 0.3;
          g.fillRect(x0, y + 6, Math.max(1, x1 - x0), 4);
          g.globalAlpha = 1;
          for (const [s, e] of res.callbacks) {
            const a = Math.max(LABEL, xOf(s, width)), b = Math.min(width, xOf(e === null ? res.end : e, width));
            if (b >= LABEL && a <= width) g.fillRect(a, y + 3, Math.max(1, b - a), 10);
          }
          if (critical) { g.strokeStyle = "#d62d20"; g.strokeRect(x0, y + 2, Math.max(1, x1 - x0), 12); }
          for (const sample of res.samples) {  // where the watchdog saw the step block the loop
            const x = xOf(sample.at, width);
            if (x < LABEL || x > width) continue;
            g.fillStyle = "#1d2329";
            g.beginPath(); g.moveTo(x - 4, y); g.lineTo(x + 4, y); g.lineTo(x, y + 7); g.fill();
          }
        }
        const from = index.get(res.trigger);
        if (from !== undefined) {  // the arrow from the trigger's lane at creation time
          const x = xOf(res.created, width);
          if (x >= LABEL && x <= width) {
            const yFrom = AXIS + (from - first) * LANE + 8;
            g.strokeStyle = "rgba(29,35,41,.35)";
            g.beginPath(); g.moveTo(x, Math.max(AXIS, yFrom)); g.lineTo(x, y + 8); g.stroke();
            g.beginPath(); g.moveTo(x - 3, y + 4); g.lineTo(x, y + 8); g.lineTo(x + 3, y + 4); g.stroke();
          }
        }
      }
    }

    function zoom(factor, at) {
      const span = state.t1 - state.t0;
      const centre = at === undefined ? state.t0 + span / 2 : at;
      const next = Math.max(1000, span * factor);
      state.t0 = Math.max(0, centre - (centre - state.t0) * (next / span));
      state.t1 = state.t0 + next;
      paint();
    }

    const timeAt = (clientX) => {
      const box = canvas.getBoundingClientRect();
      const width = box.width;
      return state.t0 + ((clientX - box.left - LABEL) / (width - LABEL - 10)) * (state.t1 - state.t0);
    };
    canvas.addEventListener("wheel", (e) => {
      if (!e.ctrlKey && !e.metaKey) return;
      e.preventDefault();
      zoom(e.deltaY > 0 ? 1.25 : 0.8, timeAt(e.clientX));
    }, { passive: false });
    let drag = null;
    canvas.addEventListener("mousedown", (e) => { drag = { x: e.clientX, t0: state.t0, t1: state.t1 }; });
    window.addEventListener("mouseup", () => { drag = null; });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      const per = (drag.t1 - drag.t0) / (canvas.getBoundingClientRect().width - LABEL - 10);
      const shift = (drag.x - e.clientX) * per;
      state.t0 = drag.t0 + shift; state.t1 = drag.t1 + shift;
      paint();
    });
    canvas.addEventListener("click", (e) => {
      const box = canvas.getBoundingClientRect();
      const i = Math.floor((e.clientY - box.top - AXIS) / LANE) + Math.floor(scroll.scrollTop / LANE);
      if (e.clientY - box.top > AXIS && lanes[i] && e.clientX - box.left < LABEL) AT.showDetails(model, lanes[i]);
    });
    canvas.tabIndex = 0;
    canvas.addEventListener("keydown", (e) => { if (e.key === "0") { state.t0 = 0; state.t1 = Math.max(1, model.duration); paint(); } });
    scroll.addEventListener("scroll", paint);
    window.addEventListener("resize", paint);
    relayout();
  }

  return { render, lanesOf };
})();
