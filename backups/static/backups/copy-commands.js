// A "Copy" button on each command block of the "Add a server" page.
// (A static file, not inline, so the Content-Security-Policy needs no exception.)
document.querySelectorAll("pre[data-copy]").forEach(function (pre) {
  if (!navigator.clipboard) return;
  var button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", function () {
    navigator.clipboard.writeText(pre.textContent).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });
  pre.parentNode.insertBefore(button, pre);
});
