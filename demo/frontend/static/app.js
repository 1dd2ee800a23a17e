// Demo MES frontend. The backend URL is injected by server.py into every page
// (window.BACKEND_URL) and is also available from /config.js.
"use strict";

const API = (window.BACKEND_URL || "").replace(/\/$/, "");
const TOKEN_KEY = "demo-mes-token";

const NEXT_STATUS = {
  planned: ["released", "cancelled"],
  released: ["in_progress", "on_hold", "cancelled"],
  in_progress: ["on_hold", "completed"],
  on_hold: ["released", "in_progress", "cancelled"],
};

function token() {
  return window.localStorage.getItem(TOKEN_KEY);
}

async function api(path, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(API + path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401 && document.body.dataset.page !== "login") {
    window.localStorage.removeItem(TOKEN_KEY);
    window.location.href = "/login.html";
  }
  if (!response.ok) throw new Error(body.message || response.statusText);
  return body;
}

function showError(error) {
  const el = document.getElementById("error");
  if (!el) return;
  el.textContent = String(error.message || error);
  el.hidden = false;
}

function lookup(obj, dotted) {
  return dotted.split(".").reduce((o, k) => (o == null ? o : o[k]), obj);
}

async function initSession() {
  const logout = document.getElementById("logout");
  const loginLink = document.getElementById("login-link");
  if (!token()) return null;
  const me = await api("/api/me");
  const who = document.getElementById("whoami");
  if (who) who.textContent = "logged in as " + me.username;
  if (logout) {
    logout.hidden = false;
    logout.addEventListener("click", async () => {
      await api("/api/logout", { method: "POST", body: "{}" }).catch(() => {});
      window.localStorage.removeItem(TOKEN_KEY);
      window.location.href = "/login.html";
    });
  }
  if (loginLink) loginLink.hidden = true;
  return me;
}

async function initDashboard() {
  if (!(await initSession())) return;
  const stats = await api("/api/stats");
  document.querySelectorAll("[data-stat]").forEach((el) => {
    const value = lookup(stats, el.dataset.stat);
    el.textContent = value == null ? "-" : String(value);
  });
}

async function initLogin() {
  const form = document.getElementById("login-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    try {
      const body = await api("/api/login", {
        method: "POST",
        body: JSON.stringify({ username: data.get("username"), password: data.get("password") }),
      });
      window.localStorage.setItem(TOKEN_KEY, body.token);
      window.location.href = "/";
    } catch (error) {
      showError(error);
    }
  });
}

let latestLoad = 0; // the newest list asked for is the one shown, whichever answer comes last

async function loadWorkOrders(status) {
  const ticket = ++latestLoad;
  const query = status ? "?limit=100&status=" + encodeURIComponent(status) : "?limit=100";
  const page = await api("/api/work-orders" + query);
  if (ticket !== latestLoad) return; // a newer load (a filter applied meanwhile) shows its own
  document.getElementById("total").textContent = page.total + " work orders";
  const tbody = document.querySelector("#work-orders tbody");
  tbody.replaceChildren();
  for (const wo of page.items) {
    const tr = document.createElement("tr");
    for (const value of [wo.number, wo.sku, wo.quantity, wo.status, wo.priority, wo.due_date || ""]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.appendChild(td);
    }
    const actions = document.createElement("td");
    for (const next of NEXT_STATUS[wo.status] || []) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = next;
      button.addEventListener("click", async () => {
        try {
          await api("/api/work-orders/" + wo.id + "/status", {
            method: "POST",
            body: JSON.stringify({ status: next }),
          });
          await loadWorkOrders(status);
        } catch (error) {
          showError(error);
        }
      });
      actions.appendChild(button);
    }
    tr.appendChild(actions);
    tbody.appendChild(tr);
  }
}

async function initWorkOrders() {
  if (!(await initSession())) {
    window.location.href = "/login.html";
    return;
  }
  const form = document.getElementById("filter");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    loadWorkOrders(new FormData(form).get("status")).catch(showError);
  });
  await loadWorkOrders("");
}

const PAGES = { dashboard: initDashboard, login: initLogin, work_orders: initWorkOrders };

document.addEventListener("DOMContentLoaded", () => {
  const init = PAGES[document.body.dataset.page];
  if (init) init().catch(showError);
});
