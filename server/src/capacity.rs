//! The node's answers to checkers' proof-of-capacity challenges (`pylon_proto::capacity`):
//! `C = A·B mod 2³²` for the challenge's seed, on the node's own Vulkan device
//! ([`pylon_gpu::CapacityEngine`]), in a thread of its own so that the frame path and the
//! link never wait for it.
//!
//! The engine is opened when the node starts (device creation would otherwise count
//! against the first challenge's deadline). One challenge runs at a time; another that
//! arrives meanwhile is refused (`busy`), as is every challenge when no device opened.

use crate::metrics::{DropReason, ServerMetrics};
use pylon_proto::capacity::Challenge;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tokio::sync::mpsc;

/// A finished challenge.
#[derive(Debug)]
pub struct Answer {
    /// The challenge's input sequence number.
    pub seq: u32,
    /// The product and its times, or why there is none.
    pub result: Result<Product, String>,
}

/// A computed product.
#[derive(Debug)]
pub struct Product {
    /// `C`, row-major.
    pub words: Vec<u32>,
    /// The shader's time on the GPU, µs.
    pub gpu_us: u32,
    /// From the challenge's arrival to the product in memory, µs.
    pub wall_us: u32,
}

/// The thread that answers challenges, and its results.
#[derive(Debug)]
pub struct CapacityWorker {
    jobs: std::sync::mpsc::Sender<(u32, Challenge, Instant)>,
    busy: Arc<AtomicBool>,
    answers: mpsc::UnboundedReceiver<Answer>,
    metrics: ServerMetrics,
}

fn micros(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

impl CapacityWorker {
    /// Starts the thread, which opens the device `gpu` names (or the one the renderer
    /// would choose) at once.
    pub fn start(gpu: Option<String>, metrics: ServerMetrics) -> std::io::Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel::<(u32, Challenge, Instant)>();
        let (tx, answers) = mpsc::unbounded_channel();
        let busy = Arc::new(AtomicBool::new(false));
        let running = busy.clone();
        std::thread::Builder::new().name("capacity".into()).spawn(move || {
            let engine = pylon_gpu::CapacityEngine::new(gpu.as_deref()).map_err(|e| {
                tracing::warn!("no device for proof-of-capacity challenges ({e}); they will be refused");
                format!("no device: {e}")
            });
            if let Ok(engine) = &engine {
                tracing::debug!(device = %engine.device_info().name, "proof-of-capacity engine ready");
            }
            while let Ok((seq, challenge, arrived)) = rx.recv() {
                let result = engine.as_ref().map_err(Clone::clone).and_then(|engine| {
                    let (a, b) = challenge.matrices();
                    let run = engine.multiply(&a, &b, challenge.n).map_err(|e| format!("the GPU failed: {e}"))?;
                    Ok(Product { words: run.product, gpu_us: micros(run.gpu_time), wall_us: micros(arrived.elapsed()) })
                });
                running.store(false, Ordering::Release);
                if tx.send(Answer { seq, result }).is_err() {
                    break;
                }
            }
        })?;
        Ok(Self { jobs, busy, answers, metrics })
    }

    /// Starts on a challenge that arrived at `arrived`; `Err` with the reason to send back
    /// when it cannot (one is running, or the thread is gone).
    pub fn submit(&self, seq: u32, challenge: Challenge, arrived: Instant) -> Result<(), &'static str> {
        let refuse = |reason: &'static str| {
            self.metrics.capacity_challenges.get_or_create(&DropReason { reason }).inc();
            Err(reason)
        };
        if self.busy.swap(true, Ordering::AcqRel) {
            return refuse("busy");
        }
        if self.jobs.send((seq, challenge, arrived)).is_err() {
            return refuse("no_worker");
        }
        tracing::info!(seq, n = challenge.n, "proof-of-capacity challenge");
        Ok(())
    }

    /// The next finished challenge.
    pub async fn next(&mut self) -> Option<Answer> {
        let answer = self.answers.recv().await?;
        let reason = if answer.result.is_ok() { "answered" } else { "failed" };
        self.metrics.capacity_challenges.get_or_create(&DropReason { reason }).inc();
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proto::capacity::multiply;

    #[tokio::test]
    async fn a_challenge_is_answered_with_the_exact_product_and_a_second_at_once_is_busy() {
        let mut worker = CapacityWorker::start(None, ServerMetrics::new()).unwrap();
        let challenge = Challenge::new([6; 32], 64).unwrap();
        worker.submit(1, challenge, Instant::now()).unwrap();
        assert_eq!(worker.submit(2, challenge, Instant::now()), Err("busy"));
        let answer = worker.next().await.unwrap();
        assert_eq!(answer.seq, 1);
        let product = answer.result.expect("lavapipe or a GPU answers");
        let (a, b) = challenge.matrices();
        assert_eq!(product.words, multiply(&a, &b, 64));
        assert!(product.wall_us >= product.gpu_us);
        // Free again.
        worker.submit(3, challenge, Instant::now()).unwrap();
        assert_eq!(worker.next().await.unwrap().seq, 3);
    }
}
