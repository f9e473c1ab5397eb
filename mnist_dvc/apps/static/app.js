// Draw a digit: the page of `python -m mnist_dvc.apps.serve`. Plain JavaScript, no build step.
//
// Strokes are kept as point lists (for Undo) and drawn dark on a transparent
// canvas: to_mnist reads transparency as paper. While you draw, the canvas is
// sent as PNG 150 ms after the pen last moved, and at once when it lifts; only
// the answer to the latest request is shown (a request counter).
"use strict";

(() => {
  const LINE_WIDTH = 20;       // px on the 280 px canvas: ~2 px of 28 once scaled, like MNIST's strokes
  const INK = "#111827";
  const DEBOUNCE_MS = 150;
  const SHRINK_SIDE = 1000;    // big uploads are shrunk to this long side before sending (the server's work size)
  const MODELS = ["manual", "skorch"];

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const pad = $("pad");
  const picture = $("picture");
  const statusLine = $("status");
  const results = $("results");
  const verdict = $("verdict");
  const miniAnswer = $("mini-answer");  // phones: the answer next to the pad, without scrolling
  const input28 = $("input28").getContext("2d");
  const undoButton = $("undo");
  const clearButton = $("clear");
  const fileInput = $("file");

  let strokes = [];            // [[{x, y}, ...], ...]
  let active = null;           // the stroke being drawn
  let activePointer = null;    // its pointer id: a second finger is ignored
  let drawQueued = false;
  let debounceTimer = 0;
  let requestId = 0;           // answers to older requests are ignored
  let snapshot = 0;            // likewise PNGs of the canvas made before a newer one
  let inFlight = 0;            // requests on their way
  let encoding = 0;            // canvas PNGs being made
  let maxBytes = 2000000;      // updated from /api/health
  let pictureUrl = null;
  let collecting = false;      // the server saves corrections (serve --collect): from /api/health
  let tokenRequired = false;   // and wants its collection token (serve --collect-token): from /api/health
  let modelVersion = null;     // the registry version that answers (serve --stage), or null
  const TOKEN_KEY = "mnist-dvc-collect-token";  // sessionStorage: asked once, kept for this tab's session
  let answered = null;         // {body, type, digit} of the picture the shown answer is for

  // --- results: bars and 28x28 view -------------------------------------------

  const panels = {};
  for (const name of MODELS) {
    const section = $(`model-${name}`);
    const bars = section.querySelector("[data-bars]");
    const fills = [];
    for (let d = 0; d < 10; d++) {
      const column = document.createElement("div");
      column.className = "bar";
      column.setAttribute("aria-hidden", "true");
      const track = document.createElement("div");
      track.className = "track";
      const fill = document.createElement("div");
      fill.className = "fill";
      track.append(fill);
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = String(d);
      column.append(track, label);
      bars.append(column);
      fills.push(fill);
    }
    panels[name] = {
      section, bars, fills,
      digit: section.querySelector("[data-digit]"),
      confidence: section.querySelector("[data-confidence]"),
      accuracy: section.querySelector("[data-accuracy]"),
    };
  }

  const percent = (p) => (p >= 0.995 || p < 0.005 ? (p * 100).toFixed(0) : (p * 100).toFixed(1)) + "%";

  function showAnswer(answer) {
    for (const name of MODELS) {
      const panel = panels[name];
      const { digit, probabilities } = answer[name];
      panel.digit.textContent = String(digit);
      panel.section.dataset.digit = String(digit);
      panel.confidence.textContent = `${percent(probabilities[digit])} sure`;
      probabilities.forEach((p, d) => {
        const fill = panel.fills[d];
        fill.style.height = `${Math.max(p * 100, 0)}%`;
        fill.classList.toggle("top", d === digit);
        fill.parentElement.parentElement.title = `${d}: ${percent(p)}`;
      });
      const ranked = probabilities.map((p, d) => [p, d]).sort((a, b) => b[0] - a[0]).slice(0, 3);
      panel.bars.setAttribute("aria-label",
        "Most likely: " + ranked.map(([p, d]) => `${d} (${percent(p)})`).join(", "));
    }
    const [a, b] = MODELS.map((name) => answer[name].digit);
    verdict.textContent = a === b ? `Both models read ${a}.` : `The models disagree: ${a} (manual) or ${b} (skorch).`;
    verdict.classList.toggle("disagree", a !== b);
    miniAnswer.replaceChildren(...MODELS.flatMap((name, i) => {
      const digit = document.createElement("strong");
      digit.className = `mini-${name}`;
      digit.textContent = String(answer[name].digit);
      return [i ? " · " : "", `${name} `, digit];
    }));
    drawInput(answer.input);
  }

  // --- corrections (only where the server was started with --collect) ----------

  const feedback = $("feedback");
  const feedbackRight = $("feedback-right");
  const feedbackStatus = $("feedback-status");
  const digitButtons = [];
  for (let d = 0; d < 10; d++) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "button digit-button";
    button.textContent = String(d);
    button.disabled = true;
    button.addEventListener("click", () => sendCorrection(d));
    digitButtons.push(button);
  }
  $("feedback-digits").append(...digitButtons);
  feedbackRight.addEventListener("click", () => { if (answered) sendCorrection(answered.digit); });

  function offerFeedback(body, type, answer) {
    const [a, b] = MODELS.map((name) => answer[name].digit);
    // "Right" only where both models agree: otherwise the person picks the digit.
    answered = { body, type, digit: a === b ? a : null };
    feedbackRight.hidden = answered.digit === null;
    feedbackRight.textContent = `Right: it is ${a}`;
    for (const button of [feedbackRight, ...digitButtons]) button.disabled = false;
    feedbackStatus.textContent = "";
    feedbackStatus.classList.remove("error");
  }

  function withdrawFeedback() {
    answered = null;
    for (const button of [feedbackRight, ...digitButtons]) button.disabled = true;
  }

  async function sendCorrection(digit) {
    const sent = answered;
    if (!sent) return;
    withdrawFeedback();
    feedbackStatus.classList.remove("error");
    feedbackStatus.textContent = "Saving…";
    const headers = { "Content-Type": sent.type };
    if (tokenRequired) {
      const token = collectToken();
      if (!token) {
        feedbackStatus.textContent = "Not saved: this server needs its collection token.";
        feedbackStatus.classList.add("error");
        return;
      }
      headers.Authorization = `Bearer ${token}`;
    }
    try {
      const response = await fetch(`/api/feedback?label=${digit}`, { method: "POST", body: sent.body, headers });
      const data = await response.json().catch(() => ({}));
      if (response.status === 401) sessionStorage.removeItem(TOKEN_KEY);  // asked again next time
      if (response.ok) {
        feedbackStatus.textContent = (response.status === 201 ? `Saved as ${data.label}` : `Already saved; now labelled ${data.label}`) +
          ` (${data.stored} on this server). Thank you.`;
      } else {
        feedbackStatus.textContent = `Not saved: ${data.error || `${response.status} ${response.statusText}`}.`;
        feedbackStatus.classList.add("error");
      }
    } catch (err) {
      feedbackStatus.textContent = "Not saved: cannot reach the server.";
      feedbackStatus.classList.add("error");
    }
  }

  // The collection token, asked once and kept for this tab's session (never in localStorage).
  function collectToken() {
    let token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      token = (window.prompt("This server saves corrections only with its collection token. Token:") || "").trim();
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
    }
    return token;
  }

  function showVersion(version) {
    if (!version || version === modelVersion) return;
    modelVersion = version;
    const label = $("model-version");
    label.textContent = `Model ${version}`;
    label.hidden = false;
  }

  function drawInput(rows) {
    const image = input28.createImageData(28, 28);
    for (let r = 0; r < 28; r++) {
      for (let c = 0; c < 28; c++) {
        const v = Math.round(Math.min(Math.max(rows[r][c], 0), 1) * 255);
        const i = (r * 28 + c) * 4;
        image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
        image.data[i + 3] = 255;
      }
    }
    input28.putImageData(image, 0, 0);
  }

  function resetAnswer(message) {
    if (collecting) {
      withdrawFeedback();
      feedbackStatus.textContent = "";
    }
    for (const name of MODELS) {
      const panel = panels[name];
      panel.digit.textContent = "–";
      delete panel.section.dataset.digit;
      panel.confidence.textContent = "";
      panel.fills.forEach((fill) => { fill.style.height = "0%"; fill.classList.remove("top"); });
      panel.bars.setAttribute("aria-label", "No probabilities yet");
    }
    verdict.textContent = message;
    verdict.classList.remove("disagree");
    miniAnswer.replaceChildren();
    input28.fillStyle = "#000";
    input28.fillRect(0, 0, 28, 28);
  }

  function setStatus(message, isError = false) {
    statusLine.textContent = message;
    statusLine.classList.toggle("error", isError);
  }

  function updateBusy() {
    results.setAttribute("aria-busy", String(inFlight > 0 || encoding > 0 || debounceTimer !== 0));
  }

  // --- talking to the server --------------------------------------------------

  async function send(body, type) {
    const id = ++requestId;
    inFlight++;
    updateBusy();
    try {
      const response = await fetch("/api/predict", {
        method: "POST", body, headers: { "Content-Type": type || "application/octet-stream" },
      });
      const data = await response.json().catch(() => ({}));
      if (id !== requestId) return;  // a newer drawing is on its way
      if (response.ok) {
        showVersion(data.model_version);
        showAnswer(data);
        if (collecting) offerFeedback(body, type || "application/octet-stream", data);
        setStatus(picture.hidden ? "Keep drawing, or Clear to start again."
                                 : `${picture.dataset.name}: draw on the square to start again.`);
      } else {
        resetAnswer("No answer.");
        const what = picture.hidden ? "drawing" : "picture";
        setStatus(data.error ? `The server could not use this ${what}: ${data.error}.`
                             : `The server answered ${response.status} ${response.statusText}.`, true);
      }
    } catch (err) {
      if (id === requestId) {
        resetAnswer("No answer.");
        setStatus("Cannot reach the server: is `python -m mnist_dvc.apps.serve` still running?", true);
      }
    } finally {
      inFlight--;
      updateBusy();
    }
  }

  function predictDrawing() {
    clearTimeout(debounceTimer);
    debounceTimer = 0;
    updateBusy();
    if (!strokes.length) return;
    if (drawQueued) render();  // the PNG must hold the latest points
    const mine = ++snapshot;
    encoding++;
    updateBusy();
    canvas.toBlob((blob) => {
      encoding--;
      // A newer PNG is on its way, or the pad was cleared meanwhile: nothing to send.
      if (blob && mine === snapshot && strokes.length) send(blob, "image/png");
      else updateBusy();
    }, "image/png");
  }

  function forgetPending() {
    // Answers and PNGs still on their way are for a drawing that is gone.
    requestId++;
    snapshot++;
    clearTimeout(debounceTimer);
    debounceTimer = 0;
    updateBusy();
  }

  function schedulePrediction() {
    clearTimeout(debounceTimer);
    debounceTimer = setTimeout(predictDrawing, DEBOUNCE_MS);
    updateBusy();
  }

  // --- drawing ------------------------------------------------------------------

  function render() {
    drawQueued = false;
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = ctx.fillStyle = INK;
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = ctx.lineJoin = "round";
    for (const points of strokes) {
      if (points.length === 1) {
        ctx.beginPath();
        ctx.arc(points[0].x, points[0].y, LINE_WIDTH / 2, 0, 2 * Math.PI);
        ctx.fill();
        continue;
      }
      // A smooth curve through the midpoints, each sample point a control point.
      ctx.beginPath();
      ctx.moveTo(points[0].x, points[0].y);
      for (let i = 1; i < points.length - 1; i++) {
        const mid = { x: (points[i].x + points[i + 1].x) / 2, y: (points[i].y + points[i + 1].y) / 2 };
        ctx.quadraticCurveTo(points[i].x, points[i].y, mid.x, mid.y);
      }
      const last = points[points.length - 1];
      ctx.lineTo(last.x, last.y);
      ctx.stroke();
    }
  }

  function queueRender() {
    if (!drawQueued) {
      drawQueued = true;
      requestAnimationFrame(render);
    }
  }

  function updateButtons() {
    const empty = !strokes.length && picture.hidden;
    undoButton.disabled = !strokes.length;
    clearButton.disabled = empty;
    pad.classList.toggle("empty", empty);
  }

  function point(event) {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) / box.width) * canvas.width,
      y: ((event.clientY - box.top) / box.height) * canvas.height,
    };
  }

  function hidePicture() {
    if (pictureUrl) URL.revokeObjectURL(pictureUrl);
    pictureUrl = null;
    picture.hidden = true;
    picture.removeAttribute("src");
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (activePointer !== null || (event.pointerType === "mouse" && event.button !== 0)) return;
    event.preventDefault();
    if (!picture.hidden) {  // drawing replaces an uploaded picture
      hidePicture();
      forgetPending();
      resetAnswer("Nothing drawn yet.");
    }
    activePointer = event.pointerId;
    canvas.setPointerCapture(event.pointerId);
    active = [point(event)];
    strokes.push(active);
    updateButtons();
    queueRender();
  });

  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== activePointer) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) active.push(point(e));
    queueRender();
    schedulePrediction();
  });

  function endStroke(event) {
    if (event.pointerId !== activePointer) return;
    activePointer = null;
    active = null;
    queueRender();
    predictDrawing();
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);
  canvas.addEventListener("lostpointercapture", endStroke);

  // Back to an empty pad: no strokes, no picture, no answer on its way.
  function resetPad() {
    strokes = [];
    active = null;
    activePointer = null;
    hidePicture();
    forgetPending();
    render();
  }

  function clear() {
    resetPad();
    updateButtons();
    resetAnswer("Nothing drawn yet.");
    setStatus("Cleared. Draw a digit, or drop a picture on the square.");
  }

  function undo() {
    if (!strokes.length || activePointer !== null) return;
    strokes.pop();
    render();
    updateButtons();
    if (strokes.length) {
      predictDrawing();
    } else {
      forgetPending();
      resetAnswer("Nothing drawn yet.");
    }
  }

  clearButton.addEventListener("click", clear);
  undoButton.addEventListener("click", undo);
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement) return;
    if (event.key === "Escape") clear();
    else if ((event.ctrlKey || event.metaKey) && !event.shiftKey && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    }
  });

  // --- pictures: file picker and drag and drop ------------------------------

  async function shrink(file) {
    // The server refuses bodies over its limit; a phone photo is often bigger. It works
    // on at most SHRINK_SIDE px anyway, so the browser scales big pictures down first.
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, SHRINK_SIDE / Math.max(bitmap.width, bitmap.height));
    const work = document.createElement("canvas");
    work.width = Math.max(1, Math.round(bitmap.width * scale));
    work.height = Math.max(1, Math.round(bitmap.height * scale));
    work.getContext("2d").drawImage(bitmap, 0, 0, work.width, work.height);
    bitmap.close();
    const type = file.type === "image/png" ? "image/png" : "image/jpeg";  // PNG keeps transparency
    return new Promise((resolve) => work.toBlob(resolve, type, 0.92));
  }

  async function usePicture(file) {
    if (!file) return;
    resetPad();
    pictureUrl = URL.createObjectURL(file);
    picture.src = pictureUrl;
    picture.alt = `Your picture: ${file.name}`;
    picture.dataset.name = file.name;
    picture.hidden = false;
    updateButtons();
    resetAnswer("Reading your picture…");
    setStatus(`Your picture: ${file.name}`);
    let body = file;
    if (file.size > maxBytes) {
      const mine = ++snapshot;
      try {
        body = await shrink(file);
      } catch (err) {
        body = null;
      }
      if (mine !== snapshot) return;  // drawn on, cleared or replaced while shrinking
      if (!body || body.size > maxBytes) {
        forgetPending();
        resetAnswer("No answer.");
        setStatus(`${file.name} is too large to send (${(file.size / 1e6).toFixed(1)} MB; the limit is ` +
                  `${(maxBytes / 1e6).toFixed(0)} MB) and this browser cannot shrink it.`, true);
        return;
      }
    }
    // Not an image type (a PDF dropped by mistake): the server looks at the bytes and says what they are not.
    send(body, body.type.startsWith("image/") ? body.type : "application/octet-stream");
  }

  $("upload").addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    usePicture(fileInput.files[0]);
    fileInput.value = "";  // choosing the same file again still triggers a change
  });
  picture.addEventListener("error", () => { picture.alt = "(this browser cannot show the picture)"; });

  let dragDepth = 0;
  pad.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth++;
    pad.classList.add("dropping");
  });
  pad.addEventListener("dragover", (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  pad.addEventListener("dragleave", () => {
    if (--dragDepth <= 0) { dragDepth = 0; pad.classList.remove("dropping"); }
  });
  pad.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    pad.classList.remove("dropping");
    const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/")) || event.dataTransfer.files[0];
    if (file) usePicture(file);
    else setStatus("Drop a picture file (PNG, JPEG, …).", true);
  });
  // A picture dropped next to the square must not replace the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  // --- the models' details ----------------------------------------------------

  async function loadHealth() {
    const info = $("model-info");
    try {
      const response = await fetch("/api/health");
      const health = await response.json();
      maxBytes = health.max_body_bytes || maxBytes;
      const parts = [];
      for (const name of MODELS) {
        const model = health.models[name];
        const accuracy = model.test_accuracy;
        panels[name].accuracy.textContent = accuracy == null
          ? "test accuracy: not measured (run dvc repro)"
          : `test accuracy: ${(accuracy * 100).toFixed(2)}%`;
        parts.push(`${name}: ${model.file} (sha256 ${model.sha256.slice(0, 12)}…)`);
      }
      info.textContent = `Backend: ${health.backend === "onnx" ? "ONNX Runtime" : "PyTorch"}. ` +
                         `Models: ${parts.join("; ")}.`;
      info.title = MODELS.map((name) => `${name}: sha256 ${health.models[name].sha256}`).join("\n");
      showVersion(health.model_version);
      if (health.collect) {
        collecting = true;
        tokenRequired = Boolean(health.collect.token_required);
        feedback.hidden = false;
        const note = $("collect-note");
        note.textContent = `Corrections are saved on this server, in ${health.collect.folder}: ` +
          "when you press Right or a digit, the 28×28 input above and its digit are kept to retrain the models.";
        note.hidden = false;
      }
    } catch (err) {
      info.textContent = "The server did not say which models it runs.";
    }
  }

  resetAnswer("Nothing drawn yet.");
  updateButtons();
  loadHealth();
})();
