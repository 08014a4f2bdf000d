//! Gangs: planning a whole group of pods at once, and the state a gang goes through until every
//! member is bound.
//!
//! **Planning** ([`plan_gang`]) takes the members (GPUs each), and the nodes as the scheduler
//! hook sees them (free GPUs = allocatable minus bound pods minus other gangs' reservations, the
//! node's topology domain, bytes of the gang's dataset already on it) and places every member or
//! none. Among the node sets that fit, it prefers, in this order:
//!
//! 1. the fewest nodes (a training job's collective traffic stays inside as few machines as possible);
//! 2. nodes in one topology domain (zone, rack: the configured label);
//! 3. the most dataset bytes already on the chosen nodes (less to warm before the job starts).
//!
//! Exact bin packing is NP-hard; the planner is exact when members ask for the same number of
//! GPUs (the usual case: one pod per GPU group) and uses best-fit decreasing otherwise. For every
//! candidate pool (each topology domain, then all nodes) it finds the smallest `k` for which the
//! `k` nodes with the most free GPUs fit the gang, then chooses `k` nodes greedily by cached
//! bytes, keeping a node only if the set can still be completed to one that fits. It never
//! over-commits a node and never returns part of a gang (property-tested in `tests.rs`).
//!
//! **State** ([`Gang`]): `WaitingForMembers` until `size` members exist; then planned (its
//! GPUs reserved) and `Warming` while the dataset loads onto the planned nodes (or
//! `Unschedulable`, with the reason, when it does not fit); `Ready` when the data on the planned
//! nodes reaches the gang's ready percent (or its ready timeout passes: it starts anyway, and
//! says so); `Bound` when every member is bound. A `Ready` gang whose members are not all bound
//! by the reservation's expiry is released whole and planned again; so is a gang whose planned
//! node disappears. Time is an argument (`now`, milliseconds on any monotonic clock): nothing here
//! reads a clock.
//!
//! `plan.rs` holds the planner, `state.rs` a gang's state machine.

mod plan;
mod state;

pub use plan::*;
pub use state::*;

#[cfg(test)]
mod tests;
