// The razor-gguf chat page: one more client of the server's OpenAI-compatible API (streaming chat
// completions), with the KV-cache figures of GET /v1/razor/stats and the razor switch of
// POST /v1/razor/switch. Conversations live in this browser's localStorage; transcripts are the terminal
// chat's razor-gguf-chat/1 format (/save, /load). Model output is only ever rendered by RazorMarkdown.
"use strict";

const TRANSCRIPT_FORMAT = "razor-gguf-chat/1";
const STORE_KEY = "razor-gguf-chat/conversations";
const ROLES = ["system", "user", "assistant"];

const $ = (id) => document.getElementById(id);

const state = {
  conversations: [], // {id, title, system, messages: [{role, content}], updated}
  current: null,
  model: "",
  controller: null, // AbortController of the reply being streamed
  stats: null,
};

// ------------------------------------------------------------------------------------------ storage

function load() {
  try {
    const data = JSON.parse(localStorage.getItem(STORE_KEY) || "[]");
    state.conversations = Array.isArray(data) ? data.filter(validConversation) : [];
  } catch (e) {
    state.conversations = [];
  }
  if (!state.conversations.length) {
    newConversation();
  }
  state.current = state.conversations[0].id;
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
}

function validMessages(msgs) {
  return Array.isArray(msgs) && msgs.every((m) => m && ROLES.includes(m.role) && typeof m.content === "string");
}

function validConversation(c) {
  return c && typeof c.id === "string" && validMessages(c.messages) && (c.system == null || typeof c.system === "string");
}

function conv() {
  return state.conversations.find((c) => c.id === state.current);
}

function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat",
              system: $("system").value || null, messages: [], updated: Date.now() };
  state.conversations.unshift(c);
  state.current = c.id;
  save();
  return c;
}

function touch(c) {
  c.updated = Date.now();
  const first = c.messages.find((m) => m.role === "user");
  c.title = first ? first.content.slice(0, 60) : "New chat";
  save();
}

// ---------------------------------------------------------------------------------------- rendering

function messageNode(m) {
  const div = document.createElement("div");
  div.className = "message " + m.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = m.role;
  const body = document.createElement("div");
  body.className = "content";
  body.innerHTML = RazorMarkdown.render(m.content); // escaped: see markdown.js
  div.append(role, body);
  return div;
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title || "New chat";
    li.title = c.title || "";
    if (c.id === state.current) {
      li.className = "current";
    }
    li.addEventListener("click", () => {
      if (!state.controller) {
        state.current = c.id;
        render();
      }
    });
    return li;
  }));
}

function render() {
  const c = conv();
  $("system").value = c.system || "";
  $("messages").replaceChildren(...c.messages.map(messageNode));
  renderConversations();
  const last = c.messages[c.messages.length - 1];
  $("regenerate").hidden = !!state.controller || !last || last.role !== "assistant";
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setStatus(text, isError) {
  $("status").textContent = text || "";
  $("status").className = isError ? "error" : "";
}

const mib = (n) => (n / 1048576).toFixed(1) + " MiB";

function renderStats() {
  const s = state.stats;
  if (!s) {
    return;
  }
  $("model-name").textContent = s.model || state.model;
  $("razor-toggle").checked = !!s.razor;
  const frac = s.full_equiv_bytes ? s.kv_bytes / s.full_equiv_bytes : 1;
  $("gauge-razor").style.width = Math.max(1, Math.min(100, 100 * frac)) + "%";
  $("gauge-razor").className = s.razor ? "razor" : "full";
  $("gauge-text").textContent = s.razor
    ? "KV: razor " + mib(s.kv_bytes) + " vs full " + mib(s.full_equiv_bytes) + " (" + (100 * frac).toFixed(0) + "%)"
    : "KV: full cache " + mib(s.kv_bytes);
  $("ctx-text").textContent = "context: " + s.n_past + " / " + s.n_ctx;
}

async function refreshStats() {
  try {
    const r = await fetch("/v1/razor/stats");
    if (r.ok) {
      state.stats = await r.json();
      renderStats();
    }
  } catch (e) {
    // the gauge keeps its last figures while the server is busy or restarting
  }
}

// ------------------------------------------------------------------------------------------ talking

function requestMessages(c) {
  const sys = c.system && c.system.trim() ? [{ role: "system", content: c.system }] : [];
  return sys.concat(c.messages.filter((m) => m.role !== "system"));
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  $("razor-toggle").disabled = on;
  $("regenerate").hidden = true;
}

// streams one assistant reply to the end of conversation c
async function reply(c) {
  const msg = { role: "assistant", content: "" };
  c.messages.push(msg);
  const node = messageNode(msg);
  node.classList.add("streaming");
  $("messages").append(node);
  const body = node.querySelector(".content");
  state.controller = new AbortController();
  busy(true);
  setStatus("");
  let chunks = 0;
  let first = 0;
  let last = 0;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: state.controller.signal,
      body: JSON.stringify({
        messages: requestMessages({ ...c, messages: c.messages.slice(0, -1) }),
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!r.ok) {
      let detail = r.status + " " + r.statusText;
      try {
        const e = await r.json();
        detail = (e.error && e.error.message) || e.detail || detail;
      } catch (e) { /* not JSON */ }
      throw new Error(detail);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        break;
      }
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) {
          continue;
        }
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          continue;
        }
        const event = JSON.parse(data);
        if (event.error) {  // the server ends a stream it cannot finish with an error event (a lost RPC worker)
          throw new Error(event.error.message);
        }
        const delta = event.choices[0].delta || {};
        if (delta.content) {
          msg.content += delta.content;
          chunks += 1;
          last = performance.now();
          first = first || last;
          body.innerHTML = RazorMarkdown.render(msg.content);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      setStatus("error: " + e.message, true);
      if (!msg.content) {
        c.messages.pop();
      }
    } else {
      setStatus("stopped");
    }
  } finally {
    state.controller = null;
    node.classList.remove("streaming");
    busy(false);
    if (chunks > 1 && last > first) {
      $("tps-text").textContent = "last reply: " + chunks + " tokens, " + ((chunks - 1) / ((last - first) / 1000)).toFixed(1) + " tok/s";
    }
    touch(c);
    render();
    refreshStats();
  }
}

function send(ev) {
  ev.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || state.controller) {
    return;
  }
  const c = conv();
  c.system = $("system").value || null;
  c.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  touch(c);
  render();
  reply(c);
}

function regenerate() {
  const c = conv();
  if (state.controller || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant") {
    return;
  }
  c.messages.pop();
  render();
  reply(c);
}

async function switchRazor() {
  const on = $("razor-toggle").checked;
  $("razor-toggle").disabled = true;
  setStatus("reloading the model with the razor KV cache " + (on ? "on" : "off") + " …");
  try {
    const r = await fetch("/v1/razor/switch", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ razor: on }),
    });
    const data = await r.json();
    if (!r.ok) {
      throw new Error((data.error && data.error.message) || r.statusText);
    }
    state.stats = data;
    renderStats();
    setStatus("razor KV cache " + (data.razor ? "on" : "off") + "; the conversation is kept");
  } catch (e) {
    setStatus("error: " + e.message, true);
    refreshStats();
  } finally {
    $("razor-toggle").disabled = false;
  }
}

// ----------------------------------------------------------------------------------------- transcripts

function exportTranscript() {
  const c = conv();
  return { format: TRANSCRIPT_FORMAT, model: state.model, system: c.system || null,
           messages: c.messages.map((m) => ({ role: m.role, content: m.content })) };
}

function downloadTranscript() {
  const blob = new Blob([JSON.stringify(exportTranscript(), null, 1)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "razor-chat.json";
  a.click();
  URL.revokeObjectURL(a.href);
}

// a parsed transcript becomes a new conversation; false (and a status line) when it is not one
function importTranscript(data) {
  if (!data || data.format !== TRANSCRIPT_FORMAT || !validMessages(data.messages) ||
      (data.system != null && typeof data.system !== "string")) {
    setStatus("not a " + TRANSCRIPT_FORMAT + " transcript", true);
    return false;
  }
  const c = newConversation();
  c.system = data.system || null;
  c.messages = data.messages.map((m) => ({ role: m.role, content: m.content }));
  touch(c);
  render();
  return true;
}

function readImport(ev) {
  const file = ev.target.files[0];
  ev.target.value = "";
  if (!file) {
    return;
  }
  file.text().then((t) => {
    let data = null;
    try {
      data = JSON.parse(t);
    } catch (e) { /* reported below */ }
    importTranscript(data);
  });
}

// ----------------------------------------------------------------------------------------------- start

async function start() {
  load();
  render();
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      send(ev);
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("razor-toggle").addEventListener("change", switchRazor);
  $("new-chat").addEventListener("click", () => {
    if (!state.controller) {
      newConversation();
      render();
    }
  });
  $("system").addEventListener("change", () => {
    const c = conv();
    c.system = $("system").value || null;
    touch(c);
  });
  $("export").addEventListener("click", downloadTranscript);
  $("import").addEventListener("change", readImport);
  try {
    const models = await (await fetch("/v1/models")).json();
    state.model = models.data[0].id;
  } catch (e) { /* the stats carry the name too */ }
  await refreshStats();
  document.body.dataset.ready = "1";
}

// for scripts driving the page (the tests): the transcript as the Export button writes it, and Import
window.razorChat = { exportTranscript, importTranscript };

document.addEventListener("DOMContentLoaded", start);
