// The Conveyor dashboard: a login with an API key, then views chosen by the URL's
// hash (#/jobs, #/job/<id>, #/failed, #/lanes, #/tenants). Each view is a function
// that fills the main element and returns how to stop its timers and streams.

import { ApiError, apiKey, call, forgetApiKey, setApiKey, whenUnauthenticated, type Stats } from "./api";
import { append, clear, h, notice } from "./dom";
import { failedView, jobsView } from "./jobs";
import { jobView } from "./job";
import { lanesView, tenantsView } from "./stats";

export type Stop = () => void;
export type View = (main: HTMLElement, arg: string) => Stop;

const root = document.getElementById("app") as HTMLElement;
let stopView: Stop = () => undefined;
let refusal: string | null = null;

const VIEWS: [RegExp, View][] = [
  [/^#\/job\/([^/?]+)$/, jobView],
  [/^#\/failed$/, failedView],
  [/^#\/lanes$/, lanesView],
  [/^#\/tenants$/, tenantsView],
  [/^#\/jobs$/, jobsView],
];

function route(): void {
  stopView();
  stopView = () => undefined;
  clear(root);
  if (apiKey() === null) {
    showLogin();
    return;
  }
  const hash = location.hash || "#/jobs";
  const found = VIEWS.find(([pattern]) => pattern.test(hash));
  if (!found) {
    location.hash = "#/jobs";
    return;
  }
  const [pattern, view] = found;
  const arg = decodeURIComponent(pattern.exec(hash)?.[1] ?? "");
  const main = h("main", { id: "view" });
  append(root, header(hash), main);
  stopView = view(main, arg);
}

function header(hash: string): HTMLElement {
  const link = (href: string, text: string) =>
    h("a", { href, class: hash.startsWith(href) ? "active" : undefined }, text);
  const signOut = h("button", { type: "button", class: "secondary", id: "sign-out" }, "Sign out");
  signOut.addEventListener("click", () => {
    forgetApiKey();
    route();
  });
  return h(
    "header",
    {},
    h("span", { class: "brand" }, "Conveyor"),
    h(
      "nav",
      {},
      link("#/jobs", "Jobs"),
      link("#/failed", "Dead & failed"),
      link("#/lanes", "Lanes"),
      link("#/tenants", "Tenants"),
    ),
    signOut,
  );
}

function showLogin(): void {
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "off",
    placeholder: "cvk_…",
    required: true,
  });
  const button = h("button", { type: "submit" }, "Sign in");
  const status = h("div", { id: "login-status" });
  if (refusal !== null) append(status, notice(refusal));
  // No action and no method: the form is never submitted to a URL, so the key
  // cannot end up in one.
  const form = h(
    "form",
    { id: "login", class: "card" },
    h("h1", {}, "Conveyor"),
    h("p", {}, "Sign in with an API key. It is kept in this tab only (sessionStorage) and sent as an Authorization header."),
    h("label", { for: "api-key" }, "API key"),
    input,
    button,
    status,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    clear(status);
    call<Stats>("GET", "/v1/stats", undefined, key)
      .then(() => {
        refusal = null;
        setApiKey(key);
        if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
        route();
      })
      .catch((error: unknown) => {
        button.disabled = false;
        input.value = "";
        input.focus();
        const text =
          error instanceof ApiError && error.status === 401
            ? "Refused: the server does not accept this API key."
            : error instanceof ApiError
              ? `Could not sign in: ${error.describe()}`
              : `Could not reach the server: ${String(error)}`;
        append(status, notice(text));
      });
  });
  append(root, h("main", { class: "login" }, form));
  input.focus();
}

// A key the server stops accepting (revoked, expired) signs the tab out.
whenUnauthenticated(() => {
  forgetApiKey();
  refusal = "Signed out: the server no longer accepts this API key.";
  route();
});

window.addEventListener("hashchange", route);
route();
