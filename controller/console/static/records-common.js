// Shared by the record pages (map, log, report, users): the page's configuration and labels (rendered
// from the catalogue into #page-config), times shown in the city's zone, and a tiny element builder.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("page-config").textContent);

  function label(key, values) {
    let text = config.labels[key];
    if (text === undefined) return key;
    for (const [name, value] of Object.entries(values || {})) text = text.split("{" + name + "}").join(String(value));
    return text;
  }

  // A label for data (a kind, a state): the catalogue's entry, else the value itself.
  function labelOr(key, fallback) {
    return config.labels[key] !== undefined ? config.labels[key] : fallback;
  }

  const timeFormat = new Intl.DateTimeFormat(document.documentElement.lang === "en" ? "en-GB" : "vi-VN", {
    timeZone: config.timezone, year: "numeric", month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function formatTime(iso) {
    return iso ? timeFormat.format(new Date(iso)) : "—";
  }

  // "2026-11-24" (a day in the city's zone) → "2026-11-24T00:00:00+07:00"; `next`: the day after.
  function dayStart(day, next) {
    if (!day) return null;
    let value = day;
    if (next) {
      const d = new Date(day + "T00:00:00Z");
      d.setUTCDate(d.getUTCDate() + 1);
      value = d.toISOString().slice(0, 10);
    }
    return value + "T00:00:00" + config.offset;
  }

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function areaName(code) {
    return config.areas[code] || code;
  }

  window.Records = { config, label, labelOr, formatTime, dayStart, el, areaName };
})();
