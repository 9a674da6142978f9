// The public HTTP API, as the dashboard calls it: every request carries
// `Authorization: Bearer <key>`; the key lives in sessionStorage only (never in a
// URL, a cookie or localStorage), so it is gone when the tab closes.

const KEY_ITEM = "conveyor.apiKey";

export function apiKey(): string | null {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setApiKey(key: string): void {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function forgetApiKey(): void {
  sessionStorage.removeItem(KEY_ITEM);
}

export interface FieldViolation {
  field: string;
  description: string;
}

/** The HTTP API's error shape: {"error": {code, http_status, message, details, ...}}. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: FieldViolation[] = [],
  ) {
    super(message);
  }

  /** One line for a person: the code, the message and any field violations. */
  describe(): string {
    const fields = this.details
      .filter((d) => d.field)
      .map((d) => `${d.field}: ${d.description}`)
      .join("; ");
    return `${this.code}: ${this.message}${fields ? ` (${fields})` : ""}`;
  }
}

/** Called when the server refuses the key (UNAUTHENTICATED): back to the login. */
let onUnauthenticated: (error: ApiError) => void = () => undefined;

export function whenUnauthenticated(handler: (error: ApiError) => void): void {
  onUnauthenticated = handler;
}

export function authHeaders(key: string | null = apiKey()): Record<string, string> {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** The ApiError an error answer carries (or one made from its status). */
export async function errorOf(response: Response): Promise<ApiError> {
  let body: unknown = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  const error = (body as { error?: Record<string, unknown> } | null)?.error;
  if (error && typeof error === "object") {
    const details = Array.isArray(error.details)
      ? (error.details as Record<string, unknown>[]).map((d) => ({
          field: String(d.field ?? ""),
          description: String(d.description ?? ""),
        }))
      : [];
    return new ApiError(
      response.status,
      String(error.code ?? response.status),
      String(error.message ?? response.statusText),
      details,
    );
  }
  return new ApiError(response.status, `HTTP ${response.status}`, response.statusText);
}

/** One JSON call; throws ApiError for an error answer (and signs out on 401). */
export async function call<T>(
  method: "GET" | "POST",
  path: string,
  body?: unknown,
  key: string | null = apiKey(),
): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json", ...authHeaders(key) };
  const init: RequestInit = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401 && key === apiKey()) onUnauthenticated(error);
    throw error;
  }
  return (await response.json()) as T;
}

/** A query string from pairs, skipping empty values. */
export function query(pairs: [string, string | undefined][]): string {
  const params = new URLSearchParams();
  for (const [name, value] of pairs) {
    if (value !== undefined && value !== "") params.append(name, value);
  }
  const text = params.toString();
  return text ? `?${text}` : "";
}

// --- shapes of the answers the dashboard reads (the proto3 JSON mapping, lowerCamelCase)

export interface Usage {
  inputTokens?: string;
  outputTokens?: string;
  cacheCreationInputTokens?: string;
  cacheReadInputTokens?: string;
  serviceTier?: string;
  usageJson?: unknown;
}

export interface JobError {
  code?: string;
  message?: string;
  retryable?: boolean;
  httpStatus?: number;
}

export interface ContentBlock {
  type: string;
  text?: string;
  thinking?: string;
  name?: string;
  id?: string;
  input?: unknown;
  [key: string]: unknown;
}

export interface Job {
  id: string;
  tenant: string;
  status: string;
  model: string;
  lane: string;
  priority: number;
  labels: Record<string, string>;
  attempts: number;
  maxAttempts: number;
  resultText: string;
  stopReason: string;
  usage?: Usage;
  error?: JobError;
  deadReason: string;
  traceId: string;
  createdAt?: string;
  updatedAt?: string;
  runAt?: string;
  startedAt?: string;
  finishedAt?: string;
  sequence: string;
  contentJson?: ContentBlock[];
  requestJson?: unknown;
  /** Micro-dollars (an int64, so a JSON string); meaningful when `priced`. */
  costMicros?: string;
  priced?: boolean;
}

export interface ListJobsResponse {
  jobs: Job[];
  nextPageToken: string;
}

export interface HistoryEntry {
  sequence: string;
  status: string;
  previous: string;
  attempt: number;
  time?: string;
  actor: string;
  detail?: Record<string, unknown>;
}

export interface LaneStats {
  lane: string;
  counts: Record<string, string>;
  queueDepth: string;
}

export interface TenantStats {
  tenant: string;
  counts: Record<string, string>;
}

export interface Stats {
  counts: Record<string, string>;
  lanes: LaneStats[];
  deadLetterDepth: string;
  runTimeP50?: string;
  runTimeP95?: string;
  tenant: string;
  tenants: TenantStats[];
}

export interface TokenDelta {
  text: string;
  attempt: number;
  outputTokens: string;
  kind: string;
  index: number;
  blockJson?: ContentBlock;
  citationJson?: unknown;
}

export interface JobEvent {
  jobId: string;
  sequence: string;
  time?: string;
  tenant: string;
  snapshot?: Job;
  statusChanged?: { status: string; previous: string; attempt: number; error?: JobError; job?: Job };
  tokenDelta?: TokenDelta;
  progress?: { attempt: number; outputTokens: string; elapsed?: string };
}

export const TERMINAL = new Set([
  "JOB_STATUS_SUCCEEDED",
  "JOB_STATUS_FAILED",
  "JOB_STATUS_CANCELLED",
  "JOB_STATUS_DEAD",
]);

/** "JOB_STATUS_DEAD" -> "dead". */
export function statusName(status: string | undefined): string {
  return (status ?? "").replace(/^JOB_STATUS_/, "").toLowerCase() || "unknown";
}

export interface DashboardConfig {
  jaegerUrl: string | null;
}

let config: Promise<DashboardConfig> | null = null;

/** GET /dashboard/config.json (no key needed: it holds nothing secret). */
export function dashboardConfig(): Promise<DashboardConfig> {
  config ??= fetch("/dashboard/config.json", { credentials: "omit" })
    .then((r) => (r.ok ? (r.json() as Promise<DashboardConfig>) : { jaegerUrl: null }))
    .catch(() => ({ jaegerUrl: null }));
  return config;
}
