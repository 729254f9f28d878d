// Formatting of values for people: numbers, durations, dates, sizes, job states.

export const DASH = "—";

/** States after which a job no longer changes by itself (service.job_states.FINAL_STATES). */
export const FINAL_STATES = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

export const isFinal = (job) => FINAL_STATES.has(job.state);

export function number(value, digits = 2) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : DASH;
}

export function percent(fraction) {
  return typeof fraction === "number" ? `${Math.round(fraction * 100)}%` : DASH;
}

/** "12 s", "3 min 05 s", "2 h 07 min", "3 d 4 h". */
export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return DASH;
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (s < 3600) return `${Math.floor(s / 60)} min ${pad(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

/** Seconds between two ISO timestamps (`end` default: now). */
export function secondsBetween(startIso, endIso = null) {
  if (!startIso) return null;
  const end = endIso ? Date.parse(endIso) : Date.now();
  return Math.max(0, (end - Date.parse(startIso)) / 1000);
}

export function dateTime(iso) {
  if (!iso) return DASH;
  const d = new Date(iso);
  return Number.isNaN(d.getTime())
    ? iso
    : d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function bytes(n) {
  if (typeof n !== "number") return DASH;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export const shortId = (id) => (id ? String(id).slice(0, 8) : DASH);

/** A list page's count: "1000+" where the API stopped counting (`total_exact` false). */
export function pageTotal(page) {
  return page.total_exact === false ? `${page.total}+` : String(page.total);
}

/** "3 / 10" from a job's epoch and the epoch count its progress reports. */
export function epochOf(job) {
  if (job.epoch === null || job.epoch === undefined) return DASH;
  const total = job.metrics && job.metrics.epochs;
  return total ? `${job.epoch} / ${total}` : String(job.epoch);
}

/** The job's latest evaluation ({mAP, r1, ...} in percent) and losses ({total, ...}). */
export const latestEval = (job) => (job.metrics && job.metrics.eval) || {};
export const latestLosses = (job) => (job.metrics && job.metrics.losses) || {};

/** How long the job ran (or has been running), and its ETA while it runs. */
export function timing(job) {
  if (!job.started_at) return job.state === "QUEUED" ? "waiting" : DASH;
  const ran = duration(secondsBetween(job.started_at, job.finished_at));
  const eta = job.metrics && job.metrics.eta_seconds;
  return job.state === "RUNNING" && typeof eta === "number" ? `${ran} · ETA ${duration(eta)}` : ran;
}
