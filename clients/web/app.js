// mone-serve web page: classify an image or clip under a compute budget and draw the routing map.
// Plain browser JavaScript, no dependencies and no build step; it talks to the same server that serves it.
"use strict";

// Smallest expert first; the same palette as clients/routing.py.
const PALETTE = ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725", "#ffa028", "#e65028", "#b4141e"];
const ALPHA = 0.5;
const CANVAS_SIDE = 448;

const $ = (id) => document.getElementById(id);
const state = { blob: null, name: "", kind: "auto", frames: null, controller: null, seq: 0, experts: 4, kinds: [] };
// The capacity slider is the budget kind `capacity`; every other kind the server lists (`budgets.kinds` of
// v1/models) is a choice next to the number field.
const SLIDER_KIND = "capacity";

function apiHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setState(name) {
  document.body.dataset.state = name;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const err = body.error || {};
    const where = (err.detail && err.detail.errors || []).map((e) => `${e.field}: ${e.message}`).join("; ");
    return `${response.status} ${err.code || response.statusText}: ${err.message || ""}${where ? ` (${where})` : ""}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

// -- model metadata ---------------------------------------------------------------------------------------
async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: apiHeaders() });
    if (!response.ok) {
      $("model").textContent = "model metadata unavailable";
      showError(response.status === 401 ? "This server needs an API key: open “API key” and enter it."
                                         : await errorText(response));
      return;
    }
    const m = (await response.json()).models[0];
    state.experts = m.config.num_experts || 4;
    const slider = $("capacity");
    slider.min = m.budgets.min_capacity;
    $("capacity-min").textContent = `1/${Math.round(1 / m.budgets.min_capacity)} (cheapest)`;
    $("model").textContent =
      `${m.name} · ${m.variant} · ${m.device} · ${m.labels.length} classes · ${state.experts} nested experts`;
    listBudgetKinds(m.budgets.kinds || []);
    drawLegend();
  } catch (err) {
    $("model").textContent = "cannot reach the server";
    showError(String(err));
  }
}

function listBudgetKinds(kinds) {
  state.kinds = kinds.filter((k) => k.name !== SLIDER_KIND);
  const select = $("budget-kind");
  const chosen = select.value;
  select.textContent = "";
  for (const k of state.kinds) {
    const option = document.createElement("option");
    option.value = k.name;
    option.textContent = k.unit ? `${k.label || k.name} (${k.unit})` : k.label || k.name;
    option.title = k.description || "";
    select.append(option);
  }
  if (state.kinds.some((k) => k.name === chosen)) select.value = chosen;
  showBudgetHelp();
}

function chosenKind() {
  return state.kinds.find((k) => k.name === $("budget-kind").value);
}

function showBudgetHelp() {
  const k = chosenKind();
  $("budget-help").textContent = k ? k.description : "";
}

function drawLegend() {
  const legend = $("legend");
  legend.textContent = "";
  for (let e = 0; e < state.experts; e++) {
    const row = document.createElement("div");
    const swatch = document.createElement("i");
    swatch.style.background = PALETTE[Math.min(e, PALETTE.length - 1)];
    row.append(swatch, `expert ${e + 1}${e === 0 ? " (smallest)" : e === state.experts - 1 ? " (full width)" : ""}`);
    legend.append(row);
  }
}

// -- frames of the input, to draw under the map -------------------------------------------------------------
async function gifFrames(blob) {
  if (!("ImageDecoder" in window)) return [await createImageBitmap(blob)];
  const decoder = new ImageDecoder({ data: await blob.arrayBuffer(), type: "image/gif" });
  await decoder.tracks.ready;
  const count = decoder.tracks.selectedTrack.frameCount;
  const frames = [];
  for (let i = 0; i < count; i++) {
    const { image } = await decoder.decode({ frameIndex: i });
    frames.push(await createImageBitmap(image));
    image.close();
  }
  decoder.close();
  return frames;
}

function videoFrames(blob, count) {
  // Seek a hidden <video> to the centre of each of `count` segments (how the server samples a clip).
  return new Promise((resolve) => {
    const video = document.createElement("video");
    video.muted = true;
    video.preload = "auto";
    video.src = URL.createObjectURL(blob);
    const frames = [];
    const done = () => { URL.revokeObjectURL(video.src); resolve(frames); };
    video.onerror = done;
    video.onloadeddata = async () => {
      for (let i = 0; i < count; i++) {
        await new Promise((ok) => { video.onseeked = ok; video.currentTime = video.duration * (i + 0.5) / count; });
        frames.push(await createImageBitmap(video));
      }
      done();
    };
  });
}

function sampleIndices(available, count) {
  return Array.from({ length: count }, (_, i) => Math.min(available - 1, Math.floor((i + 0.5) * available / count)));
}

async function framesFor(count) {
  if (state.frames && state.frames.length === count) return state.frames;
  let frames = [];
  try {
    if (state.blob.type.startsWith("video/")) {
      frames = await videoFrames(state.blob, count);
    } else if (state.blob.type === "image/gif" && state.kind === "clip") {
      const all = await gifFrames(state.blob);
      frames = sampleIndices(all.length, count).map((i) => all[i]);
    } else {
      frames = [await createImageBitmap(state.blob)];
    }
  } catch (_) {
    frames = []; // the browser cannot decode it: the map is drawn on a dark background
  }
  state.frames = frames.length === count ? frames : null;
  return frames;
}

// -- drawing -----------------------------------------------------------------------------------------------
function hexToRgba(hex, alpha) {
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

async function drawRouting(routing) {
  const canvas = $("routing");
  const T = routing.length;
  const cols = T === 1 ? 1 : Math.min(4, T);
  const rows = Math.ceil(T / cols);
  const gap = T === 1 ? 0 : 6;
  const tile = Math.floor((CANVAS_SIDE - gap * (cols - 1)) / cols);
  canvas.width = CANVAS_SIDE;
  canvas.height = rows * tile + gap * (rows - 1);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.fillStyle = "#111";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const frames = await framesFor(T);
  routing.forEach((grid, t) => {
    const x0 = (t % cols) * (tile + gap);
    const y0 = Math.floor(t / cols) * (tile + gap);
    if (frames[t]) ctx.drawImage(frames[t], x0, y0, tile, tile);
    const gh = grid.length;
    const gw = grid[0].length;
    for (let i = 0; i < gh; i++) {
      for (let j = 0; j < gw; j++) {
        const e = Math.min(grid[i][j], PALETTE.length - 1);
        const px = x0 + Math.round(j * tile / gw);
        const py = y0 + Math.round(i * tile / gh);
        const w = x0 + Math.round((j + 1) * tile / gw) - px;
        const h = y0 + Math.round((i + 1) * tile / gh) - py;
        ctx.fillStyle = hexToRgba(PALETTE[e], ALPHA);
        ctx.fillRect(px, py, w, h);
        ctx.strokeStyle = "rgba(255, 255, 255, 0.35)";
        ctx.strokeRect(px + 0.5, py + 0.5, w - 1, h - 1);
      }
    }
  });
}

function showResult(r, requested) {
  const s = r.served;
  const saved = s.dense_gflops > 0 ? Math.round(100 * (1 - s.gflops / s.dense_gflops)) : 0;
  $("requested").textContent = requested;
  $("served-capacity").textContent =
    `${s.capacity.toFixed(3)} (realised ${s.realised_capacity.toFixed(3)})${s.degraded ? " · degraded" : ""}`;
  $("gflops").textContent = `${s.gflops.toFixed(4)} of ${s.dense_gflops.toFixed(4)} (${saved}% saved)`;
  const t = r.timing;
  const deadline = s.deadline_met === null || s.deadline_met === undefined ? ""
    : s.deadline_met ? " · deadline met" : " · deadline missed";
  $("latency-out").textContent =
    `${t.total_ms.toFixed(1)} ms (queue ${t.queue_ms.toFixed(1)}, compute ${t.compute_ms.toFixed(1)})${deadline}`;
  const list = $("predictions");
  list.textContent = "";
  for (const p of r.top_k) {
    const li = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(2, Math.round(160 * p.prob))}px`;
    const prob = document.createElement("span");
    prob.className = "p";
    prob.textContent = p.prob.toFixed(3);
    li.append(p.label, bar, prob);
    list.append(li);
  }
}

// -- asking the server -------------------------------------------------------------------------------------
function budget() {
  const k = chosenKind();
  const value = parseFloat($("budget-value").value);
  if (k && value > 0) return [k.name, value, `${k.label || k.name} ≤ ${value}${k.unit ? ` ${k.unit}` : ""}`];
  const c = parseFloat($("capacity").value);
  return [SLIDER_KIND, c, `capacity ${c.toFixed(3)}`];
}

function budgetMode() {
  document.body.classList.toggle("budget-mode", Boolean(chosenKind()) && parseFloat($("budget-value").value) > 0);
}

async function classify() {
  if (!state.blob) return;
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  const seq = ++state.seq;
  const [field, value, label] = budget();
  const form = new FormData();
  form.append("file", state.blob, state.name);
  form.append(field, String(value));
  form.append("top_k", "5");
  form.append("routing", "true");
  if (state.kind !== "auto") form.append("kind", state.kind);
  setState("loading");
  try {
    const response = await fetch("v1/classify", {
      method: "POST", body: form, headers: apiHeaders(), signal: controller.signal,
    });
    if (!response.ok) {
      if (seq !== state.seq) return;
      showError(await errorText(response));
      setState("error");
      return;
    }
    const result = await response.json();
    if (seq !== state.seq) return; // a newer request is on its way
    showError("");
    showResult(result, label);
    await drawRouting(result.routing);
    document.body.dataset.answers = String(Number(document.body.dataset.answers) + 1);
    setState("done");
  } catch (err) {
    if (err.name === "AbortError") return;
    showError(`request failed: ${err}`);
    setState("error");
  }
}

let timer = null;
function classifySoon(delay) {
  clearTimeout(timer);
  timer = setTimeout(classify, delay);
}

async function useInput(blob, name, kind) {
  state.blob = blob;
  state.name = name;
  state.frames = null;
  state.kind = kind || "auto";
  if (state.kind === "auto" && blob.type === "image/gif") {
    try {
      if ((await gifFrames(blob)).length > 1) state.kind = "clip"; // an animated GIF is a clip
    } catch (_) { /* send it as an image */ }
  }
  classify();
}

// -- wiring ------------------------------------------------------------------------------------------------
function init() {
  $("capacity").addEventListener("input", () => {
    $("capacity-value").textContent = parseFloat($("capacity").value).toFixed(3);
    $("budget-value").value = "";
    budgetMode();
    classifySoon(80);
  });
  $("budget-value").addEventListener("input", () => {
    budgetMode();
    classifySoon(300);
  });
  $("budget-kind").addEventListener("change", () => {
    showBudgetHelp();
    budgetMode();
    if (parseFloat($("budget-value").value) > 0) classifySoon(0);
  });
  $("clear-budget").addEventListener("click", () => {
    $("budget-value").value = "";
    budgetMode();
    classifySoon(0);
  });
  $("api-key").addEventListener("change", () => { loadModel(); classifySoon(0); });
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    if (file) useInput(file, file.name);
    document.querySelectorAll(".sample").forEach((b) => b.classList.remove("active"));
  });
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => document.addEventListener(t, () => drop.classList.remove("over")));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer.files[0];
    if (file) useInput(file, file.name);
  });
  document.querySelectorAll(".sample").forEach((button) => button.addEventListener("click", async () => {
    document.querySelectorAll(".sample").forEach((b) => b.classList.toggle("active", b === button));
    try {
      const response = await fetch(button.dataset.src);
      const blob = await response.blob();
      await useInput(blob, button.dataset.src.split("/").pop(), button.dataset.kind);
    } catch (err) {
      showError(`cannot load the sample: ${err}`);
    }
  }));
  drawLegend();
  loadModel();
}

init();
