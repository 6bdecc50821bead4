// The branchd dashboard: no framework, no build step. It reads the v1 API
// with the token the user gives (kept in sessionStorage, this tab only) and
// follows GET /v1/events when the daemon has it, else polls every 2 s.
"use strict";

const TOKEN_KEY = "branchd.token";
const POLL_MS = 2000;
const STREAM_RETRY_MS = 30000; // a daemon without /v1/events: ask again this often
const LOG_LINES = 40;
const STOPPED = new Set(["stopped", "exited", "fatal"]);
const UP = new Set(["running", "starting", "waiting", "backoff"]);

const $ = (id) => document.getElementById(id);
const openLogs = new Set(); // "app/name" of the instances whose log tail is shown
let fetchedAt = 0; // Date.now() of the last listing: uptimes count on from it
let pending = null; // a refresh asked for by an event, not run yet
let actionError = ""; // the last action's failure, shown until the next action

class Unauthorized extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers(extra) {
  const h = { Accept: "application/json", ...extra };
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}

async function api(method, path, { text = false } = {}) {
  const resp = await fetch(path, { method, headers: headers(), cache: "no-store" });
  if (resp.status === 401) throw new Unauthorized("a valid token is required");
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try {
      message = (await resp.json()).error.message;
    } catch (_) {
      // not a JSON error: the status line says it
    }
    throw new Error(message);
  }
  if (resp.status === 204) return null;
  return text ? resp.text() : resp.json();
}

function el(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  node.append(...kids);
  return node;
}

// The child of `parent` with this data-key, made by make() if none; placed at
// `index` without moving it when it is there already (a moved row loses a click).
function keyed(parent, key, index, make) {
  let node = parent.querySelector(`:scope > [data-key="${CSS.escape(key)}"]`);
  if (!node) {
    node = make();
    node.setAttribute("data-key", key);
  }
  if (parent.children[index] !== node) parent.insertBefore(node, parent.children[index] || null);
  return node;
}

function prune(parent, keys) {
  for (const child of [...parent.children]) {
    if (!keys.has(child.getAttribute("data-key"))) child.remove();
  }
}

// Branch ids are 32 hex digits: the first 12 tell them apart on a screen.
const short = (id) => (id.length > 16 ? id.slice(0, 12) + "…" : id);

function duration(seconds) {
  if (seconds == null) return "";
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}

function bytes(n) {
  if (n == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function bar(cell, used, total, label) {
  cell.replaceChildren();
  if (used == null || !total) {
    cell.textContent = used == null ? "" : String(used);
    return;
  }
  const ratio = Math.min(1, used / total);
  const fill = el("span");
  fill.style.width = (ratio * 100).toFixed(1) + "%";
  cell.append(el("span", { class: "bar" + (ratio > 0.85 ? " high" : ""), title: label }, fill));
  cell.append(label);
}

function renderBranches(items) {
  const body = $("branches").tBodies[0];
  const keys = new Set();
  items.forEach((b, i) => {
    keys.add(b.id);
    const row = keyed(body, b.id, i, () => el("tr", {}, ...[0, 1, 2, 3, 4, 5].map(() => el("td"))));
    const [id, state, host, inst, slots, mem] = row.cells;
    id.textContent = short(b.id) + (b.self ? " (this one)" : "");
    id.title = b.id;
    state.className = "state";
    state.setAttribute("data-state", b.state);
    state.textContent = b.state + (b.capacity && b.capacity.draining ? ", draining" : "");
    host.textContent = b.hostname || b.api_url || "";
    const c = b.capacity || {};
    bar(inst, c.instances, c.max_instances, `${c.instances ?? "?"} / ${c.max_instances ?? "?"}`);
    bar(slots, c.slots_used, c.slots, `${c.slots_used ?? "?"} / ${c.slots ?? "?"}`);
    const used = c.memory_total != null ? c.memory_total - c.memory_free : null;
    bar(mem, used, c.memory_total, `${bytes(used)} / ${bytes(c.memory_total)}`);
  });
  prune(body, keys);
}

function makeApp(name) {
  const table = el(
    "table",
    { class: "instances" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        ...["instance", "branch", "state", "uptime", "restarts", "reason", ""].map((t) =>
          el("th", {}, t),
        ),
      ),
    ),
    el("tbody"),
  );
  return el(
    "div",
    { class: "app" },
    el("h3", {}, name, el("span", { class: "counts" })),
    el("p", { class: "unreachable", hidden: true }),
    table,
  );
}

function makeInstance(app, name) {
  const row = el("tr", { class: "instance" }, ...[0, 1, 2, 3, 4, 5].map(() => el("td")));
  const actions = el("td", { class: "actions" });
  for (const action of ["start", "stop", "restart"]) {
    const button = el("button", { type: "button", "data-action": action }, action);
    button.addEventListener("click", () => act(row, app, name, action));
    actions.append(button);
  }
  const logs = el("button", { type: "button", "data-action": "logs" }, "logs");
  logs.addEventListener("click", () => {
    const key = app + "/" + name;
    if (openLogs.has(key)) openLogs.delete(key);
    else openLogs.add(key);
    refresh();
  });
  actions.append(logs);
  row.append(actions);
  row.cells[3].className = "num uptime";
  row.cells[4].className = "num";
  row.cells[5].className = "reason";
  return row;
}

function renderInstance(row, inst) {
  const [name, branch, state, uptime, restarts, reason] = row.cells;
  name.textContent = inst.name;
  branch.textContent = short(inst.branch || "");
  branch.title = inst.branch || "";
  state.className = "state";
  state.setAttribute("data-state", inst.state);
  state.textContent = inst.state + (inst.desired !== "running" && UP.has(inst.state) ? " (stopping)" : "");
  uptime.setAttribute("data-uptime", inst.uptime == null ? "" : String(inst.uptime));
  uptime.textContent = duration(inst.uptime);
  restarts.textContent = String(inst.restarts);
  reason.textContent = inst.reason || "";
  reason.title = inst.reason || "";
  const busy = row.hasAttribute("data-busy");
  for (const button of row.querySelectorAll("button[data-action]")) {
    const a = button.getAttribute("data-action");
    button.disabled =
      busy ||
      (a === "start" && (inst.state === "running" || inst.state === "starting")) ||
      (a === "stop" && STOPPED.has(inst.state));
  }
}

async function act(row, app, name, action) {
  row.setAttribute("data-busy", "");
  for (const button of row.querySelectorAll("button")) button.disabled = true;
  const wait = action === "start" ? "" : "?wait=false"; // the page follows the stop itself
  try {
    const path = `/v1/apps/${encodeURIComponent(app)}/instances/${encodeURIComponent(name)}`;
    await api("POST", `${path}/${action}${wait}`);
    actionError = "";
  } catch (err) {
    if (err instanceof Unauthorized) fail(err);
    else actionError = `${action} ${app}/${name}: ${err.message}`;
  } finally {
    row.removeAttribute("data-busy");
  }
  await refresh();
}

async function renderApps(apps) {
  const box = $("apps");
  const keys = new Set();
  const lists = await Promise.all(
    apps.map((a) =>
      api("GET", `/v1/apps/${encodeURIComponent(a.name)}/instances`).catch((err) => {
        if (err instanceof Unauthorized) throw err;
        return { items: [], unreachable: [], error: err.message };
      }),
    ),
  );
  const logs = [];
  apps.forEach((app, i) => {
    keys.add(app.name);
    const node = keyed(box, app.name, i, () => makeApp(app.name));
    const list = lists[i];
    const items = list.items || [];
    const running = items.filter((x) => x.state === "running").length;
    const desired = app.desired ?? items.filter((x) => x.desired === "running").length;
    let counts = `${running} running / ${desired} desired, ${items.length} instances`;
    if (app.beat) counts += `, beat on ${app.beat.holder || app.beat}`;
    node.querySelector(".counts").textContent = counts;
    const away = node.querySelector(".unreachable");
    const gone = (list.unreachable || []).map((u) => `${u.branch} (${u.state})`);
    away.hidden = !gone.length && !list.error;
    away.textContent = list.error || (gone.length ? "not answering: " + gone.join(", ") : "");
    const body = node.querySelector("tbody");
    const rowKeys = new Set();
    let index = 0;
    for (const inst of items) {
      const key = app.name + "/" + inst.name;
      rowKeys.add(key);
      renderInstance(keyed(body, key, index++, () => makeInstance(app.name, inst.name)), inst);
      if (openLogs.has(key)) {
        const logKey = key + "#logs";
        rowKeys.add(logKey);
        const logRow = keyed(body, logKey, index++, () =>
          el("tr", { class: "logs" }, el("td", { colSpan: 7 }, el("pre", { class: "log" }))),
        );
        logs.push([logRow.querySelector("pre"), app.name, inst.name]);
      }
    }
    prune(body, rowKeys);
  });
  prune(box, keys);
  await Promise.all(logs.map(([pre, app, name]) => tail(pre, app, name)));
}

async function tail(pre, app, name) {
  const path = `/v1/apps/${encodeURIComponent(app)}/instances/${encodeURIComponent(name)}/logs`;
  try {
    const text = await api("GET", `${path}?tail=${LOG_LINES}`, { text: true });
    const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = text || "(no output yet)";
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  } catch (err) {
    pre.textContent = "logs: " + err.message;
  }
}

function say(text) {
  $("status").textContent = text;
}

function fail(err) {
  if (err instanceof Unauthorized) {
    const refused = token() !== "";
    sessionStorage.removeItem(TOKEN_KEY); // a refused token is not kept
    login(refused ? "that token was refused" : "");
  } else {
    say(err.message);
  }
}

let refreshing = null;
let again = false;

// One refresh at a time; one asked for meanwhile runs once after it.
async function refresh() {
  if (refreshing) {
    again = true;
    return refreshing;
  }
  refreshing = (async () => {
    do {
      again = false;
      try {
        const [branches, apps] = await Promise.all([api("GET", "/v1/branches"), api("GET", "/v1/apps")]);
        renderBranches(branches.items);
        await renderApps(apps.items);
        fetchedAt = Date.now();
        document.body.setAttribute("data-refreshed", String(fetchedAt));
        showMain();
        say(actionError);
      } catch (err) {
        fail(err);
      }
    } while (again);
  })();
  try {
    await refreshing;
  } finally {
    refreshing = null;
  }
}

// Uptimes go on between refreshes (with the event stream, those are rare).
function tick() {
  const elapsed = (Date.now() - fetchedAt) / 1000;
  for (const cell of document.querySelectorAll("td.uptime[data-uptime]")) {
    const base = cell.getAttribute("data-uptime");
    if (base !== "") cell.textContent = duration(Number(base) + elapsed);
  }
}

function soon() {
  if (pending) return;
  pending = setTimeout(() => {
    pending = null;
    refresh();
  }, 100);
}

let lastEventId = null;

// Follows GET /v1/events until it ends; false when the daemon has no stream.
// fetch rather than EventSource: EventSource cannot send the Bearer header.
async function follow() {
  const extra = { Accept: "text/event-stream" };
  if (lastEventId) extra["Last-Event-ID"] = lastEventId;
  let resp;
  try {
    resp = await fetch("/v1/events", { headers: headers(extra), cache: "no-store" });
  } catch (_) {
    return false;
  }
  const type = resp.headers.get("Content-Type") || "";
  if (!resp.ok || !type.startsWith("text/event-stream") || !resp.body) {
    if (resp.body) resp.body.cancel().catch(() => {});
    return false;
  }
  $("live").textContent = "live: event stream";
  document.body.setAttribute("data-live", "events");
  soon();
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let data = false;
        for (const line of block.split("\n")) {
          if (line.startsWith("id:")) lastEventId = line.slice(3).trim();
          else if (line.startsWith("data:")) data = true;
        }
        if (data) soon(); // a comment (keep-alive) changes nothing
      }
    }
  } catch (_) {
    // the daemon went away or restarted: poll, then try again
  }
  return true;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function live() {
  for (;;) {
    if (!$("login").hidden) {
      await sleep(200); // no token yet: nothing to follow
      continue;
    }
    const streamed = await follow();
    $("live").textContent = "live: polling every 2 s";
    document.body.setAttribute("data-live", "polling");
    const until = Date.now() + (streamed ? POLL_MS : STREAM_RETRY_MS);
    do {
      await refresh();
      await sleep(POLL_MS);
    } while (Date.now() < until && $("login").hidden);
  }
}

function showMain() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("forget").hidden = !token();
}

function login(why) {
  $("main").hidden = true;
  $("login").hidden = false;
  say(why);
  $("token").focus();
}

let started = false;

function start() {
  refresh();
  if (!started) {
    started = true;
    live();
    setInterval(tick, 1000);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("login").hidden = true;
    say("");
    start();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    login("");
  });
  start();
});
