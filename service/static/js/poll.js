// Periodic refresh for the views: one run at a time, paused while the tab is hidden.

/**
 * Runs `task()` every `intervalMs` (counted from the end of the previous run) until `stop()`.
 * A hidden tab does not poll; it runs once as soon as it is visible again. A run that throws
 * goes to `onError` and polling continues. `now()` runs it at once (e.g. after a user action), or
 * right after the run in progress.
 */
export function poll(task, intervalMs, onError) {
  let timer = null;
  let running = false;
  let again = false; // now() was called during a run
  let stopped = false;

  async function run() {
    clearTimeout(timer);
    timer = null;
    if (stopped) return;
    if (running) {
      again = true;
      return;
    }
    if (document.hidden) return; // visibilitychange resumes it
    running = true;
    try {
      await task();
    } catch (error) {
      if (!stopped && error.name !== "AbortError") onError(error);
    } finally {
      running = false;
    }
    if (stopped) return;
    if (again) {
      again = false;
      run();
    } else {
      timer = setTimeout(run, intervalMs);
    }
  }

  function onVisibility() {
    if (!document.hidden && timer === null) run();
  }

  document.addEventListener("visibilitychange", onVisibility);
  timer = setTimeout(run, intervalMs);
  return {
    now: run,
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
    },
  };
}
