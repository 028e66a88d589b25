//! The log's writer thread: gathers records into batches and hands each to
//! the store's [`Sink`] as one transaction.
//!
//! A commit that fails for good (a full disk) loses its rows, counted as
//! failed. A commit that fails because the store cannot be reached for now
//! (a PostgreSQL server down or restarting: [`Sink::is_transient`]) keeps its
//! rows in memory, up to `outage_buffer` (the oldest go first beyond it), and
//! tries again with a growing pause until the store is back. Feedback a
//! client waits for is never kept that way: it is refused at once, so that
//! what a client is told is stored is stored.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
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
    /// Whether `error` may pass by itself (the store unreachable for now),
    /// so that the rows are worth keeping for another try.
    fn is_transient(&self, _error: &LogError) -> bool {
        false
    }
    /// Called once, after the last batch.
    fn close(&mut self) {}
}

/// How the writer gathers and keeps rows.
#[derive(Debug, Clone)]
pub(super) struct WriterSettings {
    /// Longest wait of a row before its commit.
    pub(super) interval: Duration,
    /// Rows per commit at most (rows kept through an outage go in one).
    pub(super) max_batch: usize,
    /// `false`: rows are counted and dropped.
    pub(super) persist: bool,
    /// Rows kept in memory while the store is unreachable.
    pub(super) outage_buffer: usize,
    /// The replica named in every record that does not name one (stamped
    /// here, off the request path).
    pub(super) replica: Option<Arc<str>>,
}

/// First pause after a transient failure; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest pause between tries while the store is unreachable.
const RETRY_MAX: Duration = Duration::from_secs(2);

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
    pub(super) fn start(sink: Box<dyn Sink>, settings: WriterSettings, capacity: usize) -> Self {
        let (tx, rx) = sync_channel(capacity);
        let stats = Arc::new(LogStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || run(sink, rx, settings, &thread_stats))
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

/// Rows gathered and not yet committed (including those kept through an
/// outage), in arrival order per table.
#[derive(Default)]
#[allow(
    clippy::vec_box,
    reason = "records arrive boxed through the queue; unboxing would copy each (~600 bytes)"
)]
struct Pending {
    records: Vec<Box<RequestRecord>>,
    /// Feedback nobody waits for (implicit signals).
    feedback: Vec<FeedbackRecord>,
    /// Feedback a client waits for, with its acknowledgements.
    acked: Vec<(FeedbackRecord, Ack)>,
    shadows: Vec<ShadowRecord>,
}

impl Pending {
    fn len(&self) -> usize {
        self.records.len() + self.feedback.len() + self.acked.len() + self.shadows.len()
    }

    /// Take `command`'s row; a record without a replica gets `replica`.
    fn push(&mut self, command: Command, replica: Option<&Arc<str>>) {
        match command {
            Command::Record(mut r) => {
                if r.replica.is_none() {
                    r.replica = replica.map(|name| name.to_string());
                }
                self.records.push(r);
            }
            Command::Feedback(f, Some(ack)) => self.acked.push((*f, ack)),
            Command::Feedback(f, None) => self.feedback.push(*f),
            Command::Shadow(r) => self.shadows.push(*r),
            Command::Flush(_) | Command::Shutdown(_) => {}
        }
    }

    /// Forget every row, keeping the buffers' room for the next batch.
    fn clear(&mut self) {
        self.records.clear();
        self.feedback.clear();
        self.acked.clear();
        self.shadows.clear();
    }

    /// Refuse waiting feedback with `reason` (nothing of it stored).
    fn refuse_acked(&mut self, reason: &str, stats: &LogStats) {
        stats
            .feedback_failed
            .fetch_add(self.acked.len() as u64, Ordering::Relaxed);
        for (_, ack) in self.acked.drain(..) {
            let _ = ack.send(Err(reason.to_string()));
        }
    }

    /// Drop the oldest rows beyond `cap`; how many records went.
    fn trim(&mut self, cap: usize, stats: &LogStats) -> usize {
        let excess = self.len().saturating_sub(cap);
        let records = excess.min(self.records.len());
        self.records.drain(..records);
        let shadows = (excess - records).min(self.shadows.len());
        self.shadows.drain(..shadows);
        let feedback = (excess - records - shadows).min(self.feedback.len());
        self.feedback.drain(..feedback);
        stats.failed.fetch_add(records as u64, Ordering::Relaxed);
        stats.feedback_failed.fetch_add(feedback as u64, Ordering::Relaxed);
        records + shadows + feedback
    }
}

/// Tries while the store is unreachable.
struct Outage {
    retry_at: Instant,
    pause: Duration,
}

fn run(mut sink: Box<dyn Sink>, rx: Receiver<Command>, settings: WriterSettings, stats: &LogStats) {
    let mut pending = Pending::default();
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let mut outage: Option<Outage> = None;
    loop {
        // Block for the first command (or, with rows kept through an
        // outage, until the next try), then gather until the interval since
        // it has passed: a row waits at most one interval to be committed.
        let first = match &outage {
            Some(o) => match rx.recv_timeout(o.retry_at.saturating_duration_since(Instant::now())) {
                Ok(cmd) => Some(cmd),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            },
            None => match rx.recv() {
                Ok(cmd) => Some(cmd),
                Err(_) => return, // every handle is gone
            },
        };
        let deadline = Instant::now() + settings.interval;
        let mut shutdown = None;
        let mut gathered = 0;
        // Gather by polling rather than blocking per record: a blocked
        // receiver costs every submitter a futex wake-up, which at tens of
        // thousands of records a second is a large share of a request.
        // (No first command: the pause of an outage is over, try again.)
        if let Some(first) = first {
            let mut next = Some(first);
            'gather: loop {
                while let Some(cmd) = next.take().or_else(|| rx.try_recv().ok()) {
                    match cmd {
                        // Once shutting down, drain everything still queued;
                        // later flushes and shutdowns wait for this last batch.
                        Command::Flush(done) | Command::Shutdown(done) if shutdown.is_some() => waiters.push(done),
                        Command::Flush(done) => {
                            waiters.push(done);
                            break 'gather;
                        }
                        Command::Shutdown(done) => shutdown = Some(done),
                        row => {
                            pending.push(row, settings.replica.as_ref());
                            gathered += 1;
                        }
                    }
                    if shutdown.is_none() && gathered >= settings.max_batch {
                        break 'gather;
                    }
                }
                let now = Instant::now();
                if shutdown.is_some() || now >= deadline {
                    break;
                }
                std::thread::sleep((deadline - now).min(POLL));
            }
        }
        let waiting = outage.as_ref().is_some_and(|o| Instant::now() < o.retry_at);
        if !settings.persist {
            stats
                .discarded
                .fetch_add(pending.records.len() as u64, Ordering::Relaxed);
            for (_, ack) in pending.acked.drain(..) {
                let _ = ack.send(Ok(()));
            }
            pending.clear();
        } else if waiting && shutdown.is_none() {
            // Between tries: keep the new rows, refuse waiting feedback.
            let reason = stats.write_failure().map(|f| f.reason).unwrap_or_default();
            pending.refuse_acked(&reason, stats);
            if pending.trim(settings.outage_buffer, stats) > 0 {
                stats.commit_failed(reason, true);
            }
        } else {
            let kept = commit(sink.as_mut(), &mut pending, &settings, shutdown.is_none(), stats);
            outage = kept.then(|| {
                let pause = outage.map_or(RETRY_MIN, |o| (o.pause * 2).min(RETRY_MAX));
                Outage {
                    retry_at: Instant::now() + pause,
                    pause,
                }
            });
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

/// Commit everything pending; whether rows were kept for another try (the
/// store unreachable and `may_keep`).
fn commit(
    sink: &mut dyn Sink,
    pending: &mut Pending,
    settings: &WriterSettings,
    may_keep: bool,
    stats: &LogStats,
) -> bool {
    if pending.len() == 0 {
        return false;
    }
    let n = pending.records.len() as u64;
    let _span = tracing::info_span!(
        "log_commit",
        records = n,
        feedback = pending.feedback.len() + pending.acked.len(),
        shadows = pending.shadows.len()
    )
    .entered();
    // Waiting feedback goes last, so it can be taken back off on failure.
    let implicit = pending.feedback.len();
    let (acked, acks): (Vec<FeedbackRecord>, Vec<Ack>) = pending.acked.drain(..).unzip();
    pending.feedback.extend(acked);
    let result = sink.write(&Batch {
        records: &pending.records,
        feedback: &pending.feedback,
        shadows: &pending.shadows,
    });
    pending.feedback.truncate(implicit);
    match result {
        Ok(()) => {
            stats.written.fetch_add(n, Ordering::Relaxed);
            stats.commit_succeeded();
            for ack in acks {
                let _ = ack.send(Ok(()));
            }
            pending.clear();
            false
        }
        Err(error) => {
            let reason = reason(&error);
            let feedback_refused = acks.len();
            stats
                .feedback_failed
                .fetch_add(feedback_refused as u64, Ordering::Relaxed);
            for ack in acks {
                let _ = ack.send(Err(reason.clone()));
            }
            if may_keep && sink.is_transient(&error) {
                let dropped = pending.trim(settings.outage_buffer, stats);
                tracing::warn!(error = %reason, kept = pending.len(), dropped, "request log store unreachable; rows kept for another try");
                stats.commit_failed(reason, dropped > 0);
                return true;
            }
            stats.failed.fetch_add(n, Ordering::Relaxed);
            stats
                .feedback_failed
                .fetch_add(pending.feedback.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %reason, records = n, "request log batch failed; its rows are lost");
            stats.commit_failed(reason, true);
            pending.clear();
            false
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
