// ferkit web page: send a photo to /v1/analyze, draw a box per face and a bar chart of its emotions.
// Plain JavaScript, no external assets: everything this page needs is served by the ferkit app itself.
"use strict";

(function () {
  const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0fb5ae", "#f032e6", "#9a6324"];
  const $ = (id) => document.getElementById(id);
  const els = {
    drop: $("drop"), file: $("file"), sample: $("sample"), webcam: $("webcam"), camera: $("camera"),
    video: $("video"), snap: $("snap"), cameraClose: $("camera-close"), status: $("status"), result: $("result"),
    photo: $("photo"), overlay: $("overlay"), faces: $("faces"), raw: $("raw"), json: $("json"),
  };
  let current = null; // {url, data}: the shown photo's object URL and the server's answer
  let stream = null;
  let busy = false;

  function setStatus(text, isError) {
    els.status.textContent = text;
    els.status.classList.toggle("error", Boolean(isError));
  }

  function pct(p) {
    return (100 * p).toFixed(p >= 0.995 || p < 0.0005 ? 0 : 1) + "%";
  }

  // -- sending -------------------------------------------------------------------------------------------

  async function analyze(blob, name) {
    if (busy) return;
    if (!blob || (blob.type && !blob.type.startsWith("image/"))) {
      setStatus("That is not an image file (" + (blob && blob.type) + ").", true);
      return;
    }
    busy = true;
    document.body.dataset.state = "busy";
    setStatus("Analysing " + (name || "photo") + "…");
    const form = new FormData();
    form.append("file", blob, name || "photo.jpg");
    let data = null;
    try {
      const response = await fetch("/v1/analyze", { method: "POST", body: form });
      const text = await response.text();
      try { data = JSON.parse(text); } catch (e) { data = { error: "http_" + response.status, detail: text }; }
      if (!response.ok) {
        showError(data, response.status);
        return;
      }
    } catch (err) {
      showError({ error: "network", detail: String(err) }, 0);
      return;
    } finally {
      busy = false;
    }
    show(blob, data);
  }

  function showError(data, status) {
    document.body.dataset.state = "error";
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    setStatus("Error" + (status ? " " + status : "") + " (" + data.error + "): " + detail, true);
    els.json.textContent = JSON.stringify(data, null, 2);
    els.raw.hidden = false;
  }

  // -- showing ---------------------------------------------------------------------------------------------

  function show(blob, data) {
    if (current && current.url) URL.revokeObjectURL(current.url);
    const url = URL.createObjectURL(blob);
    current = { url: url, data: data };
    els.photo.onload = function () {
      els.result.hidden = false;
      draw();
      renderFaces(data);
      const n = data.faces.length;
      setStatus(n + (n === 1 ? " face" : " faces") + " · " + data.image.width + "×" + data.image.height +
        " · " + Math.round(data.timing_ms.total) + " ms on the server");
      document.body.dataset.state = "done";
    };
    els.photo.src = url;
    els.json.textContent = JSON.stringify(data, null, 2);
    els.raw.hidden = false;
  }

  // Boxes are in the server's pixels (after EXIF rotation, as the browser also shows the photo); the overlay
  // canvas covers the <img> and is redrawn at the displayed size whenever the layout changes.
  function draw() {
    if (!current) return;
    const data = current.data;
    const canvas = els.overlay;
    const w = els.photo.clientWidth;
    const h = els.photo.clientHeight;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.max(1, Math.round(w * ratio));
    canvas.height = Math.max(1, Math.round(h * ratio));
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const sx = w / (data.image.width || els.photo.naturalWidth || w);
    const sy = h / (data.image.height || els.photo.naturalHeight || h);
    const line = Math.max(2, Math.min(4, w / 250));
    const fontPx = Math.round(Math.max(12, Math.min(18, w / 40)));
    ctx.font = "600 " + fontPx + "px system-ui, sans-serif";
    ctx.textBaseline = "top";
    const boxes = data.faces.map(function (face) {
      const [x, y, bw, bh] = face.box;
      return { x: x * sx, y: y * sy, w: bw * sx, h: bh * sy };
    });
    const taken = [];  // labels already drawn
    data.faces.forEach(function (face, i) {
      const color = COLORS[i % COLORS.length];
      const r = boxes[i];
      ctx.lineWidth = line;
      ctx.strokeStyle = color;
      ctx.strokeRect(r.x, r.y, r.w, r.h);
      // In a group photo the full label may cover a neighbour: then it shrinks to the face's number (its card
      // below the photo has the rest), inside its own box if even that is not free above it.
      const avoid = boxes.filter(function (b, j) { return j !== i; }).concat(taken);
      const th = fontPx + 8;
      const texts = [(i + 1) + " " + face.dominant + " " + pct(face.emotions[face.dominant]), String(i + 1)];
      let spot = null;
      for (const text of texts) {
        const tw = ctx.measureText(text).width + 10;
        for (const ty of [r.y - th >= 0 ? r.y - th : r.y, r.y]) {
          const rect = { x: Math.max(0, Math.min(r.x - line / 2, w - tw)), y: ty, w: tw, h: th };  // inside the photo
          if (!avoid.some(function (b) { return overlaps(rect, b); })) { spot = { text: text, rect: rect }; break; }
        }
        if (spot) break;
      }
      if (!spot) {
        spot = { text: texts[1], rect: { x: r.x - line / 2, y: r.y, w: ctx.measureText(texts[1]).width + 10, h: th } };
      }
      taken.push(spot.rect);
      ctx.fillStyle = color;
      ctx.fillRect(spot.rect.x, spot.rect.y, spot.rect.w, spot.rect.h);
      ctx.fillStyle = "#fff";
      ctx.fillText(spot.text, spot.rect.x + 5, spot.rect.y + 4);
    });
    canvas.dataset.faces = String(data.faces.length);
    canvas.dataset.labels = JSON.stringify(taken.map(function (r) { return [r.x, r.y, r.w, r.h]; }));
    canvas.dataset.boxes = JSON.stringify(boxes.map(function (r) { return [r.x, r.y, r.w, r.h]; }));
  }

  function overlaps(a, b) {
    return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
  }

  function renderFaces(data) {
    els.faces.replaceChildren();
    if (!data.faces.length) {
      const p = document.createElement("p");
      p.className = "no-faces";
      p.textContent = "No face found. Try a photo where faces are frontal and at least ~40 pixels tall.";
      els.faces.append(p);
      return;
    }
    data.faces.forEach(function (face, i) {
      const color = COLORS[i % COLORS.length];
      const card = document.createElement("article");
      card.className = "face-card";
      card.dataset.dominant = face.dominant;
      card.style.setProperty("--face-color", color);

      const head = document.createElement("div");
      head.className = "face-head";
      head.append(thumbnail(face.box));
      const titleBox = document.createElement("div");
      const title = document.createElement("h2");
      title.className = "face-title";
      title.append("Face " + (i + 1) + ": ");
      const dom = document.createElement("span");
      dom.className = "dominant";
      dom.textContent = face.dominant;
      title.append(dom, " " + pct(face.emotions[face.dominant]));
      const meta = document.createElement("div");
      meta.className = "face-meta";
      meta.textContent = "box " + face.box.join(", ") + " · detector score " + face.face_score.toFixed(3);
      titleBox.append(title, meta);
      head.append(titleBox);

      const list = document.createElement("ul");
      list.className = "bars";
      const classes = data.classes || Object.keys(face.emotions);
      classes.forEach(function (name) {
        const p = face.emotions[name];
        const row = document.createElement("li");
        row.className = "bar-row" + (name === face.dominant ? " is-dominant" : "");
        const label = document.createElement("span");
        label.className = "emotion-label";
        label.textContent = name;
        const bar = document.createElement("span");
        bar.className = "bar";
        bar.setAttribute("role", "meter");
        bar.setAttribute("aria-label", name);
        bar.setAttribute("aria-valuemin", "0");
        bar.setAttribute("aria-valuemax", "1");
        bar.setAttribute("aria-valuenow", p.toFixed(4));
        const fill = document.createElement("span");
        fill.style.width = (100 * p).toFixed(2) + "%";
        bar.append(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = pct(p);
        row.append(label, bar, value);
        list.append(row);
      });
      card.append(head, list);
      els.faces.append(card);
    });
  }

  function thumbnail(box) {
    const c = document.createElement("canvas");
    c.width = 96;
    c.height = 96;
    const ctx = c.getContext("2d");
    const [x, y, w, h] = box;
    const side = Math.max(w, h);
    try {
      ctx.drawImage(els.photo, x + w / 2 - side / 2, y + h / 2 - side / 2, side, side, 0, 0, 96, 96);
    } catch (e) { /* a thumbnail is optional */ }
    return c;
  }

  // -- inputs ----------------------------------------------------------------------------------------------

  els.file.addEventListener("change", function () {
    const f = els.file.files && els.file.files[0];
    if (f) analyze(f, f.name);
    els.file.value = "";
  });

  els.sample.addEventListener("click", async function () {
    try {
      const r = await fetch("/sample.jpg");
      analyze(await r.blob(), "astronaut.jpg");
    } catch (err) {
      setStatus("Could not load the sample photo: " + err, true);
    }
  });

  ["dragenter", "dragover"].forEach(function (type) {
    document.addEventListener(type, function (e) {
      e.preventDefault();
      els.drop.classList.add("over");
    });
  });
  ["dragleave", "drop"].forEach(function (type) {
    document.addEventListener(type, function (e) {
      e.preventDefault();
      els.drop.classList.remove("over");
    });
  });
  document.addEventListener("drop", function (e) {
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (f) analyze(f, f.name);
  });

  document.addEventListener("paste", function (e) {
    const items = (e.clipboardData && e.clipboardData.items) || [];
    for (const item of items) {
      if (item.kind === "file" && item.type.startsWith("image/")) {
        e.preventDefault();
        analyze(item.getAsFile(), "pasted." + item.type.split("/")[1]);
        return;
      }
    }
  });

  els.drop.addEventListener("keydown", function (e) {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      els.file.click();
    }
  });

  // Webcam: only offered where the browser allows it (a secure context: https or localhost).
  const canCamera = Boolean(window.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
  els.webcam.hidden = !canCamera;

  function stopCamera() {
    if (stream) stream.getTracks().forEach(function (t) { t.stop(); });
    stream = null;
    els.camera.hidden = true;
  }

  els.webcam.addEventListener("click", async function () {
    try {
      stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" }, audio: false });
      els.video.srcObject = stream;
      els.camera.hidden = false;
      await els.video.play();
    } catch (err) {
      stopCamera();
      setStatus("Webcam not available: " + (err && err.message ? err.message : err), true);
    }
  });

  els.snap.addEventListener("click", function () {
    const v = els.video;
    if (!v.videoWidth) return;
    const c = document.createElement("canvas");
    c.width = v.videoWidth;
    c.height = v.videoHeight;
    c.getContext("2d").drawImage(v, 0, 0);
    stopCamera();
    c.toBlob(function (blob) { analyze(blob, "webcam.jpg"); }, "image/jpeg", 0.92);
  });

  els.cameraClose.addEventListener("click", stopCamera);

  if (window.ResizeObserver) {
    new ResizeObserver(draw).observe(els.photo);
  } else {
    window.addEventListener("resize", draw);
  }
})();
