/**
 * A small Prometheus registry: counters, histograms and callback-read values, rendered in the
 * text exposition format (version 0.0.4). Enough for what mxkeys exports, without a dependency.
 */

type Labels = Readonly<Record<string, string>>;

function labelText(labels: Labels): string {
  const keys = Object.keys(labels);
  if (keys.length === 0) return '';
  return `{${keys.map((k) => `${k}="${labels[k]!.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`).join(',')}}`;
}

interface Metric {
  readonly name: string;
  render(): string;
}

export class Counter implements Metric {
  private readonly values = new Map<string, number>();

  constructor(
    readonly name: string,
    private readonly help: string,
  ) {}

  inc(labels: Labels = {}, by = 1): void {
    const key = labelText(labels);
    this.values.set(key, (this.values.get(key) ?? 0) + by);
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const [labels, v] of this.values) lines.push(`${this.name}${labels} ${v}`);
    return lines.join('\n');
  }
}

export class Histogram implements Metric {
  private readonly series = new Map<string, { counts: number[]; sum: number; count: number }>();

  constructor(
    readonly name: string,
    private readonly help: string,
    private readonly buckets: readonly number[],
  ) {}

  observe(labels: Labels, value: number): void {
    const key = labelText(labels);
    let s = this.series.get(key);
    if (!s) this.series.set(key, (s = { counts: new Array<number>(this.buckets.length).fill(0), sum: 0, count: 0 }));
    for (let i = 0; i < this.buckets.length; i++) if (value <= this.buckets[i]!) s.counts[i]!++;
    s.sum += value;
    s.count++;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    for (const [labels, s] of this.series) {
      const inner = labels === '' ? '' : labels.slice(1, -1) + ',';
      this.buckets.forEach((b, i) => lines.push(`${this.name}_bucket{${inner}le="${b}"} ${s.counts[i]}`));
      lines.push(`${this.name}_bucket{${inner}le="+Inf"} ${s.count}`, `${this.name}_sum${labels} ${s.sum}`, `${this.name}_count${labels} ${s.count}`);
    }
    return lines.join('\n');
  }
}

/** A value read when scraped (a counter or gauge kept elsewhere). */
export class Observed implements Metric {
  constructor(
    readonly name: string,
    private readonly help: string,
    private readonly type: 'counter' | 'gauge',
    private readonly read: () => number | ReadonlyArray<readonly [Labels, number]>,
  ) {}

  render(): string {
    const v = this.read();
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} ${this.type}`];
    if (typeof v === 'number') lines.push(`${this.name} ${v}`);
    else for (const [labels, n] of v) lines.push(`${this.name}${labelText(labels)} ${n}`);
    return lines.join('\n');
  }
}

export class Registry {
  private readonly metrics: Metric[] = [];

  add<M extends Metric>(metric: M): M {
    this.metrics.push(metric);
    return metric;
  }

  render(): string {
    return `${this.metrics.map((m) => m.render()).join('\n')}\n`;
  }
}
