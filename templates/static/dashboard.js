// The manager's dashboard: what its pages do beyond plain HTML forms.
// Served from /static (the dashboard works offline); every part is optional:
// without this script the pages still work, with the browser's own tooltips
// (each chart point's SVG <title>) and no confirmation before "Delete all".
"use strict";

// Ask before a form that says so (data-confirm) is submitted. Not an inline
// onsubmit: there, a field named "confirm" would shadow window.confirm.
function confirmBeforeSubmit() {
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
}

// Keep the pool's part of Memory Configuration current (an automatic resize,
// a node that stops answering) without reloading the page, which would reset
// a form being filled in. The resize fields' limits follow the pool's size.
function refreshPool() {
  const pool = document.getElementById("pool");
  if (!pool) return;
  const every = Number(pool.dataset.refreshMs) || 3000;
  const applyLimits = () => {
    const size = Number(pool.querySelector("[data-size]")?.dataset.size);
    if (!size) return;
    const limits = { "expand-count": Number(pool.dataset.maxNodes) - size,
                     "shrink-count": size - Number(pool.dataset.minNodes) };
    for (const [id, max] of Object.entries(limits)) {
      const field = document.getElementById(id);
      if (field) field.max = String(Math.max(max, 1));
    }
  };
  setInterval(async () => {
    try {
      const response = await fetch("/config/pool", { credentials: "same-origin" });
      const type = response.headers.get("Content-Type") || "";
      // A lapsed session answers with the login page: leave the page as it is.
      if (!response.ok || response.redirected || !type.startsWith("text/html")) return;
      pool.querySelector("#pool-state").innerHTML = await response.text();
      applyLimits();
    } catch (error) {
      // The manager is unreachable for a moment: try again at the next period.
    }
  }, every);
}

// Redraw the statistics page's charts in place; the page itself stays put.
function refreshCharts() {
  const charts = document.getElementById("charts");
  if (!charts) return;
  const every = Number(charts.dataset.refreshMs) || 15000;
  setInterval(async () => {
    try {
      const response = await fetch("/stats/charts", { credentials: "same-origin" });
      const type = response.headers.get("Content-Type") || "";
      // A lapsed session answers with the login page: keep the charts shown.
      if (!response.ok || response.redirected || !type.startsWith("text/html")) return;
      charts.innerHTML = await response.text();
    } catch (error) {
      // The manager is unreachable for a moment: try again at the next period.
    }
  }, every);
}

// Show a chart point's value as soon as the pointer comes near it: the point
// nearest the pointer along the time axis, its time (UTC) and value.
function chartTips() {
  const charts = document.querySelector(".charts");
  if (!charts) return;
  const tip = document.createElement("div");
  tip.id = "chart-tip";
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  document.body.append(tip);
  let marked = null;
  const hide = () => {
    tip.hidden = true;
    marked?.classList.remove("hovered");
    marked = null;
  };
  charts.addEventListener("mousemove", (event) => {
    const svg = event.target.closest?.("figure.chart svg");
    if (!svg) return hide();
    let nearest = null;
    let distance = Infinity;
    for (const dots of svg.querySelectorAll("g.dots")) {
      const box = dots.querySelector("circle")?.getBoundingClientRect();
      if (!box) continue;
      const away = Math.abs(box.left + box.width / 2 - event.clientX);
      if (away < distance) [nearest, distance] = [dots, away];
    }
    if (!nearest) return hide();
    // The title becomes the tip's text: the browser's own tooltip would repeat it.
    const title = nearest.querySelector(":scope > title");
    if (title) {
      nearest.dataset.tip = title.textContent;
      title.remove();
    }
    tip.textContent = nearest.dataset.tip || "";
    tip.hidden = false;
    const box = nearest.querySelector("circle").getBoundingClientRect();
    tip.style.left = `${box.left + box.width / 2 + window.scrollX}px`;
    tip.style.top = `${box.top + window.scrollY}px`;
    if (marked !== nearest) {
      marked?.classList.remove("hovered");
      nearest.classList.add("hovered");
      marked = nearest;
    }
  });
  charts.addEventListener("mouseleave", hide);
}

confirmBeforeSubmit();
refreshPool();
refreshCharts();
chartTips();
