// /ui/dashboard: poll GET /api/admin/overview every second; pause/resume queues.
"use strict";

(() => {
  const { $, el, loadConfig, errorMessage, fmtNumber } = window.tq;
  const POLL_MS = 1000;
  const RATE_FIELDS = ["submitted", "completed", "failed"];

  let previous = null; // {at (ms), counters} of the last good poll, for rates
  const cards = new Map(); // queueId -> {root, fields, pause, resume}

  const token = () => $("admin-token").value.trim();
  const authHeaders = () => ({ Authorization: `Bearer ${token()}` });

  function setPoll(state, message) {
    $("poll-status").dataset.state = state;
    $("poll-status").textContent = message;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  // ---- queue cards -----------------------------------------------------------------------

  function fact(label, field) {
    return [el("dt", {}, label), el("dd", { dataset: { field } }, "—")];
  }

  function meter(field) {
    return el("div", { className: "meter", dataset: { meter: field } }, el("span"));
  }

  function card(queueId) {
    const pause = el("button", { type: "button", "data-testid": `pause-${queueId}` }, "Pause");
    const resume = el("button", { type: "button", "data-testid": `resume-${queueId}` }, "Resume");
    pause.addEventListener("click", () => act(queueId, "pause"));
    resume.addEventListener("click", () => act(queueId, "resume"));
    const root = el(
      "section",
      { className: "queue panel", dataset: { queue: queueId }, "data-testid": `queue-${queueId}` },
      el(
        "header",
        {},
        el("h3", {}, queueId),
        el("span", { className: "state", dataset: { field: "paused" }, "data-testid": `state-${queueId}` }, "—"),
      ),
      el("p", { className: "tags", dataset: { field: "tags" } }),
      el(
        "dl",
        { className: "facts" },
        ...fact("parallelism", "parallelism"),
        ...fact("in flight", "inFlight"),
      ),
      meter("inFlight"),
      el("dl", { className: "facts" }, ...fact("parked", "parked"), ...fact("most parked", "topParked")),
      el("dl", { className: "facts" }, ...fact("admitted", "admitted")),
      meter("admitted"),
      el(
        "dl",
        { className: "facts" },
        ...fact("lag", "lag"),
        ...fact("submitted/s", "submittedRate"),
        ...fact("completed/s", "completedRate"),
        ...fact("failed/s", "failedRate"),
        ...fact("completed", "completed"),
        ...fact("failed", "failed"),
        ...fact("DLQ", "dlq"),
      ),
      el("div", { className: "actions" }, pause, resume),
    );
    const fields = {};
    for (const node of root.querySelectorAll("[data-field]")) fields[node.dataset.field] = node;
    const meters = {};
    for (const node of root.querySelectorAll("[data-meter]")) meters[node.dataset.meter] = node;
    return { root, fields, meters, pause, resume };
  }

  function setMeter(node, value, max) {
    const ratio = max > 0 ? Math.min(1, value / max) : 0;
    node.firstChild.style.width = `${(ratio * 100).toFixed(1)}%`;
    node.classList.toggle("hot", ratio >= 0.9);
  }

  function renderQueue(q, counters, rates) {
    let c = cards.get(q.queueId);
    if (!c) {
      c = card(q.queueId);
      cards.set(q.queueId, c);
      $("queues").append(c.root);
    }
    const f = c.fields;
    c.root.dataset.paused = String(q.paused);
    f.paused.textContent = q.paused ? "paused" : "active";
    f.paused.dataset.paused = String(q.paused);
    f.tags.textContent = `${q.tier} · ${q.experience}`;
    f.parallelism.textContent = String(q.parallelism);
    f.inFlight.textContent = `${q.inFlight} / ${q.parallelism}`;
    f.admitted.textContent = `${q.admitted} / ${q.admissionDepth}`;
    f.lag.textContent = String(q.lag);
    f.parked.textContent = String(q.parked ?? 0);
    const top = (q.topParked || []).slice(0, 3).map((u) => `${u.userId} (${u.parked})`);
    f.topParked.textContent = top.length ? top.join(", ") : "—";
    f.dlq.textContent = String(q.dlq);
    f.dlq.classList.toggle("warn", q.dlq > 0);
    setMeter(c.meters.inFlight, q.inFlight, q.parallelism);
    setMeter(c.meters.admitted, q.admitted, q.admissionDepth);
    if (counters !== undefined) {
      // undefined: keep what the last poll showed (after a pause/resume answer)
      for (const name of RATE_FIELDS) {
        f[`${name}Rate`].textContent = rates ? fmtNumber(rates[name], 1) : "—";
      }
      f.completed.textContent = counters ? String(counters.completed) : "—";
      f.failed.textContent = counters ? String(counters.failed) : "—";
    }
    if (!c.busy) {
      c.pause.disabled = q.paused;
      c.resume.disabled = !q.paused;
    }
  }

  // Rates per second from the counters of two successive polls (null on the first poll or
  // when a counter went backwards, i.e. the app restarted).
  function rates(queueId, counters, now) {
    if (!previous || !counters || !previous.counters[queueId]) return null;
    const seconds = (now - previous.at) / 1000;
    if (seconds <= 0) return null;
    const out = {};
    for (const name of RATE_FIELDS) {
      const delta = (counters[name] || 0) - (previous.counters[queueId][name] || 0);
      if (delta < 0) return null;
      out[name] = delta / seconds;
    }
    return out;
  }

  // ---- guards ----------------------------------------------------------------------------

  function jobsCell(jobs) {
    const list = jobs || [];
    const shown = list.slice(0, 3).join(", ");
    return el("td", { className: "mono small", title: list.join("\n") }, list.length > 3 ? `${shown} +${list.length - 3}` : shown);
  }

  // limit is null for a user no configured API key belongs to
  function usageCell(running, limit) {
    const m = el("div", { className: "meter" }, el("span"));
    setMeter(m, running, limit ?? 0);
    return el("td", {}, el("span", { className: "num" }, `${running} / ${limit ?? "—"}`), m);
  }

  function renderGuards(guards) {
    const models = (guards && guards.models) || [];
    const users = (guards && guards.users) || [];
    $("model-guards").replaceChildren(
      ...models.map((g) =>
        el("tr", { dataset: { model: g.modelId, tier: g.tier } },
          el("td", {}, g.modelId), el("td", {}, g.tier), usageCell(g.running, g.limit), jobsCell(g.jobs)),
      ),
    );
    if (!models.length) $("model-guards").append(el("tr", { className: "empty" }, el("td", { colSpan: 4 }, "no model guards")));
    $("user-guards").replaceChildren(
      ...users.map((g) =>
        el("tr", { dataset: { user: g.userId } },
          el("td", {}, g.userId), usageCell(g.running, g.limit), jobsCell(g.jobs)),
      ),
    );
    if (!users.length) $("user-guards").append(el("tr", { className: "empty" }, el("td", { colSpan: 3 }, "no user holds a lease")));
  }

  // ---- polling and actions ---------------------------------------------------------------

  function render(overview, now) {
    const counters = overview.counters || {};
    let inFlight = 0;
    let admitted = 0;
    for (const q of overview.queues) {
      const own = counters[q.queueId] || null;
      renderQueue(q, own, rates(q.queueId, own, now));
      inFlight += q.inFlight;
      admitted += q.admitted;
    }
    $("dlq-size").textContent = String(overview.dlqSize);
    $("total-in-flight").textContent = String(inFlight);
    $("total-admitted").textContent = String(admitted);
    renderGuards(overview.guards);
    previous = { at: now, counters };
  }

  let polls = 0;
  async function poll() {
    try {
      if (!token()) {
        setPoll("error", "enter the admin token");
        return;
      }
      const res = await fetch("/api/admin/overview", { headers: authHeaders(), cache: "no-store" });
      if (!res.ok) {
        setPoll("error", await errorMessage(res));
        return;
      }
      render(await res.json(), performance.now());
      polls += 1;
      document.body.dataset.polls = String(polls);
      setPoll("ok", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      setPoll("error", `poll failed: ${err.message}`);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  async function act(queueId, action) {
    const c = cards.get(queueId);
    c.busy = true;
    c.pause.disabled = true;
    c.resume.disabled = true;
    showError("");
    try {
      const res = await fetch(`/api/admin/queues/${encodeURIComponent(queueId)}/${action}`, {
        method: "POST",
        headers: authHeaders(),
      });
      c.busy = false;
      if (!res.ok) {
        showError(`${action} ${queueId}: ${await errorMessage(res)}`);
        return;
      }
      renderQueue(await res.json());
    } catch (err) {
      showError(`${action} ${queueId}: ${err.message}`);
    } finally {
      c.busy = false;
    }
  }

  async function start() {
    try {
      const config = await loadConfig();
      if (config.devMode && config.adminToken) {
        $("admin-token").value = config.adminToken;
        $("dev-badge").hidden = false;
      }
    } catch (err) {
      showError(`could not load /ui/config.json: ${err.message}`);
    }
    document.body.dataset.ready = "true";
    poll();
  }

  start();
})();
