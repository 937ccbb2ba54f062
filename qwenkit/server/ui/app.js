// The chat page of `qwenkit serve`: conversations kept in localStorage, answers streamed from
// /v1/chat/completions, markdown rendered to HTML by the server (/ui/render). The API key, when
// the server asks for one, lives in sessionStorage (this tab only). No other host is contacted.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "qwenkit.chats", CURRENT = "qwenkit.current", SETTINGS = "qwenkit.settings", KEY = "qwenkit.key";
const MODEL = "qwenkit.model";  // the model or LoRA adapter chosen last
const DEFAULTS = {system: "", temperature: "0.7", top_p: "0.8", top_k: "20", max_tokens: "", thinking: true, tools: ""};
const RENDER_BATCH = 256;  // the most texts /ui/render takes at once
const RENDER_EVERY_MS = 250;

let chats = load(STORE, {});
let current = localStorage.getItem(CURRENT);
let model = null;
let running = null;  // the AbortController of the reply being streamed

function load(name, fallback) {
  try { return JSON.parse(localStorage.getItem(name)) ?? fallback; } catch { return fallback; }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(chats));
  localStorage.setItem(CURRENT, current || "");
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// -- the server ---------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(r) {
  try { return (await r.json()).error.message; } catch { return `HTTP ${r.status}`; }
}

async function call(path, body, signal) {
  const init = body === undefined ? {headers: headers()} : {method: "POST", headers: headers(), body: JSON.stringify(body)};
  const r = await fetch(path, {...init, signal});
  if (r.status === 401) {
    askKey(sessionStorage.getItem(KEY) ? "That key was refused." : "");
    throw new Error("the server needs an API key");
  }
  if (!r.ok) throw new Error(await errorText(r));
  return r;
}

async function connect() {
  try {
    const models = (await (await call("/v1/models")).json()).data.map((m) => m.id);
    const chosen = localStorage.getItem(MODEL);
    $("model").replaceChildren(...models.map((id) => el("option", "", id)));
    $("model").value = model = models.includes(chosen) ? chosen : models[0];
    status("");
    renderAll();
  } catch (e) { status(e.message, true); }
}

function askKey(message) {
  $("key-error").textContent = message;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data && data !== "[DONE]") onEvent(JSON.parse(data));
    }
  }
}

// -- markdown, rendered by the server -------------------------------------------------------

async function renderTexts(texts) {
  const html = [];
  for (let i = 0; i < texts.length; i += RENDER_BATCH) {
    const r = await call("/ui/render", {texts: texts.slice(i, i + RENDER_BATCH)});
    html.push(...(await r.json()).html);
  }
  return html;
}

// Renders view.message.content into view.body; while a render is in flight the newer text
// waits in view.tail (plain) and is rendered next.
async function renderView(view) {
  if (view.rendering) { view.again = true; return; }
  view.rendering = true;
  const text = view.message.content;
  try {
    const [html] = await renderTexts([text]);
    view.body.innerHTML = html;
    view.renderedLength = text.length;
  } catch { /* stays plain text */ }
  view.rendering = false;
  view.body.append(view.tail);
  showTail(view);
  if (view.again) { view.again = false; renderView(view); }
}

function showTail(view) {
  view.tail.textContent = view.message.content.slice(view.renderedLength);
}

async function renderAll() {
  const views = [...document.querySelectorAll(".msg.assistant")].map((n) => n.view).filter((v) => v.message.content);
  try {
    const html = await renderTexts(views.map((v) => v.message.content));
    views.forEach((v, i) => { v.body.innerHTML = html[i]; v.renderedLength = v.message.content.length; });
  } catch { /* stays plain text */ }
}

// -- conversations ------------------------------------------------------------------------

function messageView(message) {
  const box = el("div", "msg " + message.role);
  const view = {message, box, renderedLength: 0, tail: el("span", "tail")};
  view.think = el("details", "thinking");
  view.think.append(el("summary", "", "Thinking"), view.thinkText = el("div", "plain"));
  view.body = el("div", message.role === "assistant" ? "md" : "plain");
  view.body.append(view.tail);
  view.tools = el("div", "tools");
  view.note = el("div", "note");
  box.append(view.think, view.body, view.tools, view.note);
  box.view = view;
  updateView(view);
  return view;
}

function updateView(view) {
  const m = view.message;
  view.think.hidden = !m.reasoning;
  view.thinkText.textContent = m.reasoning || "";
  showTail(view);
  view.tools.replaceChildren(...(m.tool_calls || []).map((c) =>
    el("pre", "tool", `${c.function.name}(${c.function.arguments})`)));
  view.note.textContent = m.note || "";
  view.note.hidden = !m.note;
}

function showChat() {
  const chat = chats[current];
  $("messages").replaceChildren(...(chat ? chat.messages.map((m) => messageView(m).box) : []));
  $("chats").replaceChildren(...Object.entries(chats).sort((a, b) => b[1].updated - a[1].updated).map(([id, c]) => {
    const item = el("li", id === current ? "current" : "");
    const open = el("button", "open", c.title);
    open.onclick = () => { if (!running) { current = id; save(); showChat(); renderAll(); } };
    const remove = el("button", "delete", "×");
    remove.title = "Delete this conversation";
    remove.onclick = () => { if (!running) { delete chats[id]; if (current === id) current = null; save(); showChat(); } };
    item.append(open, remove);
    return item;
  }));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function newChat() {
  current = Date.now().toString(36) + Math.random().toString(36).slice(2, 6);
  chats[current] = {title: "New chat", messages: [], updated: Date.now()};
  return chats[current];
}

// -- settings -------------------------------------------------------------------------------

function settings() {
  const s = {};
  for (const name of Object.keys(DEFAULTS)) s[name] = name === "thinking" ? $(name).checked : $(name).value;
  return s;
}

function showSettings(s) {
  for (const [name, value] of Object.entries({...DEFAULTS, ...s})) {
    if (name === "thinking") $(name).checked = value; else $(name).value = value;
  }
}

function requestBody(chat) {
  const s = settings();
  const messages = s.system.trim() ? [{role: "system", content: s.system}] : [];
  for (const m of chat.messages.slice(0, -1)) {
    messages.push(m.tool_calls?.length ? {role: m.role, content: m.content, tool_calls: m.tool_calls}
                                        : {role: m.role, content: m.content});
  }
  const body = {model, messages, stream: true, chat_template_kwargs: {enable_thinking: s.thinking}};
  for (const [name, parse] of [["temperature", parseFloat], ["top_p", parseFloat], ["top_k", parseInt], ["max_tokens", parseInt]]) {
    if (s[name] !== "" && !Number.isNaN(parse(s[name]))) body[name] = parse(s[name]);
  }
  if (s.tools.trim()) {
    try { body.tools = JSON.parse(s.tools); } catch (e) { throw new Error("Tools: not JSON (" + e.message + ")"); }
  }
  return body;
}

// -- sending and streaming --------------------------------------------------------------------

function apply(reply, view, event) {
  if (event.error) throw new Error(event.error.message);
  const choice = (event.choices || [])[0];
  const delta = choice?.delta || {};
  if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
  if (delta.content) reply.content += delta.content;
  for (const c of delta.tool_calls || []) addToolCall(reply.tool_calls, c);
  if (choice?.finish_reason === "length") reply.note = "stopped at the token limit";
  paintSoon(view);
}

// A call's first delta names it; later ones (same index) carry more of its arguments.
function addToolCall(calls, delta) {
  const call = calls[delta.index ?? calls.length] ??= {id: "", type: "function", function: {name: "", arguments: ""}};
  if (delta.id) call.id = delta.id;
  if (delta.function?.name) call.function.name = delta.function.name;
  call.function.arguments += delta.function?.arguments || "";
}

// Tokens come faster than a page should lay itself out: paint once a frame, and render the
// markdown at most every RENDER_EVERY_MS (the newest text shows plain meanwhile).
function paintSoon(view) {
  if (!view.painting) {
    view.painting = true;
    requestAnimationFrame(() => {
      view.painting = false;
      updateView(view);
      $("messages").scrollTop = $("messages").scrollHeight;
    });
  }
  if (!view.renderTimer && view.message.content) {
    view.renderTimer = setTimeout(() => { view.renderTimer = null; renderView(view); }, RENDER_EVERY_MS);
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  document.body.dataset.state = on ? "busy" : "idle";
}

async function send(text) {
  const chat = chats[current] || newChat();
  if (chat.title === "New chat") chat.title = text.slice(0, 48);
  chat.messages.push({role: "user", content: text});
  const reply = {role: "assistant", content: "", reasoning: "", tool_calls: []};
  chat.messages.push(reply);
  chat.updated = Date.now();
  save();
  showChat();
  const view = $("messages").lastChild.view;
  running = new AbortController();
  busy(true);
  try {
    const r = await call("/v1/chat/completions", requestBody(chat), running.signal);
    await readEvents(r.body, (event) => apply(reply, view, event));
  } catch (e) {
    reply.note = e.name === "AbortError" ? "stopped" : "error: " + e.message;
  }
  running = null;
  clearTimeout(view.renderTimer);
  view.renderTimer = null;
  busy(false);
  updateView(view);
  renderView(view);
  save();
}

function start() {
  showSettings(load(SETTINGS, {}));
  $("settings").addEventListener("change", () => localStorage.setItem(SETTINGS, JSON.stringify(settings())));
  $("reset-settings").onclick = () => { showSettings({...DEFAULTS, system: $("system").value, tools: $("tools").value});
                                        localStorage.setItem(SETTINGS, JSON.stringify(settings())); };
  $("model").onchange = () => { model = $("model").value; localStorage.setItem(MODEL, model); };
  $("new-chat").onclick = () => { if (!running) { newChat(); save(); showChat(); } };
  $("stop").onclick = () => running && running.abort();
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    if (!model) { connect(); return; }
    $("prompt").value = "";
    send(text);
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  };
  $("key-form").onsubmit = (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key-dialog").close();
    connect();
  };
  if (current && !chats[current]) current = null;
  busy(false);
  showChat();
  connect();
}

start();
