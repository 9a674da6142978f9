// Per-lane and per-tenant views: GET /v1/stats polled every 1.5 s, turned into live
// charts of submitted and finished jobs per second, queue depth, p50/p95 of queue
// wait and run time, and failure rate.
//
// The API gives counts per status (not events), so rates are differences of
// successive counts: submitted = every job counted, finished = succeeded + failed +
// cancelled + dead, failure rate = (failed + dead) / finished over the last 30 s.
// A retry moves a job back out of "finished", so a rate never goes below zero.
// Queue wait and run time per lane come from the lane's most recent finished jobs
// (ListJobs, started - created and finished - started); per tenant, run time is
// GET /v1/stats?tenant=… (operator keys).

import { ApiError, call, query, type Job, type ListJobsResponse, type Stats } from "./api";
import { LineChart } from "./chart";
import { append, clear, durationSeconds, formatSeconds, h, notice, secondsBetween } from "./dom";
import type { Stop } from "./main";
import { STATUSES } from "./jobs";

const POLL_MS = 1500;
const SAMPLE_JOBS_MS = 5000;
const WINDOW_MS = 3 * 60 * 1000;
const FAILURE_WINDOW_MS = 30 * 1000;
const FINISHED = ["succeeded", "failed", "cancelled", "dead"];

type Counts = Record<string, number>;

interface Scope {
  counts: Counts;
  depth: number | null;
}

interface Sample {
  t: number;
  scopes: Map<string, Scope>;
}

function numbers(counts: Record<string, string> | undefined): Counts {
  const out: Counts = {};
  for (const [k, v] of Object.entries(counts ?? {})) out[k] = Number(v);
  return out;
}

function sum(counts: Counts, names?: string[]): number {
  return (names ?? Object.keys(counts)).reduce((acc, k) => acc + (counts[k] ?? 0), 0);
}

/** Samples of the last few minutes, and the series derived from them. */
class History {
  samples: Sample[] = [];

  add(sample: Sample): void {
    this.samples.push(sample);
    const from = sample.t - WINDOW_MS - 10_000;
    while (this.samples.length && this.samples[0].t < from) this.samples.shift();
  }

  private values(scope: string, pick: (s: Scope) => number | null): [number, number | null][] {
    return this.samples.map((s) => {
      const found = s.scopes.get(scope);
      return [s.t, found ? pick(found) : null];
    });
  }

  /** Per second, over the last few samples, never negative. */
  rate(scope: string, pick: (c: Counts) => number): [number, number | null][] {
    const raw = this.values(scope, (s) => pick(s.counts));
    return raw.map(([t, v], i) => {
      const j = Math.max(0, i - 3);
      const [t0, v0] = raw[j];
      if (i === 0 || v === null || v0 === null || t === t0) return [t, null];
      return [t, Math.max(0, (v - v0) / ((t - t0) / 1000))];
    });
  }

  depth(scope: string): [number, number | null][] {
    return this.values(scope, (s) => s.depth);
  }

  waiting(scope: string): [number, number | null][] {
    return this.values(scope, (s) => sum(s.counts, ["pending", "scheduled"]));
  }

  /** Percent of jobs finishing in the last 30 s that failed or died. */
  failureRate(scope: string): [number, number | null][] {
    const fin = this.values(scope, (s) => sum(s.counts, FINISHED));
    const bad = this.values(scope, (s) => sum(s.counts, ["failed", "dead"]));
    return fin.map(([t, f], i) => {
      let j = i;
      while (j > 0 && fin[j - 1][0] >= t - FAILURE_WINDOW_MS) j--;
      const f0 = fin[j][1];
      const b = bad[i][1];
      const b0 = bad[j][1];
      if (f === null || f0 === null || b === null || b0 === null || f - f0 <= 0) return [t, null];
      return [t, Math.min(100, (Math.max(0, b - b0) / (f - f0)) * 100)];
    });
  }
}

const perSecond = (v: number) => (v >= 10 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(Number.isInteger(v * 10) ? 1 : 2)) + "/s";
const count = (v: number) => (Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1));
const percent = (v: number) => `${v.toFixed(0)}%`;
const seconds = (v: number) => formatSeconds(v);

function percentile(values: number[], p: number): number | null {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))];
}

function countsTable(id: string, head: string, rows: [string, Counts, string | null][]): HTMLTableElement {
  const depth = rows.some(([, , d]) => d !== null);
  return h(
    "table",
    { class: "counts", id },
    h("thead", {}, h("tr", {}, h("th", {}, head), ...STATUSES.map((s) => h("th", {}, s)), depth && h("th", {}, "queue depth"))),
    h(
      "tbody",
      {},
      ...rows.map(([name, counts, d]) =>
        h(
          "tr",
          { "data-name": name },
          h("td", {}, name),
          ...STATUSES.map((s) => h("td", { class: "num" }, String(counts[s] ?? 0))),
          depth && h("td", { class: "num" }, d ?? "—"),
        ),
      ),
    ),
  );
}

/** Polls `fetch` every POLL_MS until stopped; errors show in `messages`. */
function poller(messages: HTMLElement, tick: () => Promise<void>): Stop {
  let timer = 0;
  let stopped = false;
  const run = async () => {
    try {
      await tick();
      clear(messages);
    } catch (error) {
      clear(messages);
      append(messages, notice(error instanceof ApiError ? error.describe() : String(error)));
    }
    if (!stopped) timer = window.setTimeout(() => void run(), POLL_MS);
  };
  void run();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}

/** Whether this key reads every tenant's statistics (operator keys); null until asked. */
let everyTenant: boolean | null = null;

/** Every tenant's statistics with an operator key; null for other keys (403). */
async function allTenants(): Promise<Stats | null> {
  if (everyTenant === false) return null;
  try {
    const stats = await call<Stats>("GET", "/v1/stats?allTenants=true");
    everyTenant = true;
    return stats;
  } catch (error) {
    if (error instanceof ApiError && error.status === 403) {
      everyTenant = false;
      return null;
    }
    throw error;
  }
}

interface Latency {
  t: number;
  wait50: number | null;
  wait95: number | null;
  run50: number | null;
  run95: number | null;
}

/** p50/p95 of queue wait (started - created) and run time (finished - started) over
 * the caller's latest 100 finished jobs (of one lane, or any), every 5 s. */
class LatencySampler {
  points: Latency[] = [];
  private last = 0;
  private lane: string | null = null;

  async sample(lane: string, now: number): Promise<void> {
    if (lane !== this.lane) {
      this.points = [];
      this.lane = lane;
    } else if (now - this.last < SAMPLE_JOBS_MS) {
      return;
    }
    this.last = now;
    const page = await call<ListJobsResponse>(
      "GET",
      `/v1/jobs${query([["status", "succeeded,failed,dead"], ["lane", lane], ["pageSize", "100"]])}`,
    );
    const waits = page.jobs.map((j: Job) => secondsBetween(j.createdAt, j.startedAt)).filter((v): v is number => v !== null);
    const runs = page.jobs.map((j: Job) => secondsBetween(j.startedAt, j.finishedAt)).filter((v): v is number => v !== null);
    this.points.push({
      t: now,
      wait50: percentile(waits, 50),
      wait95: percentile(waits, 95),
      run50: percentile(runs, 50),
      run95: percentile(runs, 95),
    });
    while (this.points.length && this.points[0].t < now - WINDOW_MS) this.points.shift();
  }

  series(pick: (l: Latency) => number | null): [number, number | null][] {
    return this.points.map((l) => [l.t, pick(l)]);
  }
}

export function lanesView(main: HTMLElement): Stop {
  const select = h("select", { id: "lane-select" }, h("option", { value: "*" }, "all lanes"));
  const messages = h("div", { class: "messages" });
  const scopeNote = h("p", { class: "hint", id: "lane-scope" });
  const throughput = new LineChart("Submitted and finished per second", perSecond, "chart-throughput", WINDOW_MS);
  const depth = new LineChart("Queue depth (messages ready)", count, "chart-depth", WINDOW_MS);
  const latency = new LineChart("Queue wait and run time, p50/p95 (latest 100 finished jobs)", seconds, "chart-latency", WINDOW_MS);
  const failures = new LineChart("Failure rate (failed + dead, last 30 s)", percent, "chart-failures", WINDOW_MS, 100);
  const table = h("div", {});
  append(
    main,
    h("h2", {}, "Lanes"),
    h("div", { class: "toolbar" }, h("label", { for: "lane-select" }, "Lane "), select),
    scopeNote,
    messages,
    h("div", { class: "charts" }, throughput.element, depth.element, latency.element, failures.element),
    table,
  );
  const history = new History();
  const latencies = new LatencySampler();

  return poller(messages, async () => {
    const stats = (await allTenants()) ?? (await call<Stats>("GET", "/v1/stats"));
    scopeNote.textContent =
      stats.tenant === "*"
        ? "Jobs of every tenant (an operator key). Queue wait and run time: your own tenant's jobs."
        : `Jobs of your tenant (${stats.tenant}); queue depth counts every tenant's messages in the lane.`;
    const now = Date.now();
    const scopes = new Map<string, Scope>();
    let total = 0;
    for (const lane of stats.lanes ?? []) {
      const d = Number(lane.queueDepth ?? 0);
      total += d;
      scopes.set(lane.lane, { counts: numbers(lane.counts), depth: d });
    }
    scopes.set("*", { counts: numbers(stats.counts), depth: total });
    history.add({ t: now, scopes });
    // Keep the lane choices current (lanes come from the server's settings).
    const names = (stats.lanes ?? []).map((l) => l.lane);
    const have = [...select.options].map((o) => o.value).slice(1);
    if (names.join() !== have.join()) {
      const chosen = select.value;
      clear(select);
      append(select, h("option", { value: "*" }, "all lanes"), ...names.map((n) => h("option", { value: n }, n)));
      select.value = names.includes(chosen) ? chosen : "*";
    }
    const lane = select.value;
    await latencies.sample(lane === "*" ? "" : lane, now);
    const since = history.samples[0].t;
    throughput.update(
      [
        { name: "submitted", points: history.rate(lane, (c) => sum(c)) },
        { name: "finished", points: history.rate(lane, (c) => sum(c, FINISHED)) },
      ],
      now,
      since,
    );
    depth.update(
      (lane === "*" ? names : [lane]).map((n) => ({ name: n, points: history.depth(n) })),
      now,
      since,
    );
    latency.update(
      [
        { name: "queue wait p50", points: latencies.series((l) => l.wait50) },
        { name: "queue wait p95", points: latencies.series((l) => l.wait95) },
        { name: "run time p50", points: latencies.series((l) => l.run50) },
        { name: "run time p95", points: latencies.series((l) => l.run95) },
      ],
      now,
      since,
    );
    failures.update([{ name: "failure rate", points: history.failureRate(lane) }], now, since);
    clear(table);
    append(
      table,
      h("h3", {}, "Jobs per lane"),
      countsTable(
        "lane-counts",
        "lane",
        (stats.lanes ?? []).map((l) => [l.lane, numbers(l.counts), String(l.queueDepth ?? 0)]),
      ),
      h(
        "p",
        { class: "hint" },
        `Dead-letter queue: ${stats.deadLetterDepth ?? 0} messages. Run time over all lanes: ` +
          `p50 ${formatSeconds(durationSeconds(stats.runTimeP50))}, p95 ${formatSeconds(durationSeconds(stats.runTimeP95))}.`,
      ),
    );
  });
}

export function tenantsView(main: HTMLElement): Stop {
  const select = h("select", { id: "tenant-select" });
  const messages = h("div", { class: "messages" });
  const scopeNote = h("p", { class: "hint", id: "tenant-scope" });
  const throughput = new LineChart("Submitted and finished per second", perSecond, "chart-tenant-throughput", WINDOW_MS);
  const waiting = new LineChart("Waiting jobs (pending + scheduled) per tenant", count, "chart-tenant-waiting", WINDOW_MS);
  const latency = new LineChart("Run time p50/p95 (and queue wait, for your own tenant)", seconds, "chart-tenant-latency", WINDOW_MS);
  const failures = new LineChart("Failure rate (failed + dead, last 30 s)", percent, "chart-tenant-failures", WINDOW_MS, 100);
  const table = h("div", {});
  append(
    main,
    h("h2", {}, "Tenants"),
    h("div", { class: "toolbar" }, h("label", { for: "tenant-select" }, "Tenant "), select),
    scopeNote,
    messages,
    h("div", { class: "charts" }, throughput.element, waiting.element, latency.element, failures.element),
    table,
  );
  const history = new History();
  const runTimes: [number, number | null, number | null][] = [];
  const latencies = new LatencySampler();

  select.addEventListener("change", () => {
    runTimes.length = 0;
  });

  return poller(messages, async () => {
    const all = await allTenants();
    const own = await call<Stats>("GET", "/v1/stats");
    const now = Date.now();
    const scopes = new Map<string, Scope>();
    if (all !== null) {
      scopeNote.textContent = "Every tenant (an operator key).";
      for (const t of all.tenants ?? []) scopes.set(t.tenant, { counts: numbers(t.counts), depth: null });
    } else {
      scopeNote.textContent = `Your tenant only (${own.tenant}): an operator key shows every tenant.`;
      scopes.set(own.tenant, { counts: numbers(own.counts), depth: null });
    }
    history.add({ t: now, scopes });
    const names = [...scopes.keys()];
    const have = [...select.options].map((o) => o.value);
    if (names.join() !== have.join()) {
      const chosen = select.value;
      clear(select);
      append(select, ...names.map((n) => h("option", { value: n }, n)));
      select.value = names.includes(chosen) ? chosen : (names.includes(own.tenant) ? own.tenant : (names[0] ?? ""));
    }
    const tenant = select.value;
    const mine = tenant === own.tenant;
    if (tenant) {
      const stats = mine ? own : await call<Stats>("GET", `/v1/stats${query([["tenant", tenant]])}`);
      runTimes.push([now, durationSeconds(stats.runTimeP50), durationSeconds(stats.runTimeP95)]);
      while (runTimes.length && runTimes[0][0] < now - WINDOW_MS) runTimes.shift();
    }
    if (mine) await latencies.sample("", now);
    const since = history.samples[0].t;
    throughput.update(
      [
        { name: "submitted", points: history.rate(tenant, (c) => sum(c)) },
        { name: "finished", points: history.rate(tenant, (c) => sum(c, FINISHED)) },
      ],
      now,
      since,
    );
    waiting.update(names.map((n) => ({ name: n, points: history.waiting(n) })), now, since);
    latency.update(
      [
        { name: "run time p50", points: runTimes.map(([t, p50]) => [t, p50] as [number, number | null]) },
        { name: "run time p95", points: runTimes.map(([t, , p95]) => [t, p95] as [number, number | null]) },
        ...(mine
          ? [
              { name: "queue wait p50", points: latencies.series((l) => l.wait50) },
              { name: "queue wait p95", points: latencies.series((l) => l.wait95) },
            ]
          : []),
      ],
      now,
      since,
    );
    failures.update([{ name: "failure rate", points: history.failureRate(tenant) }], now, since);
    clear(table);
    const rows: [string, Counts, string | null][] = names.map((n) => [n, scopes.get(n)?.counts ?? {}, null]);
    append(table, h("h3", {}, "Jobs per tenant"), countsTable("tenant-counts", "tenant", rows));
  });
}
