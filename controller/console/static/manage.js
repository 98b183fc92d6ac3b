// The management pages (templates/manage/): tables filled from the JSON API and forms that post to it.
// Text from data is always set as textContent, never as HTML. Labels come from #manage-labels.
(function () {
  "use strict";
  const labels = JSON.parse(document.getElementById("manage-labels").textContent);
  const api = Wardcast.api;

  function format(text, values) {
    return text.replace(/\{(\w+)\}/g, function (_, name) { return String(values[name]); });
  }

  function cell(row, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content); else td.textContent = content === null || content === undefined || content === "" ? "—" : String(content);
    row.append(td);
    return td;
  }

  function fill(table, items, columns) {
    const body = table.querySelector("tbody");
    body.replaceChildren();
    if (!items.length) {
      const row = body.insertRow();
      const td = cell(row, labels.empty);
      td.colSpan = table.querySelectorAll("thead th").length;
      return;
    }
    for (const item of items) {
      const row = body.insertRow();
      for (const column of columns) cell(row, column(item));
    }
  }

  function button(text, className, onClick) {
    const element = document.createElement("button");
    element.type = "button";
    element.className = className;
    element.textContent = text;
    element.addEventListener("click", onClick);
    return element;
  }

  function local(iso) {
    return iso ? new Date(iso).toLocaleString(document.documentElement.lang === "vi" ? "vi-VN" : "en-GB") : "";
  }

  // A form posting with `submit(form)`; errors shown by Wardcast.showError, success by `done(result)`.
  function handle(form, submit, done) {
    if (!form) return;
    form.addEventListener("submit", async function (event) {
      event.preventDefault();
      Wardcast.clearErrors(form);
      const sending = form.querySelector('button[type="submit"]');
      sending.disabled = true;
      try {
        done(await submit(form));
      } catch (failure) {
        Wardcast.showError(form, failure);
      } finally {
        sending.disabled = false;
      }
    });
  }

  function fileBody(form) {
    const data = new FormData();
    const input = form.querySelector('input[type="file"]');
    if (input.files.length) data.append("file", input.files[0]);
    return data;
  }

  function optional(value) { return value === "" ? null : value; }

  function number(value) { return value === "" ? null : Number(value); }

  const pages = {
    async areas() {
      const table = document.getElementById("areas-table");
      const parent = document.getElementById("area-parent");
      async function load() {
        const areas = await api("GET", "/api/v1/areas");
        fill(table, areas, [
          (a) => a.code, (a) => a.name, (a) => labels.kinds[a.kind] || a.kind, (a) => a.parent,
          (a) => (a.lat === null ? "" : a.lat.toFixed(4) + ", " + a.lon.toFixed(4)), (a) => a.admin_code,
        ]);
        if (parent) {
          parent.replaceChildren(parent.options[0]);
          for (const area of areas) parent.add(new Option(area.name + " (" + area.code + ")", area.code));
        }
      }
      handle(document.getElementById("area-form"), function (form) {
        const f = form.elements;
        return api("POST", "/api/v1/areas", {
          code: f.code.value.trim(), name: f.name.value.trim(), kind: f.kind.value, parent: optional(f.parent.value),
          lat: number(f.lat.value), lon: number(f.lon.value), admin_code: optional(f.admin_code.value.trim()),
        });
      }, function () { document.getElementById("area-form").reset(); load(); });
      handle(document.getElementById("area-import-form"), function (form) {
        const upsert = form.elements.upsert.checked ? "?upsert=true" : "";
        return api("POST", "/api/v1/areas/import" + upsert, fileBody(form));
      }, function (result) {
        document.querySelector("#area-import-form .result").textContent = format(labels.imported, result);
        load();
      });
      await load();
    },

    async media() {
      const table = document.getElementById("media-table");
      async function load() {
        fill(table, await api("GET", "/api/v1/media"), [
          (m) => m.filename || m.id, (m) => m.duration_s.toFixed(1), (m) => (m.size_bytes / 1024).toFixed(0) + " KiB",
          function (m) {
            const audio = document.createElement("audio");
            audio.controls = true;
            audio.preload = "none";
            audio.src = "/media/" + m.sha256;
            audio.setAttribute("aria-label", m.filename || m.id);
            return audio;
          },
        ]);
      }
      handle(document.getElementById("media-form"), (form) => api("POST", "/api/v1/media", fileBody(form)), function (m) {
        document.querySelector("#media-form .result").textContent = format(labels.uploaded, { name: m.filename || m.id, duration: m.duration_s.toFixed(1) });
        load();
      });
      await load();
    },

    async rules() {
      const table = document.getElementById("rules-table");
      const mayManage = table.dataset.mayManage === "true";
      async function load() {
        fill(table, await api("GET", "/api/v1/rules"), [
          (r) => r.name, (r) => r.device_id, (r) => r.metric,
          (r) => (r.direction === "above" ? "≥ " : "≤ ") + r.raise_at + " / " + r.clear_at + (r.for_s ? " · " + r.for_s + " s" : ""),
          (r) => r.action, (r) => (r.enabled ? labels.yes : labels.no),
          (r) => (mayManage ? button(labels.delete, "secondary", async function () {
            if (!window.confirm(format(labels.confirm_delete, { name: r.name }))) return;
            await api("DELETE", "/api/v1/rules/" + encodeURIComponent(r.id));
            load();
          }) : ""),
        ]);
        fill(document.getElementById("alarms-table"), await api("GET", "/api/v1/alarms?limit=100"), [
          (a) => a.device_id, (a) => a.rule || a.source, (a) => (a.state === "active" ? labels.alarm_active : labels.alarm_cleared),
          (a) => local(a.raised_at), (a) => local(a.cleared_at),
        ]);
      }
      const form = document.getElementById("rule-form");
      if (form) {
        const devices = await api("GET", "/api/v1/devices?kind=sensor");
        for (const device of devices) form.elements.device_id.add(new Option((device.name || device.id) + " (" + device.id + ")", device.id));
        for (const area of await api("GET", "/api/v1/areas")) form.elements["broadcast.areas"].add(new Option(area.name + " (" + area.code + ")", area.code));
        form.elements.action.addEventListener("change", function () {
          document.getElementById("rule-broadcast").hidden = form.elements.action.value === "none";
        });
        handle(form, function () {
          const f = form.elements;
          const body = {
            name: f.name.value.trim(), device_id: f.device_id.value, metric: f.metric.value.trim(), direction: f.direction.value,
            raise_at: number(f.raise_at.value), clear_at: number(f.clear_at.value), for_s: number(f.for_s.value) || 0, action: f.action.value,
          };
          if (body.action !== "none") {
            body.broadcast = {
              areas: Array.from(f["broadcast.areas"].selectedOptions, (o) => o.value),
              headline: f["broadcast.headline"].value.trim(), text: f["broadcast.text"].value.trim(),
            };
          }
          return api("POST", "/api/v1/rules", body);
        }, function () { form.reset(); document.getElementById("rule-broadcast").hidden = true; load(); });
      }
      await load();
    },

    async keys() {
      const table = document.getElementById("keys-table");
      async function load() {
        fill(table, await api("GET", "/api/v1/apikeys"), [
          (k) => k.name, (k) => labels.roles[k.role] || k.role, (k) => [k.ward].concat(k.wards).filter(Boolean).join(", "), (k) => local(k.created_at),
          (k) => (k.revoked_at ? labels.revoked : labels.active),
          (k) => (k.revoked_at ? "" : button(labels.revoke, "secondary", async function () {
            if (!window.confirm(format(labels.confirm_revoke, { name: k.name }))) return;
            await api("POST", "/api/v1/apikeys/" + encodeURIComponent(k.id) + "/revoke");
            load();
          })),
        ]);
      }
      const form = document.getElementById("key-form");
      for (const area of await api("GET", "/api/v1/areas")) {
        if (area.kind === "ward" || area.kind === "commune") form.elements.ward.add(new Option(area.name + " (" + area.code + ")", area.code));
      }
      handle(form, function () {
        const f = form.elements;
        return api("POST", "/api/v1/apikeys", { name: f.name.value.trim(), role: f.role.value, ward: optional(f.ward.value) });
      }, function (created) {
        document.getElementById("key-token-value").textContent = created.token;
        document.getElementById("key-token").hidden = false;
        form.reset();
        load();
      });
      handle(document.getElementById("secrets-form"), (f) => api("POST", "/api/v1/factory-secrets?atomic=true", fileBody(f)), function (result) {
        document.querySelector("#secrets-form .result").textContent = format(labels.secrets_registered, { registered: result.registered, rejected: result.rejected.length });
      });
      await load();
    },

    async audit() {
      const form = document.getElementById("audit-form");
      const since = new Date(Date.now() - 7 * 86400 * 1000);
      form.elements.from.value = since.toISOString().slice(0, 10);
      async function load() {
        const query = new URLSearchParams({ limit: "1000" });
        if (form.elements.from.value) query.set("from", new Date(form.elements.from.value + "T00:00:00").toISOString());
        if (form.elements.action.value.trim()) query.set("action", form.elements.action.value.trim());
        const entries = await api("GET", "/api/v1/audit?" + query.toString());
        entries.reverse();  // newest first
        fill(document.getElementById("audit-table"), entries, [
          (e) => local(e.at), (e) => e.key_name + " (" + (labels.roles[e.role] || e.role) + ")", (e) => e.action, (e) => e.subject, (e) => e.outcome,
        ]);
        return entries;
      }
      handle(form, load, function () {});
      await load();
    },
  };

  const page = pages[document.body.dataset.managePage];
  if (page) {
    page().then(function () { document.body.dataset.loaded = "true"; }, function (failure) {
      Wardcast.showError(null, failure);
    });
  }
})();
