//! The receiving end of a mistral.rs request, and the scheduler choice.

use super::*;

/// The PagedAttention scheduler for a pipeline loaded with paged attention
/// (`None` when mistral.rs turned it off, e.g. for a model on the CPU).
pub(super) async fn paged_scheduler<P: ?Sized + mistralrs::core::Pipeline>(
    pipeline: &tokio::sync::Mutex<P>,
    max_num_seqs: usize,
) -> Option<SchedulerConfig> {
    let config = pipeline.lock().await.get_metadata().cache_config.clone()?;
    Some(SchedulerConfig::PagedAttentionMeta { max_num_seqs, config })
}

/// The receiving end of one mistral.rs request, kept until the engine has
/// let go of the request.
///
/// mistral.rs 0.8.1 stops its engine thread when it cannot deliver a
/// tokenization, a raw-logit answer or a non-streamed answer (a panic in the
/// engine loop: every sequence in it fails, and the next request restarts
/// it with its caches empty). A cancelled gRPC call drops the future that
/// waits here, so an `Inbox` dropped before the engine is done hands its
/// receiver to a background task that takes what is still coming. It also
/// holds a router's prompt gate, given back once the engine has retired the
/// sequence, at most [`RAW_SEQUENCE_RETIRE_TIMEOUT`] after its answer.
/// Streamed answers need none of this: mistral.rs cancels a streamed
/// sequence whose receiver is gone.
pub(super) struct Inbox<T: Send + 'static> {
    rx: Option<mpsc::Receiver<T>>,
    gate: Option<OwnedMutexGuard<()>>,
    /// A response arrived: the request's prompt step is done.
    answered: bool,
}

impl<T: Send + 'static> Inbox<T> {
    pub(super) fn new(rx: mpsc::Receiver<T>, gate: Option<OwnedMutexGuard<()>>) -> Self {
        Self {
            rx: Some(rx),
            gate,
            answered: false,
        }
    }

    pub(super) async fn recv(&mut self) -> Option<T> {
        let item = self.rx.as_mut()?.recv().await;
        self.answered |= item.is_some();
        item
    }

    /// Wait until the engine drops the request (its channel closes), at
    /// most [`RAW_SEQUENCE_RETIRE_TIMEOUT`], and give back the gate.
    pub(super) async fn retire(mut self) -> Option<OwnedMutexGuard<()>> {
        if let Some(rx) = self.rx.as_mut()
            && tokio::time::timeout(RAW_SEQUENCE_RETIRE_TIMEOUT, drain(rx))
                .await
                .is_ok()
        {
            self.rx = None;
        }
        self.gate.take()
    }
}

impl<T: Send + 'static> Drop for Inbox<T> {
    fn drop(&mut self) {
        let (Some(mut rx), gate, answered) = (self.rx.take(), self.gate.take(), self.answered) else {
            return;
        };
        // Nothing can be sent any more, or no runtime to receive it on.
        if rx.is_closed() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // An unanswered request first waits for its prompt step.
            if answered || rx.recv().await.is_some() {
                let _ = tokio::time::timeout(RAW_SEQUENCE_RETIRE_TIMEOUT, drain(&mut rx)).await;
            }
            drop(gate);
            drain(&mut rx).await;
        });
    }
}

/// Receive until every sender is gone.
pub(super) async fn drain<T>(rx: &mut mpsc::Receiver<T>) {
    while rx.recv().await.is_some() {}
}
