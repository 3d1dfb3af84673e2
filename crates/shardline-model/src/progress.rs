//! Progress of the model's long steps (building weights, uploading them to a GPU), reported to
//! whoever shows it: the command line draws bars; a library user may set their own reporter or
//! none (the default, which costs nothing).
//!
//! The reporter is process-wide, as a logger is: the steps that report run deep inside loading,
//! and threading a handle through every loader would burden each caller for a display concern.

use std::sync::OnceLock;

/// Receives a step's progress: `begin`, some `advance`s, then `end`, on the thread that runs it.
pub trait Report: Send + Sync {
    /// A step of `total` units starts.
    fn begin(&self, what: &str, total: u64);
    /// `n` more units are done.
    fn advance(&self, n: u64);
    /// The step has ended (done or failed).
    fn end(&self);
}

static REPORTER: OnceLock<Box<dyn Report>> = OnceLock::new();

/// Sets the process's reporter; only the first call takes effect.
pub fn set_reporter(r: Box<dyn Report>) {
    let _ = REPORTER.set(r);
}

/// A step being reported; ends when dropped.
pub struct Step(Option<&'static dyn Report>);

impl Step {
    /// Starts reporting a step of `total` units.
    pub fn begin(what: &str, total: u64) -> Step {
        let r = REPORTER.get().map(|b| &**b);
        if let Some(r) = r {
            r.begin(what, total);
        }
        Step(r)
    }

    /// One more unit is done.
    pub fn advance(&self) {
        if let Some(r) = self.0 {
            r.advance(1);
        }
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some(r) = self.0 {
            r.end();
        }
    }
}
