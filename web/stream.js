// The one EventSource for every channel the user is a member of
// (GET /api/v1/events?access_token=…).
//
// Reconnecting after a dropped connection or a `close` event is the browser's own work:
// it waits the last `retry:` and sends the last `id:` it saw as Last-Event-ID, so the
// server replays exactly what was missed. Only when the browser gives up (any non-200
// answer: a 429 or 503, readyState CLOSED) does this open a new EventSource itself,
// after a growing delay, passing the last cursor it saw as ?last_event_id=.

const EVENTS = ["ready", "message", "subscribed", "unsubscribed", "reset", "close", "heartbeat"];

export class Stream {
  constructor(token, handlers) {
    this.token = token;
    this.handlers = handlers; // {event name: fn(data)}, state(name), check() -> Promise<bool>
    this.cursor = "";
    this.source = null;
    this.timer = null;
    this.delayMs = 1000;
    this.failures = 0; // opens in a row that ended before `ready`
    this.lostPosition = false;
    this.stopped = false;
  }

  start() {
    this.stopped = false;
    const query = new URLSearchParams({ access_token: this.token });
    // The browser's own reconnects send the newer cursor as a header, which wins over this.
    if (this.cursor) query.set("last_event_id", this.cursor);
    const source = new EventSource(`/api/v1/events?${query}`);
    this.source = source;
    for (const name of EVENTS) {
      source.addEventListener(name, (event) => this.dispatch(source, name, event));
    }
    source.onerror = () => {
      if (source !== this.source) return;
      this.handlers.state("reconnecting");
      if (source.readyState === EventSource.CLOSED) this.reopenLater();
    };
  }

  dispatch(source, name, event) {
    if (source !== this.source) return;
    // An event's lastEventId is the last `id:` the stream carried, from a message or an
    // id:-only cursor frame: the resume point, should this EventSource give up.
    if (event.lastEventId) this.cursor = event.lastEventId;
    if (name === "ready") {
      this.delayMs = 1000;
      this.failures = 0;
      this.handlers.state("live");
    } else if (name === "close") {
      this.handlers.state("reconnecting");
    }
    const handler = this.handlers[name];
    if (handler) handler(JSON.parse(event.data));
  }

  reopenLater() {
    this.source.close();
    // A cursor the server keeps refusing (422: say, the deployment's key changed) would
    // fail every open: after three, start from now and let the app refetch over REST.
    this.failures += 1;
    if (this.failures >= 3 && this.cursor) {
      this.cursor = "";
      this.lostPosition = true;
    }
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      if (this.stopped) return;
      // A refused token ends it (the app signs out); anything else: try again.
      if (await this.handlers.check()) this.start();
    }, this.delayMs);
    this.delayMs = Math.min(this.delayMs * 2, 30000);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.source) this.source.close();
    this.source = null;
  }
}
