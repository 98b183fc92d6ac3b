// New announcement: targets (area checkboxes, or a polygon drawn on the map for operators), content (a
// text read by the controller's Vietnamese TTS, with a preview, or an uploaded file), priority, and time:
// now, once, or recurring through an editor that writes the RFC 5545 RRULE. "Check" asks the API for a
// dry run (POST /api/v1/schedules/check) and lists the clashes before anything is saved; "Save" creates
// the schedules (POST /api/v1/schedules). Texts come from the catalogue (#announce-labels).
(function () {
  "use strict";

  // -- pure helpers (also used by the tests through window.Wardcast) ---------------------------------

  // Even-odd ray casting: is [lat, lon] inside the polygon of [lat, lon] vertices? Points on the map of
  // a city are close enough together for the plane approximation to be exact to the metre.
  function pointInPolygon(point, vertices) {
    const y = point[0];
    const x = point[1];
    let inside = false;
    for (let i = 0, j = vertices.length - 1; i < vertices.length; j = i, i += 1) {
      const yi = vertices[i][0];
      const xi = vertices[i][1];
      const yj = vertices[j][0];
      const xj = vertices[j][1];
      if ((yi > y) !== (yj > y) && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
    }
    return inside;
  }

  function uniqueSorted(values) {
    return Array.from(new Set(values)).sort(function (a, b) { return a - b; });
  }

  function twoDigits(value) { return String(value).padStart(2, "0"); }

  // "6:5" / "06:05" / "06:05:30" → "06:05:00" / "06:05:30"; null when not a time.
  function normaliseTime(text) {
    const match = /^(\d{1,2}):(\d{2})(?::(\d{2}))?$/.exec((text || "").trim());
    if (!match) return null;
    const hour = Number(match[1]);
    const minute = Number(match[2]);
    const second = Number(match[3] || 0);
    if (hour > 23 || minute > 59 || second > 59) return null;
    return twoDigits(hour) + ":" + twoDigits(minute) + ":" + twoDigits(second);
  }

  // The schedules for a recurring announcement: one rule when the times of day are exactly every
  // combination of their hours and minutes at one second (BYHOUR × BYMINUTE, RFC 5545), otherwise one
  // schedule per time of day. spec: {frequency, days, times, startDate, end, until, count}.
  function recurrence(spec) {
    const times = Array.from(new Set(spec.times.map(normaliseTime).filter(Boolean))).sort();
    const parts = function (time) { return time.split(":").map(Number); };
    const hours = uniqueSorted(times.map(function (time) { return parts(time)[0]; }));
    const minutes = uniqueSorted(times.map(function (time) { return parts(time)[1]; }));
    const seconds = uniqueSorted(times.map(function (time) { return parts(time)[2]; }));
    const oneRule = times.length > 0 && seconds.length === 1 && hours.length * minutes.length === times.length;
    const groups = oneRule ? [times] : times.map(function (time) { return [time]; });
    let base = "FREQ=" + spec.frequency;
    if (spec.frequency === "WEEKLY") base += ";BYDAY=" + spec.days.join(",");
    let tail = "";
    if (spec.end === "until" && spec.until) tail = ";UNTIL=" + spec.until.replace(/-/g, "");
    else if (spec.end === "count" && spec.count) tail = ";COUNT=" + Number(spec.count);
    return groups.map(function (group) {
      let rule = base;
      if (group.length > 1) {
        rule += ";BYHOUR=" + hours.join(",") + ";BYMINUTE=" + minutes.join(",");
      }
      return { times: group, dtstart: spec.startDate + "T" + group[0], rrule: rule + tail };
    });
  }

  window.Wardcast = Object.assign(window.Wardcast || {}, { pointInPolygon, recurrence, normaliseTime });

  // -- the page -------------------------------------------------------------------------------------

  const form = document.getElementById("announce-form");
  if (!form) return;
  const labels = JSON.parse(document.getElementById("announce-labels").textContent);
  const zone = form.dataset.timezone;
  const skewMs = Number(form.dataset.serverNow) - Date.now();  // the controller's clock, not the PC's
  const language = document.documentElement.lang || "vi";
  const byId = function (id) { return document.getElementById(id); };
  let checkedOnce = false;
  let checkTimer = null;

  function t(key, values) {
    let text = labels[key] || key;
    for (const name of Object.keys(values || {})) text = text.split("{" + name + "}").join(String(values[name]));
    return text;
  }

  function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text !== undefined) made.textContent = text;
    return made;
  }

  // The controller's "now" plus `seconds`, as a local date-time in the city's zone (2026-12-01T06:00:05).
  function cityMoment(seconds) {
    const when = new Date(Date.now() + skewMs + seconds * 1000);
    const text = new Intl.DateTimeFormat("sv-SE", {
      timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    }).format(when);
    return text.replace(" ", "T");
  }

  function showInstant(iso) {
    return new Intl.DateTimeFormat(language === "vi" ? "vi-VN" : "en-GB", {
      timeZone: zone, weekday: "short", day: "2-digit", month: "2-digit", year: "numeric",
      hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23",
    }).format(new Date(iso));
  }

  function showDate(isoDate) {
    const [year, month, day] = isoDate.split("-");
    return day + "/" + month + "/" + year;
  }

  function shortTime(time) { return time.endsWith(":00") ? time.slice(0, 5) : time; }

  function radio(name) {
    const chosen = form.querySelector('input[name="' + name + '"]:checked');
    return chosen ? chosen.value : null;
  }

  // -- errors found before asking the API (no field of the API to name yet) ---------------------------
  function localError(target, key) {
    Wardcast.clearErrors(form);
    const box = form.querySelector(".form-error");
    box.textContent = t(key);
    box.hidden = false;
    box.setAttribute("role", "alert");
    target.setAttribute("aria-invalid", "true");
    const focusable = target.matches("input, select, textarea") ? target : target.querySelector("input, select, textarea");
    if (focusable) focusable.focus();
    return null;
  }

  function apiError(failure) {
    if (failure instanceof Wardcast.ApiFailure && failure.status === 409 && failure.body && failure.body.clashes) {
      Wardcast.clearErrors(form);
      renderCheck([{ ok: false, clashes: failure.body.clashes, settled_clashes: [], next_occurrences: [null] }]);
      return;
    }
    Wardcast.showError(form, failure);
  }

  // -- content --------------------------------------------------------------------------------------
  function syncContent() {
    const kind = radio("content_kind");
    byId("tts-part").hidden = kind !== "tts";
    byId("file-part").hidden = kind !== "file";
  }

  async function listen() {
    const status = byId("listen-status");
    const audio = byId("tts-audio");
    Wardcast.clearErrors(form);
    status.textContent = t("announce.listening");
    try {
      const response = await Wardcast.api("POST", "/api/v1/tts/preview", { text: byId("tts-text").value });
      const blob = await response.blob();
      if (audio.src) URL.revokeObjectURL(audio.src);
      audio.src = URL.createObjectURL(blob);
      audio.hidden = false;
      status.textContent = t("announce.preview_ready", {
        seconds: Number(response.headers.get("X-Duration-S") || 0).toFixed(1),
      });
      audio.play().catch(function () { /* autoplay refused: the controls are there */ });
    } catch (failure) {
      status.textContent = "";
      if (failure instanceof Wardcast.ApiFailure && failure.field === "text") {
        // The preview's field is `text`; on this form the text is the schedule's content.tts.
        Wardcast.showError(form, new Wardcast.ApiFailure(failure.status, Object.assign({}, failure.body, { field: "content.tts" })));
      } else {
        Wardcast.showError(form, failure);
      }
    }
  }

  async function upload() {
    const input = byId("media-file");
    const status = byId("upload-status");
    byId("media-id").value = "";
    if (!input.files.length) return;
    const data = new FormData();
    data.append("file", input.files[0]);
    status.textContent = t("announce.uploading");
    try {
      const media = await Wardcast.api("POST", "/api/v1/media", data);
      byId("media-id").value = media.id;
      status.textContent = t("announce.uploaded", { name: media.filename || media.id, seconds: media.duration_s.toFixed(1) });
      changed();
    } catch (failure) {
      status.textContent = "";
      Wardcast.showError(form, failure);
    }
  }

  // -- time ---------------------------------------------------------------------------------------
  function addTime(value) {
    const list = byId("time-list");
    const index = list.children.length + 1;
    const item = element("li");
    const id = "time-" + index + "-" + Math.random().toString(36).slice(2, 7);
    const label = element("label", null, t("announce.time", { n: index }));
    label.htmlFor = id;
    const input = element("input");
    input.type = "time";
    input.step = "1";
    input.id = id;
    input.className = "time-of-day";
    input.value = value || "";
    const remove = element("button", "secondary small", t("announce.remove_time"));
    remove.type = "button";
    remove.addEventListener("click", function () { item.remove(); renumber(); changed(); });
    item.append(label, input, remove);
    list.append(item);
    return input;
  }

  function renumber() {
    Array.from(byId("time-list").children).forEach(function (item, index) {
      item.querySelector("label").textContent = t("announce.time", { n: index + 1 });
    });
  }

  function spec() {
    return {
      frequency: byId("frequency").value,
      days: Array.from(form.querySelectorAll('input[name="byday"]:checked')).map(function (box) { return box.value; }),
      times: Array.from(form.querySelectorAll(".time-of-day")).map(function (input) { return input.value; }),
      startDate: byId("start-date").value,
      end: radio("end"),
      until: byId("until").value,
      count: byId("count").value,
    };
  }

  function syncWhen() {
    const when = radio("when");
    byId("once-part").hidden = when !== "once";
    byId("recurring-part").hidden = when !== "recurring";
    byId("days").hidden = byId("frequency").value !== "WEEKLY";
    // The API's `dtstart` is the date-time of a one-off, or the start date of a recurring rule.
    byId("dtstart").dataset.field = when === "once" ? "dtstart" : "";
    byId("start-date").dataset.field = when === "recurring" ? "dtstart" : "";
    byId("order-part").hidden = byId("resolution").value !== "order";
    describe();
  }

  // The generated RRULE(s) and a plain-language summary of the timing.
  function describe() {
    const when = radio("when");
    const summary = byId("rule-summary");
    const code = byId("rrule-text");
    if (when === "now") {
      summary.textContent = t("announce.summary.now");
      code.textContent = "—";
      return;
    }
    if (when === "once") {
      const value = byId("dtstart").value;
      summary.textContent = value ? t("announce.summary.once", { moment: showDate(value.slice(0, 10)) + " " + shortTime(value.slice(11)) }) : "";
      code.textContent = "—";
      return;
    }
    const current = spec();
    const rules = recurrence(current);
    const times = Array.from(new Set(current.times.map(normaliseTime).filter(Boolean))).sort();
    const parts = [];
    if (current.frequency === "WEEKLY") {
      parts.push(t("announce.summary.weekly", { days: current.days.map(function (day) { return t("announce.dayname." + day); }).join(", ") }));
    } else {
      parts.push(t("announce.summary.daily"));
    }
    if (times.length) parts.push(t("announce.summary.at", { times: times.map(shortTime).join(", ") }));
    if (current.startDate) parts.push(t("announce.summary.from", { date: showDate(current.startDate) }));
    if (current.end === "until" && current.until) parts.push(t("announce.summary.until", { date: showDate(current.until) }));
    if (current.end === "count" && current.count) parts.push(t("announce.summary.count", { count: current.count }));
    let text = parts.join(", ") + ".";
    if (rules.length > 1) text += " " + t("announce.summary.per_time");
    summary.textContent = text;
    code.textContent = rules.map(function (rule) { return "DTSTART:" + rule.dtstart.replace(/[-:]/g, "") + " RRULE:" + rule.rrule; }).join("\n") || "—";
  }

  // -- the request bodies -------------------------------------------------------------------------------
  function polygonDevices() {
    const hidden = byId("polygon-devices");
    return hidden && hidden.value ? hidden.value.split(",") : [];
  }

  // The schedules to create (one, or one per time of day), or null after showing what is missing.
  function bodies() {
    Wardcast.clearErrors(form);
    const areas = Array.from(form.querySelectorAll('input[name="targets.areas"]:checked')).map(function (box) { return box.value; });
    const devices = polygonDevices();
    if (!areas.length && !devices.length) return localError(byId("targets"), "announce.error.targets");
    let content;
    if (radio("content_kind") === "file") {
      const mediaId = byId("media-id").value;
      if (!mediaId) return localError(byId("media-file"), "announce.error.media");
      content = { media_ids: [mediaId] };
    } else {
      content = { tts: byId("tts-text").value };
    }
    const common = {
      name: byId("name").value,
      targets: { areas: areas, devices: devices },
      content: content,
      priority: byId("priority").value,
      resolution: byId("resolution").value,
    };
    if (common.resolution === "order") common.ward_order = Number(byId("ward-order").value);
    const when = radio("when");
    if (when === "now") return [Object.assign({}, common, { dtstart: cityMoment(5), rrule: null })];
    if (when === "once") {
      let value = byId("dtstart").value;
      if (value.length === 16) value += ":00";
      return [Object.assign({}, common, { dtstart: value, rrule: null })];
    }
    const current = spec();
    if (current.frequency === "WEEKLY" && !current.days.length) return localError(byId("days"), "announce.error.days");
    const rules = recurrence(current);
    if (!rules.length) return localError(byId("times"), "announce.error.times");
    return rules.map(function (rule) {
      const name = rules.length > 1 ? common.name + " (" + shortTime(rule.times[0]) + ")" : common.name;
      return Object.assign({}, common, { name: name, dtstart: rule.dtstart, rrule: rule.rrule });
    });
  }

  // -- check and save -------------------------------------------------------------------------------
  function renderCheck(results) {
    const box = byId("check-result");
    box.replaceChildren();
    const clashes = results.flatMap(function (result) { return result.clashes; });
    const settled = results.flatMap(function (result) { return result.settled_clashes; });
    if (clashes.length) {
      const head = element("p", "error", t("announce.check.clashes", { count: clashes.length }));
      head.setAttribute("role", "alert");
      box.append(head);
      const list = element("ul", "clashes");
      for (const clash of clashes) {
        const item = element("li", "clash");
        item.dataset.scheduleId = clash.schedule_id;
        item.append(element("strong", "clash-name", t("announce.clash.other", { name: clash.name })));
        let times = clash.times.map(function (span) { return showInstant(span.start); }).join("; ");
        if (clash.overlap_count > clash.times.length) times += " " + t("announce.clash.more", { count: clash.overlap_count - clash.times.length });
        item.append(element("div", "clash-times", t("announce.clash.times", { times: times })));
        item.append(element("div", "clash-devices", t("announce.clash.devices", { devices: clash.devices.join(", ") })));
        item.append(element("div", "clash-remedy", t("announce.remedy." + (clash.remedy || "time"))));
        if (clash.remedy === "priority" || clash.remedy === "order") {
          const apply = element("button", "secondary small", t("announce.remedy.apply"));
          apply.type = "button";
          apply.addEventListener("click", function () {
            byId("resolution").value = clash.remedy;
            syncWhen();
            if (clash.remedy === "order") byId("ward-order").focus(); else check();
          });
          item.append(apply);
        }
        list.append(item);
      }
      box.append(list);
    } else if (results.length && results[0].device_count !== undefined) {
      const total = results.reduce(function (sum, result) { return Math.max(sum, result.device_count); }, 0);
      box.append(element("p", "ok", t("announce.check.ok", { count: total })));
    }
    if (settled.length) {
      box.append(element("p", "note", t("announce.check.settled", { names: settled.map(function (clash) { return clash.name; }).join(", ") })));
    }
    const upcoming = results.flatMap(function (result) { return result.next_occurrences || []; }).filter(Boolean);
    if (upcoming.length) {
      upcoming.sort(function (a, b) { return a.start_utc < b.start_utc ? -1 : 1; });
      box.append(element("p", "note", t("announce.check.next")));
      const list = element("ul", "next-occurrences");
      for (const moment of upcoming.slice(0, 5)) list.append(element("li", null, showInstant(moment.start_utc)));
      box.append(list);
    } else if (results.length && results.every(function (result) { return Array.isArray(result.next_occurrences) && !result.next_occurrences.length; })) {
      box.append(element("p", "error", t("announce.check.past")));
    }
  }

  async function check() {
    const list = bodies();
    if (!list) return;
    checkedOnce = true;
    const button = byId("check");
    button.disabled = true;
    byId("check-result").textContent = t("announce.checking");
    try {
      const results = [];
      for (const body of list) results.push(await Wardcast.api("POST", "/api/v1/schedules/check", body));
      renderCheck(results);
    } catch (failure) {
      byId("check-result").replaceChildren();
      apiError(failure);
    } finally {
      button.disabled = false;
    }
  }

  async function save(event) {
    event.preventDefault();
    const list = bodies();
    if (!list) return;
    const button = byId("save");
    const saved = byId("saved");
    button.disabled = true;
    saved.hidden = true;
    try {
      const created = [];
      for (const body of list) created.push(await Wardcast.api("POST", "/api/v1/schedules", body));
      const first = created.map(function (item) { return item.first_occurrence; }).sort(function (a, b) { return a.start_utc < b.start_utc ? -1 : 1; })[0];
      byId("check-result").replaceChildren();
      saved.replaceChildren(element("p", "ok", t("announce.saved", { count: created.length, moment: showInstant(first.start_utc) })));
      const area = list[0].targets.areas[0];
      const link = element("a", null, t("announce.to_calendar"));
      link.href = "/calendar?" + new URLSearchParams(Object.assign(area ? { area: area } : {}, { week: first.start_local.slice(0, 10) }));
      saved.append(link);
      saved.hidden = false;
      link.focus();
    } catch (failure) {
      apiError(failure);
    } finally {
      button.disabled = false;
    }
  }

  function changed(event) {
    describe();
    // A chosen file is checked once its upload has finished (upload() calls this again).
    if (!checkedOnce || (event && event.target && event.target.id === "media-file")) return;
    clearTimeout(checkTimer);
    checkTimer = setTimeout(check, 700);
  }

  // -- drawing an area on the map (operators) ---------------------------------------------------------
  function setUpDrawing() {
    const details = byId("draw");
    if (!details) return;
    let map = null;
    let devices = [];
    let vertices = [];
    let outline = null;
    let closed = false;
    const status = byId("polygon-status");
    const hidden = byId("polygon-devices");

    function redraw() {
      if (outline) outline.remove();
      outline = null;
      if (vertices.length) {
        outline = (closed ? L.polygon(vertices, { color: "#123a63" }) : L.polyline(vertices, { color: "#123a63", dashArray: "4 4" })).addTo(map);
      }
      const inside = closed ? devices.filter(function (device) { return pointInPolygon([device.lat, device.lon], vertices); }) : [];
      hidden.value = inside.map(function (device) { return device.id; }).join(",");
      for (const device of devices) device.marker.setStyle({ fillColor: inside.includes(device) ? "#0b5cad" : "#ffffff" });
      status.textContent = closed
        ? (inside.length ? t("announce.map.chosen", { count: inside.length }) : t("announce.map.none"))
        : t("announce.map.points", { count: vertices.length });
      changed();
    }

    details.addEventListener("toggle", async function () {
      if (!details.open || map) return;
      map = Wardcast.createMap(byId("draw-map"));
      map.on("click", function (event) {
        if (closed) return;
        vertices.push([event.latlng.lat, event.latlng.lng]);
        redraw();
      });
      try {
        const listed = await Wardcast.api("GET", "/api/v1/devices");
        devices = listed.filter(function (device) { return device.lat !== null && device.lon !== null && device.kind === "speaker"; });
      } catch (failure) {
        Wardcast.showError(form, failure);
      }
      for (const device of devices) {
        device.marker = L.circleMarker([device.lat, device.lon], { radius: 7, color: "#123a63", weight: 2, fillOpacity: 1, fillColor: "#ffffff", className: "device-marker device-" + device.id })
          .bindTooltip(device.name || device.id).addTo(map);
      }
      Wardcast.fitTo(map, devices.map(function (device) { return [device.lat, device.lon]; }));
      redraw();
    });
    byId("polygon-close").addEventListener("click", function () {
      if (vertices.length >= 3) { closed = true; redraw(); }
    });
    byId("polygon-clear").addEventListener("click", function () {
      vertices = [];
      closed = false;
      if (map) redraw();
    });
  }

  // -- wiring ------------------------------------------------------------------------------------------
  for (const input of form.querySelectorAll('input[name="content_kind"]')) input.addEventListener("change", syncContent);
  for (const input of form.querySelectorAll('input[name="when"], input[name="end"]')) input.addEventListener("change", syncWhen);
  byId("frequency").addEventListener("change", syncWhen);
  byId("resolution").addEventListener("change", syncWhen);
  byId("listen").addEventListener("click", listen);
  byId("media-file").addEventListener("change", upload);
  byId("check").addEventListener("click", check);
  byId("add-time").addEventListener("click", function () { addTime("").focus(); });
  form.addEventListener("submit", save);
  form.addEventListener("change", changed);
  form.addEventListener("input", describe);
  addTime("06:00");
  const today = new Date(form.dataset.today + "T12:00:00Z");
  const weekday = ["SU", "MO", "TU", "WE", "TH", "FR", "SA"][today.getUTCDay()];
  byId("day-" + weekday).checked = true;
  const until = new Date(today.getTime() + 30 * 86400000);
  byId("until").value = until.toISOString().slice(0, 10);
  byId("dtstart").value = cityMoment(3600).slice(0, 16);
  setUpDrawing();
  syncContent();
  syncWhen();
})();
