// xpcnn serve: draw (pointer events: mouse, pen, finger) or drop a picture; POST it to /api/predict.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const errorBox = document.getElementById("error");
const busyBox = document.getElementById("busy");
const TOP = 5;
const BRUSH = 22;          // pixels of the 280 x 280 pad: about 2 pixels of a 28 x 28 image
const DEBOUNCE_MS = 150;
const MAX_TRIES = 10;      // a request answered 503 (busy) is sent again up to this many times in all

let drawing = null;        // the pointer id drawing now
let last = null;
let inFlight = false;
let timer = null;

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function point(event) {
  const rect = pad.getBoundingClientRect();
  return [(event.clientX - rect.left) * pad.width / rect.width, (event.clientY - rect.top) * pad.height / rect.height];
}

function stroke(from, to, pressure) {
  ctx.strokeStyle = "#000";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = BRUSH * (pressure > 0 && pressure !== 0.5 ? 0.6 + 0.8 * pressure : 1);
  ctx.beginPath();
  ctx.moveTo(from[0], from[1]);
  ctx.lineTo(to[0], to[1]);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = event.pointerId;
  last = point(event);
  stroke(last, last, event.pressure);
  changed();
});
pad.addEventListener("pointermove", (event) => {
  if (event.pointerId !== drawing) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const one of (events.length ? events : [event])) {
    const here = point(one);
    stroke(last, here, one.pressure);
    last = here;
  }
  changed();
});
for (const name of ["pointerup", "pointercancel"]) {
  pad.addEventListener(name, (event) => {
    if (event.pointerId !== drawing) return;
    drawing = null;
    changed();
  });
}

function changed() {
  document.body.dataset.pending = "1";     // a drawing not yet sent (tests wait for "0")
  clearTimeout(timer);
  timer = setTimeout(sendPad, DEBOUNCE_MS);
}

function sendPad() {
  if (inFlight) { timer = setTimeout(sendPad, DEBOUNCE_MS); return; }
  document.body.dataset.pending = "0";
  document.body.dataset.state = "busy";
  pad.toBlob((blob) => predict(blob, null, "your drawing"), "image/png");
}

function request(body, name) {
  if (name === null) return { method: "POST", body, headers: { "Content-Type": "application/octet-stream" } };
  const form = new FormData();             // a new one for each try
  form.append("file", body, name);
  return { method: "POST", body: form };
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A busy server answers 503 with Retry-After: say so, wait that long (plus up to half again, so
// that many pages do not all come back at the same moment) and try again, at most MAX_TRIES times.
// A drawing that changed meanwhile is not retried: the newer one is sent instead.
async function predict(body, name, source) {
  inFlight = true;
  document.body.dataset.state = "busy";
  try {
    for (let attempt = 1; ; attempt++) {
      const response = await fetch(`/api/predict?top=${TOP}`, request(body, name));
      let answer;
      try { answer = await response.json(); } catch { answer = { error: `the server answered ${response.status}` }; }
      if (response.status === 503 && attempt < MAX_TRIES) {
        if (name === null && document.body.dataset.pending === "1") break;
        const after = (response.headers.get("Retry-After") || "").trim();
        const seconds = /^[0-9]+$/.test(after) ? Number(after) : 1;
        showBusy(`busy, retrying in ${seconds} s (try ${attempt + 1} of ${MAX_TRIES}): ${answer.error || ""}`);
        await sleep(seconds * 1000 * (1 + Math.random() / 2));
        continue;
      }
      showBusy(null);
      if (response.status === 503) showError(`${answer.error || "the server is busy"} (gave up after ${MAX_TRIES} tries)`);
      else if (!response.ok) showError(answer.error || `the server answered ${response.status}`);
      else show(answer, source);
      break;
    }
  } catch (exc) {
    showBusy(null);
    showError(`no answer from the server (${exc.message}); is xpcnn serve still running?`);
  } finally {
    inFlight = false;
    document.body.dataset.answers = String(Number(document.body.dataset.answers) + 1);
    document.body.dataset.state = "idle";
  }
}

function showBusy(message) {
  busyBox.textContent = message || "";
  busyBox.hidden = !message;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function show(answer, source) {
  errorBox.hidden = true;
  const best = answer.top[0];
  const label = document.getElementById("top-label");
  label.textContent = best.label;
  label.dataset.class = String(best.class);
  document.getElementById("source").textContent =
    `${source}${answer.inverted ? " (light background: inverted)" : ""}`;
  const bars = document.getElementById("bars");
  bars.replaceChildren(...answer.top.map((guess) => {
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = guess.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * guess.prob).toFixed(1)}%`;
    bar.append(fill);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = guess.prob.toFixed(3);
    item.append(name, bar, p);
    return item;
  }));
  document.getElementById("prepared").src = answer.input.png;
  document.getElementById("input-size").textContent = `${answer.input.height} \u00d7 ${answer.input.width}`;
  const maps = document.getElementById("maps");
  if (answer.feature_maps) {
    const fm = answer.feature_maps;
    document.getElementById("maps-note").textContent =
      `The ${fm.count} feature maps (${fm.height} \u00d7 ${fm.width}) of ${fm.layer}, the first convolution ` +
      "(before ReLU; each scaled to its own range, bright: strong response).";
    const sheet = document.createElement("img");
    sheet.src = fm.png;
    sheet.alt = `the ${fm.count} feature maps of ${fm.layer}`;
    sheet.id = "maps-sheet";
    sheet.dataset.count = String(fm.count);
    maps.replaceChildren(sheet);
  } else {
    maps.replaceChildren();
    document.getElementById("maps-note").textContent = "This model has no convolution: no feature maps to show.";
  }
}

function sendFile(file) {
  if (!file) return;
  predict(file, file.name, `file ${file.name}`);
}

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  errorBox.hidden = true;
});
document.getElementById("file").addEventListener("change", (event) => {
  sendFile(event.target.files[0]);
  event.target.value = "";
});
const zone = document.getElementById("drop-zone");
zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  sendFile(event.dataTransfer.files[0]);
});

async function loadModel() {
  try {
    const info = await (await fetch("/api/model")).json();
    const accuracy = info.test_accuracy === null ? "test accuracy unknown" :
      `test accuracy ${(100 * info.test_accuracy).toFixed(1)}%`;
    document.getElementById("model-info").textContent =
      `${info.model} on ${info.dataset || "an unknown dataset"} \u00b7 ${accuracy} \u00b7 epoch ${info.epoch} ` +
      `\u00b7 ${info.input_size.join(" \u00d7 ")} input \u00b7 backend ${info.backend}`;
  } catch (exc) {
    showError(`could not read /api/model (${exc.message})`);
  }
  document.body.dataset.state = "idle";
}

clearPad();
loadModel();
