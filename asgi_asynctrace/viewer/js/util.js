// util.js: the shared namespace, safe DOM building, formatting, categories and origins.
// Every string from a trace reaches the page through textContent or an attribute, never as HTML.
"use strict";
const AT = { views: {} };

AT.el = function (tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
};

AT.svg = function (tag, attrs, text) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = String(text);
  return node;
};

AT.fmt = function (ns) {
  if (ns === null || ns === undefined) return "–";
  const abs = Math.abs(ns);
  if (abs >= 1e9) return (ns / 1e9).toFixed(2) + " s";
  if (abs >= 1e6) return (ns / 1e6).toFixed(abs >= 1e8 ? 0 : 1) + " ms";
  if (abs >= 1e3) return (ns / 1e3).toFixed(0) + " µs";
  return ns + " ns";
};

// Categories as bubbleprof colours them.
AT.CATEGORY_OF = {
  fetch: "network", websocket: "network", "remote-root": "network",
  "stream-read": "data", "stream-write": "data", "queue-send": "data", "queue-receive": "data",
  "cache-get": "storage", "cache-put": "storage", "cache-delete": "storage",
  "kv-get": "storage", "kv-put": "storage", "kv-delete": "storage", "kv-list": "storage",
  "kv-pipeline": "storage", "kv-command": "storage",
  "db-query": "storage",
  root: "scheduling", task: "scheduling", timer: "scheduling", future: "scheduling",
  thread: "thread",
};
AT.CATEGORIES = ["network", "data", "storage", "scheduling", "thread", "other"];
AT.category = (type) => AT.CATEGORY_OF[type] || "other";
AT.colour = (type) => getComputedStyle(document.documentElement)
  .getPropertyValue("--" + AT.category(type)).trim() || "#888";

// The same rule as asgi_asynctrace.frame_origin: "site-packages/…" is a dependency,
// "<stdlib>/…" (or any "<…>") the runtime, everything else the app's own code.
AT.origin = function (frame) {
  const at = frame.lastIndexOf(" @ ");
  const where = at >= 0 ? frame.slice(at + 3) : frame;
  if (where.startsWith("site-packages/")) return "dependency";
  if (where.startsWith("<")) return "runtime";
  return "app";
};

// The package a dependency's frame is in: "httpx" for "… @ site-packages/httpx/_client.py:1:1".
AT.packageOf = function (frame) {
  const at = frame.lastIndexOf(" @ ");
  const where = at >= 0 ? frame.slice(at + 3) : frame;
  return where.startsWith("site-packages/") ? where.slice(14).split(/[/:]/)[0] : "";
};

// When the response had gone out (the analyzer's answeredNs), or null without an analysis.
AT.answered = (m) => (m.analysis && typeof m.analysis.answeredNs === "number" ? m.analysis.answeredNs : null);
