// The print page's Print button (no inline script: the CSP allows only scripts from this origin).
(function () {
  "use strict";
  document.addEventListener("click", function (event) {
    var target = event.target;
    if (target && target.closest && target.closest("[data-print]")) { window.print(); }
  });
})();
