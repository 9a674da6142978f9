// One job's page: its answer streaming live over SSE (GET /v1/jobs/{id}/events),
// its content blocks once finished (text, tool_use input as JSON, thinking),
// history, usage, cost (once an attempt finished), and a trace link when the
// server has a Jaeger URL.

import {
  ApiError,
  TERMINAL,
  call,
  dashboardConfig,
  statusName,
  type ContentBlock,
  type HistoryEntry,
  type Job,
  type JobEvent,
  type TokenDelta,
} from "./api";
import { append, clear, h, notice, secondsBetween, formatSeconds, statusBadge, when } from "./dom";
import type { Stop } from "./main";
import { openStream } from "./sse";

/** A content block as it streams: its start (blockJson) and the pieces so far. */
interface LiveBlock {
  start: ContentBlock;
  body: HTMLElement;
}

function pretty(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

/** A finished content block as a person reads it. */
export function renderBlock(block: ContentBlock, index: number): HTMLElement {
  const box = (title: string, ...content: (Node | string)[]) =>
    h("section", { class: `block block-${block.type}`, "data-type": block.type, "data-index": index }, h("h4", {}, title), ...content);
  switch (block.type) {
    case "text":
      return box("text", h("pre", { class: "text" }, block.text ?? ""));
    case "thinking":
      return box("thinking", h("details", { open: true }, h("summary", {}, "thinking"), h("pre", { class: "thinking" }, block.thinking ?? "")));
    case "redacted_thinking":
      return box("redacted thinking", h("p", { class: "hint" }, "(encrypted by the provider)"));
    case "tool_use":
    case "server_tool_use":
      return box(`${block.type}: ${block.name ?? ""}`, h("p", { class: "mono hint" }, block.id ?? ""), h("pre", { class: "json" }, pretty(block.input ?? {})));
    default:
      return box(block.type, h("pre", { class: "json" }, pretty(block)));
  }
}

function field(label: string, value: Node | string, id?: string): HTMLElement[] {
  return [h("dt", {}, label), h("dd", { id }, value)];
}

function usageRows(job: Job): HTMLElement[] {
  const u = job.usage;
  if (!u) return [h("p", { class: "hint" }, "No usage reported yet.")];
  const rows: [string, string | undefined][] = [
    ["input tokens", u.inputTokens],
    ["output tokens", u.outputTokens],
    ["cache write tokens", u.cacheCreationInputTokens],
    ["cache read tokens", u.cacheReadInputTokens],
    ["service tier", u.serviceTier],
  ];
  const cost = job.priced
    ? `$${(Number(job.costMicros ?? "0") / 1e6).toFixed(6)}`
    : job.finishedAt
      ? "unpriced (model not in the price table)"
      : "not known yet";
  return [
    h(
      "dl",
      { class: "facts", id: "usage" },
      ...rows.flatMap(([k, v]) => field(k, v || "0")),
      ...field("cost", cost, "cost"),
    ),
  ];
}

export function jobView(main: HTMLElement, id: string): Stop {
  const head = h("div", { id: "job-head" });
  const actions = h("div", { class: "toolbar", id: "job-actions" });
  const live = h("p", { class: "hint", id: "stream-state" }, "connecting…");
  const answer = h("div", { id: "answer", class: "answer" });
  const messages = h("div", { class: "messages" });
  const usage = h("div", {});
  const history = h("div", { id: "history" });
  const request = h("div", {});
  append(
    main,
    h("p", {}, h("a", { href: "#/jobs" }, "← jobs")),
    head,
    actions,
    messages,
    h("h3", {}, "Answer"),
    live,
    answer,
    h("h3", {}, "Usage"),
    usage,
    h("h3", {}, "History"),
    history,
    request,
  );

  let attempt = 0;
  let blocks = new Map<number, LiveBlock>();
  let finished = false;
  let stopped = false;

  function liveBlock(delta: TokenDelta): LiveBlock {
    let block = blocks.get(delta.index);
    if (block === undefined) {
      const kind = delta.kind.replace(/^DELTA_KIND_/, "");
      const type = delta.blockJson?.type ?? ({ TEXT: "text", THINKING: "thinking", INPUT_JSON: "tool_use" } as Record<string, string>)[kind] ?? "block";
      const start: ContentBlock = delta.blockJson ?? { type };
      const body = h("pre", { class: type === "text" ? "text live" : type === "thinking" ? "thinking" : "json" });
      const title = start.name ? `${type}: ${start.name}` : type;
      const section = h("section", { class: `block block-${type}`, "data-type": type, "data-index": delta.index }, h("h4", {}, title), body);
      block = { start, body };
      blocks.set(delta.index, block);
      // Blocks arrive in index order; keep them so if one comes late.
      const after = [...answer.children].find((el) => Number((el as HTMLElement).dataset.index) > delta.index);
      answer.insertBefore(section, after ?? null);
    }
    return block;
  }

  function onDelta(delta: TokenDelta): void {
    if (finished) return;
    if (delta.attempt !== attempt) {
      // A new attempt starts its answer anew.
      attempt = delta.attempt;
      blocks = new Map();
      clear(answer);
    }
    const block = liveBlock(delta);
    switch (delta.kind) {
      case "DELTA_KIND_TEXT":
      case "DELTA_KIND_THINKING":
      case "DELTA_KIND_INPUT_JSON":
        block.body.append(delta.text);
        break;
      case "DELTA_KIND_BLOCK":
        if (delta.blockJson) block.body.textContent = pretty(delta.blockJson);
        break;
      default:
        break; // signatures and citations show in the finished blocks
    }
    live.textContent = `streaming: attempt ${delta.attempt}, ${delta.outputTokens} tokens`;
  }

  function renderHead(job: Job): void {
    clear(head);
    const labels = Object.entries(job.labels ?? {}).map(([k, v]) => h("span", { class: "label" }, `${k}=${v}`));
    const facts = h(
      "dl",
      { class: "facts" },
      ...field("status", statusBadge(statusName(job.status)), "job-status"),
      ...field("model", job.model),
      ...field("lane", job.lane),
      ...field("tenant", job.tenant),
      ...field("priority", String(job.priority)),
      ...field("attempts", `${job.attempts} of ${job.maxAttempts}`),
      ...field("created", when(job.createdAt)),
      ...field("started", when(job.startedAt)),
      ...field("finished", when(job.finishedAt)),
      ...field("queue wait", formatSeconds(secondsBetween(job.createdAt, job.startedAt))),
      ...field("run time", formatSeconds(secondsBetween(job.startedAt, job.finishedAt))),
      ...field("stop reason", job.stopReason || "—"),
    );
    const labelsEl = labels.length ? h("dd", {}, ...labels) : h("dd", {}, "—");
    append(facts, h("dt", {}, "labels"), labelsEl);
    append(head, h("h2", {}, "Job ", h("span", { class: "mono", id: "job-id" }, job.id)), facts);
    if (job.deadReason || job.error?.code) {
      const text = [job.deadReason, job.error?.code, job.error?.message].filter(Boolean).join(" — ");
      append(head, h("p", { class: "notice error", id: "job-error" }, text));
    }
    void dashboardConfig().then((config) => {
      if (config.jaegerUrl && job.traceId && !head.querySelector("#trace-link")) {
        const href = `${config.jaegerUrl.replace(/\/+$/, "")}/trace/${job.traceId}`;
        append(facts, h("dt", {}, "trace"), h("dd", {}, h("a", { href, id: "trace-link", target: "_blank", rel: "noopener noreferrer" }, job.traceId)));
      }
    });
    renderActions(job);
  }

  function renderActions(job: Job): void {
    clear(actions);
    const status = statusName(job.status);
    if (status === "dead" || status === "failed") {
      const retry = h("button", { type: "button", id: "retry-job" }, "Retry");
      retry.addEventListener("click", () => void act(`/v1/jobs/${encodeURIComponent(id)}:retry`, retry));
      append(actions, retry);
    }
    if (!TERMINAL.has(job.status)) {
      const cancel = h("button", { type: "button", class: "secondary", id: "cancel-job" }, "Cancel");
      cancel.addEventListener("click", () => void act(`/v1/jobs/${encodeURIComponent(id)}:cancel`, cancel));
      append(actions, cancel);
    }
  }

  async function act(path: string, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    clear(messages);
    try {
      await call("POST", path, {});
      if (path.endsWith(":retry")) {
        finished = false;
        watch(); // the job runs again: stream it
      }
      await refresh();
    } catch (error) {
      button.disabled = false;
      append(messages, notice(error instanceof ApiError ? error.describe() : String(error)));
    }
  }

  function renderFinal(job: Job): void {
    clear(answer);
    blocks = new Map();
    const content = Array.isArray(job.contentJson) ? job.contentJson : [];
    if (content.length) {
      content.forEach((block, i) => append(answer, renderBlock(block, i)));
    } else if (job.resultText) {
      append(answer, renderBlock({ type: "text", text: job.resultText }, 0));
    } else {
      append(answer, h("p", { class: "hint" }, "No answer."));
    }
  }

  async function refresh(): Promise<void> {
    try {
      const [{ job }, { entries }] = await Promise.all([
        call<{ job: Job }>("GET", `/v1/jobs/${encodeURIComponent(id)}`),
        call<{ entries: HistoryEntry[] }>("GET", `/v1/jobs/${encodeURIComponent(id)}/history`),
      ]);
      if (stopped) return;
      renderHead(job);
      clear(usage);
      append(usage, ...usageRows(job));
      renderHistory(entries ?? []);
      clear(request);
      if (job.requestJson !== undefined) {
        append(request, h("details", {}, h("summary", {}, "Request"), h("pre", { class: "json" }, pretty(job.requestJson))));
      }
      if (TERMINAL.has(job.status)) {
        finished = true;
        renderFinal(job);
        live.textContent = `finished: ${statusName(job.status)}`;
      }
    } catch (error) {
      clear(messages);
      append(messages, notice(error instanceof ApiError ? error.describe() : String(error)));
    }
  }

  function renderHistory(entries: HistoryEntry[]): void {
    clear(history);
    const rows = entries.map((e) =>
      h(
        "tr",
        {},
        h("td", { class: "num" }, e.sequence),
        h("td", {}, when(e.time)),
        h("td", {}, e.previous && e.previous !== "JOB_STATUS_UNSPECIFIED" ? `${statusName(e.previous)} → ` : "", statusBadge(statusName(e.status))),
        h("td", { class: "num" }, String(e.attempt)),
        h("td", {}, e.actor || "conveyor"),
        h("td", { class: "detail" }, e.detail && Object.keys(e.detail).length ? JSON.stringify(e.detail) : ""),
      ),
    );
    append(
      history,
      h(
        "table",
        { class: "history" },
        h("thead", {}, h("tr", {}, ...["Seq", "Time", "Status", "Attempt", "Actor", "Detail"].map((t) => h("th", {}, t)))),
        h("tbody", {}, ...rows),
      ),
    );
  }

  let stream: { close(): void } | null = null;

  function watch(): void {
    stream?.close();
    attempt = 0;
    stream = openStream(`/v1/jobs/${encodeURIComponent(id)}/events`, {
      message(message) {
        const event = JSON.parse(message.data) as JobEvent;
        if (event.tokenDelta) onDelta(event.tokenDelta);
        else if (event.statusChanged) {
          void refresh();
          if (!TERMINAL.has(event.statusChanged.status)) live.textContent = `${statusName(event.statusChanged.status)}…`;
        } else if (event.snapshot) {
          if (!TERMINAL.has(event.snapshot.status)) live.textContent = `${statusName(event.snapshot.status)}…`;
        } else if (event.progress && !finished) {
          live.textContent = `running: attempt ${event.progress.attempt}, ${event.progress.outputTokens} tokens`;
        }
      },
      fatal(error) {
        live.textContent = "not streaming";
        append(messages, notice(error.describe()));
      },
      end() {
        void refresh();
      },
      state(state) {
        if (state === "reconnecting") live.textContent = "connection lost: reconnecting…";
      },
    });
  }

  void refresh();
  watch();
  return () => {
    stopped = true;
    stream?.close();
  };
}
