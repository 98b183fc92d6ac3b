// The console's pages call the controller's JSON API (/api/v1/...) as the signed-in user: the session
// cookie travels by itself, and a call that changes something carries the session's CSRF token.
// Errors come back as {error, field, detail}: `showError` writes them next to the form, names the
// field, and marks the input that has it (aria-invalid) so that keyboard and screen-reader users find it.
(function () {
  "use strict";

  class ApiFailure extends Error {
    constructor(status, body) {
      super((body && body.detail) || "HTTP " + status);
      this.status = status;
      this.field = body ? body.field : null;
      this.detail = body ? body.detail : null;
      this.body = body;
    }
  }

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  // api("POST", "/api/v1/broadcasts", {...}) → parsed JSON (or null for 204). A FormData body is sent
  // as multipart (uploads). Throws ApiFailure for a 4xx/5xx answer.
  async function api(method, path, body, options) {
    const headers = { "Accept": "application/json" };
    if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = csrfToken();
    let payload;
    if (body instanceof FormData || body instanceof Blob) {
      payload = body;
    } else if (body !== undefined && body !== null) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const response = await fetch(path, Object.assign({ method, headers, body: payload, credentials: "same-origin" }, options || {}));
    if (response.status === 204) return null;
    const type = response.headers.get("Content-Type") || "";
    const parsed = type.includes("json") ? await response.json() : null;
    if (response.status === 401) {
      // The session ended (expired, signed out elsewhere, password changed): sign in again, then come back.
      window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname + window.location.search));
    }
    if (!response.ok) throw new ApiFailure(response.status, parsed);
    return parsed === null ? response : parsed;
  }

  // The first input, select or textarea of `form` whose data-field (or name) is the API's field name
  // or its first part ("content.tts" → "content.tts", then "content").
  function inputFor(form, field) {
    if (!form || !field) return null;
    const parts = field.split(/[.[]/);
    for (let n = parts.length; n > 0; n -= 1) {
      const name = parts.slice(0, n).join(".");
      const found = form.querySelector('[data-field="' + CSS.escape(name) + '"], [name="' + CSS.escape(name) + '"]');
      if (found) return found;
    }
    return null;
  }

  function clearErrors(form) {
    if (!form) return;
    for (const marked of form.querySelectorAll('[aria-invalid="true"]')) marked.removeAttribute("aria-invalid");
    const box = form.querySelector(".form-error");
    if (box) { box.textContent = ""; box.hidden = true; }
  }

  // The message shown: "<label of the field> (<api field>): <detail>"; a network failure gets the page's
  // data-network-error text (from the catalogue).
  function showError(form, failure) {
    clearErrors(form);
    let box = form && form.querySelector(".form-error");
    if (!box) {
      box = document.createElement("p");
      box.className = "form-error error";
      if (form) form.prepend(box); else document.querySelector("main").prepend(box);
    }
    box.setAttribute("role", "alert");
    box.hidden = false;
    if (!(failure instanceof ApiFailure)) {
      box.textContent = document.body.dataset.networkError || String(failure);
      return;
    }
    const input = inputFor(form, failure.field);
    let label = failure.field || "";
    if (input) {
      input.setAttribute("aria-invalid", "true");
      const labelElement = input.id ? form.querySelector('label[for="' + CSS.escape(input.id) + '"]') : null;
      if (labelElement) label = labelElement.textContent.trim() + " (" + failure.field + ")";
      input.focus();
    }
    box.textContent = label ? label + ": " + failure.detail : failure.detail;
  }

  // The navigation folds into a menu on a phone; on a wider screen it is always open.
  const menu = document.getElementById("nav-menu");
  if (menu) {
    const wide = window.matchMedia("(min-width: 700px)");
    const follow = function () { menu.open = wide.matches; };
    follow();
    wide.addEventListener("change", follow);
  }

  window.Wardcast = Object.assign(window.Wardcast || {}, { api, ApiFailure, showError, clearErrors, csrfToken });
})();
