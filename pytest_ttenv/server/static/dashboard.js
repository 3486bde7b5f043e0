/* ttenv dashboard: plain DOM APIs, no library, no build step; loaded with `defer` on every page.
 *
 * Contract with the templates (pytest_ttenv/server/templates/) and the server's streams:
 * - every text that came from the server is set with textContent / createTextNode, never parsed as
 *   HTML (ENV names, owners and console lines are user- or guest-controlled);
 * - time.ts[data-ts] (unix s) is shown in local time; span.countdown[data-expires] ("" = never)
 *   counts down every second ("1h 02m 03s", "expired", "never");
 * - .bar / .minibar [data-used][data-total] get their .fill width set through the CSSOM (the CSP
 *   forbids style attributes, not element.style);
 * - table#envs[data-stream]: rows rebuilt from `event: envs`; section#env[data-stream]: the ENV
 *   page's states refreshed from the same stream; pre#console[data-stream]: `event: line`, at most
 *   data-max-lines lines kept; table#events[data-stream]: `event: event`, newest on top, by id once;
 * - form#delete: in-page confirmation (#delete-confirm submits confirm=yes; Escape cancels);
 * - span#live shows the stream's state; EventSource reconnects by itself.
 */
(function () {
  "use strict";

  const byId = (id) => document.getElementById(id);

  function node(tag, cls, text) {
    const el = document.createElement(tag);
    if (cls) el.className = cls;
    if (text !== undefined && text !== null) el.textContent = String(text);
    return el;
  }

  // -- times ---------------------------------------------------------------------------------
  const pad = (n) => (n < 10 ? "0" : "") + n;

  function localTime(seconds) {
    const d = new Date(seconds * 1000);
    return (
      d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds())
    );
  }

  function formatTimes(root) {
    root.querySelectorAll("time.ts[data-ts]").forEach((el) => {
      const t = Number(el.dataset.ts);
      if (el.dataset.shown === el.dataset.ts || !Number.isFinite(t)) return;
      el.textContent = localTime(t);
      el.dateTime = new Date(t * 1000).toISOString();
      el.title = el.dateTime;
      el.dataset.shown = el.dataset.ts;
    });
  }

  function tsNode(seconds) {
    if (seconds === null || seconds === undefined) return node("span", "muted", "never");
    const el = node("time", "ts", seconds);
    el.dataset.ts = String(seconds);
    return el;
  }

  /** "never" (no expiry), "expired", else the time left as "1h 02m 03s" (hours may exceed 24). */
  function countdownText(expires, now) {
    if (expires === undefined || expires === "") return "never";
    const at = Number(expires);
    if (!Number.isFinite(at)) return "never";
    const left = Math.floor(at - now);
    if (left <= 0) return "expired";
    const h = Math.floor(left / 3600);
    const m = Math.floor((left % 3600) / 60);
    return h + "h " + pad(m) + "m " + pad(left % 60) + "s";
  }

  function tick() {
    const now = Date.now() / 1000;
    document.querySelectorAll("span.countdown").forEach((el) => {
      const text = countdownText(el.dataset.expires, now);
      if (el.textContent !== text) el.textContent = text;
      const left = Number(el.dataset.expires) - now;
      el.classList.toggle("expired", text === "expired");
      el.classList.toggle("soon", text !== "expired" && text !== "never" && left < 600);
    });
  }

  function countdownNode(expires) {
    const el = node("span", "countdown");
    el.dataset.expires = expires === null || expires === undefined ? "" : String(expires);
    el.textContent = countdownText(el.dataset.expires, Date.now() / 1000);
    return el;
  }

  // -- resource bars -------------------------------------------------------------------------
  function sizeBars() {
    document.querySelectorAll(".bar[data-total], .minibar[data-total]").forEach((bar) => {
      const used = Number(bar.dataset.used);
      const total = Number(bar.dataset.total);
      const frac = total > 0 && Number.isFinite(used) ? Math.min(1, Math.max(0, used / total)) : 0;
      const fill = bar.querySelector(".fill");
      if (fill) fill.style.width = (frac * 100).toFixed(1) + "%";
      bar.classList.toggle("high", frac >= 0.9);
      bar.classList.toggle("mid", frac >= 0.7 && frac < 0.9);
    });
  }

  // -- streams -------------------------------------------------------------------------------
  const live = byId("live");

  function showLive(state, text) {
    if (!live) return;
    live.hidden = false;
    live.dataset.state = state;
    live.textContent = text;
  }

  /** Opens an EventSource on url; handlers maps event names to functions of the parsed JSON data.
   * onReopen runs when the stream opens again after a drop (the server replays its backlog). */
  function watch(url, handlers, onReopen) {
    const source = new EventSource(url);
    let opened = false;
    showLive("connecting", "connecting…");
    source.addEventListener("open", () => {
      if (opened && onReopen) onReopen();
      opened = true;
      showLive("live", "live");
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) showLive("closed", "disconnected: reload the page");
      else showLive("reconnecting", "reconnecting…");
    });
    Object.keys(handlers).forEach((name) => {
      source.addEventListener(name, (ev) => {
        let data;
        try {
          data = JSON.parse(ev.data);
        } catch (err) {
          return;
        }
        handlers[name](data);
      });
    });
    window.addEventListener("pagehide", () => source.close());
    return source;
  }

  function pill(prefix, value) {
    return node("span", "pill " + prefix + "-" + value, value);
  }

  // -- ENV list ------------------------------------------------------------------------------
  function vmSummary(vm) {
    return (
      vm.name + ": " + vm.os + " " + vm.version + " " + vm.arch + ", " + vm.state + ", " + vm.boot + ", " +
      vm.engine + (vm.host ? "@" + vm.host : "")
    );
  }

  function envRow(env) {
    const tr = node("tr", "env");
    tr.dataset.env = env.name;
    tr.dataset.id = String(env.id);
    tr.dataset.state = env.state;
    const name = node("td", "name");
    const link = node("a", "env-link", env.name);
    link.href = "/envs/" + encodeURIComponent(env.name);
    name.appendChild(link);
    const state = node("td", "state");
    state.appendChild(pill("state", env.state));
    const vms = node("td", "vms");
    const list = node("ul", "vm-list");
    (env.vms || []).forEach((vm) => {
      const li = node("li", null, vmSummary(vm));
      li.dataset.vm = vm.name;
      list.appendChild(li);
    });
    vms.appendChild(list);
    const lease = node("td", "lease");
    lease.appendChild(countdownNode(env.expires));
    const created = node("td", "created");
    created.appendChild(tsNode(env.created));
    const expires = node("td", "expires");
    expires.appendChild(tsNode(env.expires));
    tr.append(name, node("td", "owner", env.owner), state, vms, lease, created, expires);
    return tr;
  }

  /** Makes table's rows match envs (in the stream's order): unchanged rows stay, changed ones are
   * replaced (keeping keyboard focus on their link), gone ones are removed. */
  function renderEnvs(table, envs) {
    const body = table.tBodies[0];
    const old = new Map();
    body.querySelectorAll("tr.env").forEach((tr) => old.set(tr.dataset.id || tr.dataset.env, tr));
    let prev = null;
    envs.forEach((env) => {
      const key = String(env.id);
      const sig = JSON.stringify(env);
      let tr = old.get(key) || old.get(env.name);
      old.delete(key);
      old.delete(env.name);
      if (!tr || tr.dataset.sig !== sig) {
        const fresh = envRow(env);
        fresh.dataset.sig = sig;
        if (tr) {
          const focused = tr.contains(document.activeElement);
          tr.replaceWith(fresh);
          if (focused) fresh.querySelector("a.env-link").focus();
        }
        tr = fresh;
      }
      const want = prev ? prev.nextSibling : body.firstChild;
      if (want !== tr) body.insertBefore(tr, want);
      prev = tr;
    });
    old.forEach((tr) => tr.remove());
    const empty = byId("envs-empty");
    if (empty) empty.hidden = envs.length > 0;
    formatTimes(body);
  }

  function setPill(cell, prefix, value) {
    if (!cell || cell.textContent === value) return;
    cell.replaceChildren(pill(prefix, value));
  }

  /** The ENV page: refresh the ENV's and its VMs' states from the list; say so when it is gone. */
  function updateEnv(section, envs) {
    const id = section.dataset.id;
    const env = envs.find((e) => (id ? String(e.id) === id : e.name === section.dataset.env));
    const gone = byId("env-gone");
    if (gone) gone.hidden = Boolean(env);
    if (!env) return;
    setPill(section.querySelector("dd.state"), "state", env.state);
    const countdown = section.querySelector("span.countdown");
    const expires = env.expires === null || env.expires === undefined ? "" : String(env.expires);
    if (countdown && countdown.dataset.expires !== expires) {
      countdown.dataset.expires = expires;
      section.querySelector("dd.expires").replaceChildren(tsNode(env.expires));
      formatTimes(section);
    }
    (env.vms || []).forEach((vm) => {
      const row = Array.from(document.querySelectorAll("tr.vm")).find((tr) => tr.dataset.vm === vm.name);
      if (!row) return;
      setPill(row.querySelector("td.state"), "state", vm.state);
      const fields = {
        boot: vm.boot,
        address: vm.address ? vm.address + ":" + vm.port : "",
        "vm-error": vm.error || "",
      };
      Object.keys(fields).forEach((cls) => {
        const cell = row.querySelector("td." + cls);
        if (cell && cell.textContent !== fields[cls]) cell.textContent = fields[cls];
      });
    });
  }

  // -- console -------------------------------------------------------------------------------
  /** Appends lines to pre as text nodes (batched), keeps at most max lines, and follows the end
   * only while the reader is at the bottom. */
  function consoleSink(pre, max) {
    let queue = [];
    let timer = 0;
    function flush() {
      timer = 0;
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
      const batch = document.createDocumentFragment();
      queue.forEach((text) => batch.appendChild(document.createTextNode(text + "\n")));
      queue = [];
      pre.appendChild(batch);
      while (pre.childNodes.length > max) pre.removeChild(pre.firstChild);
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }
    return (text) => {
      queue.push(text);
      if (queue.length > max) queue.splice(0, queue.length - max);
      if (!timer) timer = window.setTimeout(flush, 50);
    };
  }

  // -- events --------------------------------------------------------------------------------
  function eventRow(e) {
    const tr = node("tr", "event");
    tr.dataset.kind = e.kind;
    tr.dataset.id = String(e.id);
    tr.dataset.time = String(e.time);
    const time = node("td", "time");
    time.appendChild(tsNode(e.time));
    const kind = node("td", "kind");
    kind.appendChild(pill("kind", e.kind));
    tr.append(time, kind, node("td", "env", e.env), node("td", "owner", e.owner), node("td", "detail", e.detail));
    return tr;
  }

  function eventsSink(table) {
    const body = table.tBodies[0];
    const max = Number(table.dataset.maxRows) || 1000;
    const seen = new Set(Array.from(body.rows).map((tr) => tr.dataset.id));
    return (e) => {
      const id = String(e.id);
      if (seen.has(id)) return;
      seen.add(id);
      const tr = eventRow(e);
      const before = Array.from(body.rows).find((row) => Number(row.dataset.time) <= Number(e.time)) || null;
      body.insertBefore(tr, before);
      while (body.rows.length > max) {
        seen.delete(body.rows[body.rows.length - 1].dataset.id);
        body.deleteRow(-1);
      }
      formatTimes(tr);
      const empty = byId("events-empty");
      if (empty) empty.hidden = true;
    };
  }

  // -- delete confirmation ---------------------------------------------------------------------
  function confirmDelete(form) {
    const ask = byId("delete-submit");
    const yes = byId("delete-confirm");
    const no = byId("delete-cancel");
    const question = byId("delete-ask");
    const parts = [yes, no, question].filter(Boolean);
    ask.setAttribute("aria-expanded", "false");
    const open = () => {
      parts.forEach((el) => (el.hidden = false));
      ask.setAttribute("aria-expanded", "true");
      yes.focus();
    };
    const close = () => {
      parts.forEach((el) => (el.hidden = true));
      ask.setAttribute("aria-expanded", "false");
      ask.focus();
    };
    form.addEventListener("submit", (ev) => {
      if (ev.submitter !== yes) {
        ev.preventDefault();
        open();
      }
    });
    if (no) no.addEventListener("click", close);
    document.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && !yes.hidden) {
        ev.preventDefault();
        close();
      }
    });
  }

  // -- copy the login line -------------------------------------------------------------------
  function copyButton(button) {
    const source = byId(button.dataset.copy);
    if (!source || !navigator.clipboard || !window.isSecureContext) return;
    button.hidden = false;
    button.addEventListener("click", () => {
      navigator.clipboard.writeText(source.textContent).then(
        () => (button.textContent = "Copied"),
        () => (button.textContent = "Copy failed")
      );
      window.setTimeout(() => (button.textContent = "Copy"), 2000);
    });
  }

  // -- wiring --------------------------------------------------------------------------------
  formatTimes(document);
  sizeBars();
  tick();
  window.setInterval(tick, 1000);

  const envs = byId("envs");
  if (envs && envs.dataset.stream) watch(envs.dataset.stream, { envs: (list) => renderEnvs(envs, list) });

  const envSection = byId("env");
  if (envSection && envSection.dataset.stream) {
    watch(envSection.dataset.stream, { envs: (list) => updateEnv(envSection, list) });
  }

  const pre = byId("console");
  if (pre && pre.dataset.stream) {
    const add = consoleSink(pre, Number(pre.dataset.maxLines) || 5000);
    watch(pre.dataset.stream, { line: (data) => add(String(data.text)) }, () =>
      add("--- ttenv: console reconnected; recent lines follow again ---")
    );
    const clear = byId("console-clear");
    if (clear) clear.addEventListener("click", () => pre.replaceChildren());
  }

  const events = byId("events");
  if (events && events.dataset.stream) watch(events.dataset.stream, { event: eventsSink(events) });

  const del = byId("delete");
  if (del && byId("delete-confirm")) confirmDelete(del);

  document.querySelectorAll("button[data-copy]").forEach(copyButton);
})();
