// moat dashboard: live sandbox list (server-sent events) and a confirm on kill.
// Every value is set as text, never parsed as markup (the CSP allows no inline script).
"use strict";

function age(s) {
  if (s < 120) return s + "s";
  if (s < 7200) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function mib(n) {
  return n === null || n === undefined ? "-" : (n / 1048576).toFixed(1) + " MiB";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    td.appendChild(span);
  } else {
    td.textContent = text;
  }
  tr.appendChild(td);
  return td;
}

function render(tbody, rows) {
  const admin = tbody.dataset.admin === "yes";
  const fresh = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    const a = document.createElement("a");
    a.href = "/ui/sandboxes/" + encodeURIComponent(r.id);
    a.textContent = r.id;
    cell(tr, "").appendChild(a);
    if (admin) cell(tr, r.tenant);
    cell(tr, r.tier, "tier");
    cell(tr, r.template);
    cell(tr, r.state, "state " + r.state);
    cell(tr, age(r.age_s));
    cell(tr, r.cpu_pct === null ? "-" : r.cpu_pct.toFixed(1) + " %");
    cell(tr, mib(r.mem_used) + " / " + mib(r.mem_total));
    fresh.appendChild(tr);
  }
  tbody.replaceChildren(fresh);
  const empty = document.getElementById("empty");
  if (empty) empty.hidden = rows.length > 0;
}

function live() {
  const table = document.getElementById("sandboxes");
  const status = document.getElementById("live");
  if (!table || !window.EventSource) return;
  const tbody = table.querySelector("tbody");
  const source = new EventSource("/ui/events");
  source.addEventListener("sandboxes", (ev) => {
    render(tbody, JSON.parse(ev.data));
    status.textContent = "live: updated " + new Date().toLocaleTimeString();
    status.className = "live on";
  });
  source.onerror = () => {
    status.textContent = "live updates: reconnecting…";
    status.className = "live";
  };
}

function confirms() {
  for (const button of document.querySelectorAll("button[data-confirm]")) {
    button.form.addEventListener("submit", (ev) => {
      if (!window.confirm(button.dataset.confirm)) ev.preventDefault();
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  live();
  confirms();
});
