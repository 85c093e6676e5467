//! The one path for "events changed state behind the relay's back" (a
//! commit, an abort, a resolved token, an expiry, a redrive): the shards'
//! workers read them again, and watchers hear of them.

use crate::status::StatusBus;
use crate::store::Resolved;

use super::RelayWaker;

/// Tells the relay and the status bus about state changes made outside the
/// relay.
#[derive(Clone)]
pub struct StateChanges {
    /// Watchers of the changed events.
    pub bus: StatusBus,
    /// Rewinds the shards of the changed events.
    pub waker: RelayWaker,
}

impl StateChanges {
    /// Rewinds the changed events' shards, then publishes the changes.
    pub fn announce(&self, resolved: Resolved) {
        self.waker.rewind_shards(resolved.shards);
        self.bus.publish(resolved.changed);
    }
}
