// ReClo recovery page: follow a failover's steps without reloading.
// Polls the status endpoint named by #steps[data-status-url] while the
// failover runs and reloads once it has finished, so the address and the
// VPN section appear. Without JavaScript the page refreshes itself instead
// (a <noscript> refresh in the page head).
(function () {
  "use strict";
  var list = document.getElementById("steps");
  var elapsed = document.getElementById("elapsed");
  if (!list || !elapsed || elapsed.dataset.running !== "1") return;

  var seconds = parseInt(elapsed.dataset.seconds, 10) || 0;
  function fmt(s) {
    var m = Math.floor(s / 60);
    return (m ? m + " min " : "") + (s % 60) + " s";
  }
  elapsed.textContent = fmt(seconds);
  setInterval(function () { seconds += 1; elapsed.textContent = fmt(seconds); }, 1000);

  var announce = document.getElementById("progress-announce");
  function show(data) {
    data.steps.forEach(function (step) {
      var li = list.querySelector('[data-step="' + step.name + '"]');
      if (!li) return;
      var before = li.className;
      if (announce && before !== "progress-step " + step.status && step.status !== "pending") {
        // A live region: screen readers say "Starting the server: done" as it happens.
        announce.textContent = li.querySelector(".progress-title").textContent + ": " + step.status;
      }
      li.className = "progress-step " + step.status;
      li.querySelector(".progress-state").textContent = step.status;
      li.querySelector(".progress-detail").textContent = step.detail || "";
      li.querySelector(".progress-time").textContent = step.seconds === null ? "" : step.seconds + " s";
    });
    var badge = document.getElementById("recovery-status");
    badge.textContent = data.status_label;
    badge.className = "badge " + data.status;
  }

  function poll() {
    fetch(list.dataset.statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) {
        show(data);
        if (!data.active) {
          window.location.reload();
          return;
        }
        setTimeout(poll, 2000);
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  setTimeout(poll, 1500);
})();
