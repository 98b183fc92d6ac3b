// One way to make a Leaflet map for every console page: tiles from config.yaml (console.map.tile_url)
// when the city set a tile server, otherwise a plain background with a note, so that a console with no
// internet still shows where devices and areas are. Markers and outlines are the page's own.
(function () {
  "use strict";

  function createMap(element) {
    const data = element.dataset;
    const map = L.map(element, {
      center: [Number(data.centerLat), Number(data.centerLon)],
      zoom: Number(data.zoom),
      maxZoom: Number(data.maxZoom),
      keyboard: true,
    });
    if (data.tileUrl) {
      L.tileLayer(data.tileUrl, { maxZoom: Number(data.maxZoom), attribution: data.attribution }).addTo(map);
    } else {
      element.classList.add("no-tiles");
      const note = L.control({ position: "bottomleft" });
      note.onAdd = function () {
        const box = L.DomUtil.create("div", "map-note");
        box.textContent = data.noTilesNote;
        return box;
      };
      note.addTo(map);
    }
    return map;
  }

  // Fit the map to these [lat, lon] points (devices with coordinates); keep the configured view if none.
  function fitTo(map, points) {
    if (points.length === 1) map.setView(points[0], Math.max(map.getZoom(), 16));
    else if (points.length > 1) map.fitBounds(L.latLngBounds(points), { padding: [24, 24], maxZoom: 17 });
  }

  window.Wardcast = Object.assign(window.Wardcast || {}, { createMap, fitTo });
})();
