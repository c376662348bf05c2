//! Core tasks that live as long as the process: if one ends on its own (an error, a panic,
//! or returning while nobody asked it to stop), every other task is told to stop and the
//! process reports the failure — a relay with a dead forwarding task, or an indexer
//! without its HTTP server, must exit (and be restarted) rather than look alive.

use tokio::sync::watch;
use tokio::task::JoinSet;

/// A set of named core tasks.
#[derive(Debug, Default)]
pub struct CoreTasks {
    set: JoinSet<(&'static str, Result<(), anyhow::Error>)>,
}

impl CoreTasks {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `task` under `name`.
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        self.set.spawn(async move { (name, task.await) });
    }

    /// Waits for every task. Tasks end normally once `stop` is true; the first that ends
    /// before (or fails, or panics) sets `stop` so the others end too, and its error is
    /// returned.
    pub async fn supervise(mut self, stop: &watch::Sender<bool>) -> anyhow::Result<()> {
        let mut failure = None;
        while let Some(done) = self.set.join_next().await {
            let outcome = match done {
                Ok((name, Ok(()))) if *stop.borrow() => {
                    tracing::debug!("{name} stopped");
                    continue;
                }
                Ok((name, Ok(()))) => anyhow::anyhow!("the {name} task ended unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("the {name} task failed")),
                Err(e) => anyhow::anyhow!("a core task panicked: {e}"),
            };
            tracing::error!("{outcome:#}; stopping");
            failure.get_or_insert(outcome);
            let _ = stop.send(true);
        }
        failure.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn until_stopped(mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let _ = stop.wait_for(|s| *s).await;
        Ok(())
    }

    #[tokio::test]
    async fn a_panicking_task_stops_the_others_and_is_reported() {
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = CoreTasks::new();
        tasks.spawn("egress", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            #[allow(clippy::panic)]
            {
                panic!("boom");
            }
        });
        tasks.spawn("http", until_stopped(stop.clone()));
        tasks.spawn("ingest", until_stopped(stop));
        let result = tokio::time::timeout(Duration::from_secs(5), tasks.supervise(&stop_tx)).await;
        let err = result.expect("the other tasks were stopped").expect_err("a panic is a failure");
        assert!(format!("{err:#}").contains("panicked"), "{err:#}");
    }

    #[tokio::test]
    async fn a_task_returning_early_is_a_failure_but_a_requested_stop_is_not() {
        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = CoreTasks::new();
        tasks.spawn("membership", async { Ok(()) });
        tasks.spawn("http", until_stopped(stop.clone()));
        let err = tasks.supervise(&stop_tx).await.expect_err("ended on its own");
        assert!(format!("{err:#}").contains("membership task ended unexpectedly"));

        let (stop_tx, stop) = watch::channel(false);
        let mut tasks = CoreTasks::new();
        tasks.spawn("http", until_stopped(stop));
        let _ = stop_tx.send(true);
        assert!(tasks.supervise(&stop_tx).await.is_ok());
    }
}
