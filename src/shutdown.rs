//! How a worker winds down, as a value rather than flags sprinkled about.
//!
//! A drain has two stages, because closing an idle keep-alive connection races with a client
//! that is just sending its next request on it (the client sees a reset; a classic cause of
//! failed requests on reload):
//!
//! 1. [`Stage::Draining`]: stop accepting; every response from now on carries
//!    `Connection: close`, so busy keep-alive connections end cleanly after their next answer;
//! 2. [`Stage::CloseIdle`] (after a short grace): connections still open are idle, or
//!    finishing a request; hyper closes the idle ones and lets the others finish.
//!
//! The [`Trigger`] is held by whoever decides (the worker's control loop); every connection
//! and accept loop holds a cloned [`Shutdown`] and reacts to the stage it reaches.

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stage {
    Running,
    Draining,
    CloseIdle,
}

pub(crate) struct Trigger {
    tx: watch::Sender<Stage>,
}

/// A worker's shutdown, as seen by its connections and by your service (through
/// [`Worker::shutdown`](crate::Worker)): whether the worker is draining, and a future that
/// resolves when it starts to.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Stage>,
}

pub(crate) fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(Stage::Running);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    /// Moves to `stage` (never backwards).
    pub(crate) fn advance(&self, stage: Stage) {
        self.tx.send_if_modified(|s| {
            if stage > *s {
                *s = stage;
                true
            } else {
                false
            }
        });
    }
}

impl Shutdown {
    pub(crate) fn stage(&self) -> Stage {
        *self.rx.borrow()
    }

    /// True once the worker stopped accepting (a reload, a stop, a recycle).
    pub fn is_draining(&self) -> bool {
        self.stage() >= Stage::Draining
    }

    /// Resolves when the worker starts draining: end long-lived streams here.
    pub async fn draining(&mut self) {
        self.reached(Stage::Draining).await
    }

    /// Whether the stage changed since this receiver was made (or the worker is exiting):
    /// a cheap check that a pending [`Shutdown::reached`] may have resolved.
    pub(crate) fn moved(&self) -> bool {
        self.rx.has_changed().unwrap_or(true)
    }

    /// Resolves once the stage is `stage` or later.
    pub(crate) async fn reached(&mut self, stage: Stage) {
        // An Err means the trigger is gone, i.e. the worker is exiting: treat as reached.
        let _ = self.rx.wait_for(|s| *s >= stage).await;
    }
}
