// bonewatch review: keyboard shortcuts and small touches. No framework, no build step.
// Study page: a agree, d disagree, j next study, k previous, h heatmap on/off.
(function () {
  "use strict";
  var HEATMAP_KEY = "bonewatch.heatmaps";

  function typing(event) {
    var t = event.target;
    return t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  }

  function setWidths() {
    document.querySelectorAll("[data-width]").forEach(function (el) {
      el.style.width = Math.max(0, Math.min(100, Number(el.dataset.width))) + "%";
    });
    document.querySelectorAll("[data-left]").forEach(function (el) {
      el.style.left = Math.max(0, Math.min(100, Number(el.dataset.left))) + "%";
    });
  }

  function heatmaps(on) {
    document.body.classList.toggle("heatmaps-on", on);
    var button = document.getElementById("toggle-heatmap");
    if (button) button.setAttribute("aria-pressed", on ? "true" : "false");
    try { localStorage.setItem(HEATMAP_KEY, on ? "1" : "0"); } catch (e) { /* private mode */ }
  }

  function go(url) { if (url) window.location.assign(url); }

  function studyPage() {
    var body = document.body;
    var saved = "0";
    try { saved = localStorage.getItem(HEATMAP_KEY) || "0"; } catch (e) { /* ignore */ }
    heatmaps(saved === "1");
    var toggle = document.getElementById("toggle-heatmap");
    if (toggle) toggle.addEventListener("click", function () {
      heatmaps(!body.classList.contains("heatmaps-on"));
    });
    var submitting = false;
    function verdict(id) {
      var button = document.getElementById(id);
      var form = document.getElementById("review-form");
      if (!button || !form || submitting) return;
      submitting = true;
      form.requestSubmit(button);
    }
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
      switch (event.key) {
        case "a": verdict("agree"); break;
        case "d": verdict("disagree"); break;
        case "j": go(body.dataset.next); break;
        case "k": go(body.dataset.prev); break;
        case "h": heatmaps(!body.classList.contains("heatmaps-on")); break;
        case "Escape": go(body.dataset.back); break;
        default: return;
      }
      event.preventDefault();
    });
  }

  function worklistPage() {
    var rows = Array.prototype.slice.call(document.querySelectorAll("tr[data-href]"));
    var current = -1;
    function select(i) {
      if (!rows.length) return;
      if (current >= 0) rows[current].classList.remove("selected");
      current = Math.max(0, Math.min(rows.length - 1, i));
      rows[current].classList.add("selected");
      rows[current].scrollIntoView({ block: "nearest" });
    }
    rows.forEach(function (row) {
      row.addEventListener("click", function (event) {
        if (event.target.closest("a")) return;
        go(row.dataset.href);
      });
    });
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
      if (event.key === "j") select(current + 1);
      else if (event.key === "k") select(current - 1);
      else if (event.key === "Enter" && current >= 0) go(rows[current].dataset.href);
      else return;
      event.preventDefault();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    setWidths();
    if (document.body.classList.contains("page-study")) studyPage();
    if (document.body.classList.contains("page-worklist")) worklistPage();
  });
})();
