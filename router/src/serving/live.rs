//! Requests being answered.
//!
//! A request's id reaches the client (in a stream's `Start` event) before
//! its record reaches the log, which happens when the answer ends. Feedback
//! on such an id is accepted (it joins the record by id), and a history read
//! waits briefly for the record instead of calling the id unknown.
//!
//! Each admitted request holds a [`LiveGuard`] until its record has been
//! handed to the log: an id is always live, queued in the log writer, or
//! written, so "not live, and still not in the log after a flush" means the
//! server never issued it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

/// The ids of the requests being answered.
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveRequests {
    /// Per id, a receiver whose sender the request's guard holds: it sees
    /// the channel close when the guard drops.
    ids: Arc<Mutex<HashMap<String, watch::Receiver<()>>>>,
}

/// Marks one request live until dropped; drop it after the request's record
/// (and any signal that follows it) has been handed to the log.
#[derive(Debug)]
pub(crate) struct LiveGuard {
    id: String,
    set: LiveRequests,
    _ended: watch::Sender<()>,
}

impl LiveRequests {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<()>>> {
        // The map stays consistent whatever a panicking holder did (one
        // insert or remove), so a poisoned lock is still usable.
        self.ids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark `id` live.
    pub(crate) fn enter(&self, id: &str) -> LiveGuard {
        let (ended, rx) = watch::channel(());
        self.lock().insert(id.to_string(), rx);
        LiveGuard {
            id: id.to_string(),
            set: self.clone(),
            _ended: ended,
        }
    }

    /// Whether `id` is being answered now.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    /// Wait until `id` is no longer live, at most `limit`; `true` when it is
    /// not (or never was) live, `false` when it still is after `limit`.
    pub(crate) async fn ended_within(&self, id: &str, limit: Duration) -> bool {
        let Some(mut rx) = self.lock().get(id).cloned() else {
            return true;
        };
        // Nothing is ever sent: `changed` returns (an error) when the
        // guard drops its sender.
        tokio::time::timeout(limit, rx.changed()).await.is_ok()
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        // Out of the map first, then the sender closes (field drop) and
        // wakes the waiters, who then find the id gone.
        self.set.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_guard_drops_and_times_out_while_it_lives() {
        let live = LiveRequests::default();
        assert!(live.ended_within("never-issued", Duration::ZERO).await);
        let guard = live.enter("r1");
        assert!(live.contains("r1"));
        assert!(!live.ended_within("r1", Duration::from_millis(20)).await);
        let waiter = {
            let live = live.clone();
            tokio::spawn(async move { live.ended_within("r1", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        drop(guard);
        assert!(waiter.await.unwrap());
        assert!(!live.contains("r1"));
    }
}
