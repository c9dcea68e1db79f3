// The playground: requests go to the same server's API as server-sent events (fetch + a stream
// reader, since EventSource cannot POST), and each request becomes a card in this session's history.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value || sessionStorage.getItem("transfusion-key");
  if (key) { h["Authorization"] = "Bearer " + key; sessionStorage.setItem("transfusion-key", key); }
  return h;
}

async function loadInfo() {
  const r = await fetch("/v1/info", { headers: headers() });
  if (r.status === 401) { $("auth-panel").hidden = false; $("status").textContent = "needs an API key"; return; }
  info = await r.json();
  const d = info.defaults;
  $("status").textContent = `${info.image_size}x${info.image_size} images · ${d.sampler} ${d.steps} steps · guidance ${d.guidance}`;
  const select = $("adapter");
  (info.adapters || []).forEach((name) => {
    if ([...select.options].some((o) => o.value === name)) return;
    const o = document.createElement("option"); o.value = o.textContent = name; select.appendChild(o);
  });
  $("adapter-panel").hidden = !(info.adapters || []).length;
}

function card(title) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  node.querySelector(".title").textContent = title;
  $("history").prepend(node);
  return node;
}

function picture(node, k, png, preview) {
  const box = node.querySelector(".pictures");
  let img = box.querySelector(`img[data-output="${k}"]`);
  if (!img) { img = document.createElement("img"); img.dataset.output = k; box.appendChild(img); }
  img.src = "data:image/png;base64," + png;
  img.classList.toggle("preview", preview);
}

// POST, then read "event: ...\ndata: {...}\n\n" blocks as they arrive
async function stream(url, init, onEvent) {
  const r = await fetch(url, init);
  if (!r.ok || !r.body) {
    let message = r.statusText;
    try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(`${r.status}: ${message}`);
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

function follow(node, outputs) {
  const progress = node.querySelector("progress");
  const steps = new Array(outputs).fill(0);
  const text = new Array(outputs).fill("");
  return (e) => {
    if (e.event === "queued") node.querySelector(".title").dataset.queued = e.position;
    if (e.event === "step") {
      steps[e.output] = e.step / e.steps;
      progress.value = steps.reduce((a, b) => a + b, 0) / outputs;
      if (e.preview) picture(node, e.output, e.preview, true);
    }
    if (e.event === "image") picture(node, e.output, e.png, false);
    if (e.event === "text") { text[e.output] = e.text; node.querySelector(".text").textContent = text.filter((t) => t).join("\n"); }
    if (e.event === "done") {
      node.classList.add("done");
      if (e.caption !== undefined) node.querySelector(".text").textContent = e.caption;
      if (e.images) e.images.forEach((im, k) => picture(node, k, im.png, false));
      if (e.data) e.data.forEach((im, k) => picture(node, k, im.b64_json, false));
    }
  };
}

$("draw").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const body = { prompt: $("prompt").value, n: +$("n").value, seed: +$("seed").value, stream: true };
  if ($("steps").value) body.steps = +$("steps").value;
  if ($("guidance").value) body.guidance = +$("guidance").value;
  if ($("gmax").value !== "") body.guidance_max_t = +$("gmax").value;
  if ($("sampler").value) body.sampler = $("sampler").value;
  if ($("adapter").value) body.model = $("adapter").value;
  const node = card(`"${body.prompt}" · seed ${body.seed}`);
  $("draw-button").disabled = true;
  try {
    await stream("/v1/images", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) },
                 follow(node, body.n));
  } catch (err) {
    node.querySelector(".text").textContent = err.message; node.querySelector(".text").classList.add("error"); node.classList.add("done");
  } finally { $("draw-button").disabled = false; }
});

$("describe").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("upload").files[0];
  if (!file) return;
  const node = card(`caption of ${file.name}`);
  picture(node, 0, await new Promise((ok) => { const r = new FileReader(); r.onload = () => ok(r.result.split(",")[1]); r.readAsDataURL(file); }), false);
  const form = new FormData();
  form.append("file", file);
  form.append("stream", "true");
  $("caption-button").disabled = true;
  try {
    await stream("/v1/caption", { method: "POST", headers: headers(), body: form }, follow(node, 1));
  } catch (err) {
    node.querySelector(".text").textContent = err.message; node.querySelector(".text").classList.add("error"); node.classList.add("done");
  } finally { $("caption-button").disabled = false; }
});

const asBase64 = (file) => new Promise((ok) => { const r = new FileReader(); r.onload = () => ok(r.result.split(",")[1]); r.readAsDataURL(file); });

// an edit: the input on the left of the card, the edited images (previews while they denoise) beside it
$("edit").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("edit-upload").files[0];
  if (!file) return;
  const n = +$("edit-n").value;
  const node = card(`"${$("instruction").value}" on ${file.name} · seed ${$("edit-seed").value}`);
  picture(node, "input", await asBase64(file), false);
  node.querySelector('img[data-output="input"]').classList.add("input");
  const form = new FormData();
  form.append("image", file);
  form.append("prompt", $("instruction").value);
  form.append("n", String(n));
  form.append("seed", $("edit-seed").value);
  form.append("stream", "true");
  if ($("edit-steps").value) form.append("num_inference_steps", $("edit-steps").value);
  if ($("adapter").value) form.append("model", $("adapter").value);
  $("edit-button").disabled = true;
  try {
    await stream("/v1/images/edits", { method: "POST", headers: headers(), body: form }, follow(node, n));
  } catch (err) {
    node.querySelector(".text").textContent = err.message; node.querySelector(".text").classList.add("error"); node.classList.add("done");
  } finally { $("edit-button").disabled = false; }
});

$("key").addEventListener("change", loadInfo);
loadInfo();
