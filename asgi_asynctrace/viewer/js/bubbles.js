// bubbles.js: the bubbleprof-style view. Resources are grouped at three levels, each drawn
// the same way: clusters (cut where the causality path crosses between the app's code, a
// dependency and the runtime, or from one dependency to another; sibling clusters of one
// identity merged), then inside a cluster the aggregates (same type and creation stack), then
// single resources.
"use strict";

AT.views.bubbles = (function () {
  function party(res, inherited) {
    if (res.type === "root") return "app";
    for (const frame of res.stack) {
      const origin = AT.origin(frame);
      if (origin !== "runtime") return origin;
    }
    return res.stack.length ? "runtime" : inherited;
  }
  const identity = (res, p) => `${res.type}|${p}|${res.stack.join("\n")}`;

  // Which side of a crossing a resource is on: "app", "runtime", or the dependency the app
  // called for it: the package of the last dependency frame before the app's own code (httpx
  // for a fetch, not the anyio under it), as bubbleprof tells node_modules apart.
  function side(res, p, inherited) {
    if (p !== "dependency") return p;
    let pkg = "";
    for (const frame of res.stack) {
      const origin = AT.origin(frame);
      if (origin === "app") break;
      if (origin === "dependency") pkg = AT.packageOf(frame);
    }
    return pkg ? "dependency:" + pkg : inherited.startsWith("dependency") ? inherited : "dependency:";
  }

  function assignClusters(model) {
    // Iterative, so a trace that is one 10,000-deep chain draws too.
    const todo = [[model.root, "app", "app", "c:" + identity(model.root, "app")]];
    const seen = new Set();
    while (todo.length) {
      const [res, p, s, key] = todo.pop();
      if (seen.has(res.id)) continue;
      seen.add(res.id);
      res.party = p;
      res.side = s;
      res.cluster = key;
      for (const child of res.children) {
        // A crossing starts a cluster: what that party did on behalf of this call site, so
        // the same crossing repeated (a fetch per loop turn) merges into one bubble.
        const cp = party(child, p);
        const cs = side(child, cp, s);
        todo.push([child, cp, cs, cs === s ? key : `${key}>${cs}@${identity(res, p)}`]);
      }
    }
    for (const res of model.resources) {  // unreachable from the root (a broken trigger chain)
      if (!seen.has(res.id)) {
        res.party = party(res, "app");
        res.side = side(res, res.party, "");
        res.cluster = "orphan:" + res.side + identity(res, res.party);
      }
    }
  }

  function unionLength(intervals) {
    intervals.sort((a, b) => a[0] - b[0]);
    let total = 0, start = null, end = null;
    for (const [s, e] of intervals) {
      if (end === null || s > end) { if (end !== null) total += end - start; start = s; end = e; }
      else end = Math.max(end, e);
    }
    return end === null ? total : total + end - start;
  }

  function firstAppFrame(stack) {
    const frame = stack.find((f) => AT.origin(f) === "app") || stack[0] || "";
    return frame;
  }

  // One level: group `members` by keyOf, link groups by the members' triggers.
  function level(model, members, keyOf) {
    const nodes = new Map();
    for (const res of members) {
      const key = keyOf(res);
      let node = nodes.get(key);
      if (!node) { node = { key, members: [], children: [], parent: null }; nodes.set(key, node); }
      node.members.push(res);
    }
    const nodeOf = new Map();
    for (const node of nodes.values()) for (const m of node.members) nodeOf.set(m.id, node);
    for (const node of nodes.values()) {
      node.members.sort((a, b) => a.created - b.created || a.id - b.id);
      const first = node.members[0];
      const parent = nodeOf.get(first.trigger);
      if (parent && parent !== node) { node.parent = parent; parent.children.push(node); }
    }
    for (const node of nodes.values()) {
      const ms = node.members;
      node.start = ms.reduce((t, m) => Math.min(t, m.created), Infinity);
      node.sync = ms.reduce((t, m) => t + m.sync, 0);
      node.busy = unionLength(ms.map((m) => [m.created, m.end]));
      node.weight = node.busy + node.sync;
      // Named after its most significant kind of member (same type and creation stack): the
      // root; else the operations a user calls (a query, a fetch, a cache call, a thread job,
      // a resource of their own) before the scheduling around them, which in a library's
      // cluster is its plumbing (the tasks, deadlines and futures of a driver); then the
      // kind alive longest. Among scheduling, never a bare future (what something else waits
      // on, not the thing itself), a timer nothing waited on (load.js' noWait: a deadline not
      // reached lives as long as what it guards) or a timer still pending when the request
      // ended (set for later, such as a cache entry's expiry), while anything else is there.
      const kinds = new Map();
      for (const m of ms) {
        const key = identity(m, m.party);
        const kind = kinds.get(key);
        if (kind) kind.push(m); else kinds.set(key, [m]);
      }
      const rank = (r) => r.type === "root" ? 3
        : AT.category(r.type) !== "scheduling" && r.type !== "gc" ? 2
        : r.type === "future" || r.noWait || (r.type === "timer" && r.state === "pending") ? 0 : 1;
      let best = null, bestRank = -1, bestWeight = -1;
      for (const kind of kinds.values()) {
        const r = kind.reduce((t, m) => Math.max(t, rank(m)), 0);
        const w = unionLength(kind.map((m) => [m.created, m.end])) + kind.reduce((t, m) => t + m.sync, 0);
        if (r > bestRank || (r === bestRank && w > bestWeight)) { best = kind; bestRank = r; bestWeight = w; }
      }
      const lead = best.reduce((a, m) => (m.end - m.created + m.sync > a.end - a.created + a.sync ? m : a));
      node.type = lead.type;
      node.party = lead.party;
      // what it is part of, under its name: the app, the runtime, or the package it went into
      node.side = lead.side && lead.side.startsWith("dependency:") && lead.side.length > 11
        ? lead.side.slice(11) : lead.party;
      node.critical = ms.some((m) => model.critical.has(m.id));
      node.name = `${lead.type} ${lead.label}`;
      node.suffix = (best.length > 1 ? ` ×${best.length}` : "") +
        (best.length < ms.length ? ` + ${ms.length - best.length} more` : "");
      node.label = node.name + node.suffix;
      // Drawn shortened in its name, never in its counts: "db-query select name… ×20 + 140 more".
      const room = Math.max(16, 40 - node.suffix.length);
      node.short = (node.name.length > room ? node.name.slice(0, room - 1) + "…" : node.name) + node.suffix;
      node.site = firstAppFrame(lead.stack).split(" @ ").pop();
    }
    const roots = [...nodes.values()].filter((n) => !n.parent);
    roots.sort((a, b) => a.start - b.start);
    for (const node of nodes.values()) node.children.sort((a, b) => a.start - b.start);
    return roots;
  }

  function layout(roots, duration) {
    const all = [];
    const walk = (n, depth) => { n.depth = depth; all.push(n); n.children.forEach((c) => walk(c, depth + 1)); };
    roots.forEach((r) => walk(r, 0));
    const maxWeight = all.reduce((t, n) => Math.max(t, n.weight), 1);
    const maxDelay = Math.max(1, duration);
    for (const n of all) n.r = 10 + 34 * Math.sqrt(n.weight / maxWeight);
    let x = 20;
    const slot = (n) => Math.max(2 * n.r, 6.5 * n.short.length) + 28;
    const place = (n) => {
      if (!n.children.length) { const w = slot(n); n.x = x + w / 2; x += w; return; }
      n.children.forEach(place);
      n.x = (n.children[0].x + n.children[n.children.length - 1].x) / 2;
    };
    roots.forEach(place);
    const setY = (n, y) => {
      n.y = y;
      for (const c of n.children) {
        const delay = Math.max(0, c.start - n.start);
        c.delay = delay;
        const len = 46 + 140 * Math.log1p(delay / 1e5) / Math.log1p(maxDelay / 1e5);
        setY(c, y + n.r + len + c.r);
      }
    };
    roots.forEach((r) => { r.delay = r.start; setY(r, 30 + r.r); });
    return { all, width: x + 20, height: all.reduce((t, n) => Math.max(t, n.y + n.r), 0) + 50 };
  }

  function draw(container, model, roots, onPick) {
    const { all, width, height } = layout(roots, model.duration);
    const svg = AT.svg("svg", { width: Math.max(width, 300), height, id: "bubbles", "data-bubbles": all.length });
    for (const n of all) {
      for (const c of n.children) {
        const line = AT.svg("line", { x1: n.x, y1: n.y + n.r, x2: c.x, y2: c.y - c.r,
          stroke: AT.colour(c.type), "stroke-width": 2 });
        line.append(AT.svg("title", {}, `async delay ${AT.fmt(c.delay)}`));
        svg.append(line);
      }
    }
    for (const n of all) {
      const g = AT.svg("g", { class: `bubble ${n.party}${n.critical ? " critical" : ""}`,
        "data-members": n.members.length, tabindex: 0 });
      g.append(AT.svg("circle", { cx: n.x, cy: n.y, r: n.r, fill: AT.colour(n.type) }));
      g.append(AT.svg("text", { x: n.x, y: n.y + n.r + 13, class: "label", "text-anchor": "middle" }, n.short));
      g.append(AT.svg("text", { x: n.x, y: n.y + n.r + 25, class: "sub", "text-anchor": "middle" },
        `${n.side} · ${AT.fmt(n.busy)} alive · ${AT.fmt(n.sync)} sync`));
      g.append(AT.svg("title", {}, `${n.label}\n${n.members.length} resource(s)${n.site ? "\n" + n.site : ""}`));
      g.addEventListener("click", () => onPick(n));
      g.addEventListener("keydown", (e) => { if (e.key === "Enter") onPick(n); });
      svg.append(g);
    }
    container.append(svg);
  }

  function legend() {
    const items = AT.CATEGORIES.map((c) =>
      AT.el("span", {}, AT.el("i", { style: `background: var(--${c})` }), c));
    items.push(AT.el("span", {}, "solid: the app's code · dashed: a dependency · dotted: the runtime · red ring: critical path"));
    return AT.el("div", { class: "legend" }, ...items);
  }

  function render(section, model) {
    assignClusters(model);
    const trail = [];  // breadcrumbs: {title, members, keyOf}
    const levels = [
      (r) => r.cluster,
      (r) => identity(r, r.party),
      (r) => "r" + r.id,
    ];
    const show = () => {
      section.replaceChildren();
      const crumbs = AT.el("div", { class: "crumbs" });
      const top = AT.el("a", { onclick: () => { trail.length = 0; show(); } }, model.root.label || "request");
      crumbs.append(top);
      trail.forEach((step, i) => {
        crumbs.append(" › ", AT.el("a", { onclick: () => { trail.length = i + 1; show(); } }, step.title));
      });
      section.append(legend(), crumbs);
      const depth = trail.length;
      const members = depth ? trail[depth - 1].members : model.resources;
      const roots = level(model, members, levels[Math.min(depth, 2)]);
      draw(section, model, roots, (node) => {
        if (node.members.length === 1) { AT.showDetails(model, node.members[0]); return; }
        trail.push({ title: node.label, members: node.members });
        show();
      });
    };
    show();
  }

  return { render, party };
})();
