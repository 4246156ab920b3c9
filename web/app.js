// Herald's reference web client: plain modules, no build step, no framework.
// Every text from the server (message bodies, names, topics) goes into the page with
// textContent, never as HTML.

import { Api, ApiError } from "./api.js";
import { Stream } from "./stream.js";

const TOKEN_KEY = "herald.token"; // sessionStorage: this tab only, gone when it closes
const ATTACHMENT_NOTE = /\(attachment (\d+)\)$/;

const $ = (id) => document.getElementById(id);

const state = {
  api: null,
  stream: null,
  me: null,
  members: null, // Set of channel ids the stream follows (from `ready`)
  channels: new Map(), // id -> {info, unread, lastId, seen: [ids counted locally]}
  shown: null, // the channel on screen
  messages: new Map(), // id -> message, of the shown channel
  loading: null, // {channelId, buffer} while the shown channel's messages are fetched
  readSent: new Map(), // channel id -> highest message id marked read
  readQueue: new Map(), // channel id -> id waiting to be sent
  pendingCount: 0, // our delayed messages not yet delivered
};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function notify(text, isError = false) {
  const notice = $("notice");
  notice.textContent = text;
  notice.classList.toggle("error", isError);
}

function failed(err) {
  // Shown, not thrown: nothing here may end as an uncaught error in the console.
  if (err instanceof ApiError && err.status === 401) return;
  notify(err instanceof ApiError ? `${err.message} (${err.code})` : String(err), true);
}

function later(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(() => fn().catch(failed), ms);
  };
}

function setStatus(name) {
  const status = $("status");
  status.dataset.state = name;
  status.textContent = { live: "live", reconnecting: "reconnecting…", offline: "signed out" }[name];
}

// -- signing in and out ------------------------------------------------------------

async function signIn(token) {
  const api = new Api(token, () => signOut("The server refused the token."));
  const me = await api.me();
  sessionStorage.setItem(TOKEN_KEY, token);
  state.api = api;
  state.me = me;
  $("me").textContent = me.name;
  $("login").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  state.stream = new Stream(token, {
    state: setStatus,
    check: checkToken,
    ready: onReady,
    message: onMessage,
    subscribed: onMembership,
    unsubscribed: onMembership,
    reset: onReset,
    close: onClose,
  });
  setStatus("reconnecting");
  state.stream.start();
}

async function checkToken() {
  try {
    await state.api.me();
    return true;
  } catch (err) {
    return !(err instanceof ApiError && err.status === 401);
  }
}

function signOut(reason) {
  if (state.stream) state.stream.stop();
  sessionStorage.removeItem(TOKEN_KEY);
  Object.assign(state, { api: null, stream: null, me: null, members: null, shown: null });
  state.channels.clear();
  state.messages.clear();
  state.readSent.clear();
  state.readQueue.clear();
  $("channel-list").replaceChildren();
  $("messages").replaceChildren();
  $("pending").replaceChildren();
  $("channel-title").textContent = "Pick a channel";
  $("channel-topic").textContent = "";
  $("composer").hidden = true;
  $("me").textContent = "";
  $("chat").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason || "";
  setStatus("offline");
}

// -- the stream's events -------------------------------------------------------------

function onReady(data) {
  state.members = new Set(data.channels);
  refreshChannels().catch(failed);
  refreshPending().catch(failed);
  if (state.stream.lostPosition) {
    // The stream restarted without a resume point: what was missed comes over REST.
    state.stream.lostPosition = false;
    if (state.shown !== null) showChannel(state.shown).catch(failed);
  }
}

function onMessage(msg) {
  const channelId = msg.channel_id;
  if (channelId === state.shown) {
    const channel = state.channels.get(channelId);
    if (channel !== undefined) channel.lastId = Math.max(channel.lastId, msg.id);
    if (state.loading && state.loading.channelId === channelId) {
      state.loading.buffer.push(msg);
    } else {
      addMessages([msg]);
      markRead(channelId, msg.id);
    }
  } else {
    const channel = state.channels.get(channelId);
    if (channel === undefined) {
      refreshSoon();
    } else if (msg.id > channel.lastId) {
      channel.lastId = msg.id;
      if (msg.author.id !== state.me.id) {
        channel.unread += 1;
        channel.seen.push(msg.id);
      }
      renderChannels();
    }
  }
  // A message of ours while one is pending may be it, delivered: look again.
  if (msg.author.id === state.me.id && state.pendingCount > 0) pendingSoon();
}

function onMembership(data) {
  if (data.reason !== undefined) {
    state.members.delete(data.channel_id);
    if (data.channel_id === state.shown) {
      clearShown();
      notify("You are no longer a member of that channel.");
    }
  } else {
    state.members.add(data.channel_id);
  }
  refreshChannels().catch(failed);
}

function onReset(data) {
  // More than the server replays were missed: refetch over REST. For the channel on
  // screen that is its messages now; any other is fetched when it is opened (reading
  // a channel's messages marks it read, so a hidden one is not fetched behind the
  // user's back), and its unread count comes from the listing.
  if (data.channel_id === state.shown) showChannel(state.shown).catch(failed);
  refreshChannels().catch(failed);
}

function onClose(data) {
  if (data.reason === "revoked") {
    // Only a stream of chosen channels ends so; ours follows memberships. Start afresh.
    state.stream.stop();
    state.stream.start();
  }
  // Any other reason: the browser reconnects by itself after the server's retry: delay.
}

// -- channels ------------------------------------------------------------------------

// Refreshes can overlap (an event, a reconnect, a user action): only the one started
// last may apply what it read, or an older listing could overwrite a newer one.
let channelsRun = 0;
let pendingRun = 0;

async function refreshChannels() {
  if (state.api === null) return;
  const run = ++channelsRun;
  const items = await state.api.channels();
  if (run !== channelsRun) return;
  const fresh = new Map();
  for (const info of items) {
    if (state.members !== null && !state.members.has(info.id)) continue;
    const old = state.channels.get(info.id);
    const listedLast = info.last_message ? info.last_message.id : 0;
    // Messages counted here after the listing was read are not in its unread_count.
    const seen = old ? old.seen.filter((id) => id > listedLast) : [];
    fresh.set(info.id, {
      info,
      unread: info.unread_count + seen.length,
      lastId: Math.max(listedLast, old ? old.lastId : 0),
      seen,
    });
  }
  state.channels = fresh;
  if (state.shown !== null && !fresh.has(state.shown)) clearShown();
  renderChannels();
  if (state.shown !== null) renderHeader(fresh.get(state.shown).info);
}

const refreshSoon = later(refreshChannels, 200);

function renderChannels() {
  const list = $("channel-list");
  const rows = [];
  for (const channel of state.channels.values()) {
    const button = el("button");
    button.type = "button";
    button.dataset.channelId = String(channel.info.id);
    button.setAttribute("aria-current", String(channel.info.id === state.shown));
    button.append(el("span", "name", `# ${channel.info.name}`));
    const unread = channel.info.id === state.shown ? 0 : channel.unread;
    const badge = el("span", "unread", String(unread));
    badge.hidden = unread === 0;
    button.append(badge);
    button.addEventListener("click", () => showChannel(channel.info.id).catch(failed));
    const item = el("li");
    item.append(button);
    rows.push(item);
  }
  list.replaceChildren(...rows);
  $("no-channels").hidden = rows.length > 0;
}

function renderHeader(info) {
  $("channel-title").textContent = `# ${info.name}`;
  $("channel-topic").textContent = info.topic;
}

function clearShown() {
  state.shown = null;
  state.loading = null;
  state.messages.clear();
  $("messages").replaceChildren();
  $("channel-title").textContent = "Pick a channel";
  $("channel-topic").textContent = "";
  $("composer").hidden = true;
  renderChannels();
}

async function showChannel(channelId) {
  const channel = state.channels.get(channelId);
  if (channel === undefined) return;
  state.shown = channelId;
  state.messages.clear();
  $("messages").replaceChildren();
  renderHeader(channel.info);
  $("composer").hidden = false;
  notify("");
  channel.unread = 0;
  channel.seen = [];
  renderChannels();
  const loading = { channelId, buffer: [] };
  state.loading = loading;
  let items;
  try {
    items = await state.api.messages(channelId);
  } finally {
    if (state.loading === loading) state.loading = null;
  }
  if (state.shown !== channelId) return; // the user moved on meanwhile
  addMessages(items);
  addMessages(loading.buffer);
  const newest = Math.max(0, ...state.messages.keys());
  channel.lastId = Math.max(channel.lastId, newest);
  if (newest > 0) markRead(channelId, newest);
}

// -- messages ------------------------------------------------------------------------

function addMessages(items) {
  const list = $("messages");
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  for (const msg of items) {
    if (msg.channel_id !== state.shown || state.messages.has(msg.id)) continue;
    state.messages.set(msg.id, msg);
    const node = renderMessage(msg);
    // Usually the newest; a refetch can bring older ones: keep id order.
    let before = null;
    for (const other of list.children) {
      if (Number(other.dataset.id) > msg.id) {
        before = other;
        break;
      }
    }
    list.insertBefore(node, before);
  }
  if (atBottom) list.scrollTop = list.scrollHeight;
}

function renderMessage(msg) {
  const item = el("li");
  item.dataset.id = String(msg.id);
  const time = msg.created_at ? new Date(msg.created_at).toLocaleTimeString() : "";
  item.append(el("span", "time", time), el("span", "author", msg.author.name));
  item.append(el("span", "body", msg.body));
  const note = ATTACHMENT_NOTE.exec(msg.body);
  if (note) {
    const button = el("button", "link", "download");
    button.type = "button";
    button.addEventListener("click", () => download(Number(note[1])).catch(failed));
    item.append(" ", button);
  }
  return item;
}

function markRead(channelId, messageId) {
  // One request in flight per channel; a newer id waits and replaces older ones.
  if (messageId <= (state.readSent.get(channelId) || 0)) return;
  const queued = state.readQueue.get(channelId);
  if (queued !== undefined) {
    state.readQueue.set(channelId, Math.max(queued, messageId));
    return;
  }
  state.readQueue.set(channelId, messageId);
  const send = async () => {
    while (state.readQueue.has(channelId)) {
      const id = state.readQueue.get(channelId);
      try {
        if (id > (state.readSent.get(channelId) || 0)) {
          await state.api.markRead(channelId, id);
          state.readSent.set(channelId, id);
        }
      } finally {
        if (state.readQueue.get(channelId) === id) state.readQueue.delete(channelId);
      }
    }
  };
  send().catch(failed);
}

async function postMessage(event) {
  event.preventDefault();
  const input = $("post-body");
  const channelId = state.shown;
  const msg = await state.api.post(channelId, input.value);
  input.value = "";
  // The stream brings it too; whichever comes first is shown, once.
  if (state.shown === channelId && !(state.loading && state.loading.channelId === channelId)) {
    addMessages([msg]);
    markRead(channelId, msg.id);
  }
}

// -- delayed messages ------------------------------------------------------------------

async function schedule(event) {
  event.preventDefault();
  const body = $("delay-body");
  const seconds = Number($("delay-seconds").value);
  const delayed = await state.api.schedule(state.shown, body.value, seconds);
  body.value = "";
  notify(`Scheduled for ${new Date(delayed.deliver_at).toLocaleTimeString()}.`);
  await refreshPending();
}

let pendingTimer = null;

async function refreshPending() {
  if (state.api === null) return;
  const run = ++pendingRun;
  const items = await state.api.pending();
  if (run !== pendingRun) return;
  state.pendingCount = items.length;
  const rows = items.map((item) => {
    const channel = state.channels.get(item.channel_id);
    const where = channel ? `#${channel.info.name}` : `channel ${item.channel_id}`;
    const when = new Date(item.deliver_at).toLocaleTimeString();
    const row = el("li", "pending-item", `“${item.body}” to ${where} at ${when} `);
    row.dataset.id = String(item.id);
    const cancel = el("button", "link", "cancel");
    cancel.type = "button";
    cancel.addEventListener("click", () =>
      state.api.cancel(item.id).then(refreshPending).catch(failed),
    );
    row.append(cancel);
    return row;
  });
  $("pending").replaceChildren(...rows);
  // Look again a little after the next one is due, in case its message is not ours to see.
  clearTimeout(pendingTimer);
  if (items.length) {
    const next = Math.min(...items.map((item) => Date.parse(item.deliver_at)));
    pendingTimer = setTimeout(
      () => refreshPending().catch(failed),
      Math.max(1000, next - Date.now() + 2000),
    );
  }
}

const pendingSoon = later(refreshPending, 100);

// -- attachments -------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const input = $("upload-file");
  const file = input.files[0];
  if (!file) return;
  const channelId = state.shown;
  const attachment = await state.api.upload(channelId, file);
  input.value = "";
  // Attachments are not part of a message: announce it with one others' clients can
  // read too, and which this client turns into a download button.
  const note = `Attached ${attachment.filename} (attachment ${attachment.id})`;
  const msg = await state.api.post(channelId, note);
  if (state.shown === channelId) {
    addMessages([msg]);
    markRead(channelId, msg.id);
  }
}

async function download(attachmentId) {
  // The download needs the Authorization header, so no plain link: fetch, then save.
  const meta = await state.api.attachment(attachmentId);
  const blob = await state.api.attachmentContent(attachmentId);
  const url = URL.createObjectURL(blob);
  const link = el("a");
  link.href = url;
  link.download = meta.filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// -- start -------------------------------------------------------------------------------

function wire(id, handler) {
  $(id).addEventListener("submit", (event) => handler(event).catch(failed));
}

function main() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    $("login-error").textContent = "";
    signIn(token)
      .then(() => {
        $("token").value = "";
      })
      .catch((err) => {
        if (!(err instanceof ApiError && err.status === 401)) signOut(String(err.message || err));
      });
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  wire("post-form", postMessage);
  wire("delay-form", schedule);
  wire("upload-form", upload);
  document.body.dataset.ready = "1"; // the forms are wired (tests wait for this)
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) signIn(saved).catch((err) => signOut(String(err.message || err)));
}

main();
