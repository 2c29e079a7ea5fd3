//! Background tasks that cannot die quietly.
//!
//! A tokio task that panics ends alone: its `JoinHandle` reports it, and a dropped handle
//! reports it to no one, so a supervisor loop or catalog follower could stop on a bad day
//! and tern would go on serving a frozen world. Every long-lived background task is started
//! through [`Tasks::keep`] (restarted after a panic, with a back-off) or [`Tasks::watch`]
//! (one that cannot be restarted, because it owns a channel's receiving end: its panic is
//! escalated, and the watchdog bounces the process). Either way the panic is logged and
//! counted in `tern_task_panics_total{task}`.
//!
//! Tests (and `[debug] faults`) can make a named task panic at its next turn with
//! [`panic_next`]; the tasks that honour it call [`fault_point`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::telemetry::Metrics;

/// What to do when a task that cannot be restarted dies: in production, the watchdog's
/// action (bounce, exit or log).
pub type Escalate = Arc<dyn Fn(&str) + Send + Sync>;

/// Starts background tasks on a runtime and watches them.
#[derive(Clone)]
pub struct Tasks {
    metrics: Arc<Metrics>,
    escalate: Escalate,
}

/// The first restart waits this long; each panic in a row doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A task that ran this long before panicking starts again from [`FIRST_BACKOFF`].
const STEADY: Duration = Duration::from_secs(60);

impl Tasks {
    pub fn new(metrics: Arc<Metrics>, escalate: Escalate) -> Tasks {
        Tasks { metrics, escalate }
    }

    /// Runs `make()` on `runtime` until it returns, starting it again whenever it panics.
    /// The returned handle ends when the task has returned (not panicked) or was aborted.
    pub fn keep<F, Fut>(
        &self,
        runtime: &tokio::runtime::Handle,
        name: &'static str,
        make: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (this, inner) = (self.clone(), runtime.clone());
        runtime.spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = tokio::time::Instant::now();
                match inner.spawn(make()).await {
                    Ok(()) => return,
                    Err(e) if e.is_cancelled() => return,
                    Err(e) => {
                        this.died(name, e, true);
                        if started.elapsed() >= STEADY {
                            backoff = FIRST_BACKOFF;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        })
    }

    /// Runs `task` on `runtime` once; if it panics, the panic is escalated.
    pub fn watch<Fut>(
        &self,
        runtime: &tokio::runtime::Handle,
        name: &'static str,
        task: Fut,
    ) -> tokio::task::JoinHandle<()>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (this, inner) = (self.clone(), runtime.clone());
        runtime.spawn(async move {
            if let Err(e) = inner.spawn(task).await
                && e.is_panic()
            {
                this.died(name, e, false);
                (this.escalate)(name);
            }
        })
    }

    fn died(&self, name: &'static str, e: tokio::task::JoinError, restarting: bool) {
        self.metrics.task_panics.with_label_values(&[name]).inc();
        let why = panic_message(e);
        if restarting {
            tracing::error!(target: "tern::tasks", task = name, panic = %why, "background task panicked; restarting it");
        } else {
            tracing::error!(target: "tern::tasks", task = name, panic = %why,
                "background task panicked and cannot be restarted; escalating to the watchdog");
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(not a string)".into()),
        Err(e) => e.to_string(),
    }
}

/// Tasks asked to panic at their next [`fault_point`], and whether there are any.
static PANIC_NEXT: Mutex<Vec<String>> = Mutex::new(Vec::new());
static ANY_PENDING: AtomicBool = AtomicBool::new(false);

/// Makes the task named `task` panic the next time it reaches its [`fault_point`].
pub fn panic_next(task: &str) {
    PANIC_NEXT.lock().push(task.to_string());
    ANY_PENDING.store(true, Ordering::Release);
}

/// Panics if [`panic_next`] asked `task` to. An atomic load unless a fault is pending;
/// tasks call it once per turn of their loop, never on the request path.
pub fn fault_point(task: &str) {
    if !ANY_PENDING.load(Ordering::Acquire) {
        return;
    }
    let mut pending = PANIC_NEXT.lock();
    if let Some(i) = pending.iter().position(|t| t == task) {
        pending.swap_remove(i);
        ANY_PENDING.store(!pending.is_empty(), Ordering::Release);
        drop(pending);
        panic!("fault injected: {task} told to panic");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn tasks() -> (Tasks, Arc<Metrics>, Arc<Mutex<Vec<String>>>) {
        let metrics = Arc::new(Metrics::new());
        let escalated = Arc::new(Mutex::new(Vec::new()));
        let e = escalated.clone();
        (
            Tasks::new(metrics.clone(), Arc::new(move |n: &str| e.lock().push(n.to_string()))),
            metrics,
            escalated,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_task_is_restarted_after_a_panic_and_counted() {
        let (tasks, metrics, escalated) = tasks();
        let runs = Arc::new(AtomicUsize::new(0));
        let r = runs.clone();
        let handle = tasks.keep(&tokio::runtime::Handle::current(), "test-kept", move || {
            let r = r.clone();
            async move {
                // Panics on its first two runs, returns on the third.
                assert!(r.fetch_add(1, Ordering::SeqCst) >= 2, "told to fail");
            }
        });
        handle.await.expect("the keeper itself never panics");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(metrics.task_panics.with_label_values(&["test-kept"]).get(), 2);
        assert!(escalated.lock().is_empty(), "a restartable task is not escalated");
    }

    #[tokio::test]
    async fn a_watched_task_that_panics_is_escalated() {
        let (tasks, metrics, escalated) = tasks();
        let handle = tasks.watch(&tokio::runtime::Handle::current(), "test-watched", async {
            fault_point("test-watched");
        });
        handle.await.expect("the watcher itself never panics");
        assert!(escalated.lock().is_empty(), "no fault pending: it returned normally");

        panic_next("test-watched-2");
        let handle = tasks.watch(&tokio::runtime::Handle::current(), "test-watched-2", async {
            fault_point("test-watched-2");
        });
        handle.await.expect("the watcher itself never panics");
        assert_eq!(*escalated.lock(), ["test-watched-2"]);
        assert_eq!(metrics.task_panics.with_label_values(&["test-watched-2"]).get(), 1);
    }
}
