//! Teardown that happens however the benchmark ends: normally, on an error, on a panic or on
//! Ctrl-C/SIGTERM.
//!
//! Everything the benchmark starts (the S3 server, daemons, mounts, its work directory) registers
//! an undo action here and keeps the returned [`Guard`]; dropping the guard runs the action once.
//! A signal runs every action still pending, newest first, then exits with status 130. Actions run
//! while holding the registry lock, so a signal that arrives during a teardown waits for it to end
//! instead of racing it. An action must therefore never drop another guard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

type Action = Box<dyn FnOnce() + Send>;

struct Pending {
    id: u64,
    what: String,
    action: Action,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn pending() -> MutexGuard<'static, Vec<Pending>> {
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs its action when dropped (or on a signal, whichever comes first).
#[must_use = "dropping the guard runs the teardown at once"]
pub struct Guard {
    id: u64,
}

/// Registers `action` (described by `what` in messages) to run when the guard is dropped.
pub fn register(what: impl Into<String>, action: impl FnOnce() + Send + 'static) -> Guard {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    pending().push(Pending {
        id,
        what: what.into(),
        action: Box::new(action),
    });
    Guard { id }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut pending = pending();
        if let Some(i) = pending.iter().position(|p| p.id == self.id) {
            let p = pending.remove(i);
            (p.action)();
        }
    }
}

/// Waits for SIGINT or SIGTERM, tears everything down and exits with status 130.
pub async fn on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("granary-bench: cannot catch signals; Ctrl-C will leave things behind");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    eprintln!("granary-bench: interrupted, tearing down");
    let mut pending = pending();
    while let Some(p) = pending.pop() {
        eprintln!("granary-bench: teardown: {}", p.what);
        (p.action)();
    }
    std::process::exit(130);
}
