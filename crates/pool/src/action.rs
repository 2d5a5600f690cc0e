//! What an idempotent verb did, so a caller can say "already so; no
//! action taken" (stratisd's `CreateAction::Identity`).
//!
//! What must never happen: `AlreadyDone` returned by a verb that changed
//! something.

use serde::Serialize;

/// What an idempotent verb did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// It changed something.
    Done,
    /// It was already so; no action taken.
    AlreadyDone,
}
