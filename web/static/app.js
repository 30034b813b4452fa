// The BWR-DNC page: chat over the WebSocket protocol, a dashboard fed by GET /v1/events (SSE),
// and a memory view of one session. Plain JS, no framework; charts by uPlot (vendor/).
// It speaks only to the gateway that served it: nothing leaves localhost.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 120; // points kept per chart (two minutes at one summary per second)
const TRAIN_HISTORY = 2048; // loss points kept (the gateway keeps as many reports)
const STORE = { key: "bwr.apiKey", session: "bwr.session" };

const state = {
  apiKey: localStorage.getItem(STORE.key) || "",
  session: JSON.parse(localStorage.getItem(STORE.session) || "null"), // {id, token}
  ws: null,
  wsUp: false,
  generating: false,
  out: null, // the element the current turn's deltas grow
  frames: 0, // delta frames of the current turn
  retry: 500, // ms before the next reconnect (doubles up to 5 s)
  levels: [],
  lastRead: null, // which memory slots the last decoded byte read (GET .../memory)
  trainStep: -1, // the last training step drawn
  needKey: false, // the gateway answered 401: wait for a key before asking again
};

function headers(withToken = true) {
  const h = {};
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  if (withToken && state.session) h["X-Session-Token"] = state.session.token;
  return h;
}

// withToken false: read as the owner (the key or the client address), for sessions of the list
async function getJSON(path, withToken = true) {
  const r = await fetch(path, { headers: headers(withToken), cache: "no-store" });
  if (r.status === 401) needKey();
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = "pill " + cls;
}

function needKey() {
  state.needKey = true;
  setConn("API key needed", "down");
  $("api-key").focus();
}

// ----- views -----

function showView() {
  const name = (location.hash || "#chat").slice(1).split("/")[0];
  for (const v of ["chat", "dashboard", "memory"]) {
    $("view-" + v).hidden = v !== name;
    document.querySelector(`nav a[data-view="${v}"]`).classList.toggle("active", v === name);
  }
  if (name === "dashboard") { resizeCharts(); refreshSessions(); }
  if (name === "memory") refreshMemory();
}

// ----- chat: the WebSocket protocol -----

function wsURL() {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/v1/stream";
}

function connect() {
  const ws = new WebSocket(wsURL());
  state.ws = ws;
  setConn("connecting", "");
  ws.onopen = () => {
    if (state.apiKey) send({ type: "auth", api_key: state.apiKey });
    const s = state.session;
    send(s ? { type: "open", session: s.id, token: s.token } : { type: "open" });
  };
  ws.onmessage = (ev) => onFrame(JSON.parse(ev.data));
  ws.onclose = () => {
    if (state.ws !== ws) return; // replaced on purpose
    state.wsUp = false;
    endTurn("disconnected");
    setConn("reconnecting", "down");
    setTimeout(connect, state.retry);
    state.retry = Math.min(state.retry * 2, 5000);
  };
}

function send(frame) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(frame));
}

function onFrame(f) {
  switch (f.type) {
    case "opened":
      state.wsUp = true;
      state.retry = 500;
      state.session = { id: f.session, token: f.token || (state.session && state.session.token) };
      localStorage.setItem(STORE.session, JSON.stringify(state.session));
      $("session-id").textContent = f.session;
      $("context-bytes").textContent = f.context_bytes;
      setConn(f.resumed ? "resumed" : "connected", "up");
      if (f.generating) beginTurn(null);
      refreshMemory();
      break;
    case "delta":
      if (!state.out) beginTurn(null);
      state.out.textContent += f.text !== undefined ? f.text : atob(f.bytes || "");
      state.frames += 1;
      state.out.dataset.frames = String(state.frames);
      scrollDown();
      break;
    case "done":
      $("context-bytes").textContent = f.usage.context_bytes;
      endTurn(f.reason + " · " + f.usage.output_bytes + " bytes out · " + state.frames + " frames");
      refreshMemory();
      break;
    case "memory":
      showLevels(f.levels, f.version);
      break;
    case "error":
      if (f.code === "unauthorized" && !state.session) { // no key, or a wrong one: stop asking
        const ws = state.ws;
        state.ws = null;
        state.wsUp = false;
        if (ws) ws.close();
        needKey();
      } else if (f.code === "unknown_session" || (f.code === "unauthorized" && state.session && !f.fatal)) {
        // the session is gone (or its token no longer fits): start a fresh one
        state.session = null;
        localStorage.removeItem(STORE.session);
        send({ type: "open" });
      } else {
        note("error " + f.code + ": " + f.message);
        if (state.generating && f.code !== "busy") endTurn("error");
      }
      break;
  }
}

function beginTurn(text) {
  const t = $("transcript");
  if (text !== null) {
    const inp = document.createElement("div");
    inp.className = "turn-in";
    inp.textContent = text;
    t.appendChild(inp);
  }
  state.out = document.createElement("div");
  state.out.className = "turn-out";
  state.out.dataset.frames = "0";
  t.appendChild(state.out);
  state.frames = 0;
  state.generating = true;
  $("cancel").disabled = false;
}

function endTurn(why) {
  if (!state.generating) return;
  const end = document.createElement("div");
  end.className = "turn-end";
  end.textContent = why;
  $("transcript").appendChild(end);
  if (state.out) state.out.dataset.done = "1";
  state.out = null;
  state.generating = false;
  $("cancel").disabled = true;
  scrollDown();
}

function note(text) {
  const n = document.createElement("div");
  n.className = "turn-end";
  n.textContent = text;
  $("transcript").appendChild(n);
  scrollDown();
}

function scrollDown() {
  const t = $("transcript");
  t.scrollTop = t.scrollHeight;
}

function submit(ev) {
  ev.preventDefault();
  const text = $("chat-input").value;
  if (!text || !state.wsUp) return;
  if (state.generating) endTurn("interrupted");
  beginTurn(text);
  send({ type: "input", text, max_bytes: Number($("max-bytes").value) || 256 });
  $("chat-input").value = "";
}

function newSession() {
  send({ type: "close" });
  state.session = null;
  localStorage.removeItem(STORE.session);
  endTurn("closed");
  $("transcript").textContent = "";
  const old = state.ws;
  state.ws = null;
  if (old) old.close();
  connect();
}

// ----- memory -----

function levelsLabel(levels) {
  if (!levels || !levels.length) return "no levels yet";
  return levels.map((l) => `L${l.level}: ${l.slots}`).join(" · ");
}

function showLevels(levels, version) {
  state.levels = levels || [];
  $("memory-levels").textContent = levelsLabel(state.levels) + " (v" + version + ")";
  if (state.session && memoryTarget() === state.session.id) drawLevels(state.levels, version);
}

// The memory view shows #memory/ID (any session of this owner) or else the chat's session.
function memoryTarget() {
  const [view, id] = location.hash.slice(1).split("/");
  return view === "memory" && id ? decodeURIComponent(id) : state.session && state.session.id;
}

async function refreshMemory() {
  const sid = memoryTarget();
  if (!sid || state.needKey) return;
  const own = state.session && sid === state.session.id;
  try {
    const m = await getJSON(`/v1/sessions/${encodeURIComponent(sid)}/memory`, own);
    if (sid !== memoryTarget()) return; // the view moved on meanwhile
    $("mem-session").textContent = m.session;
    $("mem-context").textContent = m.context_bytes;
    $("mem-state").textContent = m.state_bytes;
    $("mem-bytes").textContent = m.memory_bytes || m.nbytes || 0;
    $("mem-version").textContent = m.version;
    if (own) $("context-bytes").textContent = m.context_bytes;
    $("mem-note").textContent = m.memory === "off"
      ? "Memory is off in this gateway: the session keeps only its recurrent state."
      : `${m.slots || 0} of ${m.max_slots || 0} slots hold ${m.bytes_covered || 0} bytes of context` +
        (m.pending_jobs ? ` · ${m.pending_jobs} consolidation jobs pending` : "");
    state.lastRead = m.last_read || null;
    showLastRead(state.lastRead);
    if (!own) drawLevels(m.levels || [], m.version);
    else if (m.levels && m.levels.length) showLevels(m.levels, m.version);
    else drawLevels(state.levels, m.version);
  } catch (e) {
    // the session may be gone or the gateway restarting: the next frame or refresh retries
  }
}

function showLastRead(r) {
  const el = $("mem-read");
  if (!r || r.at < 0) {
    el.textContent = r ? "No byte has read memory yet." : "";
    return;
  }
  const picked = r.slots.reduce((n, s) => n + s.heads, 0);
  el.textContent = `Last read at byte ${r.at}: ${r.heads} heads took their top ${r.k} each; ` +
    `${picked} picks fell on ${r.slots.length} memory slots` +
    (r.earlier_version ? " of the previous memory version (not outlined: the levels have moved since)"
      : " (outlined)") + `, ${r.null} on the null slot.`;
}

// Per level, index from the oldest slot -> heads that picked it in the last read.
function pickedSlots(levels) {
  const out = new Map();
  const r = state.lastRead;
  if (!r || r.at < 0 || r.earlier_version) return out;
  for (const p of r.slots) {
    const l = levels.find((x) => x.level === p.level);
    if (!l) continue;
    out.set(`${p.level}:${l.slots - 1 - p.from_newest}`, p.heads);
  }
  return out;
}

function drawLevels(levels, version) {
  const root = $("levels");
  root.textContent = "";
  const ctx = Number($("mem-context").textContent) || 1;
  const picked = pickedSlots(levels);
  for (const l of levels) {
    const box = document.createElement("div");
    box.className = "level";
    box.dataset.level = String(l.level);
    const h = document.createElement("h3");
    h.textContent = `Level ${l.level}: ${l.slots} of ${l.capacity ?? "?"} slots · ` +
      `${l.bytes_covered ?? 0} bytes covered` + (l.end ? ` (bytes ${l.start}-${l.end})` : "");
    box.appendChild(h);
    const slots = document.createElement("div");
    slots.className = "slots";
    const cap = Math.max(l.capacity || l.slots, l.slots);
    for (let i = 0; i < cap; i++) {
      const s = document.createElement("div");
      const heads = picked.get(`${l.level}:${i}`);
      s.className = "slot" + (i < l.slots ? " full" : "") + (heads ? " picked" : "");
      s.title = i < l.slots ? `slot ${i}: about ${Math.round((l.bytes_covered || 0) / l.slots)} bytes` +
        (heads ? ` · read by ${heads} heads in the last read` : "") : "empty";
      slots.appendChild(s);
    }
    box.appendChild(slots);
    if (l.end) { // the span of the context this level covers
      const span = document.createElement("div");
      span.className = "span";
      const bar = document.createElement("i");
      const total = Math.max(ctx, l.end);
      bar.style.left = (100 * l.start / total) + "%";
      bar.style.width = Math.max(1, 100 * (l.end - l.start) / total) + "%";
      span.appendChild(bar);
      box.appendChild(span);
    }
    root.appendChild(box);
  }
  if (!levels.length) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = "No memory levels yet (version " + version + "): levels appear after a segment closes.";
    root.appendChild(p);
  }
}

// ----- dashboard: charts fed by the event feed -----

const charts = {};

// x is time (seconds) unless time is false (then x is e.g. the training step)
function makeChart(id, series, { time = true, limit = HISTORY } = {}) {
  const el = $(id);
  const data = [[], ...series.map(() => [])];
  const opts = {
    width: Math.max(el.clientWidth || 320, 240),
    height: 180,
    legend: { show: true },
    scales: { x: { time } },
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 1.5 }))],
    axes: [{}, { size: 50 }],
  };
  charts[id] = { plot: new uPlot(opts, data, el), data, limit };
}

function resizeCharts() {
  for (const [id, c] of Object.entries(charts)) {
    const w = $(id).clientWidth;
    if (w > 0) c.plot.setSize({ width: w, height: 180 });
  }
}

function push(id, t, values) {
  const c = charts[id];
  c.data[0].push(t);
  values.forEach((v, i) => c.data[i + 1].push(v));
  if (c.data[0].length > c.limit) for (const col of c.data) col.shift();
  c.plot.setData(c.data);
}

const ms = (s) => (s === null || s === undefined ? null : 1000 * s);
const fmt = (v, d = 1) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));

function onEngine(e) {
  push("chart-throughput", e.ts, [e.bytes_out_per_s, e.bytes_in_per_s]);
  push("chart-latency", e.ts, [ms(e.ttft_p50_s), ms(e.itl_p50_s)]);
  push("chart-queue", e.ts, [e.running, e.waiting]);
  $("m-throughput").textContent = fmt(e.bytes_out_per_s, 0);
  $("m-ttft").textContent = fmt(ms(e.ttft_p50_s));
  $("m-itl").textContent = fmt(ms(e.itl_p50_s), 2);
  $("m-queue").textContent = `${e.running} / ${e.waiting}`;
  $("m-weights").textContent = e.weights_version;
  $("m-sessions").textContent = e.sessions;
}

// The trainer's reports (events.train via the feed, and GET /v1/training for what came before the
// page opened): loss by optimizer step; a report at or before the last step drawn is skipped.
function onTrain(e) {
  if (typeof e.step !== "number" || e.step <= state.trainStep) return;
  state.trainStep = e.step;
  push("chart-loss", e.step, [e.loss]);
  $("m-train-step").textContent = String(e.step);
  $("m-train-loss").textContent = fmt(e.loss, 3);
  $("m-train-rate").textContent = fmt(e.bytes_per_s, 0);
}

async function loadTraining() {
  try {
    const { reports } = await getJSON(`/v1/training?since=${state.trainStep}`);
    for (const r of reports) onTrain(r);
  } catch (e) { /* no trainer yet, or the gateway is away: the feed carries new reports */ }
}

function onSession(e) {
  const li = document.createElement("li");
  const t = new Date(e.ts * 1000).toLocaleTimeString();
  li.textContent = `${t} ${e.event} ${e.session}` + (e.reason ? ` (${e.reason})` : "");
  const list = $("events");
  list.prepend(li);
  while (list.children.length > 50) list.lastChild.remove();
  refreshSessions();
}

function onNamespace(e) { // ingestion per namespace, from the bus (events.namespace)
  const body = document.querySelector("#namespaces tbody");
  let tr = body.querySelector(`tr[data-namespace="${CSS.escape(e.namespace)}"]`);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.namespace = e.namespace;
    for (let i = 0; i < 4; i++) tr.appendChild(document.createElement("td"));
    body.appendChild(tr);
  }
  const cells = [e.namespace, e.documents, e.bytes, new Date(e.ts * 1000).toLocaleTimeString()];
  cells.forEach((v, i) => { tr.children[i].textContent = v; });
}

function onOther(kind, e) {
  onSession({ ts: e.ts || Date.now() / 1000, event: kind, session: e.session || "" });
}

// GET /v1/events read with fetch (EventSource cannot send the Authorization header); reconnects.
async function feed() {
  let wait = 500;
  for (;;) {
    while (state.needKey) await new Promise((res) => setTimeout(res, 250));
    try {
      const r = await fetch("/v1/events", { headers: headers(), cache: "no-store" });
      if (r.status === 401) needKey();
      if (!r.ok) throw new Error("HTTP " + r.status);
      wait = 500;
      loadTraining(); // reports published while the feed was down
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          dispatch(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } catch (e) {
      // the gateway is away (restarting) or refused the key: wait and try again
    }
    await new Promise((res) => setTimeout(res, wait));
    wait = Math.min(wait * 2, 5000);
  }
}

function dispatch(block) {
  let event = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (!data) return;
  const e = JSON.parse(data);
  if (event === "engine") onEngine(e);
  else if (event === "session") onSession(e);
  else if (event === "namespace") onNamespace(e);
  else if (event === "train") onTrain(e);
  else if (event === "memory_job_failed") onOther(event, e);
}

// /metrics-derived figures and the caller's sessions, polled while the dashboard shows.
async function refreshSessions() {
  if ($("view-dashboard").hidden || state.needKey) return;
  try {
    const { sessions } = await getJSON("/v1/sessions");
    const shown = sessions.slice(0, 16); // one memory read each: keep it to a screenful
    const mems = await Promise.all(shown.map((s) =>
      getJSON(`/v1/sessions/${s.session}/memory`, false).catch(() => null)));
    let pending = 0;
    const body = document.querySelector("#sessions tbody");
    body.textContent = "";
    shown.forEach((s, i) => {
      const m = mems[i];
      pending += (m && m.pending_jobs) || 0;
      const mem = !m ? "-" : m.memory === "off" ? "off"
        : `v${m.version} · ${levelsLabel(m.levels)} · ${m.slots || 0} slots`;
      const tr = document.createElement("tr");
      tr.dataset.session = s.session;
      const cells = [s.session, s.state, s.context_bytes, mem, s.generating ? "yes" : "no", fmt(s.idle_s)];
      for (const v of cells) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      const a = document.createElement("a");
      a.href = "#memory/" + encodeURIComponent(s.session);
      a.textContent = "memory";
      td.appendChild(a);
      tr.appendChild(td);
      body.appendChild(tr);
    });
    $("m-pending").textContent = String(pending);
  } catch (e) { /* retried on the next tick */ }
  try {
    const r = await fetch("/metrics", { headers: headers(), cache: "no-store" });
    if (r.ok) showMetrics(parseMetrics(await r.text()));
  } catch (e) { /* retried on the next tick */ }
}

function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const sp = line.lastIndexOf(" ");
    out[line.slice(0, sp)] = Number(line.slice(sp + 1));
  }
  return out;
}

function showMetrics(m) {
  const n = m["bwr:engine_batch_size_count"];
  $("m-batch").textContent = n ? fmt(m["bwr:engine_batch_size_sum"] / n, 2) : "-";
  const seg = m["bwr:segments_closed_total"];
  $("m-segments").textContent = seg === undefined ? "-" : String(seg);
  const done = m["bwr:memory_versions_installed_total"];
  $("m-consolidated").textContent = done === undefined ? "-" : String(done);
  let turns = 0;
  for (const [k, v] of Object.entries(m)) if (k.startsWith("bwr:turns_total{")) turns += v;
  $("m-turns").textContent = String(turns);
}

// ----- start -----

function start() {
  $("api-key").value = state.apiKey;
  $("api-key").addEventListener("change", () => {
    state.apiKey = $("api-key").value.trim();
    state.needKey = false;
    localStorage.setItem(STORE.key, state.apiKey);
    newSession();
  });
  $("chat-form").addEventListener("submit", submit);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.ctrlKey) submit(e);
  });
  $("cancel").addEventListener("click", () => send({ type: "cancel" }));
  $("new-session").addEventListener("click", newSession);
  $("mem-refresh").addEventListener("click", refreshMemory);
  window.addEventListener("hashchange", showView);
  window.addEventListener("resize", resizeCharts);
  makeChart("chart-throughput", [["out", "#2060c0"], ["in", "#c07020"]]);
  makeChart("chart-latency", [["TTFT", "#2060c0"], ["ITL", "#20a060"]]);
  makeChart("chart-queue", [["running", "#2060c0"], ["waiting", "#c03030"]]);
  makeChart("chart-loss", [["loss", "#8030b0"]], { time: false, limit: TRAIN_HISTORY });
  showView();
  connect();
  feed();
  setInterval(refreshSessions, 2000);
  setInterval(() => { if (!$("view-memory").hidden) refreshMemory(); }, 2000);
}

window.bwr = { state, charts }; // read by the browser tests
start();
