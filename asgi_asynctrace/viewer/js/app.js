// app.js: loading (embedded data, the app's trace store, a file, pasted JSON, the demo),
// the summary bar, the details panel and the tabs.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  let model = null;
  let view = "bubbles";

  AT.showDetails = function (m, res) {
    const panel = $("details");
    panel.hidden = false;
    const rows = [["id", `#${res.id} (triggered by #${res.trigger})`], ["state", res.state],
      ["created", AT.fmt(res.created)], ["ended", res.settled === null ? "never (pending)" : AT.fmt(res.settled)],
      ["sync", AT.fmt(res.sync)], ["waiting", AT.fmt(res.wait)],
      ["origin", res.party || AT.views.bubbles.party(res, "app")]];
    const table = AT.el("table", {}, ...rows.map(([k, v]) => AT.el("tr", {}, AT.el("td", {}, k), AT.el("td", {}, v))));
    const notes = AT.el("table", { id: "details-notes" }, ...Object.entries(res.notes).map(([k, v]) =>
      AT.el("tr", {}, AT.el("td", {}, k), AT.el("td", {}, v === null ? "null" : String(v)))));
    const stack = AT.el("pre", { id: "details-stack" },
      res.stack.length ? res.stack.map((f) => `${f}   [${AT.origin(f)}]`).join("\n") : "no creation stack");
    const steps = res.callbacks.slice(0, 200).map(([s, e]) => `${AT.fmt(s)} → ${e === null ? "(running)" : AT.fmt(e)}  (${AT.fmt((e === null ? res.end : e) - s)})`);
    if (res.callbacks.length > 200) steps.push(`… ${res.callbacks.length - 200} more`);
    // The stacks the watchdog took while a step ran long: where the loop was blocked.
    const blocked = res.samples.length ? [AT.el("h2", {}, "blocked the loop at"),
      AT.el("pre", { id: "details-blocked" }, res.samples.map((s) => {
        const step = res.callbacks.find(([b, e]) => b <= s.at && (e === null || s.at <= e));
        const into = step ? `, ${AT.fmt(s.at - step[0])} into the step` : "";
        return `at ${AT.fmt(s.at)}${into}:\n` + s.frames.map((f) => `  ${f}   [${AT.origin(f)}]`).join("\n");
      }).join("\n\n"))] : [];
    panel.replaceChildren(
      AT.el("button", { type: "button", onclick: () => { panel.hidden = true; } }, "close"),
      AT.el("h2", {}, `${res.type} ${res.label}`), table,
      ...blocked,
      AT.el("h2", {}, "annotations"), notes,
      AT.el("h2", {}, "created at"), stack,
      AT.el("h2", {}, `callbacks (${res.callbacks.length})`),
      AT.el("pre", { id: "details-steps" }, steps.join("\n") || "none"));
  };

  function summary(m) {
    const bar = $("summary");
    const req = m.request;
    const counts = new Map();
    let sync = 0;
    for (const r of m.resources) counts.set(r.type, (counts.get(r.type) || 0) + 1);
    sync = m.root.sync;
    const head = [req.method, req.path, req.status].filter((x) => x !== undefined && x !== null).join(" ");
    const route = m.root.notes.route;  // the path as its route's template, where it has one
    bar.replaceChildren(
      AT.el("span", { class: "req" }, head || "request", "  ", AT.fmt(m.duration)),
      ...(typeof route === "string" && route ? [AT.el("span", { class: "route" }, `route ${route}`)] : []),
      AT.el("span", {}, `${m.resources.length} resources: `,
        [...counts.entries()].sort((a, b) => b[1] - a[1]).map(([t, n]) => `${n} ${t}`).join(", ")),
      AT.el("span", {}, `own code ${AT.fmt(sync)} · waiting ${AT.fmt(Math.max(0, m.duration - sync))}`),
      ...afterTheResponse(m),
      AT.el("span", { class: "t" }, `trace ${m.traceId}`));
    const dropped = Object.entries(m.dropped || {}).filter(([, n]) => n);
    if (dropped.length) bar.append(AT.el("span", {}, "dropped by caps: " + dropped.map(([k, n]) => `${n} ${k}`).join(", ")));
    if (m.analysis) bar.append(criticalPath(m));
    const list = AT.el("ol", { class: "findings", id: "findings" });
    if (m.analysis) {
      for (const f of m.analysis.findings) {
        const item = AT.el("li", { class: `finding ${f.severity}`, "data-id": (f.resources || [])[0] },
          `[${f.severity}] ${f.kind}: ${f.title}`, f.costNs ? ` (${AT.fmt(f.costNs)})` : "", " — ", f.fix,
          f.site ? AT.el("span", { class: "site" }, ` at ${f.site}`) : "",
          ...(f.blockers || []).map((b) => heldBy(b)));
        // A click opens what it is about (for a blocked loop, with the stacks of where).
        item.addEventListener("click", () => { const res = m.byId.get((f.resources || [])[0]); if (res) AT.showDetails(m, res); });
        list.append(item);
      }
      if (!m.analysis.findings.length) list.append(AT.el("li", { class: "none" }, "no findings: nothing held this request up beyond its own work"));
    } else {
      list.append(AT.el("li", { class: "none" }, "findings come with traces from the app or `asgi-asynctrace convert --to html`"));
    }
    bar.append(list);
  }

  // Another traced request of the process whose step ran while this one waited for the loop:
  // named, and a link that opens its trace (served from the store, which holds it).
  function heldBy(b) {
    const what = `held by ${b.label}: ran ${AT.fmt(b.ranNs)}${b.site ? ` at ${b.site}` : ""} `;
    const store = document.querySelector('meta[name="asynctrace-store"]');
    const open = store
      ? AT.el("a", { href: `?id=${encodeURIComponent(b.traceId)}`, class: "blocker-link" }, `trace ${b.traceId.slice(0, 12)}`)
      : AT.el("span", {}, `trace ${b.traceId.slice(0, 12)}`);
    return AT.el("div", { class: "held-by" }, what, open);
  }

  // When the handling went on a while after the response had gone out (cleanup, background
  // tasks: no client waited for it), as the CLI's summary says it: at least 1 ms and 5 %.
  function afterTheResponse(m) {
    const answered = AT.answered(m);
    const after = m.duration - answered;
    if (answered === null || after < Math.max(1e6, m.duration / 20)) return [];
    return [AT.el("span", { id: "answered" }, `response sent at ${AT.fmt(answered)}; ${AT.fmt(after)} more after it`)];
  }

  // What held the request up, in order: the critical path's top-level steps (what the root
  // waited on, and where its own code ran), a run of the same steps counted once. A click
  // opens the step's resource.
  function criticalPath(m) {
    const what = (s) => (s.type === "root" ? s.label : `${s.type} ${s.label}`);
    const runs = AT.pathRuns((m.analysis.criticalPath || []).filter((s) => s.depth === 0));
    const list = AT.el("ol", { class: "path", id: "path" });
    for (const run of runs.slice(0, 12)) {
      const first = run.steps[0];
      const text = run.steps.map(what).join(", then ");
      const item = AT.el("li", { "data-id": first.asyncId, "data-reps": run.reps },
        AT.el("span", { class: "t" }, `${AT.fmt(run.start)} → ${AT.fmt(run.end)}`), " ",
        run.reps > 1 ? `${run.reps} × ${text}` : text);
      item.addEventListener("click", () => { const res = m.byId.get(first.asyncId); if (res) AT.showDetails(m, res); });
      list.append(item);
    }
    if (runs.length > 12) list.append(AT.el("li", {}, `… ${runs.length - 12} more (the tree marks them all)`));
    if (!runs.length) list.append(AT.el("li", {}, "the request never waited on anything it started"));
    return AT.el("div", { class: "path-box" }, AT.el("span", { class: "req" }, "what held it up"), list);
  }

  function show(name) {
    view = name;
    for (const tab of document.querySelectorAll("#tabs button")) tab.setAttribute("aria-selected", String(tab.dataset.view === name));
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== "view-" + name;
    if (name !== "load" && model) AT.views[name].render($("view-" + name), model);
    if (name !== "load" && !model) $("view-" + name).replaceChildren(AT.el("p", { class: "empty" }, "No trace loaded yet: use Load…"));
  }

  function use(doc) {
    model = AT.normalize(doc);
    $("details").hidden = true;
    $("load-error").textContent = "";
    summary(model);
    show(view === "load" ? "bubbles" : view);
    document.body.dataset.loaded = model.traceId || "yes";
  }

  function fail(error) {
    $("load-error").textContent = error instanceof AT.LoadError || error instanceof SyntaxError
      ? `Could not load: ${error.message}` : `Could not load: ${error}`;
    show("load");
  }

  function loadText(text) {
    try { use(AT.parseText(text)[0]); } catch (e) { fail(e); }
  }

  function readFile(file) {
    file.text().then(loadText, fail);
  }

  function embedded(id) {
    const node = $(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  async function loadTrace(base, id) {
    // The app stores a trace once the request has fully ended, just after the client got the
    // last byte: ask again briefly before giving up.
    let said = "";
    for (let attempt = 0; attempt < 20; attempt++) {
      const got = await fetch(`${base}traces/${encodeURIComponent(id)}?analysis=1`);
      if (got.ok) {
        use(await got.json());
        // the page's address now opens this trace: a link to share, a reload that keeps it
        history.replaceState(null, "", `${location.pathname}?id=${encodeURIComponent(id)}`);
        return;
      }
      if (got.status !== 404) throw new AT.LoadError((await got.json()).error || got.statusText);
      said = await got.text();
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    // the store's own answer names the likeliest reason (another worker process has it)
    let reason = "";
    try { reason = JSON.parse(said).error || ""; } catch (e) { reason = ""; }
    throw new AT.LoadError(`trace ${id} never reached the store${reason ? `: ${reason}` : ""}`);
  }

  async function runTraced(base, path) {
    // /__asynctrace/?run=/items: send that request traced, then show its trace.
    if (!path.startsWith("/") || path.startsWith("//")) throw new AT.LoadError("run= takes a path on this app");
    const res = await fetch(path, { headers: { "X-Async-Trace": "1" } });
    const id = res.headers.get("x-async-trace-id");
    if (!id) throw new AT.LoadError(`${path} answered ${res.status} without a trace (is this client allowed to trace?)`);
    await loadTrace(base, id);
  }

  // Traces by route, the slowest first (as `asgi-asynctrace routes` gives them: from the
  // store's GET routes, or embedded with the traces of a file); open(id) shows a trace.
  function showRoutes(routes, open) {
    const box = $("routes-box"), table = $("routes");
    box.hidden = !routes.length;
    const share = (held) => Object.entries(held).slice(0, 3)
      .map(([k, v]) => `${k} ${Math.round(100 * v)} %`).join(", ");
    const findings = (found) => Object.entries(found)
      .map(([k, f]) => `${k} in ${f.traces} (${f.worst})`).join(", ") || "none";
    const head = AT.el("tr", {}, ...["route", "traces", "median", "95th pct", "held up by", "findings", ""]
      .map((h) => AT.el("th", {}, h)));
    table.replaceChildren(head, ...routes.map((r) => AT.el("tr", { class: "route" },
      AT.el("td", {}, `${r.method} ${r.route}`),
      AT.el("td", { class: "n" }, r.traces),
      AT.el("td", { class: "n" }, AT.fmt(r.p50Ns)),
      AT.el("td", { class: "n" }, AT.fmt(r.p95Ns)),
      AT.el("td", {}, share(r.heldUpBy)),
      AT.el("td", {}, findings(r.findings)),
      AT.el("td", {}, AT.el("a", { href: "#", class: "open", onclick: async (e) => {
        e.preventDefault();
        try { await open(r.slowestTraceId); } catch (err) { fail(err); }
      } }, `open the slowest (${AT.fmt(r.maxNs)})`)),
      AT.el("td", {}, r.comparison ? AT.el("a", { href: "#", class: "compare", onclick: (e) => {
        e.preventDefault();
        showComparison(r.comparison, open);
      } }, `compare with ${r.comparison.baseline.is === "typical" ? "a typical one" : "the faster"}`) : null))));
    $("comparison").hidden = true;
  }

  // A route's slowest trace against its typical one (the store's routes carry it, as
  // `asgi-asynctrace compare` gives it): where the slower one's extra time went.
  function showComparison(c, open) {
    const box = $("comparison"), base = c.baseline.is;
    const signed = (ns) => (ns > 0 ? "+" : ns < 0 ? "−" : "") + (ns ? AT.fmt(Math.abs(ns)) : "0");
    const link = (side, text) => AT.el("a", { href: "#", onclick: async (e) => {
      e.preventDefault();
      try { await open(side.traceId); } catch (err) { fail(err); }
    } }, text);
    const table = (title, rows, cells) => AT.el("table", { class: "diff" },
      AT.el("tr", {}, ...[title, base, "slower", "difference"].map((h) => AT.el("th", {}, h))),
      ...rows.map((d) => AT.el("tr", {}, AT.el("td", { class: "what" }, d.what),
        ...cells(d).map((v) => AT.el("td", { class: "n" }, v)))));
    const time = (ns) => (ns ? AT.fmt(ns) : "–");
    const count = (d, i) => (d.count[i] ? `${d.count[i]} × ${time(d.ns[i])}` : "–");
    const more = (d) => (d.count[1] !== d.count[0] ? ` (${d.count[1] > d.count[0] ? "+" : ""}${d.count[1] - d.count[0]})` : "");
    const ops = c.operations.slice(0, 12);
    box.replaceChildren(...[
      AT.el("h2", {}, `${c.route || "Two traces"}: the slower ${AT.fmt(c.slower.durationNs)} against ${AT.fmt(c.baseline.durationNs)} for the ${base} one (${signed(c.deltaNs)})`),
      AT.el("p", {}, link(c.slower, `open the slower (${c.slower.request.method || ""} ${c.slower.request.path || ""})`), " · ",
        link(c.baseline, `open the ${base} one (${c.baseline.request.method || ""} ${c.baseline.request.path || ""})`)),
      table("what held it up (critical path)", c.heldUpBy, (d) => [time(d.ns[0]), time(d.ns[1]), signed(d.deltaNs)]),
      ops.length ? table("operations (how many, how long alive)", ops,
        (d) => [count(d, 0), count(d, 1), signed(d.deltaNs) + more(d)])
        : AT.el("p", {}, "the same operations, as long in both"),
      c.operations.length > ops.length ? AT.el("p", { class: "muted" }, `… and ${c.operations.length - ops.length} more that differ`) : null,
      AT.el("p", {}, `findings only in the slower: ${c.findings.onlySlower.join(", ") || "none"}; only in the ${base} one: ${c.findings.onlyFaster.join(", ") || "none"}`),
    ].filter((node) => node !== null));
    box.hidden = false;
    box.scrollIntoView({ block: "nearest" });
  }

  async function loadRoutes(base, keepComparison) {
    try {
      const res = await fetch(base + "routes", { headers: { accept: "application/json" } });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const reading = !$("comparison").hidden;
      showRoutes((await res.json()).routes, (id) => loadTrace(base, id));
      if (keepComparison && reading) $("comparison").hidden = false;  // being read: left as it is
    } catch (e) {
      $("routes-box").hidden = false;
      $("routes").replaceChildren(AT.el("tr", {}, AT.el("td", {}, `could not list routes (${e})`)));
    }
  }

  // The tracer in the process that answered (the store's GET status, as `asgi-asynctrace
  // status` prints it), in one line: where to look first when a trace is missing something.
  async function loadStatus(base) {
    const line = $("tracer-status");
    try {
      const res = await fetch(base + "status", { headers: { accept: "application/json" } });
      if (!res.ok) return;  // an app from before the status: nothing to say
      const s = await res.json();
      const on = Object.entries(s.instrumentation || {}).filter(([, state]) => state === "on").map(([n]) => n);
      const failures = Object.entries(s.failures || {}).sort((a, b) => b[1] - a[1]);
      line.replaceChildren(
        `tracer: process ${s.pid}, Python ${s.python}, ${s.loop}, ${s.accelerator ? "C accelerator" : "pure Python"}; `
        + `instrumentation on: ${on.join(", ") || "none"}; `,
        AT.el("span", { class: failures.length ? "failures" : "" }, failures.length
          ? `tracer failures: ${failures.map(([where, n]) => `${n} × ${where}`).join(", ")} (each in the app's log)`
          : "tracer failures: none"));
      line.hidden = false;
    } catch (e) {
      line.hidden = true;
    }
  }

  // The store's recent traces and routes; then, while the list is on screen, looked at again
  // every 2 s and redrawn when a trace came in (the page need not be reloaded).
  let newest = null;
  async function loadStore(base, again) {
    $("store").hidden = false;
    const list = $("store-list");
    try {
      const res = await fetch(base + "traces", { headers: { accept: "application/json" } });
      const body = await res.json();
      const first = body.traces.length ? body.traces[0].traceId : "";
      if (again && first === newest) return;
      newest = first;
      loadRoutes(base, again);
      list.replaceChildren(...body.traces.map((t) => AT.el("li", {},
        AT.el("a", { href: "#", onclick: async (e) => {
          e.preventDefault();
          try { await loadTrace(base, t.traceId); } catch (err) { fail(err); }
        } }, `${t.method || ""} ${t.path || ""} ${t.status || ""} · ${AT.fmt(t.durationNs)} · ${t.resources} resources`))));
      if (!body.traces.length) list.append(AT.el("li", {}, "no traces yet: send a request with X-Async-Trace: 1"));
    } catch (e) {
      if (!again) list.replaceChildren(AT.el("li", {}, `could not list traces (${e})`));
    }
    loadStatus(base);
    if (!again) {
      setInterval(() => {
        if (view === "load" && document.visibilityState === "visible") loadStore(base, true);
      }, 2000);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const tab of document.querySelectorAll("#tabs button")) tab.addEventListener("click", () => show(tab.dataset.view));
    $("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]); });
    $("paste-load").addEventListener("click", () => loadText($("paste").value));
    const demo = embedded("asynctrace-demo");
    $("demo").hidden = !demo;
    $("demo").addEventListener("click", () => { try { use(demo); } catch (e) { fail(e); } });
    const data = embedded("asynctrace-data");
    const store = document.querySelector('meta[name="asynctrace-store"]');
    if (store) {
      const params = new URLSearchParams(location.search);
      const run = params.get("run"), id = params.get("id");
      // ?run=/path: send that request traced and show its trace; ?id=<trace id>: show that one
      const first = run ? runTraced(store.content, run) : id ? loadTrace(store.content, id) : null;
      if (first) first.catch(fail).finally(() => loadStore(store.content));
      else loadStore(store.content);
    }
    if (data && data.traces && data.traces.length) {
      try { use(data.traces[0]); } catch (e) { fail(e); }
      if (data.traces.length > 1) {
        $("store").hidden = false;
        document.querySelector("#store > h2").textContent = `${data.traces.length} traces in this file`;
        if (data.routes) {
          showRoutes(data.routes, (id) => {
            const found = data.traces.find((t) => (t.trace || t).traceId === id);
            if (!found) throw new AT.LoadError(`no trace ${id} in this file`);
            use(found);
          });
        }
        $("store-list").replaceChildren(...data.traces.map((t, i) => AT.el("li", {},
          AT.el("a", { href: "#", onclick: (e) => { e.preventDefault(); try { use(t); } catch (err) { fail(err); } } },
            `${(t.trace || t).request?.method || ""} ${(t.trace || t).request?.path || ""} #${i + 1}`))));
      }
    } else {
      show("load");
    }
  });
})();
