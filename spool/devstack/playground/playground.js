// Spool playground: plain JavaScript, no build step, no dependencies.
//
// Flow: (optional) POST /v1/contexts with the pasted / dropped files, POST /v1/jobs, then
// new EventSource(job.links.events). The browser's EventSource reconnects by itself whenever a
// stream ends early (time limit) or is cut ("Drop connection"), sending Last-Event-ID; the page
// checks that the next id is exactly last + 1, so a resume that lost or repeated anything shows.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(window.location.search);
  const MAX_FILE_BYTES = 5 * 1024 * 1024;
  const SKIP_DIRS = new Set([".git", "node_modules", "__pycache__", ".venv", ".mypy_cache", ".ruff_cache"]);

  // What tests (and the curious, from the console) can read: one object, updated in place.
  const state = {
    jobId: null,
    job: null, // the latest job resource seen (202 answer, status polls, final GET)
    model: null,
    contextId: null,
    lastEventId: 0, // the last chunk's sequence_id the page accepted
    text: "",
    chunks: 0,
    status: null, // the job's status
    connection: "idle", // idle | connecting | open | reconnecting | closed | failed
    opens: 0,
    done: false,
    doneData: null, // the `done` event's data
    reconnects: [], // {after, next, ok, cause}: one per resumed connection
    drops: [], // {after, dropped}: one per "Drop connection" click
    gaps: [], // {after, next}: should stay empty
    duplicates: [], // sequence ids received twice (ignored): should stay empty
    events: [], // every SSE event and connection change: {type, id}
    errors: [], // every error shown: {code, message}
    verified: null, // true / false once the streamed text is compared with the job's output
    inputTokens: null,
    modelsLoaded: false,
    log: [],
    // A context whose POST would be larger than this goes through a presigned upload instead: what a
    // Lambda invocation takes (6 MiB, the body escaped inside the event), less room for the rest.
    directUploadBytes: 6 * 1024 * 1024 - 64 * 1024,
  };
  window.playground = state;

  let models = new Map();
  let files = []; // {path, content, size}
  let skipped = []; // {path, reason}: the files of the last batch this page did not add
  let uploaded = null; // {signature, context}: the context made from the current files
  let stream = null;
  let pollTimer = null;
  let pendingResume = null; // {after, cause}: set when a reconnected stream opens
  let lostCause = null; // why the current connection ended, as seen by onerror
  let dropPending = false;
  let firstChunkAt = null;
  let lastChunkAt = null;
  let answerText = null;

  class ApiError extends Error {
    constructor(error) {
      super(error.message || "Request failed");
      this.error = error;
    }
  }

  // ------------------------------------------------------------------ helpers
  function apiBase() {
    const value = $("api").value.trim().replace(/\/+$/, "");
    return value || window.location.origin;
  }

  function apiKey() {
    return $("key").value.trim();
  }

  function uuid() {
    if (window.crypto && typeof window.crypto.randomUUID === "function") return window.crypto.randomUUID();
    const bytes = window.crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
  }

  async function api(method, path, { body, headers } = {}) {
    const url = apiBase() + path;
    const init = { method, headers: { Authorization: `Bearer ${apiKey()}`, ...(headers || {}) } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    let response;
    try {
      response = await fetch(url, init);
    } catch (exc) {
      throw new ApiError({
        code: "network_error",
        message: `Could not reach ${url} (${exc.message})`,
        suggestions: [
          "Check the API base URL and that `spool dev` is running",
          "A page on another origin needs the stack to allow it (SPOOL_CORS_ORIGINS)",
        ],
      });
    }
    const raw = await response.text();
    let data = null;
    if (raw) {
      try {
        data = JSON.parse(raw);
      } catch {
        data = null;
      }
    }
    if (!response.ok) {
      const error =
        data && data.error
          ? { ...data.error }
          : {
              code: `http_${response.status}`,
              message: `${method} ${path} answered ${response.status} ${response.statusText} with no error body`,
              suggestions: [],
            };
      error.status = response.status;
      error.request_id = error.request_id || response.headers.get("X-Request-Id");
      throw new ApiError(error);
    }
    return data;
  }

  function fmtInt(n) {
    return Number(n || 0).toLocaleString("en-US");
  }

  function fmtUsd(v) {
    const n = Number(v || 0);
    return `$${n < 0.01 ? n.toFixed(6) : n.toFixed(4)}`;
  }

  function fmtPrice(v) {
    return `$${Number(v).toFixed(2)}`;
  }

  function clock() {
    const d = new Date();
    const p = (n, w = 2) => String(n).padStart(w, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }

  function log(message, level = "") {
    state.log.push({ message, level });
    const item = document.createElement("li");
    const time = document.createElement("span");
    time.className = "time";
    time.textContent = clock();
    const text = document.createElement("span");
    if (level) text.className = level;
    text.textContent = message;
    item.append(time, text);
    const list = $("log");
    const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
    list.append(item);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  // ------------------------------------------------------------------ errors
  function showError(exc, what) {
    const error = exc instanceof ApiError ? exc.error : { code: "error", message: String(exc && exc.message ? exc.message : exc) };
    state.errors.push({ code: error.code, message: error.message });
    const box = $("error");
    box.replaceChildren();
    const title = document.createElement("p");
    const strong = document.createElement("strong");
    strong.textContent = what ? `${what}: ` : "";
    title.append(strong, document.createTextNode(error.message || "Request failed"));
    box.append(title);
    const suggestions = Array.isArray(error.suggestions) ? error.suggestions : [];
    if (suggestions.length) {
      const list = document.createElement("ul");
      list.className = "suggestions";
      for (const suggestion of suggestions) {
        const item = document.createElement("li");
        item.textContent = suggestion;
        list.append(item);
      }
      box.append(list);
    }
    const meta = document.createElement("p");
    meta.className = "meta";
    const parts = [`code ${error.code}`];
    if (error.status) parts.push(`HTTP ${error.status}`);
    if (error.details && Object.keys(error.details).length) parts.push(`details ${JSON.stringify(error.details)}`);
    if (error.request_id) parts.push(`request ${error.request_id}`);
    meta.textContent = parts.join(" · ");
    box.append(meta);
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  // ------------------------------------------------------------------ models
  async function loadModels(current = () => true) {
    const data = await api("GET", "/v1/models");
    if (!current()) return;
    const list = (data && (data.models || data.data)) || [];
    models = new Map(list.map((m) => [m.id, m]));
    const select = $("model");
    const wanted = (!state.modelsLoaded && params.get("model")) || select.value || "sim-realtime";
    select.replaceChildren();
    for (const model of list) {
      const option = document.createElement("option");
      option.value = model.id;
      const price = model.pricing
        ? ` · ${fmtPrice(model.pricing.input_per_mtok)} / ${fmtPrice(model.pricing.output_per_mtok)} per M tokens`
        : "";
      const status = model.status && model.status !== "available" ? ` [${model.status}]` : "";
      option.textContent = `${model.id}${price}${status}`;
      select.append(option);
    }
    if (models.has(wanted)) select.value = wanted;
    else if (models.has("sim-realtime")) select.value = "sim-realtime";
    describeModel();
    state.modelsLoaded = true;
  }

  function describeModel() {
    const model = models.get($("model").value);
    if (!model) {
      $("model-info").textContent = "";
      return;
    }
    const bits = [`${model.provider || "provider ?"}`, `${fmtInt(model.context_window)}-token window`];
    if (model.aliases && model.aliases.length) bits.push(`aliases ${model.aliases.join(", ")}`);
    if (model.fallbacks && model.fallbacks.length) bits.push(`falls back to ${model.fallbacks.join(" → ")}`);
    if (model.pricing) {
      bits.push(`input ${fmtPrice(model.pricing.input_per_mtok)}, output ${fmtPrice(model.pricing.output_per_mtok)} per million tokens`);
    }
    if (model.status) bits.push(model.status);
    $("model-info").textContent = bits.join(" · ");
  }

  // ------------------------------------------------------------------ context files
  function addFile(path, content) {
    const clean = path.trim().replace(/^\.?\/+/, "");
    if (!clean) throw new ApiError({ code: "invalid_path", message: "Give the pasted file a path, e.g. src/app.py" });
    files = files.filter((f) => f.path !== clean);
    files.push({ path: clean, content, size: new Blob([content]).size });
    renderFiles();
  }

  function renderFiles() {
    const list = $("context-files");
    list.replaceChildren();
    for (const file of files) {
      const item = document.createElement("li");
      const name = document.createElement("span");
      name.textContent = file.path;
      const size = document.createElement("span");
      size.className = "size";
      size.textContent = `${fmtInt(file.size)} B`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "✕";
      remove.setAttribute("aria-label", `Remove ${file.path}`);
      remove.addEventListener("click", () => {
        files = files.filter((f) => f !== file);
        renderFiles();
      });
      item.append(name, size, remove);
      list.append(item);
    }
    describeContext();
  }

  function signature() {
    return JSON.stringify(files.map((f) => [f.path, f.content]));
  }

  function describeContext() {
    const el = $("context");
    const notAdded = skipped.length
      ? ` Not added: ${skipped.map((s) => `${s.path} (${s.reason})`).join(", ")}.`
      : "";
    if (!files.length) {
      el.textContent = `No context: the question is sent on its own.${notAdded}`;
    } else if (uploaded && uploaded.signature === signature()) {
      const c = uploaded.context;
      el.textContent = `Context ${c.context_id} v${c.version}: ${fmtInt(c.file_count)} file(s), ${fmtInt(c.token_count)} tokens, ${fmtInt(c.size_bytes)} bytes.`;
    } else {
      const bytes = files.reduce((n, f) => n + f.size, 0);
      el.textContent = `${files.length} file(s), ${fmtInt(bytes)} bytes: uploaded as a context when you ask.${notAdded}`;
    }
    el.classList.toggle("warn", skipped.length > 0);
  }

  // A new batch of files (chosen or dropped): what it skips is said beside the context, not only in
  // the stream's log at the bottom of the page (a file too large was dropped and the question asked
  // without it, the context panel saying "No context").
  async function addBatch(add) {
    skipped = [];
    try {
      await add();
    } finally {
      describeContext();
    }
  }

  function addPasted() {
    const content = $("paste-content").value;
    if (!content) return false;
    addFile($("paste-path").value, content);
    $("paste-content").value = "";
    return true;
  }

  async function addBrowserFile(file, path) {
    if (file.size > MAX_FILE_BYTES) {
      const reason = `${fmtInt(file.size)} bytes, more than the ${fmtInt(MAX_FILE_BYTES)} this page reads; use the spool CLI`;
      log(`skipped ${path}: ${reason}`, "warn");
      skipped.push({ path, reason });
      return;
    }
    const content = await file.text();
    if (content.includes("\u0000")) {
      log(`skipped ${path}: binary file`, "warn");
      skipped.push({ path, reason: "binary" });
      return;
    }
    addFile(path, content);
  }

  async function walkEntry(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      await addBrowserFile(file, prefix + entry.name);
    } else if (entry.isDirectory && !SKIP_DIRS.has(entry.name)) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walkEntry(child, `${prefix}${entry.name}/`);
      }
    }
  }

  async function addDropped(dataTransfer) {
    // The items are only readable during the event: take the entries before the first await.
    const items = [...(dataTransfer.items || [])].filter((item) => item.kind === "file");
    const entries = items.map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
    const plain = [...(dataTransfer.files || [])];
    const before = files.length;
    if (entries.length && entries.every(Boolean)) {
      for (const entry of entries) await walkEntry(entry, "");
    } else {
      for (const file of plain) await addBrowserFile(file, file.webkitRelativePath || file.name);
    }
    log(`context: ${files.length - before} file(s) added, ${files.length} in all`);
  }

  // A context in one POST, or (too large for a request) through a presigned upload, as the CLI does.
  async function createContext(doc) {
    const text = JSON.stringify(doc);
    if (new Blob([JSON.stringify(text)]).size <= state.directUploadBytes) {
      return api("POST", "/v1/contexts", { body: doc });
    }
    const upload = await api("POST", "/v1/contexts/uploads");
    const size = new Blob([text]).size;
    if (upload.max_bytes && size > upload.max_bytes) {
      throw new ApiError({
        code: "payload_too_large",
        message: `The context document is ${fmtInt(size)} bytes; an upload holds at most ${fmtInt(upload.max_bytes)}`,
        suggestions: ["Remove files from the context"],
      });
    }
    log(`context: ${fmtInt(size)} bytes, uploading to its presigned URL`);
    let put;
    try {
      put = await fetch(upload.upload_url, { method: "PUT", body: text });
    } catch (exc) {
      throw new ApiError({
        code: "network_error",
        message: `Could not upload the context (${exc.message})`,
        suggestions: ["Check that the page's origin may reach the bucket (CORS)"],
      });
    }
    if (!put.ok) {
      throw new ApiError({
        code: `http_${put.status}`,
        message: `The context's upload answered ${put.status} ${put.statusText}`,
        suggestions: ["Ask again: the upload URL may have expired"],
      });
    }
    return api("POST", "/v1/contexts", { body: { upload_id: upload.upload_id } });
  }

  async function ensureContext() {
    const sig = signature();
    if (uploaded && uploaded.signature === sig) return uploaded.context.context_id;
    const context = await createContext({ files: files.map(({ path, content }) => ({ path, content })) });
    uploaded = { signature: sig, context };
    log(`context ${context.context_id} v${context.version}: ${context.file_count} file(s), ${fmtInt(context.token_count)} tokens`);
    describeContext();
    return context.context_id;
  }

  // ------------------------------------------------------------------ status line
  function setConnection(value) {
    state.connection = value;
    state.events.push({ type: "connection", id: value });
    renderStatus();
  }

  function outputTokens() {
    if (state.doneData && state.doneData.usage) return { n: state.doneData.usage.output_tokens || 0, exact: true };
    const polled = state.job && state.job.progress ? state.job.progress.tokens_generated || 0 : 0;
    const guessed = Math.round(state.text.length / 4); // about four characters a token
    return polled > 0 ? { n: polled, exact: true } : { n: guessed, exact: false };
  }

  function renderStatus() {
    const box = $("status");
    const parts = [];
    const add = (id, label, value) => {
      const span = document.createElement("span");
      span.id = id;
      const l = document.createElement("span");
      l.className = "label";
      l.textContent = `${label} `;
      span.append(l, document.createTextNode(value));
      parts.push(span);
    };
    const connection = document.createElement("span");
    connection.className = "state";
    connection.id = "status-connection";
    connection.dataset.state = state.connection;
    connection.textContent =
      state.connection === "reconnecting" ? `reconnecting (Last-Event-ID: ${state.lastEventId})` : state.connection;
    parts.push(connection);
    if (state.jobId) {
      add("status-job", "job", state.status || "…");
      const tokens = outputTokens();
      add("status-tokens", "tokens", `${tokens.exact ? "" : "~"}${fmtInt(tokens.n)}`);
      const end = state.done ? lastChunkAt : performance.now();
      const seconds = firstChunkAt !== null && end !== null ? (end - firstChunkAt) / 1000 : 0;
      add("status-rate", "tokens/s", seconds >= 1 ? (tokens.n / seconds).toFixed(1) : "–");
      add("status-cost", state.doneData ? "cost" : "cost so far", costText(tokens.n));
      add("status-last", "last id", String(state.lastEventId));
      add("status-reconnects", "reconnects", String(state.reconnects.length));
    }
    box.replaceChildren(...parts);
  }

  function costText(tokens) {
    if (state.doneData && typeof state.doneData.cost_usd === "number") return fmtUsd(state.doneData.cost_usd);
    const model = models.get((state.job && state.job.model && state.job.model.resolved) || state.model);
    if (!model || !model.pricing) return "–";
    const input = state.inputTokens || 0;
    const cost = (input * model.pricing.input_per_mtok + tokens * model.pricing.output_per_mtok) / 1e6;
    return `~${fmtUsd(cost)}`;
  }

  // ------------------------------------------------------------------ asking and streaming
  function resetRun() {
    if (stream) stream.close();
    stream = null;
    stopPolling();
    Object.assign(state, {
      jobId: null,
      job: null,
      lastEventId: 0,
      text: "",
      chunks: 0,
      status: null,
      opens: 0,
      done: false,
      doneData: null,
      reconnects: [],
      drops: [],
      gaps: [],
      duplicates: [],
      events: [],
      verified: null,
      inputTokens: null,
    });
    pendingResume = null;
    lostCause = null;
    dropPending = false;
    firstChunkAt = null;
    lastChunkAt = null;
    answerText = document.createTextNode("");
    $("answer").replaceChildren(answerText);
    $("verified").textContent = "";
    $("verified").className = "verified";
    $("log").replaceChildren();
    state.log = [];
    setConnection("idle");
  }

  function setRunning(running) {
    $("ask").disabled = running;
    $("drop").disabled = !running;
    $("cancel").disabled = !running;
  }

  async function ask() {
    clearError();
    const question = $("question").value.trim();
    if (!question) {
      showError(new ApiError({ code: "invalid_request", message: "Type a question first" }));
      return;
    }
    const maxTokens = parseInt($("max-tokens").value, 10);
    resetRun();
    setRunning(true);
    state.model = $("model").value;
    try {
      if (addPasted()) log("the pasted file was added to the context");
      const body = { message: question, model: state.model };
      if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
      if (files.length) body.context_id = state.contextId = await ensureContext();
      else state.contextId = null;
      const job = await api("POST", "/v1/jobs", { body, headers: { "Idempotency-Key": uuid() } });
      state.job = job;
      state.jobId = job.job_id;
      state.status = job.status;
      const fallback = job.model && job.model.resolved !== job.model.requested ? ` (resolved to ${job.model.resolved})` : "";
      log(`job ${job.job_id} ${job.status} on ${state.model}${fallback}`);
      countInput(body);
      openStream(job.links.events);
      startPolling();
    } catch (exc) {
      showError(exc, "Ask failed");
      setRunning(false);
      setConnection("idle");
    }
  }

  function countInput(body) {
    // For "cost so far": the input side, until the done event brings the real cost.
    const request = { model: body.model, messages: [{ role: "user", content: body.message }] };
    if (body.context_id) request.context_id = body.context_id;
    const jobId = state.jobId;
    api("POST", "/v1/tokens/count", { body: request })
      .then((counted) => {
        if (state.jobId === jobId) state.inputTokens = counted.input_tokens;
        renderStatus();
      })
      .catch(() => {});
  }

  function openStream(url) {
    const es = new EventSource(url);
    stream = es;
    setConnection("connecting");
    es.onopen = () => {
      if (es !== stream) return;
      state.opens += 1;
      if (state.opens > 1) {
        pendingResume = { after: state.lastEventId, cause: lostCause || "ended" };
        log(
          state.lastEventId
            ? `browser reconnected with Last-Event-ID: ${state.lastEventId}`
            : "browser reconnected (no event yet, so no Last-Event-ID: the stream starts over)",
        );
      } else {
        log(`stream open: GET ${url.replace(/token=[^&]+/, "token=…")}`);
      }
      lostCause = null;
      setConnection("open");
    };
    es.onerror = (event) => {
      if (es !== stream) return;
      if (event.data !== undefined) {
        // Spool's own `event: error` (the stream's key was revoked): say why, and stop here; the
        // browser would otherwise reconnect until a reconnect is refused.
        es.close();
        stream = null;
        const body = JSON.parse(event.data);
        setConnection("closed");
        showError(new ApiError({ ...body.error, status: 401 }), "Stream ended");
        log(`the server ended the stream: ${body.error.message}`, "bad");
        stopPolling();
        setRunning(false);
        return;
      }
      if (es.readyState === EventSource.CONNECTING) {
        lostCause = dropPending ? "dropped" : "ended";
        dropPending = false;
        // The page cannot tell a time limit from a network failure: both end the connection.
        const why = lostCause === "dropped" ? "dropped" : "ended by the server or the network";
        log(`connection ${why} after id ${state.lastEventId}; the browser reconnects by itself`, "warn");
        state.events.push({ type: "lost", id: state.lastEventId });
        setConnection("reconnecting");
      } else {
        setConnection("failed");
        log("the browser gave up on the stream (an HTTP error, not a dropped connection)", "bad");
        diagnoseStream(url);
      }
    };
    es.addEventListener("chunk", onChunk);
    es.addEventListener("done", onDone);
  }

  async function diagnoseStream(url) {
    // EventSource hides the status and body of a failed answer: ask again with fetch to show them.
    try {
      const response = await fetch(url, { headers: { Accept: "text/event-stream" } });
      const type = response.headers.get("Content-Type") || "";
      const data = type.includes("json") ? await response.json().catch(() => null) : null;
      if (!data && response.body) response.body.cancel().catch(() => {});
      if (data && data.error) showError(new ApiError({ ...data.error, status: response.status }), "Stream failed");
      else {
        const message = `the stream answered ${response.status} ${type || "with no Content-Type"}`;
        showError(new ApiError({ code: `http_${response.status}`, message }), "Stream failed");
      }
    } catch (exc) {
      showError(exc, "Stream failed");
    }
    stopPolling();
    setRunning(false);
  }

  function onChunk(event) {
    const data = JSON.parse(event.data);
    const seq = data.sequence_id;
    state.events.push({ type: "chunk", id: seq });
    if (String(seq) !== event.lastEventId) {
      log(`chunk ${seq} came with id "${event.lastEventId}"`, "bad");
    }
    if (seq <= state.lastEventId) {
      state.duplicates.push(seq);
      log(`DUPLICATE: chunk ${seq} again (already have up to ${state.lastEventId}); ignored`, "bad");
      return;
    }
    if (seq !== state.lastEventId + 1) {
      state.gaps.push({ after: state.lastEventId, next: seq });
      log(`GAP: expected id ${state.lastEventId + 1}, got ${seq}: chunks ${state.lastEventId + 1}..${seq - 1} are missing`, "bad");
    }
    if (pendingResume) finishResume(seq);
    const now = performance.now();
    if (firstChunkAt === null) firstChunkAt = now;
    lastChunkAt = now;
    state.text += data.text;
    state.lastEventId = seq;
    state.chunks += 1;
    const answer = $("answer");
    const atBottom = answer.scrollTop + answer.clientHeight >= answer.scrollHeight - 8;
    answerText.appendData(data.text);
    if (atBottom) answer.scrollTop = answer.scrollHeight;
    if (state.status === "queued") state.status = "running";
    renderStatus();
  }

  function finishResume(next) {
    const { after, cause } = pendingResume;
    pendingResume = null;
    const ok = next === after + 1;
    state.reconnects.push({ after, next, ok, cause });
    const how = cause === "dropped" ? "connection dropped" : "stream ended";
    if (ok) {
      log(`${how} after id ${after}; browser reconnected with Last-Event-ID: ${after}; next id ${next}: nothing lost`, "ok");
    } else {
      log(`${how} after id ${after}; resumed at ${next}: ${next > after + 1 ? "chunks LOST" : "chunks REPEATED"}`, "bad");
    }
  }

  function onDone(event) {
    const es = event.target;
    es.close();
    if (es !== stream) return;
    stream = null;
    const data = JSON.parse(event.data);
    state.events.push({ type: "done", id: event.lastEventId });
    if (pendingResume) {
      const { after, cause } = pendingResume;
      pendingResume = null;
      const ok = data.last_sequence_id === undefined || data.last_sequence_id === after;
      state.reconnects.push({ after, next: "done", ok, cause });
      log(`reconnected with Last-Event-ID: ${after}; next event: done${ok ? ": nothing lost" : ""}`, ok ? "ok" : "bad");
    }
    if (typeof data.last_sequence_id === "number" && data.last_sequence_id !== state.lastEventId) {
      state.gaps.push({ after: state.lastEventId, next: data.last_sequence_id + 1 });
      log(`GAP: done says the last id is ${data.last_sequence_id}, the page has ${state.lastEventId}`, "bad");
    }
    state.doneData = data;
    state.status = data.status;
    state.done = true;
    stopPolling();
    setRunning(false);
    setConnection("closed");
    const usage = data.usage || {};
    log(
      `done: ${data.status}; ${fmtInt(usage.input_tokens)} input + ${fmtInt(usage.output_tokens)} output tokens; ` +
        `${fmtUsd(data.cost_usd)}; ${state.chunks} chunks, ${state.reconnects.length} reconnect(s)`,
      data.status === "completed" ? "ok" : "warn",
    );
    if (data.error) showError(new ApiError(data.error), `Job ${data.status}`);
    verify(state.jobId);
    refreshUsage();
  }

  async function verify(jobId) {
    // The stream's text must be exactly the job's output (partial, for a cancelled job).
    try {
      const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
      if (state.jobId !== jobId) return;
      state.job = job;
      const ok = job.output === state.text;
      state.verified = ok;
      const el = $("verified");
      el.className = `verified ${ok ? "ok" : "bad"}`;
      el.textContent = ok
        ? `✓ equals the job's output (${fmtInt(state.text.length)} characters, ${state.chunks} chunks)`
        : `✗ differs from the job's output (${fmtInt(state.text.length)} vs ${fmtInt((job.output || "").length)} characters)`;
      log(ok ? "verified: the streamed text equals GET /v1/jobs/{id} output" : "MISMATCH with GET /v1/jobs/{id} output", ok ? "ok" : "bad");
      renderStatus();
    } catch (exc) {
      showError(exc, "Could not read the finished job");
    }
  }

  function startPolling() {
    stopPolling();
    const jobId = state.jobId;
    const poll = async () => {
      try {
        const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}?output=false`);
        if (state.jobId !== jobId || state.done) return;
        state.job = job;
        state.status = job.status;
        renderStatus();
      } catch {
        // the status line falls back to its estimate; the stream carries on regardless
      }
    };
    pollTimer = window.setInterval(poll, 1000);
    poll();
  }

  function stopPolling() {
    if (pollTimer !== null) window.clearInterval(pollTimer);
    pollTimer = null;
  }

  async function cancel() {
    if (!state.jobId) return;
    $("cancel").disabled = true;
    try {
      const job = await api("POST", `/v1/jobs/${encodeURIComponent(state.jobId)}/cancel`);
      log(`cancel requested: job ${job.status}; the stream ends with its done event`, "warn");
    } catch (exc) {
      showError(exc, "Cancel failed");
      $("cancel").disabled = state.done;
    }
  }

  async function drop() {
    if (!state.jobId || state.done) return;
    const after = state.lastEventId;
    dropPending = true;
    const url = `${apiBase()}/_spool/drop-streams?job_id=${encodeURIComponent(state.jobId)}`;
    let dropped = null;
    try {
      const response = await fetch(url, { method: "POST" });
      const data = await response.json().catch(() => null);
      if (!response.ok) {
        dropPending = false;
        const error = data && data.error ? data.error : { code: `http_${response.status}`, message: `${url} answered ${response.status}` };
        if (!error.suggestions) error.suggestions = ["Dropping a connection on purpose works against the local stack (`spool dev`) only"];
        showError(new ApiError({ ...error, status: response.status }), "Drop failed");
        return;
      }
      dropped = data ? data.dropped : null;
    } catch {
      // A page on another origin cannot read this local route's answer; the cut happens anyway.
      log("drop requested; its answer is not readable from this origin", "warn");
    }
    state.drops.push({ after, dropped });
    if (dropped === 0) {
      dropPending = false;
      log("nothing to drop: the browser is between connections right now; try again", "warn");
    } else if (dropped !== null) {
      log(`dropped ${dropped} open connection(s) of this job after id ${after}`, "warn");
    }
  }

  // ------------------------------------------------------------------ usage
  async function refreshUsage() {
    let usage;
    try {
      usage = await api("GET", "/v1/usage");
    } catch (exc) {
      showError(exc, "Usage");
      return;
    }
    const body = $("usage").tBodies[0];
    const rows = [...(usage.days || [])].sort((a, b) => (b.date || "").localeCompare(a.date || "") || (a.model || "").localeCompare(b.model || ""));
    const cells = (values) =>
      values.map(([value, numeric]) => {
        const td = document.createElement("td");
        if (numeric) td.className = "num";
        td.textContent = value;
        return td;
      });
    body.replaceChildren(
      ...rows.map((row) => {
        const tr = document.createElement("tr");
        tr.dataset.model = row.model || "";
        tr.append(
          ...cells([
            [row.date || "", false],
            [row.model || "", false],
            [fmtInt(row.jobs), true],
            [fmtInt(row.input_tokens), true],
            [fmtInt(row.output_tokens), true],
            [fmtUsd(row.cost_usd), true],
          ]),
        );
        return tr;
      }),
    );
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 6;
      td.className = "empty";
      td.textContent = "No usage in this period yet: ask something.";
      tr.append(td);
      body.append(tr);
    }
    const totals = usage.totals || {};
    const foot = $("usage").tFoot;
    const tr = document.createElement("tr");
    tr.append(
      ...cells([
        ["Total", false],
        ["", false],
        [fmtInt(totals.jobs), true],
        [fmtInt(totals.input_tokens), true],
        [fmtInt(totals.output_tokens), true],
        [fmtUsd(totals.cost_usd), true],
      ]),
    );
    foot.replaceChildren(tr);
    $("usage-range").textContent = usage.since ? `${usage.since} to ${usage.until} (UTC days)` : "";
    $("limits").textContent = describeLimits(usage.limits || {});
  }

  function describeLimits(limits) {
    const bits = [];
    const bucket = (name, label) => {
      const b = limits[name];
      if (b && b.limit !== undefined && b.limit !== null) bits.push(`${label}: ${fmtInt(b.remaining)} of ${fmtInt(b.limit)} tokens left`);
    };
    bucket("tokens_per_minute", "per minute");
    bucket("tokens_per_day", "per day");
    const jobs = limits.concurrent_jobs;
    if (jobs) bits.push(`jobs running: ${fmtInt(jobs.running)} of ${fmtInt(jobs.limit)}`);
    const budget = limits.daily_budget;
    if (budget) {
      bits.push(
        budget.limit_usd === null || budget.limit_usd === undefined
          ? "no daily budget"
          : `daily budget: ${fmtUsd(budget.committed_usd)} of ${fmtUsd(budget.limit_usd)} committed`,
      );
    }
    return bits.length ? `Limits now: ${bits.join(" · ")}` : "";
  }

  // ------------------------------------------------------------------ wiring
  let reloads = 0;

  async function reload() {
    // Key or base URL changed: only the latest reload may show its outcome.
    const mine = ++reloads;
    clearError();
    try {
      await loadModels(() => mine === reloads);
    } catch (exc) {
      if (mine === reloads) showError(exc, "Models");
      return;
    }
    if (mine === reloads) await refreshUsage();
  }

  function init() {
    $("api").value = params.get("api") || (window.location.origin.startsWith("http") ? window.location.origin : "http://127.0.0.1:8000");
    answerText = document.createTextNode("");
    $("answer").replaceChildren(answerText);
    $("connect").addEventListener("click", reload);
    $("api").addEventListener("change", reload);
    $("key").addEventListener("change", reload);
    $("model").addEventListener("change", describeModel);
    $("ask").addEventListener("click", ask);
    $("question").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("ask").disabled) ask();
    });
    $("drop").addEventListener("click", drop);
    $("cancel").addEventListener("click", cancel);
    $("usage-refresh").addEventListener("click", refreshUsage);
    $("paste-add").addEventListener("click", () => {
      try {
        if (addPasted()) log(`context: ${files.length} file(s)`);
      } catch (exc) {
        showError(exc);
      }
    });
    $("context-clear").addEventListener("click", () => {
      files = [];
      renderFiles();
    });
    $("files").addEventListener("change", async (event) => {
      const chosen = [...event.target.files];
      await addBatch(async () => {
        for (const file of chosen) await addBrowserFile(file, file.webkitRelativePath || file.name);
      });
      event.target.value = "";
    });
    const zone = $("context-panel");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      $("dropzone").classList.add("over");
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) $("dropzone").classList.remove("over");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      $("dropzone").classList.remove("over");
      const dropped = event.dataTransfer;
      addBatch(() => addDropped(dropped)).catch((exc) => showError(exc, "Reading dropped files"));
    });
    window.setInterval(() => {
      if (stream) renderStatus(); // keep tokens/s moving between chunks
    }, 500);
    renderStatus();
    reload();
  }

  init();
})();
