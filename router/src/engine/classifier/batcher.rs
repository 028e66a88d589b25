//! The route batcher: concurrent decisions share one padded forward pass.
//!
//! The model behind a batcher is a [`Featurizer`] (a sentence encoder or a
//! decoder backbone). Callers cut their query into token windows and queue it; one worker
//! thread takes the first job waiting, every job queued behind it that fits
//! the token budget (padded tokens: windows x longest window), and, when the
//! queue was not empty (decisions are arriving together), waits up to
//! [`BatchSettings::max_wait`] for more. A single client never waits. A job
//! whose caller went away before its batch formed is left out. The queue is
//! bounded: a full queue answers [`EngineError::Overloaded`] at once. A text
//! another caller on the same model files embedded a moment ago (the
//! jailbreak rail, on the same request) is not queued at all
//! ([`Featurizer::recall`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Featurizer;
use crate::engine::EngineError;

/// How the batcher gathers decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// Padded tokens per forward pass at most (a single query always runs).
    pub max_batch_tokens: usize,
    /// Decisions waiting at most; one more is refused as overloaded.
    pub queue: usize,
    /// Longest wait for more decisions once several are queued.
    pub max_wait: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_batch_tokens: 4096,
            queue: 1024,
            max_wait: Duration::from_millis(1),
        }
    }
}

struct Job {
    windows: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<f32>, String>>,
}

impl Job {
    fn padded_tokens(jobs: &[Job], extra: &Job) -> usize {
        let windows = jobs.iter().chain([extra]).map(|j| j.windows.len()).sum::<usize>();
        let longest = jobs
            .iter()
            .chain([extra])
            .flat_map(|j| j.windows.iter().map(Vec::len))
            .max()
            .unwrap_or(0);
        windows * longest
    }
}

/// Counters of a batcher.
#[derive(Debug, Default)]
struct Counters {
    /// Decisions the worker has taken off the queue.
    taken: AtomicU64,
    passes: AtomicU64,
    embedded: AtomicU64,
    recalled: AtomicU64,
}

/// A handle on the batcher's worker; the worker stops when the last handle is dropped.
pub struct Batcher {
    tx: SyncSender<Job>,
    counters: Arc<Counters>,
    model: Arc<dyn Featurizer>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("passes", &self.forward_passes())
            .finish()
    }
}

impl Batcher {
    /// Start a worker thread running `model`.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start(model: Arc<dyn Featurizer>, settings: BatchSettings) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue.max(1));
        let counters = Arc::new(Counters::default());
        let worker = Worker {
            rx,
            model: model.clone(),
            settings,
            counters: counters.clone(),
            carry: None,
        };
        std::thread::Builder::new()
            .name("route-batcher".into())
            .spawn(move || worker.run())?;
        Ok(Self { tx, counters, model })
    }

    /// The features of `text` (and the tokens read), computed in a batch
    /// with whatever else is queued.
    ///
    /// # Errors
    /// [`EngineError::Overloaded`] when the queue is full, tokenizer or model
    /// failures, [`EngineError::Disconnected`] when the worker is gone.
    ///
    /// # Cancel safety
    /// Dropping the future before its batch forms takes the query out of it.
    pub async fn features(&self, text: &str) -> Result<(Vec<f32>, u32), EngineError> {
        // The input rails usually encoded this very text a moment ago.
        if let Some((v, tokens)) = self.model.recall(text) {
            self.counters.recalled.fetch_add(1, Ordering::Relaxed);
            return Ok((v.to_vec(), tokens));
        }
        let windows = self.model.windows(text).map_err(EngineError::Backend)?;
        let tokens = crate::embed::window_tokens(&windows);
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { windows, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(EngineError::Overloaded("the route queue is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::Disconnected),
        }
        match rx.await {
            Ok(Ok(v)) => {
                self.model.remember(text, &v, tokens);
                Ok((v, tokens))
            }
            Ok(Err(e)) => Err(EngineError::Backend(anyhow::anyhow!(e))),
            Err(_) => Err(EngineError::Disconnected),
        }
    }

    /// The fingerprint of the model files whose features it shares with
    /// other callers ([`Featurizer::fingerprint`]).
    pub fn fingerprint(&self) -> Option<&str> {
        self.model.fingerprint()
    }

    /// Forward passes run so far (one per batch).
    pub fn forward_passes(&self) -> u64 {
        self.counters.passes.load(Ordering::Relaxed)
    }

    /// Decisions the worker has taken off the queue so far (into a batch, or
    /// held for the next one).
    pub fn taken(&self) -> u64 {
        self.counters.taken.load(Ordering::Relaxed)
    }

    /// Queries embedded so far.
    pub fn embedded(&self) -> u64 {
        self.counters.embedded.load(Ordering::Relaxed)
    }

    /// Queries whose embedding another caller had just computed (no pass).
    pub fn recalled(&self) -> u64 {
        self.counters.recalled.load(Ordering::Relaxed)
    }
}

struct Worker {
    rx: Receiver<Job>,
    model: Arc<dyn Featurizer>,
    settings: BatchSettings,
    counters: Arc<Counters>,
    /// A job that did not fit the last batch: it opens the next.
    carry: Option<Job>,
}

impl Worker {
    fn run(mut self) {
        while let Some(batch) = self.next_batch() {
            let batch: Vec<Job> = batch.into_iter().filter(|j| !j.reply.is_closed()).collect();
            if batch.is_empty() {
                continue;
            }
            let texts: Vec<Vec<Vec<u32>>> = batch.iter().map(|j| j.windows.clone()).collect();
            let result = self.model.features(&texts);
            self.counters.passes.fetch_add(1, Ordering::Relaxed);
            self.counters.embedded.fetch_add(batch.len() as u64, Ordering::Relaxed);
            match result {
                Ok(vectors) => {
                    for (job, v) in batch.into_iter().zip(vectors) {
                        let _ = job.reply.send(Ok(v));
                    }
                }
                Err(e) => {
                    for job in batch {
                        let _ = job.reply.send(Err(format!("{e:#}")));
                    }
                }
            }
        }
    }

    /// The next batch; `None` once every handle is dropped and the queue drained.
    fn next_batch(&mut self) -> Option<Vec<Job>> {
        let first = match self.carry.take() {
            Some(j) => j,
            None => self.take(self.rx.recv().ok()?),
        };
        let mut batch = vec![first];
        let mut deadline: Option<Instant> = None;
        loop {
            let next = match self.rx.try_recv() {
                Ok(j) => self.take(j),
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    if batch.len() < 2 {
                        break;
                    }
                    // Decisions are arriving together: give the next ones a moment.
                    let until = *deadline.get_or_insert_with(|| Instant::now() + self.settings.max_wait);
                    match self.rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                        Ok(j) => self.take(j),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            if Job::padded_tokens(&batch, &next) > self.settings.max_batch_tokens {
                self.carry = Some(next);
                break;
            }
            batch.push(next);
        }
        Some(batch)
    }

    fn take(&self, job: Job) -> Job {
        self.counters.taken.fetch_add(1, Ordering::Relaxed);
        job
    }
}
