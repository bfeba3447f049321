// Sign-up: tell ReClo the browser's time zone, so pages and emails show
// local times from the first page on (changeable under Security).
(function () {
  "use strict";
  var zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return; }
  document.querySelectorAll("input[data-detect-zone]").forEach(function (input) {
    if (!input.value) input.value = zone;
  });
})();
