// The technician's pages: devices (filters, registration with its provisioning bundle, CSV import),
// one device (operations followed to their end, re-issued credentials, decommissioning), claims awaiting
// approval, firmware rollouts. Every action is a call of the JSON API (Wardcast.api); every text comes
// from the page's catalogue (the #tech-labels JSON), never from here.
(function () {
  "use strict";
  const blob = document.getElementById("tech-labels");
  const labels = blob ? JSON.parse(blob.textContent) : {};
  const body = document.body;
  const POLL_MS = 500;
  const POLL_LIMIT = 1800; // 15 minutes at most, then the page stops asking (the table still shows it)

  // L("tech.x", {name: value}): the text with {name} filled in; the key itself if it is missing.
  function L(key, values) {
    let text = Object.prototype.hasOwnProperty.call(labels, key) ? labels[key] : key;
    for (const [name, value] of Object.entries(values || {})) text = text.split("{" + name + "}").join(String(value));
    return text;
  }

  function when(stamp) {
    if (!stamp) return "—";
    const options = { timeZone: body.dataset.timezone || undefined, day: "2-digit", month: "2-digit", year: "numeric",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false };
    // dd/mm/yyyy HH:MM:SS in the city's zone, as the server writes times on the same pages.
    const parts = {};
    for (const part of new Intl.DateTimeFormat("en-GB", options).formatToParts(new Date(stamp))) parts[part.type] = part.value;
    return parts.day + "/" + parts.month + "/" + parts.year + " " + parts.hour + ":" + parts.minute + ":" + parts.second;
  }

  function element(tag, attributes, text) {
    const made = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) made.setAttribute(name, value);
    if (text !== undefined) made.textContent = text;
    return made;
  }

  function wait(ms) { return new Promise(function (resolve) { setTimeout(resolve, ms); }); }

  // Shows a choice before a form is sent: the form's .ask button reveals its confirmation box.
  function confirmStep(form) {
    const box = document.getElementById(form.dataset.confirm);
    const ask = form.querySelector(".ask");
    ask.addEventListener("click", function () {
      box.hidden = false; ask.hidden = true; box.querySelector("button[type=submit]").focus();
    });
    box.querySelector(".cancel").addEventListener("click", function () {
      box.hidden = true; ask.hidden = false; ask.focus();
    });
    return function reset() { box.hidden = true; ask.hidden = false; };
  }

  // -- provisioning bundles ------------------------------------------------------------------------
  function download(name, data) {
    const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
    return element("a", { href: url, download: name, class: "download" }, L("tech.bundle.download"));
  }

  async function showBundle(box, bundle, heading) {
    box.replaceChildren();
    box.hidden = false;
    const title = element("h3", { tabindex: "-1" }, heading);
    box.append(title, element("p", { class: "warning" }, L("tech.bundle.once")));
    const links = element("p", {});
    links.append(download("bundle-" + bundle.device_id + ".json", bundle));
    box.append(links);
    const details = element("details", {});
    details.append(element("summary", {}, L("tech.bundle.show_json")), element("pre", { class: "bundle-json" }, JSON.stringify(bundle, null, 2)));
    box.append(details);
    title.focus();
    try {
      const answer = await Wardcast.api("POST", "/api/v1/provisioning/qr", { bundle: bundle });
      const url = URL.createObjectURL(await answer.blob());
      const figure = element("figure", { class: "qr" });
      figure.append(element("img", { src: url, alt: L("tech.bundle.qr_alt", { id: bundle.device_id }) }),
        element("figcaption", {}, L("tech.bundle.qr_caption")));
      box.append(figure);
    } catch (failure) {
      box.append(element("p", { class: "note" }, L("tech.bundle.no_qr")));
    }
  }

  // -- the devices page ------------------------------------------------------------------------------
  function deviceFilters() {
    const form = document.getElementById("device-filters");
    if (!form) return;
    const count = document.getElementById("device-count");
    const apply = function () {
      const search = form.elements.search.value.trim().toLowerCase();
      const kind = form.elements.kind.value;
      const area = form.elements.area.value;
      const status = form.elements.status.value;
      let shown = 0;
      const rows = document.querySelectorAll("#devices-table tbody tr");
      for (const row of rows) {
        // An area takes its subtree: the codes below it start with its code and a dot.
        const inArea = !area || row.dataset.area === area || row.dataset.area.startsWith(area + ".");
        const visible = (!search || row.dataset.search.includes(search)) && (!kind || row.dataset.kind === kind)
          && inArea && (!status || row.dataset.status === status);
        row.hidden = !visible;
        if (visible) shown += 1;
      }
      count.textContent = L("tech.devices.count", { shown: shown, total: rows.length });
      document.getElementById("no-match").hidden = shown > 0;
    };
    form.addEventListener("input", apply);
    form.addEventListener("change", apply);
    form.addEventListener("submit", function (event) { event.preventDefault(); apply(); });
    // The live feed changes a row's status: a status filter follows it.
    new MutationObserver(apply).observe(document.querySelector("#devices-table tbody"), { attributes: true, subtree: true, attributeFilter: ["data-status"] });
  }

  function registerForm() {
    const form = document.getElementById("register-form");
    if (!form) return;
    const box = document.getElementById("register-result");
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      Wardcast.clearErrors(form);
      const data = { kind: form.elements.kind.value, area: form.elements.area.value };
      for (const name of ["id", "name", "serial"]) {
        const value = form.elements[name].value.trim();
        if (value) data[name] = value;
      }
      for (const name of ["lat", "lon"]) {
        const value = form.elements[name].value.trim();
        if (value) data[name] = Number(value);
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const device = await Wardcast.api("POST", "/api/v1/devices", data);
        form.reset();
        if (device.bundle) {
          await showBundle(box, device.bundle, L("tech.register.done", { id: device.id }));
        } else {
          box.replaceChildren(element("p", {}, L("tech.register.done", { id: device.id })));
          box.hidden = false;
        }
        const link = element("a", { href: "/devices/" + encodeURIComponent(device.id) }, L("tech.register.open", { id: device.id }));
        box.append(element("p", {})); box.lastChild.append(link);
      } catch (failure) {
        Wardcast.showError(form, failure);
      } finally {
        button.disabled = false;
      }
    });
  }

  function importForm() {
    const form = document.getElementById("import-form");
    if (!form) return;
    const box = document.getElementById("import-result");
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      Wardcast.clearErrors(form);
      const file = form.elements.file.files[0];
      if (!file) {
        Wardcast.showError(form, new Wardcast.ApiFailure(422, { field: "file", detail: L("tech.import.choose") }));
        return;
      }
      const path = "/api/v1/devices/import" + (form.elements.atomic.checked ? "?atomic=true" : "");
      let report;
      try {
        report = await Wardcast.api("POST", path, new Blob([await file.text()], { type: "text/csv" }));
      } catch (failure) {
        if (!(failure instanceof Wardcast.ApiFailure) || !failure.body || !failure.body.rejected) {
          Wardcast.showError(form, failure);
          return;
        }
        report = { created: 0, rejected: failure.body.rejected, bundles: [], refused: true };
      }
      box.replaceChildren();
      box.hidden = false;
      const summary = element("h3", { tabindex: "-1" }, report.refused
        ? L("tech.import.refused", { rejected: report.rejected.length })
        : L("tech.import.summary", { created: report.created, rejected: report.rejected.length }));
      box.append(summary);
      if (report.rejected.length) {
        const table = element("table", { class: "data", id: "import-errors" });
        const head = element("tr", {});
        for (const key of ["tech.import.line", "tech.import.column", "tech.import.problem"]) head.append(element("th", { scope: "col" }, L(key)));
        table.append(element("thead", {})); table.tHead.append(head);
        const rows = element("tbody", {});
        for (const problem of report.rejected) {
          const row = element("tr", { role: "row" });
          row.append(element("td", {}, L("tech.import.line_n", { n: problem.row })), element("td", {}, problem.field || "—"), element("td", {}, problem.detail));
          rows.append(row);
        }
        table.append(rows);
        const scroll = element("div", { class: "table-scroll" }); scroll.append(table);
        box.append(scroll);
      }
      if (report.bundles && report.bundles.length) {
        box.append(element("p", { class: "warning" }, L("tech.bundle.once")));
        box.append(element("p", {})); box.lastChild.append(download("bundles.json", report.bundles));
      }
      summary.focus();
    });
  }

  // -- one device -------------------------------------------------------------------------------------
  function stateLabel(state) { return L("tech.op.state." + state); }

  function resultText(operation, result) {
    if (!result) return "";
    const reported = result.result || {};
    if (result.state === "completed") {
      if (operation.type === "test_tone") {
        return L("tech.op.result.test_tone", { seconds: (operation.params && operation.params.duration_s) || 3,
          self_test: L("tech.self_test." + (reported.self_test || "pass")) });
      }
      if (operation.type === "set_volume") return L("tech.op.result.set_volume", { volume: reported.volume });
      if (operation.type === "reboot") return L("tech.op.result.reboot", { at: when(reported.booted_at) });
      return L("tech.op.result.done");
    }
    if (result.detail || reported.fault) return [result.detail, reported.fault].filter(Boolean).join(" — ");
    return "";
  }

  async function loadOperations(deviceId) {
    const table = document.getElementById("operations");
    if (!table) return;
    let operations;
    try {
      operations = await Wardcast.api("GET", "/api/v1/operations?limit=20&device=" + encodeURIComponent(deviceId));
    } catch (failure) {
      Wardcast.showError(null, failure);
      return;
    }
    const rows = [];
    for (const operation of operations) {
      const result = operation.device_result;
      const row = element("tr", { "data-operation-id": operation.id, "data-state": result.state });
      row.append(element("td", {}, L("tech.op.type." + operation.type)), element("td", {}, when(operation.created_at)),
        element("td", {}, stateLabel(result.state)), element("td", {}, resultText(operation, result)));
      rows.push(row);
    }
    table.tBodies[0].replaceChildren(...rows);
    document.getElementById("operations-none").hidden = rows.length > 0;
  }

  // Sends an operation to this device and follows it to its end: "test tone: sent → done (…)".
  async function operate(deviceId, type, params, form) {
    const status = document.getElementById("operation-status");
    Wardcast.clearErrors(form);
    let accepted;
    try {
      accepted = await Wardcast.api("POST", "/api/v1/operations", { type: type, targets: { devices: [deviceId] }, params: params });
    } catch (failure) {
      Wardcast.showError(form, failure);
      return;
    }
    // Each step the device's result went through, from its timestamps (a fast device may pass several
    // between two polls): queued → sent → delivered → its end.
    const show = function (operation, result) {
      const steps = ["queued"];
      if (result && result.sent_at) steps.push("sent");
      if (result && result.delivered_at) steps.push("delivered");
      if (result && !steps.includes(result.state)) steps.push(result.state);
      const extra = operation && result ? resultText(operation, result) : "";
      status.dataset.state = result ? result.state : "queued";
      status.textContent = L("tech.op.type." + type) + ": " + steps.map(stateLabel).join(" → ") + (extra ? " (" + extra + ")" : "");
    };
    show(null, null);
    await loadOperations(deviceId);
    for (let round = 0; round < POLL_LIMIT; round += 1) {
      await wait(POLL_MS);
      let operation;
      try {
        operation = await Wardcast.api("GET", "/api/v1/operations/" + encodeURIComponent(accepted.id));
      } catch (failure) {
        continue; // a network hiccup: ask again
      }
      const result = operation.results.find(function (r) { return r.device_id === deviceId; });
      show(operation, result);
      if (operation.status !== "pending") break;
    }
    await loadOperations(deviceId);
  }

  function devicePage() {
    const deviceId = body.dataset.devicePage;
    if (!deviceId) return;
    loadOperations(deviceId);
    const tone = document.getElementById("tone-form");
    if (tone) tone.addEventListener("submit", function (event) {
      event.preventDefault();
      operate(deviceId, "test_tone", { duration_s: Number(tone.elements.duration_s.value) }, tone);
    });
    const volume = document.getElementById("volume-form");
    if (volume) volume.addEventListener("submit", function (event) {
      event.preventDefault();
      operate(deviceId, "set_volume", { volume: Number(volume.elements.volume.value) }, volume);
    });
    const reboot = document.getElementById("reboot-form");
    if (reboot) {
      const reset = confirmStep(reboot);
      reboot.addEventListener("submit", function (event) {
        event.preventDefault(); reset();
        operate(deviceId, "reboot", {}, reboot);
      });
    }
    const reissue = document.getElementById("reissue-form");
    if (reissue) {
      const reset = confirmStep(reissue);
      reissue.addEventListener("submit", async function (event) {
        event.preventDefault(); reset();
        Wardcast.clearErrors(reissue);
        try {
          const bundle = await Wardcast.api("POST", "/api/v1/devices/" + encodeURIComponent(deviceId) + "/credentials");
          await showBundle(document.getElementById("reissue-result"), bundle, L("tech.credentials.done", { id: deviceId }));
        } catch (failure) {
          Wardcast.showError(reissue, failure);
        }
      });
    }
    const decommission = document.getElementById("decommission-form");
    if (decommission) {
      const input = decommission.elements.confirm;
      const button = document.getElementById("decommission-button");
      input.addEventListener("input", function () { button.disabled = input.value.trim() !== input.dataset.expected; });
      decommission.addEventListener("submit", async function (event) {
        event.preventDefault();
        if (input.value.trim() !== input.dataset.expected) return;
        try {
          await Wardcast.api("POST", "/api/v1/devices/" + encodeURIComponent(deviceId) + "/decommission");
          window.location.reload();
        } catch (failure) {
          Wardcast.showError(decommission, failure);
        }
      });
    }
  }

  // -- claims ---------------------------------------------------------------------------------------------
  function claimForms() {
    const result = document.getElementById("claims-result");
    for (const form of document.querySelectorAll(".approve-form")) {
      form.addEventListener("submit", async function (event) {
        event.preventDefault();
        Wardcast.clearErrors(form);
        const data = { area: form.elements.area.value };
        for (const name of ["name", "device_id"]) {
          const value = form.elements[name].value.trim();
          if (value) data[name] = value;
        }
        try {
          const approved = await Wardcast.api("POST", "/api/v1/claims/" + encodeURIComponent(form.dataset.claimId) + "/approve", data);
          result.replaceChildren(element("p", {}, L(approved.answered ? "tech.claims.approved" : "tech.claims.approved_unanswered", { id: approved.device.id })));
          const link = element("a", { href: "/devices/" + encodeURIComponent(approved.device.id) }, L("tech.register.open", { id: approved.device.id }));
          result.append(element("p", {})); result.lastChild.append(link);
          result.hidden = false;
          form.closest(".claim").remove();
        } catch (failure) {
          Wardcast.showError(form, failure);
        }
      });
    }
  }

  // -- rollouts -------------------------------------------------------------------------------------------
  function rolloutsPage() {
    const list = document.getElementById("rollouts");
    if (!list) return;
    const result = document.getElementById("rollout-result");
    list.addEventListener("click", async function (event) {
      const button = event.target.closest("[data-rollout-action]");
      if (!button) return;
      const action = button.dataset.rolloutAction;
      const id = button.closest("[data-rollout-id]").dataset.rolloutId;
      if (action === "abort" && !window.confirm(L("tech.rollout.abort_confirm"))) return;
      try {
        const rollout = await Wardcast.api("POST", "/api/v1/rollouts/" + encodeURIComponent(id) + "/" + action);
        result.textContent = L("tech.rollout.changed", { name: rollout.name, state: L("tech.rollout.state." + rollout.state) });
        result.hidden = false;
        if (window.htmx) htmx.trigger(list, "refresh");
      } catch (failure) {
        Wardcast.showError(null, failure);
      }
    });
    const form = document.getElementById("rollout-form");
    if (!form) return;
    const anytime = form.elements.anytime;
    anytime.addEventListener("change", function () { form.elements.maintenance_window.disabled = anytime.checked; });
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      Wardcast.clearErrors(form);
      const data = {
        name: form.elements.name.value.trim(),
        image_id: form.elements.image_id.value,
        first_group: Number(form.elements.first_group.value),
        groups: Number(form.elements.groups.value),
        success_threshold: Number(form.elements.success_threshold.value) / 100,
        error_threshold: Number(form.elements.error_threshold.value) / 100,
      };
      if (form.elements.area.value) data.area = form.elements.area.value;
      if (form.elements.from_version.value.trim()) data.from_version = form.elements.from_version.value.trim();
      if (anytime.checked) data.maintenance_window = null;
      else if (form.elements.maintenance_window.value.trim()) data.maintenance_window = form.elements.maintenance_window.value.trim();
      try {
        const rollout = await Wardcast.api("POST", "/api/v1/rollouts", data);
        form.reset();
        form.elements.maintenance_window.disabled = false;
        result.textContent = L("tech.rollout.created", { name: rollout.name });
        result.hidden = false;
        if (window.htmx) htmx.trigger(list, "refresh");
      } catch (failure) {
        Wardcast.showError(form, failure);
      }
    });
  }

  function start() {
    deviceFilters();
    registerForm();
    importForm();
    devicePage();
    claimForms();
    rolloutsPage();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();
