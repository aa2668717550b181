// Follows a generation job over Server-Sent Events and reveals the review link when it is done.
(function () {
  "use strict";
  var section = document.getElementById("job");
  if (!section || !window.EventSource) { return; }
  var jobId = section.getAttribute("data-job-id");
  // The final statuses come from the server's JobStatus enum (data-final-statuses), not a copy here.
  var finished = (section.getAttribute("data-final-statuses") || "").split(" ");
  if (finished.indexOf(section.getAttribute("data-status")) >= 0) { return; }
  var statusText = document.getElementById("job-status");
  var bar = document.getElementById("job-progress");
  var link = document.getElementById("review-link");
  var preview = document.getElementById("job-preview");
  var lastStep = 0;
  var source = new EventSource("/jobs/" + encodeURIComponent(jobId) + "/events");
  source.onmessage = function (event) {
    var job = JSON.parse(event.data);
    section.setAttribute("data-status", job.status);
    if (job.total) { bar.max = job.total; bar.value = job.step; }
    if (job.status === "running") {
      statusText.textContent = "Step " + job.step + " of " + job.total + "…";
      if (preview && job.step > lastStep) {
        // A cheap latent preview, replaced as steps go by; a missing one just stays hidden.
        lastStep = job.step;
        preview.onload = function () { preview.hidden = false; };
        preview.src = "/artifacts/" + encodeURIComponent(jobId) + "/preview?step=" + job.step;
      }
    }
    if (job.status === "succeeded") {
      statusText.textContent = "Done.";
      bar.value = bar.max;
      link.hidden = false;
      source.close();
      window.location.assign("/review/" + encodeURIComponent(jobId));
    } else if (finished.indexOf(job.status) >= 0) {
      statusText.textContent = "It did not work" + (job.error ? ": " + job.error : ".") + " Please try again.";
      source.close();
    }
  };
  source.onerror = function () { statusText.textContent = "Lost contact with the server; reload the page to continue."; source.close(); };
})();

// The workspace's handout-topic lists name each topic in English and in the handout's language: when the
// Language list changes, the names follow. The list of every topic carries each one's titles per language
// (data-titles); a condition's own list ("<condition id>:<topic id>") is named from it.
(function () {
  "use strict";
  var language = document.getElementById("language");
  var every = document.querySelectorAll("#topic-other option[data-titles]");
  if (!language || !every.length) { return; }
  var titles = {};
  Array.prototype.forEach.call(every, function (option) {
    titles[option.value] = JSON.parse(option.getAttribute("data-titles"));
  });
  function label(topic) {
    var local = topic[language.value];
    return topic.en + (local && local !== topic.en ? " — " + local : "");
  }
  function relabel() {
    Array.prototype.forEach.call(document.querySelectorAll("select[name=topic_choice] option, #topic-other option"), function (option) {
      var value = option.value;
      var topic = titles[value.slice(value.indexOf(":") + 1)];
      if (topic) { option.textContent = label(topic); }
    });
  }
  language.addEventListener("change", relabel);
})();
