// Server-Sent Events over fetch(): EventSource cannot send an Authorization header,
// so the stream is read from a ReadableStream and parsed here, following the
// WHATWG event-stream rules (lines end in CRLF, LF or CR; `data` lines join with
// LF; a blank line dispatches; `:` starts a comment). After a drop the stream is
// reopened with `Last-Event-ID`, so the server resumes exactly after the last
// event received.

import { ApiError, authHeaders, errorOf } from "./api";

export interface SseMessage {
  id: string | null;
  event: string;
  data: string;
}

export class SseParser {
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private id: string | null = null;
  private pendingCR = false;
  /** The last `id:` seen (kept across messages, as EventSource does). */
  lastEventId: string | null = null;
  /** Milliseconds from the last `retry:` field. */
  retryMs: number | null = null;

  /** Feed decoded text; returns the messages it completed. */
  feed(chunk: string): SseMessage[] {
    let text = chunk;
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    this.pendingCR = false;
    this.buffer += text;
    const out: SseMessage[] = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      if (match === null) break;
      // A CR at the very end may be the first half of a CRLF still in flight.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) {
        this.pendingCR = true;
      }
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const message = this.line(line);
      if (message !== null) out.push(message);
    }
    return out;
  }

  private line(line: string): SseMessage | null {
    if (line === "") {
      if (this.id !== null) this.lastEventId = this.id;
      const hadData = this.data.length > 0;
      const message = { id: this.lastEventId, event: this.event || "message", data: this.data.join("\n") };
      this.data = [];
      this.event = "";
      this.id = null;
      return hadData ? message : null;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "event":
        this.event = value;
        break;
      case "id":
        if (!value.includes("\0")) this.id = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retryMs = Number(value);
        break;
      default:
        break;
    }
    return null;
  }
}

export interface StreamHandlers {
  /** A message with data (its `event` is "message" unless the server named one). */
  message(message: SseMessage): void;
  /** The stream will not go on: a refusal (404, 401, ...) or an `error` event. */
  fatal(error: ApiError): void;
  /** The server ended the stream (`event: end`). */
  end?(): void;
  /** Connection state, for a status line: "live", "reconnecting". */
  state?(state: "live" | "reconnecting"): void;
}

/** Codes after which reconnecting (with Last-Event-ID) is worth it. */
const RESUMABLE = new Set(["UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "DEADLINE_EXCEEDED", "INTERNAL"]);

/**
 * Read `path` as an event stream until `end`, a fatal error, or `close()`.
 * Drops (network errors, a stream cut before `end`, a resumable `error` event)
 * reconnect after the server's `retry:` delay, with Last-Event-ID.
 */
export function openStream(path: string, handlers: StreamHandlers): { close(): void } {
  const abort = new AbortController();
  let lastEventId: string | null = null;
  let retryMs = 2000;

  async function once(): Promise<"done" | "again"> {
    const headers: Record<string, string> = { Accept: "text/event-stream", ...authHeaders() };
    if (lastEventId !== null) headers["Last-Event-ID"] = lastEventId;
    const response = await fetch(path, {
      headers,
      credentials: "omit",
      cache: "no-store",
      signal: abort.signal,
    });
    if (!response.ok || response.body === null) {
      const error = await errorOf(response);
      if (response.status >= 500 || response.status === 429) return "again";
      handlers.fatal(error);
      return "done";
    }
    handlers.state?.("live");
    const parser = new SseParser();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "again"; // cut before `end`: resume
      for (const message of parser.feed(value)) {
        if (parser.retryMs !== null) retryMs = parser.retryMs;
        if (message.event === "end") {
          handlers.end?.();
          return "done";
        }
        if (message.event === "error") {
          const body = JSON.parse(message.data) as { error?: { code?: string; message?: string } };
          const code = body.error?.code ?? "UNKNOWN";
          if (RESUMABLE.has(code)) {
            await reader.cancel();
            return "again";
          }
          handlers.fatal(new ApiError(0, code, body.error?.message ?? "the stream failed"));
          return "done";
        }
        if (message.id !== null) lastEventId = message.id;
        handlers.message(message);
      }
    }
  }

  void (async () => {
    while (!abort.signal.aborted) {
      let outcome: "done" | "again";
      try {
        outcome = await once();
      } catch {
        outcome = "again"; // a network error, or close() aborting the read
      }
      if (outcome === "done" || abort.signal.aborted) return;
      handlers.state?.("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, retryMs));
    }
  })();
  return { close: () => abort.abort() };
}
