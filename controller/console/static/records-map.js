// The device map: markers by coordinates, coloured and shaped by status (online / offline / playing),
// following /console/events live; filters by kind and area; the same devices in a table below the map
// for keyboard and screen-reader users. Tiles only when config.yaml sets console.map.tile_url.
(function () {
  "use strict";
  const { config, label, labelOr, formatTime, el, areaName } = window.Records;
  const element = document.getElementById("device-map");
  const map = window.Wardcast.createMap(element);
  const layer = L.layerGroup().addTo(map);
  // Leaflet drops a zoom asked for while a zoom animation runs: a fit asked for then waits for its end
  // (choosing two filters in quick succession must still show the devices of the last one).
  let zooming = false;
  let pendingFit = null;
  map.on("zoomstart", () => { zooming = true; });
  map.on("zoomend", () => {
    zooming = false;
    if (pendingFit) { const points = pendingFit; pendingFit = null; window.Wardcast.fitTo(map, points); }
  });
  function fit(points) {
    if (zooming) pendingFit = points; else window.Wardcast.fitTo(map, points);
  }
  const kindFilter = document.getElementById("filter-kind");
  const areaFilter = document.getElementById("filter-area");
  const tbody = document.querySelector("#device-table tbody");
  let devices = [];
  let shownPoints = [];
  const markers = new Map();

  function within(code, ancestor) {
    for (let at = code; at; at = config.parents[at]) if (at === ancestor) return true;
    return false;
  }

  function statusOf(device) {
    return config.statuses[device.id] || (device.online ? "online" : "offline");
  }

  function icon(status) {
    return L.divIcon({ className: "device-marker status-" + status, html: "<span></span>", iconSize: [22, 22], iconAnchor: [11, 11], popupAnchor: [0, -10] });
  }

  function popup(device) {
    const status = statusOf(device);
    return el("div", { class: "device-popup" },
      el("strong", { text: device.name || device.id }),
      el("dl", {},
        el("dt", { text: label("records.map.kind") }), el("dd", { text: labelOr("device.kind." + device.kind, device.kind) }),
        el("dt", { text: label("records.area") }), el("dd", { text: areaName(device.area) }),
        el("dt", { text: label("records.map.status") }), el("dd", { class: "status-text status-" + status, text: label("status." + status) }),
        el("dt", { text: label("records.map.last_seen") }), el("dd", { text: formatTime(device.last_seen) })));
  }

  function shown() {
    return devices.filter((d) => (!kindFilter.value || d.kind === kindFilter.value) && (!areaFilter.value || within(d.area, areaFilter.value)));
  }

  function draw(refit) {
    layer.clearLayers();
    markers.clear();
    tbody.replaceChildren();
    const points = [];
    let unplaced = 0;
    const list = shown();
    for (const device of list) {
      const status = statusOf(device);
      const name = device.name || device.id;
      const placed = device.lat !== null && device.lon !== null;
      if (placed) {
        const marker = L.marker([device.lat, device.lon], { icon: icon(status), title: name + " — " + label("status." + status), alt: name, keyboard: true });
        marker.bindPopup(() => popup(device));
        marker.on("add", () => { marker.getElement().dataset.deviceId = device.id; marker.getElement().dataset.status = status; });
        marker.addTo(layer);
        markers.set(device.id, marker);
        points.push([device.lat, device.lon]);
      } else {
        unplaced += 1;
      }
      const show = placed ? el("button", { type: "button", class: "secondary small", text: label("records.map.show"), onclick: () => { map.setView([device.lat, device.lon], Math.max(map.getZoom(), 16)); markers.get(device.id).openPopup(); element.focus(); } }) : label("records.map.no_position");
      tbody.append(el("tr", { dataset: { deviceId: device.id, status } },
        el("th", { scope: "row", text: name }),
        el("td", { text: labelOr("device.kind." + device.kind, device.kind) }),
        el("td", { text: areaName(device.area) }),
        el("td", {}, el("span", { class: "status-text status-" + status, text: label("status." + status) })),
        el("td", { text: formatTime(device.last_seen) }),
        el("td", {}, show)));
    }
    document.getElementById("device-count").textContent = String(list.length);
    const note = document.getElementById("no-position");
    note.hidden = unplaced === 0;
    note.textContent = label("records.map.unplaced", { count: unplaced });
    shownPoints = points;
    if (refit) fit(points);
  }

  function update(message) {
    const change = JSON.parse(message.data);
    if (!change.status || !devices.some((d) => d.id === change.device_id)) return;
    config.statuses[change.device_id] = change.status;
    const device = devices.find((d) => d.id === change.device_id);
    if (change.status !== "offline") device.last_seen = change.at;
    const marker = markers.get(change.device_id);
    if (marker) {
      marker.setIcon(icon(change.status));
      const node = marker.getElement();
      if (node) { node.dataset.status = change.status; node.title = (device.name || device.id) + " — " + label("status." + change.status); }
      if (marker.isPopupOpen()) marker.setPopupContent(popup(device));
    }
    const row = tbody.querySelector('tr[data-device-id="' + CSS.escape(change.device_id) + '"]');
    if (row) {
      row.dataset.status = change.status;
      const cell = row.querySelector(".status-text");
      cell.className = "status-text status-" + change.status;
      cell.textContent = label("status." + change.status);
      row.cells[4].textContent = formatTime(device.last_seen);
    }
  }

  map.on("resize", () => fit(shownPoints)); // a phone turned, a window resized: keep every device in view
  kindFilter.addEventListener("change", () => draw(true));
  areaFilter.addEventListener("change", () => draw(true));

  window.Wardcast.api("GET", "/api/v1/devices").then((found) => {
    devices = found.filter((d) => d.enabled && !d.decommissioned_at);
    draw(true);
    document.body.dataset.loaded = "true";
  }).catch((failure) => window.Wardcast.showError(document.getElementById("map-filters"), failure));

  const source = new EventSource("/console/events");
  source.addEventListener("ready", () => { document.body.dataset.live = "on"; });
  source.addEventListener("device", update);
  source.addEventListener("delivery", update);
  source.onerror = () => { document.body.dataset.live = "off"; };
})();
