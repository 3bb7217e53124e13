// The llmmesh playground: a page over the mesh's public HTTP API only.
// GET /v1/mesh/models fills the model menu; POST /v1/generate_stream streams
// an answer as Server-Sent Events, read with fetch and a stream reader, and
// aborting the fetch (Stop) ends the generation in the backend too.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "llmmesh.apiKey";
  const UNSPECIFIED = "FINISH_REASON_UNSPECIFIED";
  const ERROR = "FINISH_REASON_ERROR";

  const FINISH = {
    FINISH_REASON_LENGTH: "length limit",
    FINISH_REASON_EOS_TOKEN: "end of answer",
    FINISH_REASON_STOP_SEQUENCE: "stop sequence",
    FINISH_REASON_ERROR: "error",
  };

  const SCENARIO_HINTS = {
    chat: "A conversation: each message is sent with the turns before it.",
    qa: "Each message is a question on its own, answered concisely.",
    summarize: "Paste a text: each message is summarized on its own.",
    rewrite: "Paste a text: each message is rewritten on its own.",
    raw: "The text goes to the model as it is, with no chat template.",
  };

  // Request fields the mesh may name in a BadRequest, and the control for each.
  const FIELDS = {
    "parameters.max_new_tokens": "max_new_tokens",
    "parameters.temperature": "temperature",
    "parameters.top_p": "top_p",
    inputs: "prompt",
    messages: "prompt",
    model_id: "model",
    scenario: "scenario",
  };

  const ui = {
    model: $("model"),
    compare: $("compare"),
    scenario: $("scenario"),
    modelInfo: $("model-info"),
    scenarioInfo: $("scenario-info"),
    panes: $("panes"),
    composer: $("composer"),
    prompt: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    clear: $("clear"),
    key: $("api-key"),
    keyPanel: $("key-panel"),
    settings: $("settings"),
    template: $("pane-template"),
  };

  let models = [];
  let panes = [];
  let running = null; // the AbortController of the answers being streamed

  // ---- the API ----

  function headers() {
    const out = { "Content-Type": "application/json" };
    const key = ui.key.value.trim();
    if (key) out.Authorization = `Bearer ${key}`;
    return out;
  }

  // The {code, message, details} body of an error response, or what can be made of it.
  async function errorBody(resp) {
    const text = await resp.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && typeof body === "object") return body;
    } catch (_) {
      // not JSON: an intermediary's page, say
    }
    return { message: text.trim().slice(0, 300) || resp.statusText, details: [] };
  }

  function detail(body, type) {
    const list = Array.isArray(body.details) ? body.details : [];
    return list.find((d) => typeof d["@type"] === "string" && d["@type"].endsWith(type));
  }

  function labelOf(field) {
    const id = FIELDS[field];
    const label = id && document.querySelector(`label[for="${id}"]`);
    return label ? label.textContent : field;
  }

  // An error response in plain words: {title, message, fields}.
  function describe(status, body) {
    const info = detail(body, "google.rpc.ErrorInfo") || {};
    const bad = detail(body, "google.rpc.BadRequest");
    const retry = detail(body, "google.rpc.RetryInfo");
    const reason = info.reason || "";
    const message = String(body.message || "");
    const violations = (bad && bad.field_violations) || [];
    const fields = violations.map((v) => FIELDS[v.field]).filter(Boolean);
    if (status === 400 && violations.length) {
      const what = violations.map((v) => `${labelOf(v.field)} ${v.description}`);
      return { title: `Please check: ${what.join("; ")}.`, message: "", fields };
    }
    if (status === 413) {
      return { title: "The text is too long for the mesh (1 MiB at most).", message, fields: ["prompt"] };
    }
    if (status === 400) {
      return { title: "The mesh refused this request.", message, fields };
    }
    if (status === 401 || reason === "UNAUTHENTICATED") {
      return {
        title: "This mesh needs an API key: enter it under “API key” at the top.",
        message, fields: ["api-key"], auth: true,
      };
    }
    if (status === 403) return { title: "This API key is not allowed to do that.", message, fields };
    if (status === 404) {
      return { title: "That model is not served here (any more).", message, fields: ["model"] };
    }
    if (status === 429) {
      const seconds = retry ? Math.max(1, Math.ceil(parseFloat(retry.retry_delay) || 1)) : 1;
      return { title: `The model is busy. Retry in ${seconds} s.`, message, fields };
    }
    if (status === 503 && reason === "MODEL_UNAVAILABLE") {
      // Which model, and since when (the router's ErrorInfo metadata).
      const meta = info.metadata || {};
      const model = meta.model_id ? `Model ${meta.model_id}` : "This model";
      const since = meta.down_since ? new Date(meta.down_since) : null;
      const when = since && !isNaN(since) ? ` since ${since.toLocaleTimeString()}` : "";
      return { title: `${model} is down: no replica has served it${when}. Try again shortly, or pick another model.`, message, fields };
    }
    if (status === 503 && reason === "BACKEND_UNAVAILABLE") {
      return { title: "This model is down: its inference server cannot be reached.", message, fields };
    }
    if (status === 503) {
      return { title: "The mesh is unavailable right now. Try again shortly.", message, fields };
    }
    if (status === 504) return { title: "No answer before the deadline.", message, fields };
    if (status === 500) return { title: "The model failed while generating.", message, fields };
    return { title: `The mesh answered with an error (HTTP ${status}).`, message, fields };
  }

  // An in-band error event (the stream had already started) in plain words.
  function describeInBand(error) {
    const reason = (error && error.reason) || "";
    const message = (error && error.message) || "";
    const titles = {
      INCOMPLETE_GENERATION: "The answer was cut off: the model's server stopped before the end.",
      BACKEND_UNAVAILABLE: "The answer was cut off: the model's server went away.",
      MODEL_UNAVAILABLE: "The answer was cut off: the model went down.",
      TIMEOUT: "The answer was cut off at the deadline.",
      MODEL_ERROR: "The model failed while generating.",
    };
    return { title: titles[reason] || "The answer was cut off by an error.", message, fields: [] };
  }

  // ---- models ----

  async function loadModels() {
    let resp;
    try {
      resp = await fetch("/v1/mesh/models", { headers: headers() });
    } catch (err) {
      ui.modelInfo.textContent = "The mesh cannot be reached.";
      return;
    }
    if (!resp.ok) {
      const problem = describe(resp.status, await errorBody(resp));
      ui.modelInfo.textContent = resp.status === 404
        ? "This mesh has no model listing at /v1/mesh/models." : problem.title;
      if (problem.auth) ui.keyPanel.open = true;
      return;
    }
    const data = await resp.json();
    models = Array.isArray(data.models) ? data.models : [];
    fillMenu(ui.model, models, false);
    fillMenu(ui.compare, models, true);
    showModel();
    syncPanes();
  }

  function fillMenu(select, list, withNone) {
    const keep = select.value;
    select.replaceChildren();
    if (withNone) select.append(new Option("(none)", ""));
    for (const m of list) {
      const down = m.ready ? "" : " (down)";
      select.append(new Option(`${m.id}${down}`, m.id));
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;
  }

  function limitOf(model, name) {
    const limits = model.limits || {};
    return limits[name] || model[name] || 0;
  }

  function showModel() {
    const m = models.find((x) => x.id === ui.model.value);
    if (!m) {
      ui.modelInfo.textContent = models.length ? "" : "No models are configured.";
      return;
    }
    const replicas = m.replicas || 0;
    const readyReplicas = m.ready_replicas || 0;
    const name = document.createElement("strong");
    name.textContent = m.name || m.id;
    const state = document.createElement("span");
    state.className = m.ready ? "state ready" : "state down";
    state.textContent = m.ready ? "ready" : "down";
    const parts = [`${readyReplicas} of ${replicas} replica${replicas === 1 ? "" : "s"} serving`];
    if (m.backend_model) parts.push(`backend ${m.backend_model}`);
    const maxNew = limitOf(m, "max_new_tokens");
    if (maxNew) {
      parts.push(`up to ${maxNew} new tokens`);
      $("max_new_tokens").max = String(maxNew);
    }
    ui.modelInfo.replaceChildren(name, document.createElement("br"), state, ` · ${parts.join(" · ")}`);
  }

  // ---- panes: one per model answering ----

  function paneModels() {
    const chosen = [ui.model.value];
    if (ui.compare.value) chosen.push(ui.compare.value);
    return chosen.filter(Boolean);
  }

  function syncPanes() {
    const chosen = paneModels();
    while (panes.length > chosen.length) panes.pop().el.remove();
    while (panes.length < chosen.length) {
      const el = ui.template.content.firstElementChild.cloneNode(true);
      ui.panes.append(el);
      panes.push({ el, log: el.querySelector(".log"), title: el.querySelector(".pane-title"), history: [] });
    }
    panes.forEach((pane, i) => {
      pane.model = chosen[i];
      const m = models.find((x) => x.id === pane.model);
      pane.title.textContent = m && m.name ? `${m.id} · ${m.name}` : pane.model;
      pane.el.dataset.model = pane.model;
      if (!pane.log.children.length) {
        const empty = document.createElement("p");
        empty.className = "empty";
        empty.textContent = `Answers from ${pane.model} appear here.`;
        pane.log.append(empty);
      }
    });
    ui.panes.classList.toggle("two", panes.length > 1);
  }

  function clearConversation() {
    for (const pane of panes) {
      pane.history = [];
      pane.log.replaceChildren();
    }
    syncPanes();
    ui.prompt.focus();
  }

  // ---- one answer ----

  function bubble(pane, role, text) {
    pane.log.querySelector(".empty")?.remove();
    const el = document.createElement("div");
    el.className = `msg ${role}`;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "You" : pane.model;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    el.append(who, body);
    pane.log.append(el);
    return el;
  }

  function showStats(answer, figures) {
    const dl = document.createElement("dl");
    dl.className = "stats";
    for (const [name, value, key] of figures) {
      const item = document.createElement("div");
      item.dataset.stat = key;
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      item.append(dt, dd);
      dl.append(item);
    }
    answer.append(dl);
  }

  function showProblem(answer, problem) {
    const box = document.createElement("div");
    box.className = "problem";
    box.setAttribute("role", "alert");
    const title = document.createElement("strong");
    title.textContent = problem.title;
    box.append(title);
    if (problem.message) {
      const more = document.createElement("p");
      more.textContent = problem.message;
      box.append(more);
    }
    answer.append(box);
    for (const id of problem.fields || []) $(id)?.setAttribute("aria-invalid", "true");
    if (problem.auth) {
      ui.keyPanel.open = true;
    }
  }

  function parameters() {
    const out = {};
    for (const name of ["max_new_tokens", "temperature", "top_p"]) {
      const raw = $(name).value.trim();
      if (raw === "") continue;
      out[name] = Number(raw);
    }
    return out;
  }

  // Split Server-Sent Events off `buffer`; returns [events, rest].
  function takeEvents(buffer) {
    const events = [];
    let at;
    while ((at = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, at);
      buffer = buffer.slice(at).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) events.push(JSON.parse(data));
    }
    return [events, buffer];
  }

  async function ask(pane, text, scenario, params, signal) {
    const model = pane.model;
    bubble(pane, "user", text);
    const answer = bubble(pane, "assistant", "");
    const out = answer.querySelector(".text");
    answer.dataset.state = "streaming";
    // Screen readers announce the answer once it is complete, not each token.
    answer.setAttribute("aria-busy", "true");
    const body = { model_id: model, scenario, parameters: params };
    if (scenario === "chat") {
      body.messages = [...pane.history, { role: "user", content: text }];
    } else {
      body.inputs = text;
    }

    const started = performance.now();
    let first = null;
    let tokens = 0;
    let final = null;
    let steps = 0;
    let state = "done";
    try {
      const resp = await fetch("/v1/generate_stream", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal,
      });
      if (!resp.ok) {
        const problem = describe(resp.status, await errorBody(resp));
        showProblem(answer, problem);
        answer.dataset.state = "error";
        answer.dataset.status = String(resp.status);
        answer.removeAttribute("aria-busy");
        if (resp.status === 404 || resp.status === 503) loadModels();
        return;
      }
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let events;
        [events, buffer] = takeEvents(buffer + value);
        for (const raw of events) {
          const event = { text: "", tokens: 0, finish_reason: UNSPECIFIED, ...raw };
          if (event.text) {
            if (first === null) first = performance.now();
            out.textContent += event.text;
            pane.log.scrollTop = pane.log.scrollHeight;
            steps += 1;
            answer.dataset.steps = String(steps);
          }
          if (event.tokens) tokens = event.tokens;
          if (event.finish_reason !== UNSPECIFIED) final = event;
        }
      }
    } catch (err) {
      if (err.name === "AbortError") {
        state = "stopped";
      } else {
        showProblem(answer, { title: "The connection to the mesh broke off.", message: String(err.message || err) });
        state = "error";
      }
    }
    const ended = performance.now();

    if (final && final.finish_reason === ERROR) {
      showProblem(answer, describeInBand(final.error));
      state = "error";
    } else if (!final && state === "done") {
      showProblem(answer, { title: "The stream ended before the answer was complete.", message: "" });
      state = "error";
    }
    if (final && final.tokens) tokens = final.tokens;
    const decode = first !== null && tokens > 1 && ended > first
      ? ((tokens - 1) * 1000) / (ended - first) : null;
    const finish = state === "stopped" ? "stopped" : final ? (FINISH[final.finish_reason] || final.finish_reason) : "incomplete";
    showStats(answer, [
      ["Input tokens", final && final.input_tokens ? String(final.input_tokens) : "–", "input"],
      ["Output tokens", String(tokens), "output"],
      ["Time to first token", first === null ? "–" : `${Math.round(first - started)} ms`, "ttft"],
      ["Tokens/s", decode === null ? "–" : decode.toFixed(1), "rate"],
      ["Finish", finish, "finish"],
    ]);
    answer.dataset.state = state;
    answer.removeAttribute("aria-busy");
    if (scenario === "chat" && out.textContent) {
      pane.history.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
    }
  }

  async function send() {
    const text = ui.prompt.value.trim();
    if (!text || running || !panes.length) return;
    for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    const scenario = ui.scenario.value;
    const params = parameters();
    running = new AbortController();
    setBusy(true);
    ui.prompt.value = "";
    try {
      await Promise.all(panes.map((pane) => ask(pane, text, scenario, params, running.signal)));
    } finally {
      running = null;
      setBusy(false);
    }
  }

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    // The answering models and the scenario stay as they are until the end.
    for (const menu of [ui.model, ui.compare, ui.scenario]) menu.disabled = busy;
    document.body.classList.toggle("busy", busy);
    if (busy) ui.stop.focus();
    else ui.prompt.focus();
  }

  function stop() {
    if (running) running.abort();
  }

  // ---- wiring ----

  ui.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.settings.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && running) stop();
  });
  ui.stop.addEventListener("click", stop);
  ui.clear.addEventListener("click", clearConversation);
  ui.model.addEventListener("change", () => { showModel(); syncPanes(); });
  ui.compare.addEventListener("change", syncPanes);
  ui.scenario.addEventListener("change", () => {
    ui.scenarioInfo.textContent = SCENARIO_HINTS[ui.scenario.value] || "";
  });
  // The key lives in sessionStorage: this tab only, gone when it closes.
  function applyKey() {
    const key = ui.key.value.trim();
    if (key === (sessionStorage.getItem(KEY_STORE) || "")) return;
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
    ui.key.removeAttribute("aria-invalid");
    loadModels();
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    applyKey();
  });
  ui.key.addEventListener("change", applyKey);

  ui.key.value = sessionStorage.getItem(KEY_STORE) || "";
  ui.scenarioInfo.textContent = SCENARIO_HINTS[ui.scenario.value];
  loadModels();
})();
