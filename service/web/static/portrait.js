// Portrait pages: show the people details only when people are chosen, and follow all variants over one
// Server-Sent Events stream (real step counts; the page never reloads itself).
(function () {
  "use strict";
  var peopleSelect = document.getElementById("show_people");
  var details = document.getElementById("people-details");
  if (peopleSelect && details) {
    var sync = function () { details.hidden = peopleSelect.value !== "yes"; };
    peopleSelect.addEventListener("change", sync);
    sync();
  }

  var section = document.getElementById("variants");
  if (!section || !window.EventSource) { return; }
  var finished = (section.getAttribute("data-final-statuses") || "").split(" ");
  var cards = {};
  var open = 0;
  Array.prototype.forEach.call(section.querySelectorAll("li.variant"), function (card) {
    cards[card.getAttribute("data-job-id")] = card;
    if (finished.indexOf(card.getAttribute("data-status")) < 0) { open += 1; }
  });
  if (open === 0) { return; }
  var overall = document.getElementById("variants-status");
  var source = new EventSource("/portraits/variants/events?jobs=" + encodeURIComponent(section.getAttribute("data-jobs")));

  function update(job) {
    var card = cards[job.job_id];
    if (!card) { return; }
    var was = card.getAttribute("data-status");
    card.setAttribute("data-status", job.status);
    var text = card.querySelector(".variant-status");
    var bar = card.querySelector("progress");
    if (job.total) { bar.max = job.total; bar.value = job.step; }
    if (job.status === "running" && job.total) {
      text.textContent = "Step " + job.step + " of " + job.total + ".";
    } else if (job.status === "queued") {
      text.textContent = "Waiting for the image engine.";
    } else if (job.status === "succeeded") {
      text.textContent = "Done.";
      bar.value = bar.max;
      var image = card.querySelector("img.variant-image");
      image.src = "/artifacts/" + encodeURIComponent(job.job_id) + "/png";
      image.hidden = false;
      card.querySelector(".variant-actions").hidden = false;
    } else if (finished.indexOf(job.status) >= 0) {
      text.textContent = "This variant did not work" + (job.error ? ": " + job.error : ".");
    }
    if (finished.indexOf(job.status) >= 0 && finished.indexOf(was) < 0) {
      open -= 1;
      if (open === 0) {
        overall.textContent = "All variants are done. Compare them, then review one; nothing reaches the patient without approval.";
        source.close();
      }
    }
  }

  source.onmessage = function (event) { update(JSON.parse(event.data)); };
  source.onerror = function () {
    overall.textContent = "Lost contact with the server. Reload the page to see the variants.";
    source.close();
  };
})();
