// REST calls to Herald's /api/v1, with the bearer token. Errors come back as ApiError
// carrying the contract's {"error": {code, message}}.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  constructor(token, onUnauthorized) {
    this.token = token;
    this.onUnauthorized = onUnauthorized;
  }

  async request(method, path, body) {
    const headers = { Authorization: `Bearer ${this.token}` };
    let payload;
    if (body instanceof FormData) {
      payload = body; // the browser sets the multipart Content-Type with its boundary
    } else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(`/api/v1${path}`, { method, headers, body: payload });
    } catch (err) {
      throw new ApiError(0, "network_error", "the server cannot be reached");
    }
    if (resp.status === 401) this.onUnauthorized();
    if (!resp.ok) {
      let code = "http_" + resp.status;
      let message = resp.statusText || code;
      try {
        const doc = await resp.json();
        code = doc.error.code;
        message = doc.error.message;
      } catch (err) {
        // not the contract's JSON (a proxy's page): keep the status
      }
      throw new ApiError(resp.status, code, message);
    }
    return resp;
  }

  async json(method, path, body) {
    const resp = await this.request(method, path, body);
    return resp.status === 204 ? null : resp.json();
  }

  me() {
    return this.json("GET", "/me");
  }

  async channels() {
    // Every page of the listing (1000 a page; a client rarely sees more than one).
    const items = [];
    let cursor = "";
    do {
      const query = new URLSearchParams({ limit: "1000" });
      if (cursor) query.set("cursor", cursor);
      const page = await this.json("GET", `/channels?${query}`);
      items.push(...page.items);
      cursor = page.next_cursor;
    } while (cursor);
    return items;
  }

  async messages(channelId, limit = 100) {
    // The newest `limit`, oldest first. Reading them also moves the read position.
    const page = await this.json("GET", `/channels/${channelId}/messages?limit=${limit}`);
    return page.items;
  }

  post(channelId, body) {
    return this.json("POST", `/channels/${channelId}/messages`, { body });
  }

  markRead(channelId, messageId) {
    return this.json("POST", `/channels/${channelId}/read`, { message_id: messageId });
  }

  schedule(channelId, body, delaySeconds) {
    return this.json("POST", `/channels/${channelId}/delayed-messages`, {
      body,
      delay_seconds: delaySeconds,
    });
  }

  async pending() {
    return (await this.json("GET", "/delayed-messages?status=pending")).items;
  }

  cancel(delayedId) {
    return this.json("DELETE", `/delayed-messages/${delayedId}`);
  }

  upload(channelId, file) {
    const form = new FormData();
    form.append("file", file, file.name);
    return this.json("POST", `/channels/${channelId}/attachments`, form);
  }

  attachment(id) {
    return this.json("GET", `/attachments/${id}`);
  }

  async attachmentContent(id) {
    return (await this.request("GET", `/attachments/${id}/content`)).blob();
  }
}
