// The tcserve playground: a client of the public API, nothing more. Everything it
// shows comes from GET /v1/models and POST /v1/complete, with the key typed here.
"use strict";

const HUMAN = "\n\nHuman:";
const ASSISTANT = "\n\nAssistant:";
// The server's own words (src/tcserve/core/transcript.py), so that the check as you
// type and the 400 you get say the same thing.
const BAD_START = 'prompt must start with "\n\nHuman:" turn after an optional system prompt';
const BAD_END = 'prompt must end with "\n\nAssistant:" turn';
const KEY_STORE = "tcserve.apiKey";
const MODEL_STORE = "tcserve.model";
const VERSION = "2023-06-01";

const $ = (id) => document.getElementById(id);

const state = {
  turns: [{ role: "Human", text: "Why is the sky blue?" }],
  controller: null,
  lang: "curl",
};

// ---- the transcript ------------------------------------------------------------

function renderPrompt() {
  let prompt = $("system").value;
  for (const turn of state.turns) {
    prompt += (turn.role === "Human" ? HUMAN : ASSISTANT) + (turn.text ? " " + turn.text : "");
  }
  prompt += ASSISTANT;
  const prefill = $("prefill").value;
  return prefill ? prompt + " " + prefill : prompt;
}

// Any string is a system text plus a run of turns; the text after a last
// Assistant marker is the prefill.
function parsePrompt(prompt) {
  const marks = [...prompt.matchAll(/\n\nHuman:|\n\nAssistant:/g)];
  const system = marks.length ? prompt.slice(0, marks[0].index) : prompt;
  const turns = marks.map((mark, i) => {
    const end = i + 1 < marks.length ? marks[i + 1].index : prompt.length;
    let text = prompt.slice(mark.index + mark[0].length, end);
    if (text.startsWith(" ")) text = text.slice(1);
    return { role: mark[0] === HUMAN ? "Human" : "Assistant", text };
  });
  let prefill = "";
  if (turns.length && turns[turns.length - 1].role === "Assistant") prefill = turns.pop().text;
  return { system, turns, prefill };
}

// Anthropic's rules as the server applies them: strip trailing whitespace, put
// "\n\n" before a leading "Human:", then check the first and the last turn.
function ruleProblem(prompt) {
  let text = prompt.replace(/\s+$/u, "");
  if (text.startsWith("Human:")) text = "\n\n" + text;
  const human = text.indexOf(HUMAN);
  const assistant = text.indexOf(ASSISTANT);
  if (human < 0 || (assistant >= 0 && assistant < human)) return BAD_START;
  if (text.lastIndexOf(ASSISTANT) < text.lastIndexOf(HUMAN)) return BAD_END;
  return null;
}

function drawTurns() {
  const box = $("turns");
  box.replaceChildren();
  state.turns.forEach((turn, i) => box.append(turnElement(turn, i)));
}

function turnElement(turn, i) {
  const row = document.createElement("div");
  row.className = "turn " + turn.role.toLowerCase();

  const role = document.createElement("select");
  role.className = "turn-role";
  role.setAttribute("aria-label", `Turn ${i + 1}: speaker`);
  for (const name of ["Human", "Assistant"]) role.append(new Option(name, name, false, name === turn.role));
  role.addEventListener("change", () => {
    turn.role = role.value;
    row.className = "turn " + turn.role.toLowerCase();
    fromStructure();
  });

  const text = document.createElement("textarea");
  text.className = "turn-text";
  text.rows = 2;
  text.value = turn.text;
  text.setAttribute("aria-label", `Turn ${i + 1}: ${turn.role} text`);
  text.addEventListener("input", () => {
    turn.text = text.value;
    fromStructure();
  });

  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "turn-remove";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove turn ${i + 1}`);
  remove.addEventListener("click", () => {
    state.turns.splice(i, 1);
    drawTurns();
    fromStructure();
    (document.querySelectorAll(".turn-text")[Math.min(i, state.turns.length - 1)] || $("add-human")).focus();
  });

  row.append(role, text, remove);
  return row;
}

function addTurn(role) {
  state.turns.push({ role, text: "" });
  drawTurns();
  fromStructure();
  const texts = document.querySelectorAll(".turn-text");
  texts[texts.length - 1].focus();
}

function fromStructure() {
  $("raw-prompt").value = renderPrompt();
  refresh();
}

// The raw text stays exactly as typed; only the structure follows it.
function fromRaw() {
  const parsed = parsePrompt($("raw-prompt").value);
  $("system").value = parsed.system;
  $("prefill").value = parsed.prefill;
  state.turns = parsed.turns;
  drawTurns();
  refresh();
}

function refresh() {
  const prompt = $("raw-prompt").value;
  $("prompt-literal").textContent = JSON.stringify(prompt);
  const problem = ruleProblem(prompt);
  const rules = $("rules");
  rules.classList.toggle("bad", problem !== null);
  rules.textContent = problem === null ? "✓ Follows Anthropic's prompt rules." : "✗ " + problem;
  drawCode();
}

// ---- the request -----------------------------------------------------------------

function unescapeStop(line) {
  return line.replace(/\\([ntr\\])/g, (_, c) => ({ n: "\n", t: "\t", r: "\r", "\\": "\\" })[c]);
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const body = { model: $("model").value, prompt: $("raw-prompt").value };
  const fields = [
    ["max_tokens_to_sample", "max-tokens"],
    ["temperature", "temperature"],
    ["top_p", "top-p"],
    ["top_k", "top-k"],
  ];
  for (const [field, id] of fields) {
    const value = numberField(id);
    if (value !== undefined) body[field] = value;
  }
  const stops = $("stops").value.split("\n").filter((line) => line !== "").map(unescapeStop);
  if (stops.length) body.stop_sequences = stops;
  body.stream = true;
  return body;
}

function apiHeaders(json) {
  const headers = { "anthropic-version": VERSION };
  if (json) headers["content-type"] = "application/json";
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers["x-api-key"] = key;
  return headers;
}

async function jsonOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text);
  } catch {
    return { type: "error", error: { type: "api_error", message: text || response.statusText } };
  }
}

function connectionError(error) {
  return { type: "error", error: { type: "api_connection_error", message: String(error.message || error) } };
}

// ---- models and keys ---------------------------------------------------------------

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models?limit=1000", { headers: apiHeaders(false) });
  } catch (error) {
    showError(null, connectionError(error), null);
    return;
  }
  const requestId = response.headers.get("request-id");
  if (!response.ok) {
    if (response.status === 401) askForKey();
    showError(response.status, await jsonOf(response), requestId);
    return;
  }
  const body = await response.json();
  const select = $("model");
  const wanted = sessionStorage.getItem(MODEL_STORE) || select.value;
  select.replaceChildren(
    ...body.data.map((model) => new Option(model.display_name === model.id ? model.id : `${model.id} (${model.display_name})`, model.id)),
  );
  if (body.data.some((model) => model.id === wanted)) select.value = wanted;
  clearError();
  drawCode();
}

function askForKey() {
  const panel = $("key-panel");
  if (panel.hidden) {
    panel.hidden = false;
    $("api-key").focus();
  }
}

function useKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  loadModels();
}

// ---- streaming ---------------------------------------------------------------------

function setText(id, text) {
  $(id).textContent = text;
}

function setState(text, busy) {
  const node = $("state");
  node.textContent = text;
  node.classList.toggle("busy", busy);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function clearError() {
  $("error").hidden = true;
  setText("error-summary", "");
  setText("error-body", "");
}

function showError(status, body, requestId) {
  const error = (body && body.error) || { type: "api_error", message: String(body) };
  const id = requestId || (body && body.request_id) || null;
  const where = status === null ? "" : `${status} `;
  setText("error-summary", `${where}${error.type}: ${error.message}` + (id ? `\nrequest-id: ${id}` : ""));
  setText("error-body", JSON.stringify(body, null, 2));
  if (id) setText("stat-request-id", id);
  $("error").hidden = false;
}

function resetOutput(prefill) {
  setText("output-prefill", prefill);
  setText("output-text", "");
  setText("raw-events", "");
  for (const id of ["stat-stop-reason", "stat-stop", "stat-ttft", "stat-tps", "stat-pieces", "stat-request-id"]) {
    setText(id, "–");
  }
  clearError();
}

class Run {
  constructor() {
    this.started = performance.now();
    this.first = null;
    this.last = null;
    this.pieces = 0;
    this.finished = false;
  }

  onFrame(frame) {
    $("raw-events").textContent += frame + "\n\n";
    let event = "message";
    const data = [];
    for (const line of frame.split("\n")) {
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    const payload = JSON.parse(data.join("\n"));
    if (event === "completion") this.onCompletion(payload);
    else if (event === "error") {
      this.finished = true;
      showError(null, payload, payload.request_id);
    }
  }

  onCompletion(payload) {
    if (payload.completion) {
      const now = performance.now();
      if (this.first === null) this.first = now;
      this.last = now;
      this.pieces += 1;
      $("output-text").textContent += payload.completion;
      this.showTimings();
    }
    if (payload.stop_reason) {
      this.finished = true;
      setText("stat-stop-reason", payload.stop_reason);
      setText("stat-stop", payload.stop === null ? "null" : JSON.stringify(payload.stop));
    }
  }

  showTimings() {
    setText("stat-pieces", String(this.pieces));
    setText("stat-ttft", `${Math.round(this.first - this.started)} ms`);
    const seconds = (this.last - this.first) / 1000;
    if (this.pieces > 1 && seconds > 0) setText("stat-tps", ((this.pieces - 1) / seconds).toFixed(1));
  }
}

async function send() {
  if (state.controller) return;
  const body = requestBody();
  sessionStorage.setItem(MODEL_STORE, body.model);
  resetOutput(ruleProblem(body.prompt) === null ? parsePrompt(body.prompt.trimEnd()).prefill : "");
  const controller = new AbortController();
  state.controller = controller;
  setState("Waiting…", true);
  const run = new Run();
  try {
    const response = await fetch("/v1/complete", {
      method: "POST",
      headers: apiHeaders(true),
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    const requestId = response.headers.get("request-id");
    if (requestId) setText("stat-request-id", requestId);
    if (!response.ok) {
      if (response.status === 401) askForKey();
      showError(response.status, await jsonOf(response), requestId);
      setState(`Refused (${response.status})`, false);
      return;
    }
    setState("Streaming…", true);
    await readEvents(response, run);
    setState(run.finished ? "Done" : "The stream ended without a stop_reason", false);
  } catch (error) {
    if (controller.signal.aborted) {
      setText("stat-stop-reason", "stopped by you");
      setState("Stopped", false);
    } else {
      showError(null, connectionError(error), null);
      setState("Failed", false);
    }
  } finally {
    state.controller = null;
    if (!$("stop").disabled) setState($("state").textContent, false);
  }
}

async function readEvents(response, run) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (frame) run.onFrame(frame);
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

// ---- copy as -------------------------------------------------------------------------

const str = (value) => JSON.stringify(value);

function curlCode(body) {
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  return [
    `curl -N ${location.origin}/v1/complete \\`,
    `  -H 'anthropic-version: ${VERSION}' \\`,
    "  -H 'content-type: application/json' \\",
    '  -H "x-api-key: $ANTHROPIC_API_KEY" \\',
    `  -d '${json}'`,
  ].join("\n");
}

function pythonCode(body) {
  const args = Object.entries(body).map(([name, value]) => `    ${name}=${pyValue(value)},`);
  return [
    "import os",
    "",
    "import anthropic  # pip install anthropic==0.125.0",
    "",
    "client = anthropic.Anthropic(",
    `    base_url=${str(location.origin)},`,
    '    api_key=os.environ.get("ANTHROPIC_API_KEY", "none"),  # any key works on a server without keys',
    ")",
    "",
    "stream = client.completions.create(",
    ...args,
    ")",
    "for event in stream:",
    '    print(event.completion, end="", flush=True)',
    "print()",
  ].join("\n");
}

function pyValue(value) {
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return "[" + value.map(pyValue).join(", ") + "]";
  return JSON.stringify(value); // a JSON string or number is a Python literal too
}

function typescriptCode(body) {
  const args = Object.entries(body).map(([name, value]) => `  ${name}: ${JSON.stringify(value)},`);
  return [
    "import Anthropic from '@anthropic-ai/sdk'; // npm install @anthropic-ai/sdk@0.137.0",
    "",
    "const client = new Anthropic({",
    `  baseURL: ${str(location.origin)},`,
    "  apiKey: process.env.ANTHROPIC_API_KEY ?? 'none', // any key works on a server without keys",
    "});",
    "",
    "const stream = await client.completions.create({",
    ...args,
    "});",
    "for await (const event of stream) process.stdout.write(event.completion);",
    "process.stdout.write('\\n');",
  ].join("\n");
}

function goCode(body) {
  const fields = [
    ["Model", `anthropic.Model(${str(body.model)})`],
    ["Prompt", str(body.prompt)],
  ];
  if (body.max_tokens_to_sample !== undefined) fields.push(["MaxTokensToSample", String(body.max_tokens_to_sample)]);
  if (body.temperature !== undefined) fields.push(["Temperature", `anthropic.Float(${body.temperature})`]);
  if (body.top_p !== undefined) fields.push(["TopP", `anthropic.Float(${body.top_p})`]);
  if (body.top_k !== undefined) fields.push(["TopK", `anthropic.Int(${body.top_k})`]);
  if (body.stop_sequences) fields.push(["StopSequences", `[]string{${body.stop_sequences.map(str).join(", ")}}`]);
  const width = Math.max(...fields.map(([name]) => name.length)) + 1;
  return [
    "package main",
    "",
    "import (",
    '\t"context"',
    '\t"fmt"',
    "",
    '\t"github.com/anthropics/anthropic-sdk-go"',
    '\t"github.com/anthropics/anthropic-sdk-go/option"',
    ")",
    "",
    "func main() {",
    "\t// The key comes from ANTHROPIC_API_KEY.",
    `\tclient := anthropic.NewClient(option.WithBaseURL(${str(location.origin)}))`,
    "\tstream := client.Completions.NewStreaming(context.TODO(), anthropic.CompletionNewParams{",
    ...fields.map(([name, value]) => `\t\t${(name + ":").padEnd(width + 1)}${value},`),
    "\t})",
    "\tfor stream.Next() {",
    "\t\tfmt.Print(stream.Current().Completion)",
    "\t}",
    "\tif err := stream.Err(); err != nil {",
    "\t\tpanic(err)",
    "\t}",
    "\tfmt.Println()",
    "}",
  ].join("\n");
}

const GENERATORS = { curl: curlCode, python: pythonCode, typescript: typescriptCode, go: goCode };

function drawCode() {
  $("code").textContent = GENERATORS[state.lang](requestBody());
}

function chooseLanguage(tab) {
  state.lang = tab.dataset.lang;
  for (const other of document.querySelectorAll(".tab")) other.setAttribute("aria-selected", String(other === tab));
  drawCode();
}

async function copyCode() {
  const button = $("copy");
  try {
    await navigator.clipboard.writeText($("code").textContent);
    button.textContent = "Copied";
  } catch {
    getSelection().selectAllChildren($("code"));
    button.textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => (button.textContent = "Copy"), 1500);
}

// ---- wiring ----------------------------------------------------------------------

function start() {
  drawTurns();
  fromStructure();
  $("system").addEventListener("input", fromStructure);
  $("prefill").addEventListener("input", fromStructure);
  $("raw-prompt").addEventListener("input", fromRaw);
  $("add-human").addEventListener("click", () => addTurn("Human"));
  $("add-assistant").addEventListener("click", () => addTurn("Assistant"));
  for (const id of ["model", "max-tokens", "temperature", "top-p", "top-k", "stops"]) {
    $(id).addEventListener("input", drawCode);
  }
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("key-form").addEventListener("submit", useKey);
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => chooseLanguage(tab));
  $("copy").addEventListener("click", copyCode);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.controller) {
      event.preventDefault();
      stop();
    }
  });
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) {
    $("api-key").value = key;
    $("key-panel").hidden = false;
  }
  loadModels();
}

start();
