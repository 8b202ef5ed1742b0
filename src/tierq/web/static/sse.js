// /ui/sse: submit a job, follow its events over SSE, reconnect with the last seen id.
"use strict";

(() => {
  const { $, el, loadConfig, errorMessage } = window.tq;
  const EVENT_TYPES = [
    "queued", "waiting", "started", "delta", "progress", "completed", "failed", "cancelled",
  ];
  const STATUS = {
    queued: "queued", waiting: "waiting", started: "running", delta: "running",
    progress: "running", completed: "completed", cancelled: "cancelled",
  };

  let config = null;
  let job = null; // the 202 answer plus the experience it was submitted with
  let source = null; // the EventSource in use (events of older ones are ignored)
  let t0 = 0; // performance.now() at submit
  let lastId = null; // SSE id (log entry id) of the last event seen
  let seqs = []; // every seq received, in arrival order
  let text = "";
  let connections = 0;
  let finished = false;

  const selected = (name) => document.querySelector(`input[name="${name}"]:checked`).value;

  function setStatus(status) {
    $("status").textContent = status;
    $("status").dataset.status = status;
  }

  function setConnection(state) {
    $("connection").dataset.state = state;
    $("connection").textContent = connections > 1 ? `${state} (connection ${connections})` : state;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function setCheck(id, state, message) {
    $(id).dataset.state = state;
    $(id).textContent = message;
  }

  // ---- form ------------------------------------------------------------------------------

  function fillServices() {
    const experience = selected("experience");
    const select = $("service");
    const previous = select.value;
    select.replaceChildren();
    for (const [name, service] of Object.entries(config.services)) {
      if (service.experiences.includes(experience)) select.append(el("option", { value: name }, name));
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    $("image-url-row").hidden = experience !== "vision";
    fillModels();
  }

  function fillModels() {
    const experience = selected("experience");
    const service = config.services[$("service").value];
    const select = $("model");
    const previous = select.value;
    select.replaceChildren();
    for (const name of service ? service.models : []) {
      const model = config.models[name];
      if (!model || model.experiences.includes(experience)) select.append(el("option", { value: name }, name));
    }
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  }

  function requestBody() {
    const experience = selected("experience");
    const input = { prompt: $("prompt").value };
    if (experience === "vision" && $("image-url").value.trim()) input.images = [$("image-url").value.trim()];
    const raw = $("simulate").value.trim();
    if (raw) input.simulate = JSON.parse(raw); // SyntaxError is reported by the caller
    return {
      service: $("service").value,
      experience,
      mode: selected("mode"),
      model: $("model").value,
      input,
    };
  }

  // ---- job and events --------------------------------------------------------------------

  function resetJob() {
    closeSource();
    job = null;
    lastId = null;
    seqs = [];
    text = "";
    connections = 0;
    finished = false;
    for (const id of ["job-id", "queue-id", "tier"]) $(id).textContent = "—";
    delete $("job-id").dataset.eventsToken;
    $("reconnects").textContent = "0";
    $("text").textContent = "";
    $("event-rows").replaceChildren();
    $("event-count").textContent = "0";
    $("reconnect").disabled = true;
    setCheck("seq-check", "none", "—");
    setCheck("text-check", "none", "—");
    setConnection("closed");
    showError("");
  }

  async function submit(event) {
    event.preventDefault();
    resetJob();
    let body;
    try {
      body = requestBody();
    } catch (err) {
      showError(`simulate is not valid JSON: ${err.message}`);
      return;
    }
    setStatus("submitting");
    $("submit").disabled = true;
    t0 = performance.now();
    let res;
    try {
      res = await fetch("/api/jobs", {
        method: "POST",
        headers: {
          "Content-Type": "application/json",
          Authorization: `Bearer ${$("api-key").value.trim()}`,
        },
        body: JSON.stringify(body),
      });
    } catch (err) {
      setStatus("error");
      showError(`network error: ${err.message}`);
      return;
    } finally {
      $("submit").disabled = false;
    }
    if (res.status !== 202) {
      setStatus("rejected");
      showError(await errorMessage(res));
      return;
    }
    job = { ...(await res.json()), experience: body.experience };
    $("job-id").textContent = job.jobId;
    $("job-id").dataset.eventsToken = job.eventsToken;
    $("queue-id").textContent = job.queueId;
    $("tier").textContent = job.tier;
    setStatus("submitted");
    addMarker("submitted", `submitted: 202 after ${Math.round(performance.now() - t0)} ms`);
    $("reconnect").disabled = false;
    openSource(null);
  }

  function openSource(after) {
    // EventSource cannot set Last-Event-ID on a new connection: the server reads ?lastEventId=.
    const params = new URLSearchParams({ token: job.eventsToken });
    if (after) params.set("lastEventId", after);
    const sep = job.eventsUrl.includes("?") ? "&" : "?";
    const es = new EventSource(`${job.eventsUrl}${sep}${params}`);
    source = es;
    connections += 1;
    setConnection("connecting");
    es.onopen = () => {
      if (source === es) setConnection("open");
    };
    es.onerror = () => {
      if (source !== es) return;
      // CONNECTING: the browser retries by itself (sending Last-Event-ID); CLOSED: it gave up.
      setConnection(es.readyState === EventSource.CLOSED ? "failed" : "retrying");
    };
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (message) => {
        if (source === es) onEvent(message);
      });
    }
  }

  function closeSource() {
    if (source) source.close();
    source = null;
  }

  function reconnect() {
    if (!job || finished) return;
    closeSource();
    $("reconnects").textContent = String(connections);
    addMarker("reconnect", `reconnect with lastEventId=${lastId || "(none)"}`);
    openSource(lastId);
  }

  function isTerminal(data) {
    return data.type === "completed" || data.type === "cancelled" || (data.type === "failed" && !data.retryable);
  }

  function detail(data) {
    switch (data.type) {
      case "queued": return `${data.queueId} (${data.tier})`;
      case "waiting": return `guard=${data.guard}${data.position != null ? ` position=${data.position}` : ""}`;
      case "started": return `attempt ${data.attempt}`;
      case "delta": return JSON.stringify(data.text);
      case "progress": return `${Math.round(data.value * 100)}%`;
      case "completed": return `usage ${JSON.stringify(data.usage)}`;
      case "failed": return `${data.code}: ${data.message}${data.retryable ? " (retryable)" : ""}`;
      default: return "";
    }
  }

  function addMarker(kind, label) {
    const ms = Math.round(performance.now() - t0);
    $("event-rows").append(
      el("tr", { className: `marker ${kind}` }, el("td", { className: "num" }, String(ms)), el("td", { colSpan: 4 }, label)),
    );
  }

  function onEvent(message) {
    const data = JSON.parse(message.data);
    const ms = Math.round(performance.now() - t0);
    lastId = message.lastEventId;
    seqs.push(data.seq);
    $("event-rows").append(
      el(
        "tr",
        { className: `ev ev-${data.type}`, dataset: { seq: data.seq, type: data.type, id: lastId } },
        el("td", { className: "num" }, String(ms)),
        el("td", { className: "num" }, String(data.seq)),
        el("td", {}, el("span", { className: `type type-${data.type}` }, data.type)),
        el("td", { className: "mono" }, lastId),
        el("td", { className: "detail" }, detail(data)),
      ),
    );
    $("event-count").textContent = String(seqs.length);
    if (data.type === "started") text = ""; // a new attempt starts its text over
    if (data.type === "delta") text += data.text;
    if (data.type === "completed" && job.experience !== "stream") text = data.result;
    $("text").textContent = text;
    setStatus(data.type === "failed" ? (data.retryable ? "retrying" : "failed") : STATUS[data.type]);
    checkSeqs();
    if (data.type === "completed") checkText(data.result);
    if (isTerminal(data)) {
      finished = true;
      closeSource();
      setConnection("done");
      $("reconnect").disabled = true;
    }
  }

  // Every event exactly once: the seqs seen must be 1..N with no gap and no repeat.
  function checkSeqs() {
    for (let i = 0; i < seqs.length; i += 1) {
      if (seqs[i] !== i + 1) {
        const why = seqs[i] <= i ? `seq ${seqs[i]} repeated` : `seq ${i + 1} missing`;
        setCheck("seq-check", "fail", `FAIL: ${why} (at event ${i + 1})`);
        return;
      }
    }
    setCheck("seq-check", "ok", `ok 1..${seqs.length} contiguous`);
  }

  function checkText(result) {
    if (job.experience !== "stream") {
      setCheck("text-check", "na", "n/a (no deltas outside stream)");
    } else if (text === result) {
      setCheck("text-check", "ok", "ok: deltas = result");
    } else {
      setCheck("text-check", "fail", "FAIL: deltas differ from result");
    }
  }

  // ---- start -----------------------------------------------------------------------------

  async function start() {
    try {
      config = await loadConfig();
    } catch (err) {
      showError(`could not load /ui/config.json: ${err.message}`);
      return;
    }
    if (config.devMode && config.devKeys) {
      $("api-key").value = config.devKeys.paid;
      $("dev-badge").hidden = false;
      $("key-presets").hidden = false;
      $("use-paid-key").onclick = () => { $("api-key").value = config.devKeys.paid; };
      $("use-free-key").onclick = () => { $("api-key").value = config.devKeys.free; };
    }
    for (const radio of document.querySelectorAll('input[name="experience"]')) {
      radio.addEventListener("change", fillServices);
    }
    $("service").addEventListener("change", fillModels);
    $("job-form").addEventListener("submit", submit);
    $("reconnect").addEventListener("click", reconnect);
    fillServices();
    document.body.dataset.ready = "true";
  }

  start();
})();
