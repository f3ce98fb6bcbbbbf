//! Stopping a long build from another thread (a Ctrl-C handler, the Python bindings): the build
//! checks the flag between its steps and returns [`IndexError::Cancelled`]; its staged folder is
//! then dropped, so nothing half-written stays.

use crate::error::{IndexError, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A flag shared by clones: set once, seen by every clone.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the build holding a clone to stop at its next check.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(IndexError::Cancelled)
        } else {
            Ok(())
        }
    }
}
