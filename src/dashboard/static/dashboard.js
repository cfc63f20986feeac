// The Tink dashboard. Asks for the API key once (sessionStorage: this tab only), then polls
// /api/v1/dashboard/state every POLL_MS with the cursor of its previous answer: the answer carries
// the worker's health, the key's runs, whole (decimated) series for runs just opened, and only the
// series cells that changed since the cursor for the others. Every value from the server is put in
// the page as text (textContent), never as HTML: run ids and metric names come from clients.
(() => {
  "use strict";

  const POLL_MS = 2000;
  const MAX_POINTS = 300; // per series; a series twice as long is thinned to every other point
  const AUTO_OPEN = 4; // runs whose plots open by themselves, most recently active first
  const CHART_MIN_WIDTH = 300;
  const CHART_HEIGHT = 160;
  const KEY = "tink.apiKey";
  const OPEN = "tink.openRuns";
  const WORKER_SERIES = {
    loss: "loss per weighted token",
    learning_rate: "learning rate",
    grad_norm: "grad norm",
    sampled_tokens: "sampled tokens",
    sampled_logprob: "mean sampled logprob",
    logprob_gap: "sampler–trainer |Δ logprob|",
  };
  const COLORS = ["#2563eb", "#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626"];

  const $ = (id) => document.getElementById(id);
  const state = {
    cursor: 0,
    runs: new Map(), // model_id -> run summary from the last poll
    data: new Map(), // model_id -> Map("source:name" -> Map(step -> value)), for open runs
    open: new Set(JSON.parse(sessionStorage.getItem(OPEN) || "[]")),
    seen: new Set(), // runs this page has listed before: only new ones open by themselves
    features: {},
    timer: null,
    polling: false, // one request at a time: answers then always arrive in order
    pollAgain: false,
    charts: new Map(), // "model_id\nsource:name" -> {plot, element}
  };

  class KeyRefused extends Error {}

  // ------------------------------------------------------------------ the key

  function apiKey() {
    return sessionStorage.getItem(KEY);
  }

  function askForKey(message) {
    clearTimeout(state.timer);
    sessionStorage.removeItem(KEY);
    $("main").hidden = true;
    $("change-key").hidden = true;
    $("key-form").hidden = false;
    $("key-error").textContent = message || "";
    $("key-input").value = "";
    $("key-input").focus();
  }

  function start() {
    state.cursor = 0;
    state.data.clear();
    state.seen.clear();
    for (const id of [...state.charts.keys()]) dropChart(id);
    $("panels").replaceChildren();
    $("key-form").hidden = true;
    $("main").hidden = false;
    $("change-key").hidden = false;
    poll();
  }

  async function api(path, options = {}) {
    const headers = { "X-API-Key": apiKey() || "" };
    if (options.body) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, { ...options, headers });
    const body = await resp.json().catch(() => ({}));
    if (resp.status === 401) throw new KeyRefused(body.error || "the worker refused this key");
    if (!resp.ok) throw new Error(`${resp.status}: ${body.error || resp.statusText}`);
    return body;
  }

  // ------------------------------------------------------------------ polling

  async function poll() {
    clearTimeout(state.timer);
    if (state.polling) {
      state.pollAgain = true;
      return;
    }
    state.polling = true;
    state.pollAgain = false;
    const open = [...state.open];
    const full = open.filter((id) => !state.data.has(id));
    const query = new URLSearchParams({
      cursor: String(state.cursor), runs: open.join(","), full: full.join(","), max_points: String(MAX_POINTS),
    });
    let again = POLL_MS;
    try {
      const answer = await api(`/api/v1/dashboard/state?${query}`);
      again = apply(answer) ? 0 : POLL_MS;
      $("poll-error").textContent = "";
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      if (err instanceof KeyRefused) {
        state.polling = false;
        return askForKey(err.message);
      }
      $("poll-error").textContent = `Cannot reach the worker: ${err.message}. Retrying…`;
    }
    state.polling = false;
    state.timer = setTimeout(poll, state.pollAgain ? 0 : again);
  }

  // Merges one answer; true when runs were opened that still need their whole series.
  function apply(answer) {
    state.cursor = answer.cursor;
    state.features = answer.worker.features || {};
    renderWorker(answer.worker);
    state.runs = new Map(answer.runs.map((run) => [run.model_id, run]));
    let opened = false;
    for (const run of answer.runs) {
      if (!state.seen.has(run.model_id) && state.open.size < AUTO_OPEN && !state.open.has(run.model_id)) {
        state.open.add(run.model_id);
        opened = true;
      }
      state.seen.add(run.model_id);
    }
    for (const id of [...state.open]) if (!state.runs.has(id)) state.open.delete(id);
    saveOpen();
    for (const [id, series] of Object.entries(answer.series)) {
      if (!state.open.has(id)) continue; // closed while the request was out
      const cells = new Map();
      for (const [source, byName] of Object.entries(series)) {
        for (const [name, points] of Object.entries(byName)) cells.set(`${source}:${name}`, new Map(points));
      }
      state.data.set(id, cells);
    }
    for (const [id, source, name, step, value] of answer.changes) {
      const cells = state.data.get(id);
      if (!cells) continue;
      const key = `${source}:${name}`;
      if (!cells.has(key)) cells.set(key, new Map());
      cells.get(key).set(step, value);
    }
    renderRuns();
    renderPanels();
    return opened;
  }

  function saveOpen() {
    sessionStorage.setItem(OPEN, JSON.stringify([...state.open]));
  }

  function toggle(id) {
    if (state.open.has(id)) {
      state.open.delete(id);
      state.data.delete(id); // changes are not sent for closed runs: reopening fetches it whole
    } else {
      state.open.add(id);
    }
    saveOpen();
    renderRuns();
    renderPanels();
    poll();
  }

  // ------------------------------------------------------------------ the worker

  function renderWorker(worker) {
    const status = $("status");
    status.textContent = worker.status;
    status.className = `pill ${worker.status}`;
    const trainer = worker.trainer || {};
    const sampler = worker.sampler || {};
    const gpu = (worker.memory || {}).gpu;
    const q = worker.queues || {};
    const facts = [
      ["Base model", worker.base_model],
      ["Trainer", `${trainer.name} — ${trainer.live === false ? `down: ${trainer.error || "no reason given"}` : "live"}`],
      ["Sampler", describeSampler(sampler)],
      ["GPU memory", gpu ? `${gpu.free_gib} GiB free of ${gpu.total_gib} GiB (${gpu.device})` : "no GPU"],
      ["Queues", `training: ${q.training_queued || 0} queued, ${q.training_running || 0} running · ` +
        `sampling: ${q.sampling_queued || 0} queued, ${q.sampling_running || 0} running`],
    ];
    $("worker-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", term), el("dd", value)]));
    $("worker-reasons").replaceChildren(...(worker.reasons || []).map((reason) => el("li", reason)));
  }

  function describeSampler(s) {
    const parts = [s.active || s.backend || "?"];
    if (s.mode) parts.push(`(${s.mode})`);
    if (s.requested && s.requested !== s.active) parts.push(`— asked for ${s.requested}`);
    if (s.base_url) parts.push(`at ${s.base_url}`);
    parts.push(s.live === false ? "— down" : "— live");
    if (s.degraded) parts.push(`— degraded: ${s.reason}`);
    return parts.join(" ");
  }

  // ------------------------------------------------------------------ the runs table

  function renderRuns() {
    const rows = [...state.runs.values()].map((run) => {
      const row = el("tr");
      row.className = `run-row${state.open.has(run.model_id) ? " open" : ""}`;
      row.dataset.run = run.model_id;
      const id = el("td", run.model_id);
      id.className = "run";
      id.title = run.model_id;
      if (run.unloaded) id.append(" ", badge("unloaded"));
      row.append(
        id, el("td", run.owner), el("td", run.base_model), el("td", String(run.rank)),
        el("td", String(run.steps)), el("td", fmt(run.last_loss)), el("td", String(run.checkpoints)),
        el("td", run.queued || run.running ? `${run.queued} queued, ${run.running} running` : "–"),
        el("td", ago(run.last_activity)), el("td", state.open.has(run.model_id) ? "▾ plots" : "▸ plots"),
      );
      row.addEventListener("click", () => toggle(run.model_id));
      return row;
    });
    $("runs").tBodies[0].replaceChildren(...rows);
    $("run-count").textContent = `(${state.runs.size})`;
    $("no-runs").hidden = state.runs.size > 0;
  }

  // ------------------------------------------------------------------ plots

  function renderPanels() {
    const panels = $("panels");
    const wanted = [...state.runs.keys()].filter((id) => state.open.has(id) && state.data.has(id));
    for (const panel of [...panels.children]) {
      if (!wanted.includes(panel.dataset.run)) {
        for (const key of [...state.charts.keys()]) if (key.startsWith(`${panel.dataset.run}\n`)) dropChart(key);
        panel.remove();
      }
    }
    wanted.forEach((id, index) => {
      let panel = [...panels.children].find((p) => p.dataset.run === id);
      if (!panel) panel = newPanel(id);
      if (panels.children[index] !== panel) panels.insertBefore(panel, panels.children[index] || null);
      fillPanel(panel, state.runs.get(id), state.data.get(id));
    });
  }

  function newPanel(id) {
    const panel = el("article");
    panel.className = "panel";
    panel.dataset.run = id;
    const head = el("div");
    head.className = "panel-head";
    const actions = el("div");
    actions.className = "actions";
    head.append(el("h3", id), el("span", ""), actions);
    const charts = el("div");
    charts.className = "charts";
    panel.append(head, charts);
    return panel;
  }

  function fillPanel(panel, run, cells) {
    const [, summary, actions] = panel.firstChild.children;
    summary.className = "muted";
    summary.textContent = `${run.steps} steps · rank ${run.rank} · ${run.optimizer} · ${run.checkpoints} checkpoints` +
      (run.last_sampler_checkpoint ? ` · latest ${run.last_sampler_checkpoint}` : "");
    renderExport(actions, run);
    const keys = [
      ...Object.keys(WORKER_SERIES).map((name) => `worker:${name}`).filter((key) => cells.has(key)),
      ...[...cells.keys()].filter((key) => key.startsWith("client:")).sort(),
    ];
    const grid = panel.lastChild;
    keys.forEach((key, index) => {
      const points = thin(cells.get(key));
      cells.set(key, points);
      drawChart(grid, run.model_id, key, points, COLORS[index % COLORS.length]);
    });
  }

  function renderExport(actions, run) {
    const path = run.last_sampler_checkpoint || run.last_checkpoint;
    if (!state.features.export || !path) return actions.replaceChildren();
    if (actions.querySelector("button")) return;
    const button = el("button", "Export merged");
    const result = el("span", "");
    result.className = "muted";
    button.type = "button";
    button.addEventListener("click", async () => {
      const target = (state.runs.get(run.model_id) || run).last_sampler_checkpoint || path;
      button.disabled = true;
      result.textContent = `exporting ${target}…`;
      try {
        const answer = await api("/api/v1/export", { method: "POST", body: JSON.stringify({ path: target }) });
        result.textContent = `exported to ${answer.directory}`;
      } catch (err) {
        result.textContent = `export failed: ${err.message}`;
      } finally {
        button.disabled = false;
      }
    });
    actions.replaceChildren(result, button);
  }

  function drawChart(grid, runId, key, points, color) {
    const id = `${runId}\n${key}`;
    const steps = [...points.keys()].sort((a, b) => a - b);
    const values = steps.map((step) => points.get(step));
    const shown = values.filter((v) => v !== null).length;
    const [source, ...rest] = key.split(":");
    const name = rest.join(":");
    const label = source === "worker" ? WORKER_SERIES[name] : name;
    let chart = state.charts.get(id);
    if (!chart) {
      const element = el("div");
      element.className = "chart";
      element.dataset.run = runId;
      element.dataset.series = key;
      const title = el("p", label);
      title.className = "chart-title";
      title.append(el("span", ""));
      title.lastChild.className = "last";
      element.append(title);
      grid.append(element);
      const plot = new uPlot(chartOptions(label, color, chartWidth(grid), element), [steps, values], element);
      chart = { plot, element };
      state.charts.set(id, chart);
    } else {
      chart.plot.setData([steps, values]);
    }
    chart.element.dataset.points = String(shown);
    chart.element.dataset.lastStep = String(steps[steps.length - 1] ?? "");
    chart.element.dataset.last = fmt(values[values.length - 1]);
    if (chart.plot.cursor.idx == null) chart.element.querySelector(".last").textContent = chart.element.dataset.last;
  }

  // Under the cursor, the title shows the point's step and value; elsewhere the last value.
  function showCursor(plot, element) {
    const i = plot.cursor.idx;
    element.querySelector(".last").textContent =
      i == null ? element.dataset.last || "" : `step ${plot.data[0][i]}: ${fmt(plot.data[1][i])}`;
  }

  // As many charts per row as fit at CHART_MIN_WIDTH, sharing the row's width.
  function chartWidth(grid) {
    const gap = 12, padding = 8;
    const room = Math.max(grid.clientWidth, CHART_MIN_WIDTH + padding);
    const columns = Math.max(1, Math.floor((room + gap) / (CHART_MIN_WIDTH + padding + gap)));
    return Math.floor((room - gap * (columns - 1)) / columns) - padding - 1; // - 1: rounding never wraps a row
  }

  function resizeCharts() {
    for (const { plot, element } of state.charts.values()) {
      plot.setSize({ width: chartWidth(element.parentElement), height: CHART_HEIGHT });
    }
  }

  function chartOptions(label, color, width, element) {
    const axis = { stroke: "#8a919b", grid: { stroke: "rgba(128,128,128,0.18)" }, ticks: { show: false } };
    return {
      width,
      height: CHART_HEIGHT,
      legend: { show: false },
      hooks: { setCursor: [(plot) => showCursor(plot, element)] },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      series: [{ label: "step" }, { label, stroke: color, width: 1.5, spanGaps: true, points: { size: 4 } }],
      axes: [{ ...axis, size: 28 }, { ...axis, size: 52 }],
    };
  }

  function dropChart(id) {
    const chart = state.charts.get(id);
    if (chart) chart.plot.destroy();
    state.charts.delete(id);
  }

  // A long-open page keeps at most about 2 * MAX_POINTS per series: every other step, and the last.
  function thin(points) {
    if (points.size <= 2 * MAX_POINTS) return points;
    const steps = [...points.keys()].sort((a, b) => a - b);
    return new Map(steps.filter((_, i) => i % 2 === 0 || i === steps.length - 1).map((s) => [s, points.get(s)]));
  }

  // ------------------------------------------------------------------ small helpers

  function el(tag, text) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function badge(text) {
    const node = el("span", text);
    node.className = "badge";
    return node;
  }

  function fmt(value) {
    if (value === null || value === undefined) return "–";
    const size = Math.abs(value);
    if (size !== 0 && (size >= 1e5 || size < 1e-3)) return value.toExponential(2);
    return String(Number(value.toPrecision(4)));
  }

  function ago(seconds) {
    if (!seconds) return "–";
    const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(seconds * 1000).toLocaleString();
  }

  // ------------------------------------------------------------------ wiring

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key-input").value.trim());
    start();
  });
  $("change-key").addEventListener("click", () => askForKey(""));
  let resizing = null;
  new ResizeObserver(() => { // the window, and a scroll bar coming or going
    clearTimeout(resizing);
    resizing = setTimeout(resizeCharts, 100);
  }).observe($("panels"));
  if (apiKey()) start();
  else askForKey("");
})();
