// The ward report: plays per device (GET /api/v1/reports/plays) with totals, and per broadcast (the rows
// of GET /api/v1/reports/plays/log added up by broadcast); the CSV links are the same API calls with
// format=csv (UTF-8 with a byte order mark, so that Excel keeps the Vietnamese names).
(function () {
  "use strict";
  const { config, label, labelOr, formatTime, dayStart, el, areaName } = window.Records;
  const COUNTS = ["scheduled", "played_ok", "interrupted", "missed", "failed", "cancelled", "pending"];
  const form = document.getElementById("report-filters");
  const status = document.getElementById("report-status");

  function weekAgo(day) {
    const d = new Date(day + "T00:00:00Z");
    d.setUTCDate(d.getUTCDate() - 6);
    return d.toISOString().slice(0, 10);
  }

  function params(extra) {
    const values = new URLSearchParams({
      area: form.elements.area.value,
      from: dayStart(form.elements.from.value, false),
      to: dayStart(form.elements.to.value, true),
    });
    for (const [name, value] of Object.entries(extra || {})) values.set(name, value);
    return values.toString();
  }

  function seconds(line) {
    return line.played_s.toFixed(0) + " / " + line.requested_s.toFixed(0);
  }

  function numbers(line) {
    return COUNTS.map((key) => el("td", { text: String(line[key]) })).concat(
      el("td", { text: seconds(line) }), el("td", { text: line.played_percent === null ? "—" : line.played_percent + "%" }));
  }

  function devices(report) {
    const body = document.querySelector("#report-devices tbody");
    body.replaceChildren(...report.devices.map((line) => el("tr", { dataset: { deviceId: line.device_id } },
      el("th", { scope: "row", text: line.name || line.device_id }), el("td", { text: line.area_name }), numbers(line))));
    document.querySelector("#report-devices tfoot").replaceChildren(el("tr", { class: "totals" },
      el("th", { scope: "row", colspan: "2", text: label("records.report.totals") }), numbers(report.totals)));
  }

  function broadcasts(log) {
    const groups = new Map();
    for (const entry of log.rows) {
      if (entry.resumes_delivery_id) continue; // part of a request already counted
      const key = entry.broadcast_id || "schedule:" + entry.schedule_id + ":" + entry.planned_at;
      if (!groups.has(key)) groups.set(key, { first: entry, devices: 0, ok: 0, played: 0, requested: 0 });
      const group = groups.get(key);
      group.devices += 1;
      if (entry.state === "completed") group.ok += 1;
      group.played += entry.played_s;
      group.requested += entry.requested_s;
    }
    const body = document.querySelector("#report-broadcasts tbody");
    body.replaceChildren(...[...groups.values()].map((g) => el("tr", {},
      el("td", { text: formatTime(g.first.queued_at || g.first.planned_at) }),
      el("td", { text: g.first.schedule_name ? label("records.report.schedule", { name: g.first.schedule_name }) : label("records.report.one_off") }),
      el("td", { text: labelOr("records.priority." + g.first.priority, g.first.priority) }),
      el("td", { text: String(g.devices) }), el("td", { text: String(g.ok) }), el("td", { text: String(g.devices - g.ok) }),
      el("td", { text: g.played.toFixed(0) + " / " + g.requested.toFixed(0) }))));
    if (!groups.size) body.append(el("tr", {}, el("td", { colspan: "7", text: label("records.report.nothing") })));
  }

  async function load() {
    window.Wardcast.clearErrors(form);
    status.textContent = label("records.loading");
    document.getElementById("csv-devices").href = "/api/v1/reports/plays?" + params({ format: "csv", level: "device" });
    document.getElementById("csv-wards").href = "/api/v1/reports/plays?" + params({ format: "csv", level: "ward" });
    document.getElementById("csv-log").href = "/api/v1/reports/plays/log?" + params({ format: "csv" });
    try {
      const [report, log] = await Promise.all([
        window.Wardcast.api("GET", "/api/v1/reports/plays?" + params()),
        window.Wardcast.api("GET", "/api/v1/reports/plays/log?" + params()),
      ]);
      devices(report);
      broadcasts(log);
      status.textContent = label("records.report.summary", { area: areaName(report.area), from: form.elements.from.value, to: form.elements.to.value });
      document.body.dataset.loaded = "true";
    } catch (failure) {
      status.textContent = "";
      window.Wardcast.showError(form, failure);
    }
  }

  form.elements.to.value = config.today;
  form.elements.from.value = weekAgo(config.today);
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  load();
})();
