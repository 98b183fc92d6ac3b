// The emergency panel (/emergency): the drill/live switch, templates, the free form, the live
// confirmation, and the lists (awaiting approval, active with per-device progress, recent history), which
// it refreshes from the alerts API every two seconds. Every text comes from the page's JSON blob.
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("emergency-data").textContent);
  const L = data.labels;
  const form = document.getElementById("alert-form");
  const banner = document.getElementById("mode-banner");
  const sendButton = document.getElementById("send-alert");
  const sendResult = document.getElementById("send-result");
  const templateNote = document.getElementById("template-note");
  const targetSummary = document.getElementById("target-summary");
  const liveDialog = document.getElementById("live-confirm");
  const confirmWords = document.getElementById("confirm-words");
  const confirmLive = document.getElementById("confirm-live");
  const cancelAllDialog = document.getElementById("cancel-all-confirm");
  const cancelAllResult = document.getElementById("cancel-all-result");
  const REFRESH_MS = 3000;
  const timeFormat = new Intl.DateTimeFormat(data.language === "vi" ? "vi-VN" : "en-GB", {
    timeZone: data.timezone, dateStyle: "short", timeStyle: "medium",
  });

  let chosenTemplate = null;  // the template's name while the form still holds it unchanged
  let pendingLive = null;  // the live alert waiting for the operator's confirmation

  function fill(text, values) {
    return text.replace(/\{(\w+)\}/g, (whole, key) => (key in values ? String(values[key]) : whole));
  }

  function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text !== undefined && text !== null) made.textContent = text;
    return made;
  }

  // -- the mode: part of the form's state, shown by the banner and the send button ------------------
  function mode() {
    const checked = form.querySelector('input[name="mode"]:checked');
    return checked ? checked.value : "drill";
  }

  function showMode() {
    const current = mode();
    form.dataset.mode = current;
    banner.className = "mode-banner mode-banner-" + current;
    for (const inner of banner.querySelectorAll("[data-mode-banner]")) {
      inner.hidden = inner.dataset.modeBanner !== current;
    }
    sendButton.textContent = L.send[current];
    sendButton.className = "send send-" + current;
  }

  function setMode(value) {
    for (const radio of form.querySelectorAll('input[name="mode"]')) radio.checked = radio.value === value;
    showMode();
  }

  // -- targets -----------------------------------------------------------------------------------
  function checkedValues(name) {
    return Array.from(form.querySelectorAll('input[name="' + name + '"]:checked'), (box) => box.value);
  }

  function reachedDevices(areas, devices) {
    const chosen = new Set(areas);
    const reached = new Set(devices);
    for (const area of data.areas) {
      if (chosen.has(area.code) || area.ancestors.some((code) => chosen.has(code))) {
        for (const device of area.devices) reached.add(device);
      }
    }
    return reached.size;
  }

  function targetText(areas, devices) {
    if (!areas.length && !devices.length) return L.no_targets;
    const names = [...areas, ...devices].map((code) => data.names[code] || code);
    return names.join(", ") + " — " + fill(L.devices, { count: reachedDevices(areas, devices) });
  }

  function showTargets() {
    targetSummary.textContent = targetText(checkedValues("area"), checkedValues("device"));
  }

  // -- templates: a card fills the form; sent unchanged, it goes as the template itself -------------
  function formMatchesTemplate(name) {
    const template = data.templates[name];
    if (!template) return false;
    const same = (a, b) => a.length === b.length && a.every((x) => b.includes(x));
    return form.elements.headline.value === template.headline
      && form.elements.text.value === template.text
      && same(checkedValues("area"), template.targets.areas)
      && same(checkedValues("device"), template.targets.devices);
  }

  function useTemplate(name) {
    const template = data.templates[name];
    form.elements.headline.value = template.headline;
    form.elements.text.value = template.text;
    for (const box of form.querySelectorAll('input[name="area"]')) box.checked = template.targets.areas.includes(box.value);
    for (const box of form.querySelectorAll('input[name="device"]')) box.checked = template.targets.devices.includes(box.value);
    chosenTemplate = name;
    for (const card of form.querySelectorAll(".template-card")) {
      card.setAttribute("aria-pressed", String(card.dataset.template === name));
    }
    showTemplate();
    showTargets();
  }

  function showTemplate() {
    if (chosenTemplate && !formMatchesTemplate(chosenTemplate)) {
      chosenTemplate = null;
      for (const card of form.querySelectorAll(".template-card")) card.setAttribute("aria-pressed", "false");
    }
    if (templateNote) {
      templateNote.textContent = chosenTemplate
        ? fill(L.template_in_use, { headline: data.templates[chosenTemplate].headline }) : "";
    }
  }

  // -- sending -----------------------------------------------------------------------------------
  function alertBody() {
    const body = { mode: mode() };
    const repeats = form.elements.repeats.value.trim();
    if (repeats !== "") body.repeats = Number(repeats);
    const minutes = form.elements.expires_at.value.trim();
    if (minutes !== "") body.expires_at = new Date(Date.now() + Number(minutes) * 60000).toISOString();
    if (chosenTemplate && formMatchesTemplate(chosenTemplate)) {
      body.template = chosenTemplate;
      return body;
    }
    const headline = form.elements.headline.value.trim();
    if (headline) body.headline = headline;
    body.text = form.elements.text.value.trim();
    const areas = checkedValues("area");
    const devices = checkedValues("device");
    if (areas.length || devices.length) body.targets = { areas, devices };
    return body;
  }

  async function sendAlert(body) {
    sendButton.disabled = true;
    sendResult.textContent = "";
    try {
      const result = await Wardcast.api("POST", "/api/v1/alerts", body);
      sendResult.textContent = result.status === "pending_approval"
        ? L.sent_pending : fill(L.sent_active, { count: result.device_count });
      setMode("drill");  // a live alert is never the default for the next one
      refresh();
    } catch (failure) {
      Wardcast.showError(form, failure);
    } finally {
      sendButton.disabled = false;
    }
  }

  function wordsMatch() {
    const norm = (text) => text.normalize("NFC").trim().toLocaleUpperCase("vi");
    return norm(confirmWords.value) === norm(L.confirm_words);
  }

  function askLiveConfirmation(body) {
    pendingLive = body;
    const template = body.template ? data.templates[body.template] : null;
    document.getElementById("confirm-headline").textContent = template ? template.headline : (body.headline || "");
    const targets = template ? template.targets : (body.targets || { areas: [], devices: [] });
    document.getElementById("confirm-targets").textContent = targetText(targets.areas, targets.devices);
    confirmWords.value = "";
    confirmLive.disabled = true;
    liveDialog.showModal();
    confirmWords.focus();
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    Wardcast.clearErrors(form);
    const body = alertBody();
    if (body.mode === "live") askLiveConfirmation(body);
    else sendAlert(body);
  });
  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") showMode();
    if (event.target.name === "area" || event.target.name === "device") showTargets();
    showTemplate();
  });
  form.addEventListener("input", showTemplate);
  for (const card of form.querySelectorAll(".template-card")) {
    card.setAttribute("aria-pressed", "false");
    card.addEventListener("click", () => useTemplate(card.dataset.template));
  }
  confirmWords.addEventListener("input", () => { confirmLive.disabled = !wordsMatch(); });
  liveDialog.addEventListener("close", () => {
    const body = pendingLive;
    pendingLive = null;
    if (liveDialog.returnValue === "confirm" && body && wordsMatch()) sendAlert(body);
    else sendButton.focus();
  });

  // -- cancelling everything ---------------------------------------------------------------------
  document.getElementById("cancel-all").addEventListener("click", () => {
    cancelAllDialog.returnValue = "";
    cancelAllDialog.showModal();
  });
  cancelAllDialog.addEventListener("close", async () => {
    if (cancelAllDialog.returnValue !== "confirm") return;
    try {
      const result = await Wardcast.api("POST", "/api/v1/alerts/cancel-all");
      cancelAllResult.textContent = fill(L.cancelled_all, {
        alerts: result.alerts.length, deliveries: result.deliveries_stopped,
      });
      refresh();
    } catch (failure) {
      Wardcast.showError(document.querySelector(".cancel-all-zone"), failure);
    }
  });

  // -- the lists -----------------------------------------------------------------------------------
  function modeBadge(alert) {
    return element("span", "badge mode-badge mode-badge-" + alert.mode, L.modes[alert.mode] || alert.mode);
  }

  function alertTargets(alert) {
    const targets = alert.targets || {};
    return targetText(targets.areas || [], targets.devices || []);
  }

  // Keeps one <li> per alert id (so that an error shown in it survives the next refresh).
  function syncList(list, alerts, emptyText, build, update) {
    const seen = new Set();
    for (const alert of alerts) {
      seen.add(alert.id);
      let item = list.querySelector('li[data-alert-id="' + CSS.escape(alert.id) + '"]');
      if (!item) {
        item = element("li", "alert-item");
        item.dataset.alertId = alert.id;
        build(item, alert);
        list.append(item);
      }
      update(item, alert);
    }
    for (const item of list.querySelectorAll("li[data-alert-id]")) {
      if (!seen.has(item.dataset.alertId)) item.remove();
    }
    let empty = list.querySelector("li.empty");
    if (alerts.length) {
      if (empty) empty.remove();
    } else if (!empty) {
      empty = element("li", "empty note", emptyText);
      list.append(empty);
    }
  }

  function heading(item, alert) {
    const line = element("p", "alert-heading");
    line.append(modeBadge(alert), " ", element("strong", "alert-headline", alert.headline));
    item.append(line);
    if (alert.text) item.append(element("p", "alert-text", alert.text));
    const meta = element("p", "note alert-meta");
    meta.append(
      fill(L.created_by, { name: alert.created_by_name }) + (alert.created_by === data.me ? " " + L.yours : ""),
      " · " + timeFormat.format(new Date(alert.created_at)),
      " · " + alertTargets(alert),
    );
    if (alert.approved_by_name) meta.append(" · " + fill(L.approved_by, { name: alert.approved_by_name }));
    meta.append(" · " + L.expires + ": " + timeFormat.format(new Date(alert.expires_at)));
    item.append(meta);
  }

  async function act(item, path, done) {
    const box = item.querySelector("form");
    for (const button of item.querySelectorAll("button")) button.disabled = true;
    try {
      await Wardcast.api("POST", path);
      Wardcast.clearErrors(box);
      done();
      refresh();
    } catch (failure) {
      Wardcast.showError(box, failure);
    } finally {
      for (const button of item.querySelectorAll("button")) button.disabled = false;
    }
  }

  function buildPending(item, alert) {
    const box = element("form", "alert-actions");
    box.append(element("p", "form-error error"));
    box.firstChild.hidden = true;
    heading(item, alert);
    const approve = element("button", "primary approve", L.approve);
    approve.type = "submit";
    const cancel = element("button", "secondary cancel-one", L.cancel);
    cancel.type = "button";
    box.append(approve, " ", cancel);
    item.append(box);
    box.addEventListener("submit", (event) => {
      event.preventDefault();
      act(item, "/api/v1/alerts/" + encodeURIComponent(alert.id) + "/approve", () => {
        sendResult.textContent = L.approved;
      });
    });
    cancel.addEventListener("click", () => act(item, "/api/v1/alerts/" + encodeURIComponent(alert.id) + "/cancel", () => {
      sendResult.textContent = L.cancelled;
    }));
  }

  function buildActive(item, alert) {
    heading(item, alert);
    item.append(element("ul", "progress"));
    const box = element("form", "alert-actions");
    box.append(element("p", "form-error error"));
    box.firstChild.hidden = true;
    const cancel = element("button", "danger cancel-one", L.cancel);
    cancel.type = "submit";
    box.append(cancel);
    item.append(box);
    box.addEventListener("submit", (event) => {
      event.preventDefault();
      act(item, "/api/v1/alerts/" + encodeURIComponent(alert.id) + "/cancel", () => {
        sendResult.textContent = L.cancelled;
      });
    });
  }

  function updateActive(item, alert) {
    const progress = item.querySelector(".progress");
    const shown = L.state_order.filter((state) => state === "playing" || state === "completed" || alert.counts[state]);
    const parts = shown.map((state) => {
      const part = element("li", "count count-" + state);
      part.dataset.state = state;
      part.append(L.states[state] + ": ", element("strong", null, String(alert.counts[state] || 0)));
      return part;
    });
    const total = element("li", "count count-total", fill(L.devices, { count: alert.device_count }));
    progress.replaceChildren(...parts, total);
  }

  function renderHistory(alerts) {
    const body = document.querySelector("#history tbody");
    const rows = alerts.map((alert) => {
      const row = element("tr");
      row.dataset.alertId = alert.id;
      const modeCell = element("td");
      modeCell.append(modeBadge(alert));
      row.append(
        element("td", null, timeFormat.format(new Date(alert.created_at))),
        modeCell,
        element("td", "status-" + alert.status, L.statuses[alert.status] || alert.status),
        element("td", null, alert.headline),
        element("td", null, alert.created_by_name),
        element("td", null, String(alert.device_count)),
      );
      return row;
    });
    if (!rows.length) {
      const row = element("tr");
      const cell = element("td", "note", L.none_history);
      cell.colSpan = 6;
      row.append(cell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      const [open, recent] = await Promise.all([
        Wardcast.api("GET", "/api/v1/alerts?status=pending_approval&status=active&limit=200"),
        Wardcast.api("GET", "/api/v1/alerts?limit=20"),
      ]);
      syncList(
        document.getElementById("pending-list"),
        open.filter((alert) => alert.status === "pending_approval"),
        L.none_pending, buildPending, () => {},
      );
      syncList(
        document.getElementById("active-list"),
        open.filter((alert) => alert.status === "active" && alert.open > 0),
        L.none_active, buildActive, updateActive,
      );
      renderHistory(recent);
      document.body.dataset.live = "on";
    } catch (failure) {
      document.body.dataset.live = "off";
    } finally {
      refreshing = false;
    }
  }

  showMode();
  showTargets();
  refresh();
  setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
})();
