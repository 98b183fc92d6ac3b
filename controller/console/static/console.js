// Live dashboard: follows /console/events and updates each device's status and the counts.
// Labels come from the page (data-label-<status>, rendered from the translation catalogue).
(function () {
  "use strict";
  const body = document.body;
  const statuses = ["online", "offline", "playing"];

  function recount() {
    for (const status of statuses) {
      const count = document.querySelectorAll('.device[data-status="' + status + '"]').length;
      const target = document.getElementById("count-" + status);
      if (target) target.textContent = String(count);
    }
  }

  function apply(message) {
    const update = JSON.parse(message.data);
    if (!update.status) return;
    const item = document.querySelector('.device[data-device-id="' + CSS.escape(update.device_id) + '"]');
    if (!item) return;
    item.dataset.status = update.status;
    item.querySelector(".device-status").textContent = body.dataset["label" + update.status[0].toUpperCase() + update.status.slice(1)];
    recount();
  }

  const source = new EventSource("/console/events");
  source.addEventListener("ready", function () { body.dataset.live = "on"; });
  source.addEventListener("device", apply);
  source.addEventListener("delivery", apply);
  source.onerror = function () { body.dataset.live = "off"; };
})();
