// Tink's chat page: streamed replies from /api/v1/sample (server-sent events over a POST), optional
// steering by a named vector, and per generated token a plot of a captured quantity:
// with a vector on, the residual stream's projection on its direction at its layer; else the norm of the
// last layer's residual stream. window.chatEvents logs what arrived, for the browser test.
(() => {
  "use strict";

  const KEY = "tink.apiKey"; // shared with the dashboard, in this tab only
  const $ = (id) => document.getElementById(id);
  const state = { history: [], vectors: new Map(), values: new Map(), numLayers: 1, busy: false };
  window.chatEvents = [];

  class KeyRefused extends Error {}

  function apiKey() {
    return sessionStorage.getItem(KEY);
  }

  async function api(path, options = {}) {
    const headers = { "X-API-Key": apiKey() || "", "Content-Type": "application/json", ...(options.headers || {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) throw new KeyRefused("the worker refused this key");
    if (!response.ok) {
      let message = `${response.status}`;
      try { const body = await response.json(); message = body.field ? `${body.field}: ${body.error}` : body.error; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return response;
  }

  function askForKey(message) {
    sessionStorage.removeItem(KEY);
    $("main").hidden = true;
    $("change-key").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").focus();
  }

  async function start() {
    try {
      const models = await (await api("/api/v1/chat/models")).json();
      const vectors = await (await api("/api/v1/steering_vectors")).json();
      state.numLayers = models.num_layers;
      fill($("model"), models.models.map((m) => [m.model_id, m.label]));
      state.vectors = new Map(vectors.steering_vectors.map((v) => [v.vector_id, v]));
      fill($("vector"), [["", "none"], ...vectors.steering_vectors.map((v) => [v.vector_id, `${v.name} (layer ${v.layer})`])]);
      $("key-form").hidden = true;
      $("main").hidden = false;
      $("change-key").hidden = false;
      legend();
      document.body.dataset.ready = "true";
    } catch (error) {
      askForKey(error instanceof KeyRefused ? error.message : `could not load the page: ${error.message}`);
    }
  }

  function fill(select, options) {
    select.replaceChildren(...options.map(([value, label]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = label;
      return option;
    }));
  }

  function legend() {
    const vector = state.vectors.get($("vector").value);
    $("plot-legend").textContent = vector
      ? `plot: projection of the residual stream after layer ${vector.layer} on "${vector.name}", per generated token`
      : `plot: norm of the residual stream after layer ${state.numLayers - 1}, per generated token`;
  }

  async function vectorValues(id) {
    if (!state.values.has(id)) {
      const body = await (await api(`/api/v1/steering_vectors/${encodeURIComponent(id)}`)).json();
      state.values.set(id, body.vector);
    }
    return state.values.get(id);
  }

  function transcriptText() {
    return state.history.map((m) => `${m.role === "user" ? "User" : "Assistant"}: ${m.text}`).join("\n") + "\nAssistant:";
  }

  function addMessage(role, text) {
    const item = document.createElement("li");
    item.className = role;
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = role === "user" ? "you" : "model";
    const body = document.createElement("span");
    body.className = "body";
    body.textContent = text;
    item.append(who, body);
    $("transcript").append(item);
    return item;
  }

  async function send(event) {
    event.preventDefault();
    if (state.busy) return;
    const text = $("message").value.trim();
    if (!text) return;
    $("chat-error").textContent = "";
    state.history.push({ role: "user", text });
    addMessage("user", text);
    $("message").value = "";
    const reply = addMessage("assistant", "");
    reply.dataset.state = "streaming";
    reply.dataset.tokens = "0";
    state.busy = true;
    $("send").disabled = true;
    try {
      const vectorId = $("vector").value;
      const vector = state.vectors.get(vectorId);
      const layer = vector ? vector.layer : state.numLayers - 1;
      const body = {
        model_id: $("model").value, prompts: [transcriptText()], stream: true,
        sampling_params: { max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value) },
        capture: [{ layer, site: "resid_post", reduce: "all" }],
      };
      if (vector) body.steer = [{ vector_id: vectorId, scale: Number($("scale").value) }];
      const direction = vector ? await vectorValues(vectorId) : null;
      const response = await api("/api/v1/sample", { method: "POST", body: JSON.stringify(body) });
      const answer = await readEvents(response, reply);
      const completion = answer.completions[0];
      state.history.push({ role: "assistant", text: completion.text });
      plot(reply, completion, quantity(completion.captures[0].values, direction));
      reply.dataset.state = "done";
    } catch (error) {
      reply.dataset.state = "failed";
      if (error instanceof KeyRefused) askForKey(error.message);
      else $("chat-error").textContent = error.message;
    } finally {
      state.busy = false;
      $("send").disabled = false;
    }
  }

  // Server-sent events from a POST: `token` events append to the reply as they come; `result` is the answer.
  async function readEvents(response, reply) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    const body = reply.querySelector(".body");
    let buffer = "";
    let result = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const kind = (chunk.match(/^event: (.*)$/m) || [])[1];
        const data = (chunk.match(/^data: (.*)$/m) || [])[1];
        if (!kind || data === undefined) continue; // a keep-alive comment
        const payload = JSON.parse(data);
        window.chatEvents.push({ kind, at: performance.now(), tokens: payload.tokens ? payload.tokens.length : 0 });
        if (kind === "token") {
          const span = document.createElement("span");
          span.className = "tok";
          span.textContent = payload.text;
          body.append(span);
          reply.dataset.tokens = String(Number(reply.dataset.tokens) + payload.tokens.length);
        } else if (kind === "result") {
          result = payload;
        } else if (kind === "error") {
          throw new Error(payload.field ? `${payload.field}: ${payload.error}` : payload.error);
        }
      }
    }
    if (!result) throw new Error("the stream ended without a result");
    return result;
  }

  function quantity(rows, direction) {
    if (!direction) return rows.map((row) => Math.sqrt(row.reduce((s, x) => s + x * x, 0)));
    const norm = Math.sqrt(direction.reduce((s, x) => s + x * x, 0)) || 1;
    return rows.map((row) => row.reduce((s, x, i) => s + x * direction[i], 0) / norm);
  }

  function plot(reply, completion, values) {
    const svgNS = "http://www.w3.org/2000/svg";
    const width = Math.max(240, 14 * values.length), height = 70, pad = 6;
    const lo = Math.min(...values, 0), hi = Math.max(...values, 0);
    const x = (i) => pad + (values.length > 1 ? i * (width - 2 * pad) / (values.length - 1) : (width - 2 * pad) / 2);
    const y = (v) => height - pad - (hi > lo ? (v - lo) * (height - 2 * pad) / (hi - lo) : 0);
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("class", "plot");
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.dataset.points = String(values.length);
    svg.dataset.values = JSON.stringify(values);
    const zero = document.createElementNS(svgNS, "line");
    zero.setAttribute("x1", pad); zero.setAttribute("x2", width - pad);
    zero.setAttribute("y1", y(0)); zero.setAttribute("y2", y(0));
    zero.setAttribute("stroke", "#d4d4d8");
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", values.map((v, i) => `${x(i)},${y(v)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", "#2563eb");
    svg.append(zero, line);
    values.forEach((v, i) => {
      const dot = document.createElementNS(svgNS, "circle");
      dot.setAttribute("cx", x(i)); dot.setAttribute("cy", y(v)); dot.setAttribute("r", 3);
      dot.setAttribute("fill", "#2563eb");
      const title = document.createElementNS(svgNS, "title");
      title.textContent = `token ${i + 1} (id ${completion.tokens[i]}): ${v.toFixed(3)}`;
      dot.append(title);
      svg.append(dot);
    });
    reply.append(svg);
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value);
    start();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  $("chat-form").addEventListener("submit", send);
  $("vector").addEventListener("change", legend);
  $("clear").addEventListener("click", () => { state.history = []; $("transcript").replaceChildren(); });
  if (apiKey()) start(); else askForKey("");
})();
