// A small live line chart drawn as SVG (no chart library: a few series of a few
// hundred points each, redrawn once a poll). Colours come from CSS classes, so
// the page needs no inline styles under its Content-Security-Policy.

import { append, clear, h, svg } from "./dom";

export interface Series {
  name: string;
  points: [number, number | null][]; // [time ms, value]; null leaves a gap
}

const MIN_SPAN_MS = 60_000;
const W = 600;
const H = 160;
const PAD = { left: 48, right: 8, top: 8, bottom: 20 };

export class LineChart {
  readonly element: HTMLElement;
  private readonly plot: SVGElement;
  private readonly legend: HTMLElement;

  /** `fixedMax`: the y axis always ends there (percentages); otherwise it fits the data. */
  constructor(
    readonly title: string,
    private readonly format: (v: number) => string,
    id: string,
    private readonly windowMs: number,
    private readonly fixedMax: number | null = null,
  ) {
    this.plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title });
    this.legend = h("div", { class: "legend" });
    this.element = h("figure", { class: "chart-box", id }, h("figcaption", {}, title), this.plot, this.legend);
  }

  /** Redraw; the x axis spans from `since` (the first sample, at least a minute back)
   * to `now`, growing to the chart's window. */
  update(series: Series[], now: number, since: number = now - this.windowMs): void {
    clear(this.plot);
    clear(this.legend);
    const span = Math.min(this.windowMs, Math.max(MIN_SPAN_MS, now - since));
    const from = now - span;
    let max = 0;
    for (const s of series) for (const [t, v] of s.points) if (t >= from && v !== null && v > max) max = v;
    max = this.fixedMax ?? niceCeil(max);
    const x = (t: number) => PAD.left + ((t - from) / span) * (W - PAD.left - PAD.right);
    const y = (v: number) => H - PAD.bottom - (v / max) * (H - PAD.top - PAD.bottom);
    // Grid: zero, half and max.
    for (const v of [0, max / 2, max]) {
      this.plot.appendChild(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
      const label = svg("text", { x: PAD.left - 4, y: y(v) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = this.format(v);
      this.plot.appendChild(label);
    }
    const ago = svg("text", { x: PAD.left, y: H - 4, class: "axis" });
    ago.textContent = span >= 120_000 ? `${Math.round(span / 60000)} min ago` : `${Math.round(span / 1000)} s ago`;
    const nowLabel = svg("text", { x: W - PAD.right, y: H - 4, class: "axis", "text-anchor": "end" });
    nowLabel.textContent = "now";
    this.plot.append(ago, nowLabel);
    series.forEach((s, i) => {
      let d = "";
      let pen = false;
      for (const [t, v] of s.points) {
        if (t < from || v === null) {
          pen = false;
          continue;
        }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      }
      if (d) this.plot.appendChild(svg("path", { d, class: `line s${i % 8}` }));
      const last = [...s.points].reverse().find(([, v]) => v !== null)?.[1] ?? null;
      append(
        this.legend,
        h("span", { class: `key s${i % 8}`, "data-series": s.name }, `${s.name}: ${last === null ? "—" : this.format(last)}`),
      );
    });
  }
}

function niceCeil(v: number): number {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}
