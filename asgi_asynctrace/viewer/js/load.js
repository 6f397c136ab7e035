// load.js: read a trace (format v1, the seed runtime's JSON, or {trace, analysis} as the
// CLI and the server give it) into the model every view draws from.
"use strict";

AT.LoadError = class extends Error {};

AT.seedType = function (name) {
  if (name.length > 1 && name[0] === "k" && name[1] >= "A" && name[1] <= "Z") name = name.slice(1);
  return name.replace(/([a-z0-9])([A-Z])/g, "$1-$2").replace(/_/g, "-").toLowerCase();
};

AT.parseText = function (text) {
  // One JSON document, JSON lines, or a log with "AsyncTrace completed; toJson() = " lines.
  const trimmed = text.trim();
  if (!trimmed) throw new AT.LoadError("nothing to load: the input is empty");
  try {
    return [JSON.parse(trimmed)];
  } catch (error) {
    const docs = [];
    const marker = "AsyncTrace completed; toJson() = ";
    trimmed.split(/\r?\n/).forEach((line, i) => {
      const at = line.indexOf(marker);
      const body = at >= 0 ? line.slice(at + marker.length) : line.trim();
      if (!body.startsWith("{")) return;
      try { docs.push(JSON.parse(body)); } catch (e) {
        throw new AT.LoadError(`line ${i + 1}: not valid JSON (${e.message})`);
      }
    });
    if (!docs.length) throw new AT.LoadError(`not JSON and no trace lines found (${error.message})`);
    return docs;
  }
};

function need(cond, message) { if (!cond) throw new AT.LoadError(message); }
const isInt = (v) => Number.isInteger(v);
const optInt = (v) => (v === null || v === undefined ? null : v);

AT.normalize = function (input) {
  need(input && typeof input === "object" && !Array.isArray(input), "a trace must be a JSON object");
  const analysis = input.trace && input.analysis ? input.analysis : null;
  const doc = input.trace && typeof input.trace === "object" ? input.trace : input;
  need(Array.isArray(doc.resources), "not a trace: it has no 'resources' list");
  const seed = doc.version === undefined;
  need(seed || doc.version === 1, `format version ${doc.version} is not supported (1 is)`);
  const duration = doc.requestDurationNs;
  need(isInt(duration), "'requestDurationNs' must be an integer");
  const stacks = new Map();
  (doc.stackTraces || []).forEach((s, i) => {
    need(s && isInt(s.id) && Array.isArray(s.frames), `stackTraces[${i}]: needs an id and frames`);
    stacks.set(s.id, s.frames.map(String));
  });
  const resources = [];
  const byId = new Map();
  doc.resources.forEach((r, i) => {
    const where = `resources[${i}]`;
    need(r && typeof r === "object", `${where}: not an object`);
    need(isInt(r.asyncId) && isInt(r.triggerId), `${where}: asyncId and triggerId must be integers`);
    need(typeof r.type === "string", `${where}: type must be a string`);
    need(isInt(r.createdAt), `${where}: createdAt must be an integer`);
    const type = seed ? AT.seedType(r.type) : r.type;
    let callbacks;
    if (!seed) {
      need(Array.isArray(r.callbacks), `${where}: callbacks must be a list`);
      callbacks = r.callbacks.map((p, j) => {
        need(Array.isArray(p) && p.length === 2 && isInt(p[0]) && (p[1] === null || isInt(p[1])),
          `${where}.callbacks[${j}]: expected [start, end|null]`);
        return [p[0], p[1]];
      });
    } else {
      const s = optInt(r.callbackStartedAt), e = optInt(r.callbackEndedAt);
      callbacks = s !== null && (s || e || type === "root") ? [[s, e !== null && e >= s ? e : null]] : [];
    }
    let settled = optInt(r.destroyedAt);
    if (seed) settled = type === "root" ? settled || duration : settled || null;
    const sid = optInt(r.stackTraceId);
    const res = {
      id: r.asyncId, trigger: r.triggerId, type, created: r.createdAt, settled,
      state: seed ? (settled !== null ? "ok" : "pending") : String(r.state || "pending"),
      stack: sid !== null && stacks.has(sid) ? stacks.get(sid) : [],
      callbacks, notes: {}, children: [], awaitedBy: r.awaitedBy || [], samples: [],
    };
    res.end = Math.max(res.settled !== null ? res.settled : duration, res.created);
    res.sync = callbacks.reduce((t, [s, e]) => t + Math.max(0, (e === null ? duration : e) - s), 0);
    res.wait = Math.max(0, res.end - res.created - res.sync);
    resources.push(res);
    byId.set(res.id, res);
  });
  need(resources.length > 0, "the trace has no resources");
  for (const a of doc.annotations || []) {
    const res = a && byId.get(a.asyncId);
    if (res) res.notes[String(a.key)] = a.value;
  }
  // Where a long step was when the app's watchdog looked (format v1's optional "samples").
  (doc.samples || []).forEach((s, i) => {
    need(s && isInt(s.asyncId) && isInt(s.at) && Array.isArray(s.frames),
      `samples[${i}]: needs an asyncId, an at and frames`);
    const res = byId.get(s.asyncId);
    if (res) res.samples.push({ at: s.at, frames: s.frames.map(String) });
  });
  for (const res of resources) {
    const parent = byId.get(res.trigger);
    if (parent && parent !== res) parent.children.push(res);
    res.label = AT.label(res);
    // As the analysis counts it: a timer other than a sleep that never fired (cancelled or
    // still pending at the end: a deadline not reached, a callback set for later) was no wait.
    res.noWait = res.type === "timer" && (res.state === "cancelled" || res.state === "pending")
      && res.notes.kind !== "sleep";
    if (res.noWait) res.wait = 0;
  }
  const root = resources.find((r) => r.type === "root") || resources[0];
  const critical = new Set((analysis ? analysis.criticalPath : []).map((s) => s.asyncId));
  // When each was what held the request up: its steps' [start, end] on the critical path.
  const criticalSpans = new Map();
  for (const s of analysis ? analysis.criticalPath : []) {
    const spans = criticalSpans.get(s.asyncId);
    if (spans) spans.push([s.start, s.end]); else criticalSpans.set(s.asyncId, [[s.start, s.end]]);
  }
  return {
    traceId: String(doc.traceId || ""), request: doc.request || {}, duration, resources, byId,
    root, analysis, critical, criticalSpans, dropped: doc.dropped || {},
  };
};

// Steps of the critical path in a row, each run of the same one, two or three steps three
// times or more as one entry: as path_runs() in asgi_asynctrace's report.
AT.pathRuns = function (path) {
  const key = (s) => `${s.depth}\u0000${s.type}\u0000${s.label}`;
  const same = (i, j, p) => {
    if (j + p > path.length) return false;
    for (let k = 0; k < p; k++) if (key(path[i + k]) !== key(path[j + k])) return false;
    return true;
  };
  const out = [];
  let i = 0;
  while (i < path.length) {
    let period = 1, reps = 1;
    for (const p of [1, 2, 3]) {
      let n = 1;
      while (same(i, i + n * p, p)) n++;
      if (n >= 3 && p * n > period * reps) { period = p; reps = n; }
    }
    const run = path.slice(i, i + period * reps);
    out.push({ steps: run.slice(0, period), last: run.slice(-period), reps,
      start: run[0].start, end: Math.max(...run.map((s) => s.end)) });
    i += period * reps;
  }
  return out;
};

AT.BODIES = { "stream-read": "request body", "stream-write": "response body" };

AT.label = function (res) {
  // The same names as asgi_asynctrace's analysis.label().
  const n = res.notes, t = res.type;
  const short = (s) => String(s).split("<locals>.").pop();
  if (t === "fetch") return `${n.method || ""} ${n.url || ""}`.trim() || t;
  if (t === "db-query") return String(n.statement || t);
  if (t === "kv-pipeline") return `${n.count !== undefined ? n.count : "?"} commands: ${n.commands || ""}`;
  if (t.startsWith("cache-") || t.startsWith("kv-")) {
    const what = n.key !== undefined ? n.key : n.keys !== undefined ? `${n.keys} keys` : "";
    return `${n.op || n.command || t} ${what}`.trim();
  }
  if (t === "future" && res.stack.length) return short(String(res.stack[0]).split(" @ ")[0]);
  if (t === "task") return short(n.coroutine || t);
  if (t === "thread") return short(n.function || t);
  if (t === "timer") {  // a deadline's delay (19.993) to a tenth, as the summary gives it
    const d = n.delayMs, tenths = typeof d === "number" && d >= 1 && Math.abs(d * 10 - Math.round(d * 10)) > 1e-9;
    return `${n.kind || "timer"} ${d === undefined ? "?" : tenths ? d.toFixed(1) : d}ms`;
  }
  if (t === "root") return `${n.method || ""} ${n.path || ""}`.trim() || t;
  if (t === "gc") return `generation ${n.generation !== undefined ? n.generation : "?"}`;
  if (AT.BODIES[t]) return `${AT.BODIES[t]}, ${n.bytes !== undefined ? n.bytes : "?"} bytes`;
  if (t === "websocket") {
    const size = n.bytes !== undefined ? `, ${n.bytes} bytes` : "";
    return `${n.direction || ""} ${n.message || ""}`.trim() + size;
  }
  return String(n.name || t);
};
