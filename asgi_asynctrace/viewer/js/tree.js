// tree.js: the causality tree, collapsible; each node with its type, label, wait and sync
// time; a search box and a type filter show matching nodes with the path down to them.
"use strict";

AT.views.tree = (function () {
  function render(section, model) {
    section.replaceChildren();
    const search = AT.el("input", { type: "search", id: "tree-search", placeholder: "search labels, types, annotations…" });
    const filter = AT.el("select", { id: "tree-type" }, AT.el("option", { value: "" }, "all types"));
    for (const type of [...new Set(model.resources.map((r) => r.type))].sort()) {
      filter.append(AT.el("option", { value: type }, type));
    }
    const status = AT.el("span", { class: "t" });
    section.append(AT.el("div", { id: "tree-tools" }, search, filter, status));
    const rows = new Map();  // id -> {li, node, ul}

    function build(res) {
      const toggle = AT.el("button", { class: "toggle", type: "button", "aria-label": "collapse" },
        res.children.length ? "▾" : "");
      const row = AT.el("div", { class: "node" + (model.critical.has(res.id) ? " critical" : ""), "data-id": res.id },
        toggle,
        AT.el("span", { class: "type", style: `background: var(--${AT.category(res.type)})` }, res.type),
        AT.el("span", { class: "label", title: res.label }, res.label),
        AT.el("span", { class: "t" }, `wait ${AT.fmt(res.wait)} · sync ${AT.fmt(res.sync)} · ${res.state}`));
      row.addEventListener("click", (e) => { if (e.target !== toggle) AT.showDetails(model, res); });
      const li = AT.el("li", {}, row);
      let ul = null;
      if (res.children.length) {
        ul = AT.el("ul", { class: "tree" });
        li.append(ul);
        toggle.addEventListener("click", () => {
          ul.hidden = !ul.hidden;
          toggle.textContent = ul.hidden ? "▸" : "▾";
          toggle.setAttribute("aria-label", ul.hidden ? "expand" : "collapse");
        });
      }
      rows.set(res.id, { li, row, ul, res });
      return li;
    }

    // Built iteratively: a 10,000-deep chain must not overflow the stack.
    const top = AT.el("ul", { class: "tree top", id: "tree" });
    const todo = [[model.root, top]];
    const seen = new Set();
    while (todo.length) {
      const [res, parentList] = todo.shift();
      if (seen.has(res.id)) continue;
      seen.add(res.id);
      const li = build(res);
      parentList.append(li);
      const own = rows.get(res.id).ul;
      for (const child of res.children) todo.push([child, own]);
    }
    section.append(top);

    const text = (res) => `${res.type} ${res.label} ${Object.values(res.notes).join(" ")}`.toLowerCase();
    function apply() {
      const q = search.value.trim().toLowerCase();
      const type = filter.value;
      const shown = new Set();
      let matches = 0;
      for (const { res, row } of rows.values()) {
        const hit = (!q || text(res).includes(q)) && (!type || res.type === type);
        row.classList.toggle("match", Boolean(q) && hit);
        if (hit) {
          matches++;
          for (let r = res; r && !shown.has(r.id); r = model.byId.get(r.trigger)) shown.add(r.id);
        }
      }
      for (const { res, li } of rows.values()) li.hidden = (q || type) ? !shown.has(res.id) : false;
      status.textContent = q || type ? `${matches} match(es)` : `${rows.size} resources`;
      section.dataset.matches = String(matches);
    }
    search.addEventListener("input", apply);
    filter.addEventListener("change", apply);
    apply();
  }
  return { render };
})();
