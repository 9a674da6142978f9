// The jobs table (filters, paging, refreshed every 2 s) and the dead & failed
// jobs with retry buttons, one job or a selection.

import { ApiError, call, query, statusName, type Job, type ListJobsResponse } from "./api";
import { append, clear, h, notice, statusBadge, when } from "./dom";
import type { Stop } from "./main";

const REFRESH_MS = 2000;
export const STATUSES = ["pending", "scheduled", "running", "succeeded", "failed", "cancelled", "dead"];

interface Filters {
  status: string;
  lane: string;
  labels: string;
  model: string;
  pageSize: string;
}

/** Kept while the tab lives, so that coming back from a job's page keeps the filters. */
const filters: Filters = { status: "", lane: "", labels: "", model: "", pageSize: "25" };

/** `team=search, env=prod` as [["labels[team]", "search"], ...]; throws on a bad entry. */
export function labelParams(text: string): [string, string][] {
  const out: [string, string][] = [];
  for (const part of text.split(",")) {
    const entry = part.trim();
    if (!entry) continue;
    const eq = entry.indexOf("=");
    if (eq <= 0) throw new Error(`label filter "${entry}" is not key=value`);
    out.push([`labels[${entry.slice(0, eq).trim()}]`, entry.slice(eq + 1).trim()]);
  }
  return out;
}

function shortId(id: string): string {
  return id.slice(0, 8);
}

function labelsText(labels: Record<string, string> | undefined): string {
  return Object.entries(labels ?? {})
    .filter(([k]) => !k.startsWith("x-sim-"))
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");
}

function jobLink(job: Job): HTMLAnchorElement {
  return h("a", { href: `#/job/${encodeURIComponent(job.id)}`, class: "mono", title: job.id }, shortId(job.id));
}

/** Pages through ListJobs with a stack of page tokens (the API pages forward only). */
class Pager {
  tokens: string[] = [""];
  next = "";
  get token(): string {
    return this.tokens[this.tokens.length - 1];
  }
  reset(): void {
    this.tokens = [""];
    this.next = "";
  }
  forward(): void {
    if (this.next) this.tokens.push(this.next);
  }
  back(): void {
    if (this.tokens.length > 1) this.tokens.pop();
  }
  get page(): number {
    return this.tokens.length;
  }
}

function pagerControls(pager: Pager, reload: () => void): HTMLElement {
  const newer = h("button", { type: "button", class: "secondary", id: "page-newer" }, "← Newer");
  const older = h("button", { type: "button", class: "secondary", id: "page-older" }, "Older →");
  newer.disabled = pager.page <= 1;
  older.disabled = !pager.next;
  newer.addEventListener("click", () => {
    pager.back();
    reload();
  });
  older.addEventListener("click", () => {
    pager.forward();
    reload();
  });
  return h("div", { class: "pager" }, newer, h("span", { id: "page-number" }, `page ${pager.page}`), older);
}

export function jobsView(main: HTMLElement): Stop {
  const pager = new Pager();
  const status = h("select", { id: "filter-status", name: "status" }, h("option", { value: "" }, "any status"));
  for (const s of STATUSES) append(status, h("option", { value: s }, s));
  const lane = h("input", { id: "filter-lane", name: "lane", placeholder: "lane" });
  const labels = h("input", { id: "filter-labels", name: "labels", placeholder: "label=value, …" });
  const model = h("input", { id: "filter-model", name: "model", placeholder: "model" });
  const pageSize = h("select", { id: "page-size", name: "page-size" });
  for (const n of ["25", "50", "100"]) append(pageSize, h("option", { value: n }, `${n} a page`));
  status.value = filters.status;
  lane.value = filters.lane;
  labels.value = filters.labels;
  model.value = filters.model;
  pageSize.value = filters.pageSize;
  const form = h(
    "form",
    { class: "filters", id: "filters" },
    status,
    lane,
    labels,
    model,
    pageSize,
    h("button", { type: "submit" }, "Apply"),
  );
  const message = h("div", { class: "messages" });
  const body = h("div", { id: "jobs" });
  append(main, h("h2", {}, "Jobs"), form, message, body);

  let timer = 0;
  let generation = 0;

  async function load(): Promise<void> {
    const mine = ++generation;
    window.clearTimeout(timer);
    let params: [string, string | undefined][];
    try {
      params = [
        ["status", filters.status],
        ["lane", filters.lane],
        ...labelParams(filters.labels),
        ["pageSize", filters.pageSize],
        ["pageToken", pager.token],
      ];
    } catch (error) {
      clear(message);
      append(message, notice(String((error as Error).message)));
      return;
    }
    try {
      const page = await call<ListJobsResponse>("GET", `/v1/jobs${query(params)}`);
      if (mine !== generation) return;
      pager.next = page.nextPageToken;
      clear(message);
      render(page.jobs);
    } catch (error) {
      if (mine !== generation) return;
      clear(message);
      append(message, notice(error instanceof ApiError ? error.describe() : String(error)));
    }
    timer = window.setTimeout(() => void load(), REFRESH_MS);
  }

  function render(jobs: Job[]): void {
    const wanted = filters.model.trim();
    // ListJobs has no model filter: the model filter narrows each page here.
    const shown = wanted ? jobs.filter((j) => j.model.includes(wanted)) : jobs;
    const rows = shown.map((job) =>
      h(
        "tr",
        { "data-job-id": job.id },
        h("td", {}, jobLink(job)),
        h("td", {}, statusBadge(statusName(job.status))),
        h("td", {}, job.model),
        h("td", {}, job.lane),
        h("td", { class: "labels" }, labelsText(job.labels)),
        h("td", { class: "num" }, `${job.attempts}/${job.maxAttempts}`),
        h("td", {}, when(job.createdAt)),
        h("td", {}, when(job.finishedAt)),
      ),
    );
    const table = h(
      "table",
      { class: "jobs" },
      h(
        "thead",
        {},
        h("tr", {}, ...["Job", "Status", "Model", "Lane", "Labels", "Attempts", "Created", "Finished"].map((t) => h("th", {}, t))),
      ),
      h("tbody", {}, ...rows),
    );
    clear(body);
    append(body, rows.length ? table : h("p", { class: "empty" }, "No jobs match."), pagerControls(pager, () => void load()));
    if (wanted && jobs.length !== shown.length) {
      append(body, h("p", { class: "hint" }, `The model filter hides ${jobs.length - shown.length} of this page's ${jobs.length} jobs.`));
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    filters.status = status.value;
    filters.lane = lane.value.trim();
    filters.labels = labels.value;
    filters.model = model.value.trim();
    filters.pageSize = pageSize.value;
    pager.reset();
    void load();
  });
  void load();
  return () => {
    generation++;
    window.clearTimeout(timer);
  };
}

export function failedView(main: HTMLElement): Stop {
  const pager = new Pager();
  const selected = new Set<string>();
  const message = h("div", { class: "messages", id: "retry-messages" });
  const retrySelected = h("button", { type: "button", id: "retry-selected" }, "Retry selected");
  const body = h("div", { id: "failed-jobs" });
  append(
    main,
    h("h2", {}, "Dead & failed jobs"),
    h("div", { class: "toolbar" }, retrySelected),
    message,
    body,
  );
  let timer = 0;
  let generation = 0;
  let busy = false;

  function updateButton(): void {
    retrySelected.textContent = `Retry selected (${selected.size})`;
    retrySelected.disabled = selected.size === 0 || busy;
  }

  async function retry(ids: string[]): Promise<void> {
    busy = true;
    updateButton();
    const results = await Promise.allSettled(ids.map((id) => call("POST", `/v1/jobs/${encodeURIComponent(id)}:retry`, {})));
    busy = false;
    const failed = results
      .map((r, i) => (r.status === "rejected" ? `${shortId(ids[i])}: ${r.reason instanceof ApiError ? r.reason.describe() : String(r.reason)}` : null))
      .filter((t): t is string => t !== null);
    const ok = ids.length - failed.length;
    for (const id of ids) selected.delete(id);
    clear(message);
    if (ok) append(message, notice(`Retried ${ok} job${ok === 1 ? "" : "s"}: queued again.`, "info"));
    for (const text of failed) append(message, notice(`Not retried ${text}`));
    await load();
  }

  async function load(): Promise<void> {
    const mine = ++generation;
    window.clearTimeout(timer);
    try {
      const page = await call<ListJobsResponse>(
        "GET",
        `/v1/jobs${query([["status", "dead,failed"], ["pageSize", "50"], ["pageToken", pager.token]])}`,
      );
      if (mine !== generation) return;
      pager.next = page.nextPageToken;
      render(page.jobs);
    } catch (error) {
      if (mine !== generation) return;
      clear(message);
      append(message, notice(error instanceof ApiError ? error.describe() : String(error)));
    }
    timer = window.setTimeout(() => void load(), REFRESH_MS);
  }

  function render(jobs: Job[]): void {
    const present = new Set(jobs.map((j) => j.id));
    for (const id of [...selected]) if (!present.has(id)) selected.delete(id);
    const all = h("input", { type: "checkbox", id: "select-all", "aria-label": "select all" });
    all.checked = jobs.length > 0 && jobs.every((j) => selected.has(j.id));
    const boxes: HTMLInputElement[] = [];
    all.addEventListener("change", () => {
      for (const box of boxes) {
        box.checked = all.checked;
        if (all.checked) selected.add(box.value);
        else selected.delete(box.value);
      }
      updateButton();
    });
    const rows = jobs.map((job) => {
      const box = h("input", { type: "checkbox", class: "select", value: job.id, "aria-label": `select ${job.id}` });
      box.checked = selected.has(job.id);
      box.addEventListener("change", () => {
        if (box.checked) selected.add(job.id);
        else selected.delete(job.id);
        updateButton();
      });
      boxes.push(box);
      const button = h("button", { type: "button", class: "retry small" }, "Retry");
      button.addEventListener("click", () => void retry([job.id]));
      const why = job.deadReason || [job.error?.code, job.error?.message].filter(Boolean).join(": ");
      return h(
        "tr",
        { "data-job-id": job.id },
        h("td", {}, box),
        h("td", {}, jobLink(job)),
        h("td", {}, statusBadge(statusName(job.status))),
        h("td", {}, job.model),
        h("td", {}, job.lane),
        h("td", { class: "num" }, `${job.attempts}/${job.maxAttempts}`),
        h("td", { class: "reason" }, why),
        h("td", {}, when(job.finishedAt)),
        h("td", {}, button),
      );
    });
    const table = h(
      "table",
      { class: "jobs" },
      h(
        "thead",
        {},
        h("tr", {}, h("th", {}, all), ...["Job", "Status", "Model", "Lane", "Attempts", "Why", "Finished", ""].map((t) => h("th", {}, t))),
      ),
      h("tbody", {}, ...rows),
    );
    clear(body);
    append(body, rows.length ? table : h("p", { class: "empty" }, "No dead or failed jobs."), pagerControls(pager, () => void load()));
    updateButton();
  }

  retrySelected.addEventListener("click", () => void retry([...selected]));
  updateButton();
  void load();
  return () => {
    generation++;
    window.clearTimeout(timer);
  };
}
