// The broadcast log: GET /api/v1/broadcasts (newest first, filtered, paged); a row expands into the
// per-device delivery states (GET /api/v1/broadcasts/{id}); active broadcasts can be cancelled by the
// roles that may (POST /api/v1/broadcasts/{id}/cancel).
(function () {
  "use strict";
  const { config, label, labelOr, formatTime, dayStart, el, areaName } = window.Records;
  const PAGE = 20;
  const form = document.getElementById("log-filters");
  const tbody = document.querySelector("#log-table tbody");
  const status = document.getElementById("log-status");
  const newer = document.getElementById("page-newer");
  const older = document.getElementById("page-older");
  let offset = 0;

  function query() {
    const params = new URLSearchParams({ limit: String(PAGE + 1), offset: String(offset) });
    const from = dayStart(form.elements.from.value, false);
    const to = dayStart(form.elements.to.value, true);
    if (from) params.set("from", from);
    if (to) params.set("to", to);
    if (form.elements.area.value) params.set("area", form.elements.area.value);
    if (form.elements.priority.value) params.set("priority", form.elements.priority.value);
    return params;
  }

  function content(broadcast) {
    if (!broadcast.content || !broadcast.content.length) return "—";
    return broadcast.content.map((item) => {
      const name = item.filename || item.media_id;
      const tts = name.startsWith("TTS ");
      return el("div", { class: "content-item" },
        el("span", { class: "badge", text: tts ? label("records.log.tts") : label("records.log.audio") }), " ",
        tts ? name.slice(4).replace(/\.wav$/, "") : name);
    });
  }

  function targets(broadcast) {
    const t = broadcast.targets || {};
    const parts = (t.areas || []).map(areaName).concat(t.devices || []);
    return parts.length ? parts.join(", ") : "—";
  }

  function counts(broadcast) {
    return Object.entries(broadcast.counts || {}).map(([state, n]) => labelOr("records.state." + state, state) + ": " + n).join(", ");
  }

  function priority(broadcast) {
    const cell = el("td", {}, el("span", { class: "badge priority-" + broadcast.priority, text: label("records.priority." + broadcast.priority) }));
    if (broadcast.mode === "drill") cell.append(" ", el("span", { class: "badge drill", text: label("records.log.drill") }));
    return cell;
  }

  function deliveries(detail) {
    return el("div", { class: "table-scroll" }, el("table", { class: "data deliveries" },
      el("caption", { text: label("records.log.deliveries") }),
      el("thead", {}, el("tr", {},
        ["records.log.device", "records.area", "records.log.state", "records.log.played", "records.log.last_change"].map((key) => el("th", { scope: "col", text: label(key) })))),
      el("tbody", {}, detail.deliveries.map((d) => {
        const last = d.events.length ? d.events[d.events.length - 1] : null;
        return el("tr", { dataset: { deviceId: d.device_id, state: d.state } },
          el("th", { scope: "row", text: d.device_name || d.device_id }),
          el("td", { text: d.area ? areaName(d.area) : "—" }),
          el("td", {}, el("span", { class: "state state-" + d.state, text: labelOr("records.state." + d.state, d.state) })),
          el("td", { text: d.played_s === null ? "—" : d.played_s.toFixed(1) + " s" }),
          el("td", { text: last ? formatTime(last.at) : "—" }));
      }))));
  }

  async function toggle(button, broadcast, detailRow) {
    const open = button.getAttribute("aria-expanded") === "true";
    button.setAttribute("aria-expanded", String(!open));
    detailRow.hidden = open;
    if (open) return;
    const cell = detailRow.cells[0];
    cell.replaceChildren(el("p", { class: "note", text: label("records.loading") }));
    try {
      cell.replaceChildren(deliveries(await window.Wardcast.api("GET", "/api/v1/broadcasts/" + encodeURIComponent(broadcast.id))));
    } catch (failure) {
      cell.replaceChildren();
      window.Wardcast.showError(form, failure);
    }
  }

  async function cancel(broadcast) {
    if (!window.confirm(label("records.log.cancel_confirm"))) return;
    try {
      await window.Wardcast.api("POST", "/api/v1/broadcasts/" + encodeURIComponent(broadcast.id) + "/cancel");
      await load();
      status.textContent = label("records.log.cancelled_note");
    } catch (failure) {
      window.Wardcast.showError(form, failure);
    }
  }

  function row(broadcast) {
    const detailId = "detail-" + broadcast.id;
    const detailRow = el("tr", { id: detailId, class: "detail", hidden: true }, el("td", { colspan: "7" }));
    const expand = el("button", { type: "button", class: "secondary small", "aria-expanded": "false", "aria-controls": detailId, text: label("records.log.details") });
    expand.addEventListener("click", () => toggle(expand, broadcast, detailRow));
    const actions = el("td", { class: "actions" }, expand);
    if (config.can_cancel && broadcast.state === "active") {
      actions.append(" ", el("button", { type: "button", class: "danger small", text: label("records.log.cancel"), onclick: () => cancel(broadcast) }));
    }
    const main = el("tr", { class: "broadcast", dataset: { broadcastId: broadcast.id, state: broadcast.state } },
      el("td", { text: formatTime(broadcast.created_at) }),
      priority(broadcast),
      el("td", {}, content(broadcast)),
      el("td", { text: targets(broadcast) }),
      el("td", { text: broadcast.created_by || "—" }),
      el("td", {}, el("strong", { class: "state state-" + broadcast.state, text: label("records.log.state." + broadcast.state) }),
        el("div", { class: "note", text: label("records.log.devices", { count: broadcast.device_count }) + (broadcast.device_count ? " — " + counts(broadcast) : "") })),
      actions);
    return [main, detailRow];
  }

  async function load() {
    window.Wardcast.clearErrors(form);
    status.textContent = label("records.loading");
    try {
      const found = await window.Wardcast.api("GET", "/api/v1/broadcasts?" + query().toString());
      const page = found.slice(0, PAGE);
      tbody.replaceChildren(...page.flatMap(row));
      status.textContent = page.length ? label("records.log.count", { from: offset + 1, to: offset + page.length }) : label("records.log.none");
      newer.disabled = offset === 0;
      older.disabled = found.length <= PAGE;
      document.getElementById("page-number").textContent = label("records.page", { page: offset / PAGE + 1 });
      document.body.dataset.loaded = "true";
    } catch (failure) {
      status.textContent = "";
      window.Wardcast.showError(form, failure);
    }
  }

  form.addEventListener("submit", (event) => { event.preventDefault(); offset = 0; load(); });
  newer.addEventListener("click", () => { offset = Math.max(0, offset - PAGE); load(); });
  older.addEventListener("click", () => { offset += PAGE; load(); });
  load();
})();
