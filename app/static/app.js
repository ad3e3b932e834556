// The NLI classifier page: classify a pair, pick the adapter, evaluate a labelled file.
//
// Only the service's non-admin routes are used (GET /ready, GET /adapters, POST /classify,
// POST /evaluate, GET and DELETE /evaluate/{job_id}), so the page needs no API key.
// Everything that comes from the API is inserted as text (text nodes, textContent, attribute
// values), never as HTML: typed pairs and uploaded files are echoed back in reports and errors.

const $ = (id) => document.getElementById(id);

const state = {
  ready: null, // GET /ready's answer once the model is loaded
  adapters: new Map(), // name -> GET /adapters' description of a loaded adapter
  defaultAdapter: null,
  userPickedAdapter: false,
  classifySeq: 0, // the answer of an older request never overwrites a newer one
  job: null, // {id} of the evaluation job being followed
};

class ApiError extends Error {
  constructor({ type, message, request_id: requestId }, status = null, retryAfter = null) {
    super(message || "unknown error");
    this.type = type || "error";
    this.requestId = requestId || null;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const percent = (x) => `${(x * 100).toFixed(1)}%`;
const fixed = (x, digits = 3) => Number(x).toFixed(digits);
const count = (n) => Number(n).toLocaleString("en-US");
const plural = (n, word) => `${count(n)} ${word}${n === 1 ? "" : "s"}`;

function bytes(n) {
  if (n < 1e3) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}

function when(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

/** Call the API (a path relative to the page). Resolves to {status, body}; rejects with an ApiError
 *  carrying the service's one error shape {error: {type, message, request_id}}. */
async function api(path, { json, ...init } = {}) {
  const headers = { Accept: "application/json" };
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    throw new ApiError({ type: "network_error", message: `Could not reach the server (${err.message}).` });
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = body && typeof body.error === "object" && body.error !== null
      ? body.error
      : { type: `http_${response.status}`, message: `${response.status} ${response.statusText}`.trim() };
    throw new ApiError(error, response.status, response.headers.get("Retry-After"));
  }
  return { status: response.status, body };
}

/** An element with attributes and children; strings become text nodes, never markup. */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined).map(
    (c) => (c instanceof Node ? c : String(c)),
  ));
  return node;
}

function retryDelay(err, fallback = 2000) {
  const seconds = Number.parseFloat(err.retryAfter);
  return Number.isFinite(seconds) ? Math.min(Math.max(seconds * 1000, 500), 30000) : fallback;
}

// ---- the message area -------------------------------------------------------------------------

/** Show an error; ``source`` names the action, so its next success can clear it. */
function showError(err, source) {
  $("message-text").textContent = `${source}: ${err.message}`;
  const meta = [];
  if (err.status) meta.push(`HTTP ${err.status}`);
  if (err.type) meta.push(err.type);
  if (err.requestId) meta.push(`request ${err.requestId}`);
  $("message-meta").textContent = meta.join(" · ");
  const box = $("message");
  box.dataset.source = source;
  box.dataset.type = err.type || "";
  box.hidden = false;
}

function clearError(source) {
  const box = $("message");
  if (source === undefined || box.dataset.source === source) box.hidden = true;
}

function setStatus(name, text) {
  const status = $("status");
  status.dataset.state = name;
  status.textContent = text;
}

function setBusy(button, busy) {
  button.disabled = busy || !state.ready;
  button.setAttribute("aria-busy", busy ? "true" : "false");
}

// ---- readiness and adapters -------------------------------------------------------------------

async function waitUntilReady() {
  for (;;) {
    try {
      const { body } = await api("ready");
      clearError("Server");
      return body;
    } catch (err) {
      if (err.status === 503) {
        setStatus("loading", "Loading the model…");
      } else {
        setStatus("error", "Unavailable");
        showError(err, "Server");
      }
      await sleep(retryDelay(err));
    }
  }
}

async function loadAdapters() {
  const select = $("adapter");
  const previous = select.value;
  let body;
  try {
    ({ body } = await api("adapters"));
  } catch (err) {
    showError(err, "Adapters");
    return;
  }
  clearError("Adapters");
  state.adapters = new Map(body.loaded.map((info) => [info.name, info]));
  state.defaultAdapter = body.default;
  const names = ["base", ...body.loaded.map((info) => info.name).filter((name) => name !== "base")];
  select.replaceChildren(...names.map((name) => el(
    "option",
    { value: name },
    name === "base" ? "base (no adapter)" : name,
    name === body.default ? " — default" : null,
  )));
  const keep = state.userPickedAdapter && names.includes(previous);
  select.value = keep ? previous : body.default;
  if (!names.includes(select.value)) select.value = "base";
  select.disabled = false;
  describeModel();
}

function describeModel() {
  const ready = state.ready;
  if (!ready) return;
  const name = $("adapter").value;
  const parts = [`Base model ${ready.base_model} (${ready.quantization}, ${ready.device}).`];
  const info = state.adapters.get(name);
  if (name === "base") {
    parts.push("Scoring with the base model alone.");
  } else if (info) {
    parts.push(`Adapter ${name}: ${bytes(info.size_bytes)}, created ${when(info.created_at)}.`);
  }
  $("model-info").textContent = parts.join(" ");
}

// ---- classify ---------------------------------------------------------------------------------

async function classify() {
  const form = $("classify-form");
  if (!form.reportValidity()) return;
  const button = $("classify-submit");
  const request = {
    premise: $("premise").value,
    hypothesis: $("hypothesis").value,
    adapter: $("adapter").value,
  };
  const seq = ++state.classifySeq;
  setBusy(button, true);
  try {
    const { body } = await api("classify", { method: "POST", json: request });
    if (seq !== state.classifySeq) return;
    clearError("Classify");
    showClassification(body);
  } catch (err) {
    if (seq !== state.classifySeq) return;
    showError(err, "Classify");
    if (err.type === "adapter_not_found") loadAdapters();
  } finally {
    if (seq === state.classifySeq) setBusy(button, false);
  }
}

function showClassification(answer) {
  const result = $("classify-result");
  result.dataset.adapter = answer.adapter;
  result.dataset.label = answer.label;
  $("predicted-label").textContent = answer.label;
  $("predicted-score").textContent = `(${percent(answer.score)})`;
  $("scores").replaceChildren(...answer.scores.map(({ label, score }) => {
    const fill = el("span", { class: "fill" });
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    return el(
      "li",
      { class: label === answer.label ? "predicted" : null, dataset: { label, score: String(score) } },
      el("span", { class: "name" }, label),
      el("span", { class: "track", "aria-hidden": "true" }, fill),
      el("span", { class: "value" }, percent(score)),
    );
  }));
  const by = answer.adapter === "base" ? "the base model alone" : `adapter ${answer.adapter}`;
  $("classify-meta").textContent = `Scored with ${by} on ${answer.base_model}.`;
  result.hidden = false;
}

// ---- evaluate ---------------------------------------------------------------------------------

function showProgress(text, done = null, total = null, status = "") {
  const box = $("eval-progress");
  const bar = $("eval-progress-bar");
  if (done === null || !total) {
    bar.removeAttribute("value"); // indeterminate
  } else {
    bar.max = total;
    bar.value = done;
  }
  $("eval-progress-text").textContent = text;
  box.dataset.status = status;
  box.hidden = false;
}

async function evaluate() {
  const form = $("evaluate-form");
  if (!form.reportValidity()) return;
  const file = $("eval-file").files[0];
  const data = new FormData();
  data.append("file", file, file.name);
  data.append("adapter", $("adapter").value);
  data.append("compare_base", $("eval-compare").checked ? "true" : "false");
  data.append("async", $("eval-async").checked ? "true" : "false");
  const button = $("evaluate-submit");
  setBusy(button, true);
  $("eval-result").hidden = true;
  showProgress(`Uploading and scoring ${file.name}…`, null, null, "uploading");
  try {
    const { status, body } = await api("evaluate", { method: "POST", body: data });
    clearError("Evaluate");
    if (status === 202) {
      await followJob(body.job_id);
    } else {
      $("eval-progress").hidden = true;
      showReport(body);
    }
  } catch (err) {
    $("eval-progress").hidden = true;
    showError(err, "Evaluate");
  } finally {
    state.job = null;
    $("evaluate-cancel").hidden = true;
    setBusy(button, false);
  }
}

/** Poll GET /evaluate/{job_id} until the job ends; the server and its jobs survive restarts, so
 *  a 503 or a lost connection only slows the polling down. */
async function followJob(jobId) {
  state.job = { id: jobId };
  $("evaluate-cancel").hidden = false;
  $("evaluate-cancel").disabled = false;
  showProgress(`Job ${jobId} queued…`, 0, 0, "queued");
  let delay = 250;
  for (;;) {
    let job;
    try {
      ({ body: job } = await api(`evaluate/${encodeURIComponent(jobId)}`));
    } catch (err) {
      if (err.status !== 503 && err.type !== "network_error") throw err;
      showProgress(`Job ${jobId}: waiting for the server…`, null, null, "waiting");
      await sleep(retryDelay(err, 2000));
      continue;
    }
    const { done, total } = job.progress;
    showProgress(`Job ${jobId}: ${job.status}, ${count(done)} / ${count(total)} pairs scored`,
      done, total, job.status);
    if (job.status === "succeeded") {
      showReport(job.result);
      return;
    }
    if (job.status === "failed") throw new ApiError(job.error || { type: "job_failed", message: "the job failed" });
    if (job.status === "cancelled") return;
    await sleep(delay);
    delay = Math.min(delay * 1.5, 2000);
  }
}

async function cancelJob() {
  if (!state.job) return;
  $("evaluate-cancel").disabled = true;
  try {
    await api(`evaluate/${encodeURIComponent(state.job.id)}`, { method: "DELETE" });
  } catch (err) {
    showError(err, "Cancel");
  }
}

/** A table in a container that scrolls sideways on narrow screens (focusable, so by keyboard too). */
function scrollable(table) {
  const caption = table.querySelector("caption");
  return el("div", {
    class: "table-scroll",
    role: "region",
    tabindex: "0",
    "aria-label": caption ? caption.textContent : null,
  }, table);
}

function summaryItem(term, value, attributes = {}) {
  return el("div", {}, el("dt", {}, term), el("dd", attributes, value));
}

function showReport(report) {
  const metrics = report.metrics;
  const adapterName = report.adapter === "base" ? "base model" : `adapter ${report.adapter}`;
  const parts = [
    el("h3", {}, `Results: ${adapterName} on ${report.source}`),
    el(
      "dl",
      { class: "summary" },
      summaryItem("Accuracy", percent(metrics.accuracy), { id: "eval-accuracy", dataset: { value: metrics.accuracy } }),
      summaryItem("Macro-F1", fixed(metrics.macro_f1), { id: "eval-macro-f1", dataset: { value: metrics.macro_f1 } }),
      summaryItem("Pairs", count(report.n), { id: "eval-n", dataset: { value: report.n } }),
      summaryItem("Dropped (no label)", count(report.dropped)),
      summaryItem("Speed", `${count(Math.round(report.pairs_per_s))} pairs/s`),
      summaryItem("Time", `${fixed(report.seconds, 2)} s`),
    ),
  ];
  parts.push(el(
    "div",
    { class: "tables" },
    report.base ? scrollable(comparisonTable(report)) : null,
    scrollable(perLabelTable(metrics, adapterName)),
  ));
  const matrices = [];
  if (report.base) matrices.push(confusionTable(report.base.metrics, "base model", "base"));
  matrices.push(confusionTable(metrics, adapterName, "adapter"));
  parts.push(el("div", { class: "tables" }, matrices.map(scrollable)));
  if (report.cases) parts.push(...casesSection(report.cases));
  const box = $("eval-result");
  box.dataset.n = report.n;
  box.replaceChildren(...parts);
  box.hidden = false;
}

function comparisonTable(report) {
  const rows = [["Accuracy", "accuracy"], ["Macro-F1", "macro_f1"]].map(([name, key]) => {
    const base = report.base.metrics[key];
    const adapter = report.metrics[key];
    const delta = adapter - base;
    const sign = delta > 0 ? "+" : delta < 0 ? "−" : "±";
    return el(
      "tr",
      {},
      el("th", { scope: "row" }, name),
      el("td", {}, fixed(base)),
      el("td", {}, fixed(adapter)),
      el("td", { class: delta > 0 ? "delta-up" : delta < 0 ? "delta-down" : null }, `${sign}${fixed(Math.abs(delta))}`),
    );
  });
  return el(
    "table",
    { class: "comparison", id: "eval-comparison" },
    el("caption", {}, "Base model vs adapter"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"), el("th", { scope: "col" }, "base"),
      el("th", { scope: "col" }, report.adapter), el("th", { scope: "col" }, "Change"))),
    el("tbody", {}, rows),
  );
}

const CASE_TITLES = {
  corrected: "Corrected by the adapter (base wrong, adapter right)",
  broken: "Broken by the adapter (base right, adapter wrong)",
  both_wrong: "Wrong in both",
};

function casesSection(cases) {
  const names = Object.keys(CASE_TITLES).filter((name) => cases[name]);
  const list = el("ul", { class: "cases" }, names.map((name) => el(
    "li", {}, `${CASE_TITLES[name]}: `, el("strong", {}, count(cases[name].count)),
  )));
  const details = names.filter((name) => cases[name].examples.length).map((name) => el(
    "details",
    {},
    el("summary", {}, `${CASE_TITLES[name]}: ${plural(cases[name].examples.length, "example")}`),
    scrollable(el(
      "table",
      { class: "examples" },
      el("thead", {}, el("tr", {}, ["Row", "Premise", "Hypothesis", "Gold", "Adapter", "Base"].map(
        (h) => el("th", { scope: "col" }, h),
      ))),
      el("tbody", {}, cases[name].examples.map((ex) => el(
        "tr",
        {},
        el("td", {}, ex.row),
        el("td", {}, ex.premise),
        el("td", {}, ex.hypothesis),
        el("td", {}, ex.label),
        el("td", {}, `${ex.prediction} (${percent(ex.score)})`),
        el("td", {}, `${ex.base_prediction} (${percent(ex.base_score)})`),
      ))),
    )),
  ));
  return [el("h3", {}, "What the adapter changed"), list, ...details];
}

function perLabelTable(metrics, title) {
  const labels = metrics.confusion_matrix.labels;
  return el(
    "table",
    { class: "per-label" },
    el("caption", {}, `Per label: ${title}`),
    el("thead", {}, el("tr", {}, ["Label", "Precision", "Recall", "F1", "Support"].map(
      (h) => el("th", { scope: "col" }, h),
    ))),
    el("tbody", {}, labels.map((label) => {
      const m = metrics.per_label[label];
      return el("tr", {}, el("th", { scope: "row" }, label), el("td", {}, fixed(m.precision)),
        el("td", {}, fixed(m.recall)), el("td", {}, fixed(m.f1)), el("td", {}, count(m.support)));
    })),
  );
}

/** Rows are gold labels, columns predicted labels; cells are shaded by their share of the row. */
function confusionTable(metrics, title, model) {
  const { labels, counts } = metrics.confusion_matrix;
  const sum = (values) => values.reduce((a, b) => a + b, 0);
  const rowTotals = counts.map(sum);
  const columnTotals = labels.map((_, j) => sum(counts.map((row) => row[j])));
  const body = counts.map((row, i) => el(
    "tr",
    {},
    el("th", { scope: "row" }, labels[i]),
    row.map((n, j) => {
      const cell = el("td", {
        class: `cell ${i === j ? "right" : "wrong"}`,
        dataset: { gold: labels[i], predicted: labels[j] },
      }, count(n));
      cell.style.setProperty("--share", rowTotals[i] ? (n / rowTotals[i]).toFixed(3) : "0");
      return cell;
    }),
    el("td", { class: "total" }, count(rowTotals[i])),
  ));
  return el(
    "table",
    { class: "confusion", dataset: { model } },
    el("caption", {}, `Confusion matrix: ${title}`),
    el("thead", {}, el(
      "tr",
      {},
      el("th", { scope: "col" }, "gold \\ predicted"),
      labels.map((label) => el("th", { scope: "col" }, label)),
      el("th", { scope: "col" }, "Total"),
    )),
    el("tbody", {}, body),
    el("tfoot", {}, el(
      "tr",
      {},
      el("th", { scope: "row" }, "Total"),
      columnTotals.map((n) => el("td", { class: "total" }, count(n))),
      el("td", { class: "total grand-total" }, count(sum(rowTotals))),
    )),
  );
}

// ---- wiring -----------------------------------------------------------------------------------

function wire() {
  $("classify-form").addEventListener("submit", (event) => {
    event.preventDefault();
    classify();
  });
  for (const id of ["premise", "hypothesis"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        $("classify-form").requestSubmit();
      }
    });
  }
  $("adapter").addEventListener("change", () => {
    state.userPickedAdapter = true;
    describeModel();
    // Show the pair's answer under the newly picked adapter.
    if (!$("classify-result").hidden && $("premise").value && $("hypothesis").value) classify();
  });
  $("adapter-refresh").addEventListener("click", loadAdapters);
  $("evaluate-form").addEventListener("submit", (event) => {
    event.preventDefault();
    evaluate();
  });
  $("evaluate-cancel").addEventListener("click", cancelJob);
  $("message-close").addEventListener("click", () => clearError());
}

async function start() {
  wire();
  state.ready = await waitUntilReady();
  setStatus("ready", "Ready");
  await loadAdapters();
  for (const id of ["classify-submit", "evaluate-submit"]) setBusy($(id), false);
  document.body.dataset.ready = "true";
}

start();
