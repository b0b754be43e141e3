// The Pigeon inbox page: plain JavaScript on the REST API, no build step.
//
// Flow: the user's JWT goes to the Gate (POST /v1/connect, same origin as this page), which
// answers with a node's HTTP address and a session token. The page then talks to that node:
// an EventSource on /v1/stream (the token in the query string: EventSource cannot send headers)
// for live messages and the unread count, and fetch() for the inbox calls. When the stream
// cannot go on (node gone, session expired, node draining) the page goes back through the Gate
// and resumes from the last event id, so nothing is missed.

const $ = (id) => document.getElementById(id);

const state = {
  jwt: "",
  session: "",
  node: "", // base URL of the node's HTTP server
  userId: "",
  cursor: "", // "<seq>.<broadcast_seq>" of the last event with an id
  stream: null,
  failures: 0, // connections in a row that did not get past the replay, for the backoff
  streamErrors: 0, // errors in a row on the current node's stream
  backoff: { initial: 0.5, max: 30, multiplier: 2 }, // seconds; the Gate's answer replaces it
  heartbeat: 15, // seconds between the node's heartbeats (its welcome says)
  watchdog: 0,
  epoch: 0, // bumped at sign-in and sign-out: answers to an earlier session are dropped
  retryTimer: 0,
  messages: new Map(), // id -> message (proto3 JSON)
  unread: 0,
};

// --- HTTP ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter; // seconds the server asked to wait (429, 503), or NaN
  }
}

// A Duration in proto3 JSON ("1.5s") in seconds; NaN when absent or malformed.
const seconds = (duration) => parseFloat(duration ?? "");

async function call(base, path, { method = "GET", body, auth = true } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth && state.session) headers.Authorization = `Bearer ${state.session}`;
  const response = await fetch(base + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data, parseFloat(response.headers.get("Retry-After")));
  }
  return data;
}

// A call to the node; a session that expired is renewed through the Gate once.
async function nodeCall(path, options) {
  try {
    return await call(state.node, path, options);
  } catch (error) {
    if (!(error instanceof ApiError) || error.status !== 401 || !state.jwt) throw error;
    await connectToGate();
    return call(state.node, path, options);
  }
}

// --- connection ----------------------------------------------------------------------------

async function connectToGate() {
  const epoch = state.epoch;
  const reply = await call("", "/v1/connect", {
    method: "POST",
    body: { token: state.jwt },
    auth: false,
  });
  // Signed out (or in as someone else) while the Gate answered: not this session's answer.
  if (epoch !== state.epoch) throw new Error("signed out");
  state.session = reply.sessionToken;
  state.node = `${location.protocol}//${reply.nodeHttpAddress}`;
  state.userId = reply.userId;
  const backoff = reply.backoff || {};
  state.backoff = {
    initial: seconds(backoff.initial) || 0.5,
    max: seconds(backoff.max) || 30,
    multiplier: Number(backoff.multiplier) || 2,
  };
  state.heartbeat = seconds(reply.heartbeatInterval) || state.heartbeat;
  $("node").textContent = `${reply.nodeId} (${reply.nodeHttpAddress})`;
  $("user").textContent = reply.userId;
  $("user").hidden = false;
  return reply;
}

function openStream() {
  closeStream();
  const params = new URLSearchParams({ access_token: state.session });
  // A new EventSource cannot set Last-Event-ID; the query parameter resumes it instead.
  if (state.cursor) params.set("last_event_id", state.cursor);
  const stream = new EventSource(`${state.node}/v1/stream?${params}`);
  state.stream = stream;
  setStatus("connecting", "connecting");
  watch();

  stream.onmessage = (event) => {
    if (stream !== state.stream) return;
    if (event.lastEventId) {
      state.cursor = event.lastEventId;
      $("cursor").textContent = state.cursor;
    }
    state.streamErrors = 0;
    watch();
    onEvent(JSON.parse(event.data));
  };
  stream.addEventListener("error", (event) => {
    if (stream !== state.stream) return;
    if (event.data) {
      // The server ended the stream with a status (sent as an "error" event).
      const status = JSON.parse(event.data);
      toast(status.message, true);
      reconnectViaGate();
    } else if (stream.readyState === EventSource.CLOSED) {
      // Refused (e.g. 401 once the session expired): the browser gives up; we go to the Gate.
      reconnectViaGate();
    } else {
      // The browser retries the same node with Last-Event-ID. If that node is gone, a second
      // failure in a row sends us back to the Gate for another one.
      state.streamErrors += 1;
      setStatus("connecting", "reconnecting");
      if (state.streamErrors >= 2) reconnectViaGate();
    }
  });
}

// A stream that goes silent (a sleeping laptop, a dropped NAT entry, a frozen node) stays open
// for ever as far as the browser knows: past 2.5 heartbeats without an event, go elsewhere.
function watch() {
  clearTimeout(state.watchdog);
  state.watchdog = setTimeout(() => {
    toast("The connection went silent; reconnecting", true);
    reconnectViaGate();
  }, state.heartbeat * 2500);
}

function closeStream() {
  clearTimeout(state.watchdog);
  if (state.stream) {
    state.stream.close();
    state.stream = null;
  }
}

function reconnectViaGate(delaySeconds) {
  closeStream();
  clearTimeout(state.retryTimer);
  state.failures += 1;
  state.streamErrors = 0;
  // Exponential backoff with full jitter, as the Gate's Connect answer says.
  const { initial, max, multiplier } = state.backoff;
  const ceiling = Math.min(max, initial * multiplier ** Math.min(state.failures - 1, 32));
  const delay = delaySeconds ?? Math.random() * ceiling;
  const epoch = state.epoch;
  setStatus("connecting", "reconnecting");
  state.retryTimer = setTimeout(async () => {
    try {
      await connectToGate();
      if (epoch === state.epoch) openStream();
    } catch (error) {
      if (epoch !== state.epoch) return;
      if (error instanceof ApiError && [400, 401, 403].includes(error.status)) {
        // Retrying cannot help: the token is refused or the request is wrong.
        signOut(`Your token was refused: ${error.message}`);
        return;
      }
      reconnectViaGate(error.retryAfter > 0 ? error.retryAfter : undefined);
    }
  }, delay * 1000);
}

// --- events --------------------------------------------------------------------------------

function onEvent(event) {
  if (event.welcome) {
    state.heartbeat = seconds(event.welcome.heartbeatInterval) || state.heartbeat;
    watch();
    setStatus("live", "live");
    // The stream starts live from now; everything before it is in the inbox listing.
    if (state.messages.size === 0) loadInbox();
  }
  for (const message of event.messages || []) {
    state.messages.set(message.id, message);
    render(message);
  }
  // Not on the welcome alone: a node that welcomes and then fails every time (a store error
  // in the replay) must see the page back off.
  if (event.replayDone) state.failures = 0;
  if (event.unreadCount !== undefined) setUnread(Number(event.unreadCount));
  if (event.reconnect) {
    // The node is draining or we fell behind: go elsewhere, resuming from our cursor, spread
    // over up to twice the hint so that a drained node's pages do not all come back at once.
    const wait = seconds(event.reconnect.retryAfter);
    reconnectViaGate((Number.isFinite(wait) ? wait : 0.5) * (1 + Math.random()));
  }
}

async function loadInbox() {
  const epoch = state.epoch;
  try {
    const page = await nodeCall("/v1/messages?pageSize=50");
    if (epoch !== state.epoch) return; // signed out meanwhile
    for (const message of page.messages.slice().reverse()) {
      if (!state.messages.has(message.id)) {
        state.messages.set(message.id, message);
        render(message);
      }
    }
  } catch (error) {
    toast(`Could not load the inbox: ${error.message}`, true);
  }
}

// --- rendering -----------------------------------------------------------------------------

function timeOf(message) {
  return message.createdAt ? new Date(message.createdAt) : new Date();
}

function render(message) {
  let item = document.querySelector(`li[data-id="${CSS.escape(message.id)}"]`);
  if (!item) {
    item = $("message-template").content.firstElementChild.cloneNode(true);
    item.dataset.id = message.id;
    item.querySelector(".read-button").addEventListener("click", () => markRead(message.id));
    item.querySelector(".delete-button").addEventListener("click", () => remove(message.id));
    insertSorted(item, timeOf(message));
  }
  // textContent only: message text is user input and must never become markup.
  item.querySelector(".sender").textContent = message.sender;
  // A badge for system and broadcast messages; none where it would repeat the sender's name.
  const kind = (message.kind || "").replace("MESSAGE_KIND_", "").toLowerCase();
  const badge = item.querySelector(".kind");
  badge.textContent = kind;
  badge.hidden = !kind || kind === "user" || kind === message.sender.toLowerCase();
  const when = timeOf(message);
  item.querySelector(".time").textContent = when.toLocaleString();
  item.querySelector(".time").dateTime = when.toISOString();
  item.querySelector(".title").textContent = message.title || "";
  item.querySelector(".title").hidden = !message.title;
  item.querySelector(".text").textContent = message.body;
  item.classList.toggle("unread", !message.read);
  item.dataset.time = String(when.getTime());
  $("empty").hidden = state.messages.size > 0;
}

function insertSorted(item, when) {
  // Newest first.
  const list = $("messages");
  for (const other of list.children) {
    if (Number(other.dataset.time) < when.getTime()) {
      list.insertBefore(item, other);
      return;
    }
  }
  list.appendChild(item);
}

function setUnread(count) {
  const badge = $("badge");
  if (count !== state.unread) {
    badge.classList.add("bump");
    setTimeout(() => badge.classList.remove("bump"), 160);
  }
  state.unread = count;
  badge.textContent = String(count);
  badge.classList.toggle("zero", count === 0);
  document.title = count ? `(${count}) Pigeon inbox` : "Pigeon inbox";
}

function setStatus(kind, text) {
  const status = $("status");
  status.className = `status ${kind}`;
  status.textContent = text;
}

let toastTimer = 0;
function toast(text, isError = false) {
  const box = $("toast");
  box.textContent = text;
  box.classList.toggle("error", isError);
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), 4000);
}

// --- actions -------------------------------------------------------------------------------

async function markRead(id) {
  const epoch = state.epoch;
  try {
    const reply = await nodeCall("/v1/messages:read", { method: "POST", body: { messageIds: [id] } });
    if (epoch !== state.epoch) return; // signed out meanwhile
    const message = state.messages.get(id);
    if (message) {
      message.read = true;
      render(message);
    }
    setUnread(Number(reply.unreadCount));
  } catch (error) {
    if (epoch === state.epoch) toast(error.message, true);
  }
}

async function markAllRead() {
  const epoch = state.epoch;
  try {
    const reply = await nodeCall("/v1/messages:read", { method: "POST", body: { all: true } });
    if (epoch !== state.epoch) return; // signed out meanwhile
    for (const message of state.messages.values()) {
      message.read = true;
      render(message);
    }
    setUnread(Number(reply.unreadCount));
  } catch (error) {
    if (epoch === state.epoch) toast(error.message, true);
  }
}

async function remove(id) {
  const epoch = state.epoch;
  try {
    const reply = await nodeCall(`/v1/messages/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (epoch !== state.epoch) return; // signed out meanwhile
    state.messages.delete(id);
    document.querySelector(`li[data-id="${CSS.escape(id)}"]`)?.remove();
    $("empty").hidden = state.messages.size > 0;
    setUnread(Number(reply.unreadCount));
  } catch (error) {
    if (epoch === state.epoch) toast(error.message, true);
  }
}

async function send(event) {
  event.preventDefault();
  const to = $("to").value.split(",").map((s) => s.trim()).filter(Boolean);
  const button = $("send");
  button.disabled = true;
  try {
    await nodeCall("/v1/messages", {
      method: "POST",
      body: { to, title: $("title").value, body: $("body").value },
    });
    $("body").value = "";
    $("title").value = "";
    toast(`Sent to ${to.join(", ")}`);
  } catch (error) {
    toast(error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function signIn(event) {
  event.preventDefault();
  const epoch = (state.epoch += 1);
  state.jwt = $("token").value.trim();
  const button = $("connect");
  button.disabled = true;
  setStatus("connecting", "connecting");
  try {
    await connectToGate();
    sessionStorage.setItem("pigeon.jwt", state.jwt);
    $("login").hidden = true;
    $("app").hidden = false;
    $("logout").hidden = false;
    openStream();
  } catch (error) {
    if (epoch !== state.epoch) return; // signed in again, or out, meanwhile
    setStatus("error", "refused");
    toast(error.message, true);
  } finally {
    button.disabled = false;
  }
}

function signOut(reason) {
  state.epoch += 1;
  closeStream();
  clearTimeout(state.retryTimer);
  sessionStorage.removeItem("pigeon.jwt");
  Object.assign(state, {
    jwt: "", session: "", node: "", userId: "", cursor: "", failures: 0, streamErrors: 0,
  });
  state.messages.clear();
  $("messages").replaceChildren();
  setUnread(0);
  setStatus("off", "offline");
  $("app").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("user").hidden = true;
  $("node").textContent = "";
  $("cursor").textContent = "";
  if (reason) toast(reason, true);
}

function init() {
  $("login-form").addEventListener("submit", signIn);
  $("send-form").addEventListener("submit", send);
  $("mark-all").addEventListener("click", markAllRead);
  $("logout").addEventListener("click", () => signOut());
  for (const chip of document.querySelectorAll(".chip")) {
    chip.addEventListener("click", () => {
      for (const other of document.querySelectorAll(".chip")) other.classList.remove("active");
      chip.classList.add("active");
      document.querySelector(".inbox").classList.toggle("only-unread", chip.dataset.filter === "unread");
    });
  }
  const saved = sessionStorage.getItem("pigeon.jwt");
  if (saved) {
    $("token").value = saved;
    $("login-form").requestSubmit();
  }
}

init();
