//! The serving state in the PostgreSQL store: per slot, the version it
//! serves, its history and the trials on it ([`SlotState`]), shared by every
//! replica using the store.
//!
//! One row per slot (`flywheel_slots`): the state as JSON and a revision
//! raised by every change. A change is one transaction that locks the row
//! (`SELECT ... FOR UPDATE`), so two replicas changing one slot at once
//! take turns and neither change is lost, and it ends with
//! `pg_notify('flywheel_serving', slot)`: replicas listening on that
//! channel learn of it at once. [`SharedServingState::changes`] gives a
//! replica those wake-ups; a replica also re-reads the state on a timer, so
//! a missed notification (a connection lost and opened again) only delays
//! a change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio_postgres::Client;
use tokio_util::task::AbortOnDropHandle;

use super::LogError;
use super::postgres::{Target, migrate_tables};
use crate::clock::unix_ms;
use crate::models::store::SlotState;

/// The channel changes are announced on.
pub const CHANNEL: &str = "flywheel_serving";

/// The serving state's own schema, versioned apart from the log's.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE flywheel_slots (
        slot TEXT PRIMARY KEY,
        revision BIGINT NOT NULL,
        state TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL,
        updated_by TEXT
    );",
)];
const STATE_SCHEMA_VERSION: i64 = 1;

/// Key of the advisory lock a running flywheel cycle holds ("cycle_lk").
const CYCLE_LOCK: i64 = 0x6379_636c_655f_6c6b;

/// How long the listener waits before connecting again after losing its
/// connection.
const RELISTEN_AFTER: Duration = Duration::from_millis(500);

/// The serving state of every slot, in the PostgreSQL store.
pub struct SharedServingState {
    target: Target,
    replica: String,
    /// One connection for reads and changes, opened again when lost.
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for SharedServingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedServingState")
            .field("store", &self.target.shown())
            .finish()
    }
}

fn parse(slot: &str, revision: i64, json: &str) -> Result<SlotState, LogError> {
    let mut state: SlotState = serde_json::from_str(json).map_err(|source| LogError::CorruptState {
        slot: slot.to_string(),
        source,
    })?;
    state.revision = u64::try_from(revision).unwrap_or_default();
    Ok(state)
}

impl SharedServingState {
    /// Connect to the store at `url` (creating the state's table when it is
    /// new); changes are recorded as made by `replica`.
    ///
    /// # Errors
    /// [`LogError::Connect`] when the store cannot be reached; a state schema
    /// newer than this binary's.
    pub async fn connect(url: &str, replica: &str) -> Result<Self, LogError> {
        let target = Target::parse(url)?;
        let mut client = target.connect().await?;
        migrate_tables(&mut client, "flywheel_state_schema", MIGRATIONS, STATE_SCHEMA_VERSION).await?;
        Ok(Self {
            target,
            replica: replica.to_string(),
            client: Mutex::new(Some(client)),
        })
    }

    /// The connection, opened again when it was lost.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, LogError> {
        let mut guard = self.client.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(self.target.connect().await?);
        }
        Ok(guard)
    }

    /// Every slot's state, by slot (slots never changed are absent).
    ///
    /// # Errors
    /// The store unreachable, a state that does not parse.
    pub async fn slot_states(&self) -> Result<BTreeMap<String, SlotState>, LogError> {
        let guard = self.client().await?;
        let client = guard.as_ref().ok_or(LogError::Closed)?;
        let rows = client
            .query("SELECT slot, revision, state FROM flywheel_slots", &[])
            .await?;
        rows.iter()
            .map(|row| {
                let slot: String = row.try_get(0)?;
                let state = parse(&slot, row.try_get(1)?, row.try_get(2)?)?;
                Ok((slot, state))
            })
            .collect()
    }

    /// Change `slot`'s state with `change`, raising its revision and telling
    /// every listening replica; returns what `change` returned and the new
    /// state. Nothing is written when `change` fails.
    ///
    /// # Errors
    /// `change`'s error; the store unreachable.
    pub async fn update_slot<T, E: From<LogError>>(
        &self,
        slot: &str,
        change: impl FnOnce(&mut SlotState) -> Result<T, E>,
    ) -> Result<(T, SlotState), E> {
        let mut guard = self.client().await?;
        let client = guard.as_mut().ok_or(LogError::Closed)?;
        let tx = client.transaction().await.map_err(LogError::from)?;
        tx.execute(
            "INSERT INTO flywheel_slots (slot, revision, state, updated_at_ms) VALUES ($1, 0, '{}', 0)
             ON CONFLICT (slot) DO NOTHING",
            &[&slot],
        )
        .await
        .map_err(LogError::from)?;
        let row = tx
            .query_one(
                "SELECT revision, state FROM flywheel_slots WHERE slot = $1 FOR UPDATE",
                &[&slot],
            )
            .await
            .map_err(LogError::from)?;
        let mut state = parse(
            slot,
            row.try_get(0).map_err(LogError::from)?,
            row.try_get(1).map_err(LogError::from)?,
        )?;
        let out = change(&mut state)?;
        state.revision += 1;
        let json = serde_json::to_string(&state).map_err(|source| LogError::CorruptState {
            slot: slot.to_string(),
            source,
        })?;
        let revision = i64::try_from(state.revision).unwrap_or(i64::MAX);
        let now = unix_ms(std::time::SystemTime::now());
        tx.execute(
            "UPDATE flywheel_slots SET revision = $2, state = $3, updated_at_ms = $4, updated_by = $5
             WHERE slot = $1",
            &[&slot, &revision, &json, &now, &self.replica],
        )
        .await
        .map_err(LogError::from)?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &slot])
            .await
            .map_err(LogError::from)?;
        tx.commit().await.map_err(LogError::from)?;
        Ok((out, state))
    }

    /// Wake-ups for changes made by any replica: a task listens on
    /// [`CHANNEL`], connecting again when its connection is lost (and
    /// waking once after it reconnects, since it may have missed some). The
    /// task ends when the returned [`Changes`] is dropped. Returns once it
    /// listens (or failed its first try: it keeps trying, and the caller's
    /// own re-reads cover the gap), so a change committed after this returns
    /// wakes the caller.
    pub async fn changes(&self) -> Changes {
        let notify = Arc::new(Notify::new());
        let target = self.target.clone();
        let wake = notify.clone();
        let (ready, listening_now) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Present until the first try: after it, a reconnection wakes the follower.
            let mut ready = Some(ready);
            loop {
                let listening = async {
                    let (client, receive) = target.connect_listening().await?;
                    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
                    Ok::<_, LogError>((client, receive))
                };
                match listening.await {
                    Ok((_client, mut receive)) => {
                        match ready.take() {
                            Some(ready) => {
                                let _ = ready.send(());
                            }
                            None => wake.notify_one(),
                        }
                        while receive.recv().await.is_some() {
                            wake.notify_one();
                        }
                    }
                    Err(error) => {
                        ready = None;
                        tracing::warn!(error = %error, "cannot listen for serving state changes");
                    }
                }
                tokio::time::sleep(RELISTEN_AFTER).await;
            }
        });
        let _ = listening_now.await;
        Changes {
            notify,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// Wake-ups for serving state changes (see [`SharedServingState::changes`]).
pub struct Changes {
    notify: Arc<Notify>,
    _task: AbortOnDropHandle<()>,
}

impl Changes {
    /// Resolves at the next change (at once when one came since the last call).
    pub async fn next(&self) {
        self.notify.notified().await;
    }
}

/// Held while a flywheel cycle runs on a shared store: one cycle at a time
/// across every machine using the store (a file lock in a registry on a
/// network volume is not reliable). A session-level advisory lock on a
/// connection of its own: dropping this, or the process dying, closes the
/// connection and releases it.
pub struct StoreCycleLock {
    _client: Client,
}

impl StoreCycleLock {
    /// Take the lock without waiting; `None` while another cycle holds it.
    ///
    /// # Errors
    /// The store unreachable.
    pub async fn try_take(url: &str) -> Result<Option<Self>, LogError> {
        let client = Target::parse(url)?.connect().await?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&CYCLE_LOCK])
            .await?;
        let taken: bool = row.try_get(0)?;
        Ok(taken.then_some(Self { _client: client }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::store::Binding;

    #[tokio::test]
    async fn changes_take_turns_raise_the_revision_and_wake_listeners() {
        let Some(url) = crate::testing::postgres_database() else {
            return;
        };
        let a = SharedServingState::connect(&url, "a").await.unwrap();
        let b = SharedServingState::connect(&url, "b").await.unwrap();
        let changes = b.changes().await;
        let binding = |v: &str| Binding {
            version: v.into(),
            path: format!("/models/{v}.gguf").into(),
        };
        // Changes from two replicas at once: both land, one after the other.
        let (first, second) = tokio::join!(
            a.update_slot("router", |s| {
                s.promote(binding("base"), binding("v1"));
                Ok::<_, LogError>(())
            }),
            b.update_slot("router", |s| {
                s.promote(binding("base"), binding("v2"));
                Ok::<_, LogError>(())
            }),
        );
        let mut revisions = [first.unwrap().1.revision, second.unwrap().1.revision];
        revisions.sort_unstable();
        assert_eq!(revisions, [1, 2]);
        tokio::time::timeout(Duration::from_secs(2), changes.next())
            .await
            .expect("no notification of the change");
        let states = b.slot_states().await.unwrap();
        let router = &states["router"];
        assert_eq!(router.revision, 2);
        assert_eq!(router.history.len(), 2);
        // A change that fails writes nothing.
        let refused = a
            .update_slot("router", |s| {
                s.roll_back("router").unwrap();
                Err::<(), _>(LogError::Closed)
            })
            .await;
        assert!(matches!(refused, Err(LogError::Closed)));
        assert_eq!(a.slot_states().await.unwrap()["router"], *router);
    }

    #[tokio::test]
    async fn one_cycle_lock_per_store_released_when_its_holder_goes() {
        let Some(url) = crate::testing::postgres_database() else {
            return;
        };
        let held = StoreCycleLock::try_take(&url).await.unwrap().expect("a free lock");
        assert!(StoreCycleLock::try_take(&url).await.unwrap().is_none());
        drop(held);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while StoreCycleLock::try_take(&url).await.unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "the lock was never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
