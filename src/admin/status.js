// The admin status page's script (served at /status.js; the page's CSP allows only
// scripts from this origin).
"use strict";
const $ = (id) => document.getElementById(id);
// What this page saw, for a surge without an autoscaler.
const seen = [];

async function call(path, options) {
  // The session cookie goes along (same origin); a 401 means signing in.
  const r = await fetch(path, Object.assign({ credentials: "same-origin", cache: "no-store" }, options));
  if (r.status === 401) { throw new Error("unauthorized"); }
  return r;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
}

function showNodes(list) {
  $("pool").textContent = "· pool " + list.pool;
  const body = $("nodes").querySelector("tbody");
  body.replaceChildren();
  for (const n of list.nodes) {
    const tr = document.createElement("tr");
    tr.dataset.node = n.id;
    cell(tr, n.id);
    cell(tr, n.state + (n.drain_done === false ? " (in flight)" : ""), "state-" + n.state);
    cell(tr, n.address);
    cell(tr, String(n.in_flight), "num");
    cell(tr, String(n.requests), "num");
    cell(tr, (n.error_rate * 100).toFixed(2) + " %", "num");
    cell(tr, n.latency_ewma_ms.toFixed(2) + " ms", "num");
    cell(tr, n.origin);
    body.appendChild(tr);
  }
  return list.nodes.filter((n) => n.state === "in_service").length;
}

function showAutoscaler(a) {
  $("desired").textContent = a.desired;
  $("ordered").textContent = a.ordered;
  $("cost").textContent = a.cost.per_hour.toFixed(2);
  if (a.observations) $("rps").textContent = a.observations.requests_per_second.toFixed(1);
  const ul = $("decisions");
  ul.replaceChildren();
  for (const d of a.decisions.slice(-12).reverse()) {
    const li = document.createElement("li");
    li.textContent = d.at + " — " + d.direction + " " + d.current + " → " + d.desired + ": " + d.reasons.join("; ");
    ul.appendChild(li);
  }
}

function sumMetric(text, name) {
  let total = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + "{") || line.startsWith(name + " ")) {
      total += Number(line.slice(line.lastIndexOf(" ") + 1)) || 0;
    }
  }
  return total;
}

// The last ten minutes: the autoscaler's own samples (once a second) when there is an
// autoscaler, else what this page saw.
const WINDOW_MS = 10 * 60 * 1000;

function drawChart(samples) {
  const svg = $("chart");
  const w = 720, h = 200, left = 36, bottom = 22, top = 10;
  const now = Date.now();
  const max = Math.max(1, ...samples.map((s) => Math.max(s.desired, s.inService, s.ordered)));
  const x = (t) => left + Math.max(0, (t - (now - WINDOW_MS)) / WINDOW_MS) * (w - left - 8);
  const y = (v) => h - bottom - v / max * (h - bottom - top);
  let out = "";
  for (let v = 0; v <= max; v += Math.max(1, Math.ceil(max / 5))) {
    out += `<line x1="${left}" x2="${w - 8}" y1="${y(v)}" y2="${y(v)}" stroke="#eee"/>` +
      `<text x="${left - 4}" y="${y(v) + 4}" font-size="11" text-anchor="end">${v}</text>`;
  }
  for (let m = 10; m >= 0; m -= 2) {
    const px = x(now - m * 60000);
    out += `<line x1="${px}" x2="${px}" y1="${h - bottom}" y2="${h - bottom + 4}" stroke="#444"/>` +
      `<text x="${px}" y="${h - 6}" font-size="11" text-anchor="${m === 0 ? "end" : "middle"}">${m === 0 ? "now" : "−" + m + " min"}</text>`;
  }
  const series = [["desired", "#9467bd"], ["inService", "#000"], ["ordered", "#8c564b"]];
  series.forEach(([key, color], i) => {
    const pts = samples.map((s) => `${x(s.t).toFixed(1)},${y(s[key]).toFixed(1)}`).join(" ");
    out += `<polyline data-series="${key}" fill="none" stroke="${color}" stroke-width="2" points="${pts}"/>` +
      `<rect x="${left + 10 + i * 110}" y="${top}" width="12" height="4" fill="${color}"/>` +
      `<text x="${left + 26 + i * 110}" y="${top + 6}" font-size="11">${key === "inService" ? "in service" : key}</text>`;
  });
  svg.innerHTML = out;
}

async function refresh() {
  try {
    const nodes = await (await call("/v1/nodes")).json();
    const inService = showNodes(nodes);
    $("in-service").textContent = inService;
    let samples = null;
    const a = await call("/v1/autoscaler");
    if (a.ok) {
      showAutoscaler(await a.json());
      const h = await call("/v1/autoscaler/history");
      if (h.ok) {
        samples = (await h.json()).samples.map((s) => ({
          t: Date.parse(s.at), desired: s.desired, inService: s.in_service, ordered: s.ordered,
        }));
      }
    }
    const room = await call("/v1/waiting-room");
    $("queue").textContent = room.ok ? (await room.json()).queued + " waiting" : "not set up";
    const metrics = await call("/metrics");
    if (metrics.ok) $("shed").textContent = sumMetric(await metrics.text(), "surge_shed_total");
    seen.push({ t: Date.now(), desired: inService, inService, ordered: 0 });
    while (seen.length && seen[0].t < Date.now() - WINDOW_MS) seen.shift();
    drawChart(samples || seen);
    $("login").hidden = true;
    $("status").hidden = false;
    $("error").textContent = "";
    $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " (every 2 s)";
  } catch (e) {
    if (e.message === "unauthorized") {
      $("status").hidden = true;
      $("login").hidden = false;
      $("updated").textContent = "sign in to see the pool";
    } else {
      $("error").textContent = "cannot reach surge: " + e.message;
    }
  }
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const r = await fetch("/v1/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: $("token").value }),
  });
  $("token").value = "";
  $("error").textContent = r.ok ? "" : "that token is not this surge's";
  refresh();
});

refresh();
setInterval(refresh, 2000);
