//! The log's writer thread: gathers records into batches and hands each to
//! the store's [`Sink`] as one transaction.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::ShadowRecord;
use super::{LogError, LogStats, RequestRecord};
use crate::data::feedback::FeedbackRecord;

/// The rows one commit writes.
pub(super) struct Batch<'a> {
    pub(super) records: &'a [Box<RequestRecord>],
    pub(super) feedback: &'a [FeedbackRecord],
    pub(super) shadows: &'a [ShadowRecord],
}

/// Where a store commits batches.
pub(super) trait Sink: Send {
    /// Commit `batch` in one transaction: all of it or none.
    fn write(&mut self, batch: &Batch<'_>) -> Result<(), LogError>;
    /// Called once, after the last batch.
    fn close(&mut self) {}
}

/// Told whether a row's commit succeeded (the store's message if not).
type Ack = oneshot::Sender<Result<(), String>>;

enum Command {
    Record(Box<RequestRecord>),
    Feedback(Box<FeedbackRecord>, Option<Ack>),
    Shadow(Box<ShadowRecord>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

pub(super) struct WriterHandle {
    tx: SyncSender<Command>,
    stats: Arc<LogStats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl WriterHandle {
    pub(super) fn start(sink: Box<dyn Sink>, interval: Duration, batch: usize, capacity: usize, persist: bool) -> Self {
        let (tx, rx) = sync_channel(capacity);
        let stats = Arc::new(LogStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || run(sink, rx, interval, batch, persist, &thread_stats))
            .expect("spawning the request-log thread");
        Self {
            tx,
            stats,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub(super) fn stats(&self) -> &LogStats {
        &self.stats
    }

    pub(super) fn submit(&self, record: RequestRecord) {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.enqueue(Command::Record(Box::new(record)));
    }

    pub(super) fn submit_feedback(&self, feedback: FeedbackRecord) {
        self.enqueue(Command::Feedback(Box::new(feedback), None));
    }

    pub(super) async fn store_feedback(&self, feedback: FeedbackRecord) -> Result<(), LogError> {
        let (ack, committed) = oneshot::channel();
        self.enqueue(Command::Feedback(Box::new(feedback), Some(ack)));
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(LogError::WriteFailed { reason }),
            Err(_) => Err(LogError::Closed),
        }
    }

    pub(super) fn submit_shadow(&self, shadow: ShadowRecord) {
        self.enqueue(Command::Shadow(Box::new(shadow)));
    }

    fn enqueue(&self, command: Command) {
        match self.tx.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(cmd)) => {
                // The writer is a full queue behind: wait for room on the
                // blocking pool rather than on the caller's task.
                let tx = self.tx.clone();
                let stats = self.stats.clone();
                let send = move || {
                    if tx.send(cmd).is_err() {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => drop(handle.spawn_blocking(send)),
                    Err(_) => send(),
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("request log is closed; a record was not written");
            }
        }
    }

    pub(super) async fn flush(&self) -> Result<(), LogError> {
        let (done, wait) = oneshot::channel();
        self.send_blocking(Command::Flush(done)).await?;
        wait.await.map_err(|_| LogError::Closed)
    }

    pub(super) async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.send_blocking(Command::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }

    async fn send_blocking(&self, cmd: Command) -> Result<(), LogError> {
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || tx.send(cmd))
            .await
            .map_err(|_| LogError::Closed)?
            .map_err(|_| LogError::Closed)
    }
}

/// How often a gathering writer looks for new commands (also the most a
/// flush request waits before its batch is written).
const POLL: Duration = Duration::from_millis(1);

fn run(
    mut sink: Box<dyn Sink>,
    rx: Receiver<Command>,
    interval: Duration,
    max_batch: usize,
    persist: bool,
    stats: &LogStats,
) {
    // Records stay boxed as they came: moving them out would copy each one.
    let mut batch: Vec<Box<RequestRecord>> = Vec::with_capacity(max_batch);
    let mut feedback: Vec<FeedbackRecord> = Vec::new();
    let mut acks: Vec<Ack> = Vec::new();
    let mut shadows: Vec<ShadowRecord> = Vec::new();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Block for the first command, then gather until the interval since
        // it has passed: a record waits at most one interval to be committed.
        let first = match rx.recv() {
            Ok(cmd) => cmd,
            Err(_) => return, // every handle is gone
        };
        let deadline = Instant::now() + interval;
        let mut shutdown = None;
        let mut next = Some(first);
        // Gather by polling rather than blocking per record: a blocked
        // receiver costs every submitter a futex wake-up, which at tens of
        // thousands of records a second is a large share of a request.
        'gather: loop {
            while let Some(cmd) = next.take().or_else(|| rx.try_recv().ok()) {
                match cmd {
                    Command::Record(r) => batch.push(r),
                    Command::Feedback(f, ack) => {
                        feedback.push(*f);
                        acks.extend(ack);
                    }
                    Command::Shadow(r) => shadows.push(*r),
                    // Once shutting down, drain everything still queued;
                    // later flushes and shutdowns wait for this last batch.
                    Command::Flush(done) | Command::Shutdown(done) if shutdown.is_some() => waiters.push(done),
                    Command::Flush(done) => {
                        waiters.push(done);
                        break 'gather;
                    }
                    Command::Shutdown(done) => shutdown = Some(done),
                }
                if shutdown.is_none() && batch.len() + feedback.len() + shadows.len() >= max_batch {
                    break 'gather;
                }
            }
            let now = Instant::now();
            if shutdown.is_some() || now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(POLL));
        }
        let committed = if persist {
            write_batch(sink.as_mut(), &mut batch, &mut feedback, &mut shadows, stats)
        } else {
            stats.discarded.fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.clear();
            feedback.clear();
            shadows.clear();
            Ok(())
        };
        for ack in acks.drain(..) {
            let _ = ack.send(committed.clone());
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        if let Some(done) = shutdown {
            sink.close();
            let _ = done.send(());
            return;
        }
    }
}

#[allow(
    clippy::vec_box,
    reason = "records arrive boxed through the queue; unboxing would copy each (~600 bytes)"
)]
fn write_batch(
    sink: &mut dyn Sink,
    batch: &mut Vec<Box<RequestRecord>>,
    feedback: &mut Vec<FeedbackRecord>,
    shadows: &mut Vec<ShadowRecord>,
    stats: &LogStats,
) -> Result<(), String> {
    if batch.is_empty() && feedback.is_empty() && shadows.is_empty() {
        return Ok(());
    }
    let n = batch.len() as u64;
    let _span = tracing::info_span!(
        "log_commit",
        records = n,
        feedback = feedback.len(),
        shadows = shadows.len()
    )
    .entered();
    let result = sink.write(&Batch {
        records: batch,
        feedback,
        shadows,
    });
    let feedback_rows = feedback.len();
    feedback.clear();
    shadows.clear();
    batch.clear();
    match result {
        Ok(()) => {
            stats.written.fetch_add(n, Ordering::Relaxed);
            stats.commit_succeeded();
            Ok(())
        }
        Err(error) => {
            let reason = reason(&error);
            stats.failed.fetch_add(n, Ordering::Relaxed);
            stats.feedback_failed.fetch_add(feedback_rows as u64, Ordering::Relaxed);
            tracing::error!(error = %reason, records = n, feedback_rows, "request log batch failed; its rows are lost");
            stats.commit_failed(reason.clone());
            Err(reason)
        }
    }
}

/// The store's own message (the error it reported, e.g. SQLite's "database
/// or disk is full", PostgreSQL's "error connecting to server: ..."), which
/// is what an operator can act on.
fn reason(error: &LogError) -> String {
    use std::error::Error as _;
    error.source().map_or_else(|| error.to_string(), ToString::to_string)
}
