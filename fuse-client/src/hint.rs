//! Shuffle-aware prefetch: a job tells the mount the order in which it will read files (a hint,
//! `granary hint --mount DIR FILE`), and the mount fetches them in that order, ahead of the job,
//! within a byte budget.
//!
//! The hint is a list of namespace paths. Opening a hinted file marks it read (and every file
//! before it in the list as passed: the job is past them); the prefetcher keeps the files after
//! the furthest one read in flight or fetched, as long as their bytes stay within the budget. A
//! file opened before its prefetch got to it is simply read as usual. Without a hint nothing
//! happens. The fetched blocks go to the worker's memory tier (`CacheApi::prefetch`), so the
//! budget is an eighth of it by default: each byte of budget is a byte of the dataset the tier
//! cannot keep between epochs (prefetched blocks take turns in about the budget, the rest of the
//! tier keeps its part of the dataset), so a job whose backend is slower than its reader wants
//! the budget small, just enough to cover the backend's latency.
//!
//! `granary hint` reaches the mount's FUSE server on an abstract unix socket named after the
//! mount point ([`socket_name`]); the server answers only root and its own user (checked with
//! `SO_PEERCRED`). It sends the list and reads one line back: `ok <paths> <budget bytes>` or
//! `error: <why>`. A server that replaces a crashed one starts without a hint.

use granary_core::BlockSize;
use granary_proto::{ApiError, CacheApi, EntryKind};
use std::collections::{HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};

/// Most paths a hint may list.
pub const MAX_PATHS: usize = 4_000_000;

/// Most bytes a hint may take.
pub const MAX_BYTES: u64 = 256 << 20;

/// How long a client may take to send its hint.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The mount point as both ends name it: its parent resolved (never the mount itself, which
/// would ask the FUSE server), then its own name.
pub fn mount_point(dir: &Path) -> std::io::Result<PathBuf> {
    let abs = std::path::absolute(dir)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(std::fs::canonicalize(parent)?.join(name)),
        _ => Ok(abs),
    }
}

/// The abstract unix socket name of the mount at `mount_point`.
pub fn socket_name(mount_point: &Path) -> String {
    let hash = xxhash_rust::xxh3::xxh3_128(mount_point.as_os_str().as_bytes());
    format!("granary-hint-{hash:032x}")
}

/// Listens for hints for the mount at `dir`, and runs the prefetcher, until the process ends.
/// A mount whose socket cannot be made (another mount holds the name) takes no hints; logged.
pub fn listen<A: CacheApi>(hints: Arc<Hints<A>>, dir: &Path) {
    let listener = mount_point(dir).and_then(|point| {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(socket_name(&point))?;
        let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
        l.set_nonblocking(true)?;
        tokio::net::UnixListener::from_std(l)
    });
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot take hints for this mount");
            return;
        }
    };
    tokio::spawn(hints.clone().run());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let hints = hints.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(&hints, stream).await {
                    tracing::debug!(error = %e, "a hint connection failed");
                }
            });
        }
    });
}

/// One `granary hint` connection: who it is, the list, the answer.
async fn answer<A: CacheApi>(
    hints: &Hints<A>,
    mut stream: tokio::net::UnixStream,
) -> std::io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let uid = stream.peer_cred()?.uid();
    let reply = if uid != 0 && uid != me {
        tracing::warn!(
            uid,
            "refused a hint from a user who is neither root nor the mount's"
        );
        format!("error: uid {uid} may not hint this mount (root or uid {me} may)\n")
    } else {
        let mut text = Vec::new();
        let mut limited = (&mut stream).take(MAX_BYTES + 1);
        match tokio::time::timeout(RECEIVE_TIMEOUT, limited.read_to_end(&mut text)).await {
            Err(_) => format!("error: the hint did not arrive within {RECEIVE_TIMEOUT:?}\n"),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(_)) if text.len() as u64 > MAX_BYTES => {
                format!("error: a hint may take {MAX_BYTES} bytes at most\n")
            }
            Ok(Ok(_)) => match std::str::from_utf8(&text) {
                Err(e) => format!("error: the hint is not UTF-8 ({e})\n"),
                Ok(text) => match hints.set(text) {
                    Ok(a) => {
                        tracing::info!(paths = a.paths, budget = a.budget, "took a hint");
                        format!("ok {} {}\n", a.paths, a.budget)
                    }
                    Err(e) => format!("error: {e}\n"),
                },
            },
        }
    };
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

/// Sends `text` (one path per line) as the hint of the mount at `dir`; the mount's answer, or
/// why it could not be asked.
pub fn send(dir: &Path, text: &[u8]) -> Result<Accepted, String> {
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    let point = mount_point(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(socket_name(&point))
        .map_err(|e| e.to_string())?;
    let mut stream = std::os::unix::net::UnixStream::connect_addr(&addr).map_err(|e| {
        format!(
            "no Granary mount at {} takes hints ({e}): is it mounted, by a version with `granary hint`?",
            point.display()
        )
    })?;
    stream
        .write_all(text)
        .and_then(|()| stream.shutdown(std::net::Shutdown::Write))
        .map_err(|e| format!("sending the hint: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("reading the mount's answer: {e}"))?;
    let reply = reply.trim_end();
    if let Some(why) = reply.strip_prefix("error: ") {
        return Err(why.to_string());
    }
    let mut words = reply.strip_prefix("ok ").unwrap_or_default().split(' ');
    match (
        words.next().and_then(|w| w.parse().ok()),
        words.next().and_then(|w| w.parse().ok()),
    ) {
        (Some(paths), Some(budget)) => Ok(Accepted { paths, budget }),
        _ => Err(format!("the mount answered {reply:?}")),
    }
}

/// Blocks of hinted files being fetched at once.
const CONCURRENCY: usize = 16;

/// The mount's prefetcher of hinted files.
pub struct Hints<A> {
    api: Arc<A>,
    block_size: BlockSize,
    budget: u64,
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    /// Bumped by every new hint: the prefetch of an older one stops.
    generation: u64,
    order: Vec<String>,
    position: HashMap<String, usize>,
    /// The next position to prefetch.
    next: usize,
    /// Files prefetched (or being prefetched) and not opened yet: position and bytes.
    ahead: VecDeque<(usize, u64)>,
    ahead_bytes: u64,
}

/// What `granary hint` is told back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub paths: usize,
    pub budget: u64,
}

impl<A: CacheApi> Hints<A> {
    /// A prefetcher that keeps at most `budget` bytes of hinted files ahead of the job.
    pub fn new(api: Arc<A>, block_size: BlockSize, budget: u64) -> Arc<Self> {
        Arc::new(Hints {
            api,
            block_size,
            budget,
            state: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Replaces the hint with `text`: one namespace path per line (relative to the mount's
    /// root, with or without a leading `/`; empty lines skipped). Refused whole, changing
    /// nothing, if a line is not a plain path.
    pub fn set(&self, text: &str) -> Result<Accepted, String> {
        let mut order = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let rel = line.trim_start_matches('/');
            if rel.is_empty()
                || rel
                    .split('/')
                    .any(|s| s.is_empty() || s == "." || s == ".." || s.contains('\0'))
            {
                return Err(format!(
                    "line {}: {line:?} is not a path inside the mount (empty, `.` or `..` segment)",
                    n + 1
                ));
            }
            order.push(format!("/{rel}"));
            if order.len() > MAX_PATHS {
                return Err(format!("more than {MAX_PATHS} paths"));
            }
        }
        let paths = order.len();
        let mut s = self.state.lock().expect("hint lock");
        let generation = s.generation + 1;
        *s = State {
            generation,
            position: order
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), i))
                .collect(),
            order,
            ..State::default()
        };
        drop(s);
        self.wake.notify_one();
        Ok(Accepted {
            paths,
            budget: self.budget,
        })
    }

    /// The job opened `path`: if it is hinted, its bytes are no longer ahead, and the files
    /// listed before it are passed.
    pub fn opened(&self, path: &str) {
        let mut s = self.state.lock().expect("hint lock");
        let Some(&at) = s.position.get(path) else {
            return;
        };
        let mut freed = 0;
        s.ahead.retain(|&(p, bytes)| {
            let keep = p > at;
            if !keep {
                freed += bytes;
            }
            keep
        });
        s.ahead_bytes -= freed;
        s.next = s.next.max(at + 1);
        drop(s);
        self.wake.notify_one();
    }

    /// Bytes of hinted files fetched ahead of the job (or being fetched).
    pub fn ahead_bytes(&self) -> u64 {
        self.state.lock().expect("hint lock").ahead_bytes
    }

    /// Runs the prefetcher until the mount goes.
    pub async fn run(self: Arc<Self>) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            let Some((generation, path)) = self.next_file() else {
                self.wake.notified().await;
                continue;
            };
            if let Err(e) = self.prefetch_file(generation, &path, &slots).await {
                tracing::debug!(path, error = %e, "hinted file not prefetched");
            }
        }
    }

    /// The next hinted file to fetch, if the budget has room.
    fn next_file(&self) -> Option<(u64, String)> {
        let s = self.state.lock().expect("hint lock");
        (s.next < s.order.len() && s.ahead_bytes < self.budget)
            .then(|| (s.generation, s.order[s.next].clone()))
    }

    async fn prefetch_file(
        &self,
        generation: u64,
        path: &str,
        slots: &Arc<Semaphore>,
    ) -> Result<(), ApiError> {
        let entry = self.api.stat(path).await;
        let object = {
            let mut s = self.state.lock().expect("hint lock");
            if s.generation != generation || s.order.get(s.next).map(String::as_str) != Some(path) {
                return Ok(()); // a new hint, or the job got past it meanwhile
            }
            let at = s.next;
            s.next += 1;
            let entry = entry?;
            let object = match (entry.kind, entry.object) {
                (EntryKind::File, Some(object)) => object,
                _ => return Ok(()),
            };
            s.ahead.push_back((at, object.id.size));
            s.ahead_bytes += object.id.size;
            object
        };
        metrics::gauge!(granary_core::metrics::FUSE_HINT_AHEAD_BYTES)
            .set(self.ahead_bytes() as f64);
        for index in 0..self.block_size.count(object.id.size) {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let api = self.api.clone();
            let object = object.clone();
            tokio::spawn(async move {
                match api.prefetch(&object, index).await {
                    Ok(()) => {
                        metrics::counter!(granary_core::metrics::FUSE_HINT_BLOCKS).increment(1)
                    }
                    Err(e) => tracing::debug!(error = %e, "hinted block not prefetched"),
                }
                drop(permit);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_with_a_bad_line_is_refused_whole() {
        let s = State::default();
        assert!(s.order.is_empty());
        let bad = ["a/../b", "a//b", "./a", "/"];
        for b in bad {
            let text = format!("ok/one\n{b}\n");
            assert!(parse_for_test(&text).is_err(), "{b:?} accepted");
        }
        assert_eq!(
            parse_for_test("a/b\n\n/c d/é\r\n").unwrap(),
            vec!["/a/b".to_string(), "/c d/é".to_string()]
        );
    }

    fn parse_for_test(text: &str) -> Result<Vec<String>, String> {
        struct NoApi;
        impl CacheApi for NoApi {
            fn info(&self) -> granary_proto::Info {
                unreachable!()
            }
            async fn stat(&self, _: &str) -> Result<granary_proto::Entry, ApiError> {
                unreachable!()
            }
            async fn list(&self, _: &str) -> Result<Arc<Vec<granary_proto::Entry>>, ApiError> {
                unreachable!()
            }
            async fn read_block(
                &self,
                _: &granary_proto::ObjectRef,
                _: u64,
            ) -> Result<granary_proto::Block, ApiError> {
                unreachable!()
            }
        }
        let h = Hints::new(Arc::new(NoApi), BlockSize::DEFAULT, 1 << 20);
        h.set(text)?;
        Ok(h.state.lock().unwrap().order.clone())
    }
}
