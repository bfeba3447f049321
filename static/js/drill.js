// ReClo drill page: follow a test failover's steps and verdict without reloading.
// Polls the status endpoint named by #drill-steps[data-status-url] while the
// drill runs, updates the steps in place and says in the live region
// #drill-announce what changed: a step's state, then the verdict (never the
// step details that change on every poll). Once the drill has finished it
// stops polling and takes the verdict's sections (checks, screenshot,
// console, report link) from the page itself. Without JavaScript the page
// has a plain Refresh link instead.
(function () {
  "use strict";
  var table = document.getElementById("drill-steps");
  if (!table || !table.dataset.statusUrl) return;
  var announce = document.getElementById("drill-announce");
  var note = document.getElementById("drill-live-note");
  if (note) note.textContent = "This page updates by itself as the drill advances; you may also leave and come back.";

  var seen = {};
  table.querySelectorAll("tr[data-step]").forEach(function (row) {
    seen[row.dataset.step] = row.querySelector(".step-status").textContent;
  });

  function text(row, cls, value) {
    row.querySelector(cls).textContent = value;
  }

  function showSteps(steps) {
    var changed = [];
    steps.forEach(function (step) {
      var row = table.querySelector('tr[data-step="' + step.name + '"]');
      if (!row) return;
      if (seen[step.name] !== step.status && step.status !== "pending") {
        changed.push(step.title + ": " + step.status + ".");
      }
      seen[step.name] = step.status;
      var badge = row.querySelector(".step-status");
      badge.className = "badge " + step.status + " step-status";
      badge.textContent = step.status;
      text(row, ".step-started", step.started || "–");
      text(row, ".step-finished", step.finished || "–");
      text(row, ".step-detail", step.detail || "");
    });
    return changed;
  }

  function badge(data) {
    var el = document.getElementById("drill-status");
    el.textContent = data.status_label;
    el.className = "badge " + (data.passed ? "green" : data.status === "failed" ? "red" : "amber");
  }

  function verdict(data) {
    if (data.passed) {
      return "Test failover passed." + (data.rto_seconds === null ? "" : " Measured RTO: " + data.rto_seconds + " s.");
    }
    return "Test failover " + data.status_label.toLowerCase() + (data.error ? ": " + data.error : ".");
  }

  // The finished page's own sections (badge, report link, RTO, checks, screenshot, console), put in
  // place of the running page's so it reads as if reloaded while the live region stays; then `done`.
  function finish(data, done) {
    if (note) note.remove();
    fetch(window.location.href, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        ["drill-status", "drill-actions", "drill-rto", "drill-error", "drill-results"].forEach(function (id) {
          var mine = document.getElementById(id);
          var theirs = fresh.getElementById(id);
          if (mine && theirs) mine.replaceWith(document.importNode(theirs, true));
        });
      })
      .catch(function () { badge(data); })  // the verdict and the steps are shown; the rest is a reload away
      .then(done);
  }

  function say(parts) {
    if (parts.length && announce) announce.textContent = parts.join(" ");
  }

  function poll() {
    fetch(table.dataset.statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        var said = showSteps(data.steps);
        if (data.active) {
          badge(data);
          say(said);
          setTimeout(poll, 2000);
          return;
        }
        // Finished: no more polls; the verdict is said once the page shows it.
        finish(data, function () { say(said.concat([verdict(data)])); });
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  setTimeout(poll, 1000);
})();
