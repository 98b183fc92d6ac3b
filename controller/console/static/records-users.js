// User management (admins): GET/POST/PATCH/DELETE /api/v1/users. Password confirmation is checked here
// (the API takes one password); every other error comes from the API, named by its field.
(function () {
  "use strict";
  const { config, label, formatTime, el, areaName } = window.Records;
  const tbody = document.querySelector("#users-table tbody");
  const status = document.getElementById("users-status");
  const createForm = document.getElementById("create-form");
  const resetSection = document.getElementById("reset-section");
  const resetForm = document.getElementById("reset-form");
  let resetting = null;

  // The same shape as an API error, so that it is shown (and the input marked) the same way.
  function mismatch(form) {
    return new window.Wardcast.ApiFailure(422, { error: "invalid", field: "password_confirm", detail: label("records.users.mismatch") });
  }

  async function act(form, call, done) {
    try {
      await call();
      status.textContent = done;
      await load();
      return true;
    } catch (failure) {
      window.Wardcast.showError(form, failure);
      return false;
    }
  }

  function openReset(user, opener) {
    resetting = { user, opener };
    resetForm.reset();
    window.Wardcast.clearErrors(resetForm);
    document.getElementById("reset-username").textContent = user.username;
    resetSection.hidden = false;
    document.getElementById("reset-password").focus();
  }

  function closeReset() {
    resetSection.hidden = true;
    if (resetting && resetting.opener.isConnected) resetting.opener.focus();
    resetting = null;
  }

  function row(user) {
    const self = user.id === config.me;
    const actions = el("td", { class: "actions" });
    const reset = el("button", { type: "button", class: "secondary small", text: label("records.users.reset"), "aria-label": label("records.users.reset") + " " + user.username });
    reset.addEventListener("click", () => openReset(user, reset));
    actions.append(reset);
    if (user.locked_until) {
      actions.append(" ", el("button", { type: "button", class: "secondary small", text: label("records.users.unlock"), "aria-label": label("records.users.unlock") + " " + user.username,
        onclick: () => act(null, () => window.Wardcast.api("PATCH", "/api/v1/users/" + user.id, { unlock: true }), label("records.users.unlocked", { name: user.username })) }));
    }
    if (!self) {
      actions.append(" ", el("button", { type: "button", class: "danger small", text: label("records.users.delete"), "aria-label": label("records.users.delete") + " " + user.username,
        onclick: () => {
          if (!window.confirm(label("records.users.delete_confirm", { name: user.username }))) return;
          act(null, () => window.Wardcast.api("DELETE", "/api/v1/users/" + user.id), label("records.users.deleted", { name: user.username }));
        } }));
    } else {
      actions.append(" ", el("span", { class: "note", text: label("records.users.you") }));
    }
    return el("tr", { dataset: { username: user.username } },
      el("th", { scope: "row", text: user.username }),
      el("td", { text: label("records.users.role." + user.role) }),
      el("td", { text: user.wards.length ? user.wards.map(areaName).join(", ") : label("records.users.whole_city") }),
      el("td", { text: user.locked_until ? formatTime(user.locked_until) : "—" }),
      el("td", { text: formatTime(user.created_at) }),
      actions);
  }

  async function load() {
    try {
      const users = await window.Wardcast.api("GET", "/api/v1/users");
      tbody.replaceChildren(...users.map(row));
      document.body.dataset.loaded = "true";
    } catch (failure) {
      window.Wardcast.showError(createForm, failure);
    }
  }

  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = createForm.elements;
    if (f.password.value !== f.password_confirm.value) { window.Wardcast.showError(createForm, mismatch()); return; }
    const body = {
      username: f.username.value.trim(),
      role: f.role.value,
      wards: [...createForm.querySelectorAll('input[name="ward"]:checked')].map((box) => box.value),
      password: f.password.value,
    };
    const name = body.username;
    const ok = await act(createForm, () => window.Wardcast.api("POST", "/api/v1/users", body), label("records.users.created_note", { name }));
    if (ok) { createForm.reset(); window.Wardcast.clearErrors(createForm); }
  });

  resetForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = resetForm.elements;
    if (f.password.value !== f.password_confirm.value) { window.Wardcast.showError(resetForm, mismatch()); return; }
    const user = resetting.user;
    const ok = await act(resetForm, () => window.Wardcast.api("PATCH", "/api/v1/users/" + user.id, { password: f.password.value }), label("records.users.reset_done", { name: user.username }));
    if (ok) closeReset();
  });
  document.getElementById("reset-close").addEventListener("click", closeReset);
  load();
})();
