//! A TCP forwarder from the bridge to the S3 server: `scripts/services/*.sh` start it on
//! 127.0.0.1 only, which the emulated hosts cannot reach. It runs on a thread of its own (one
//! current-thread runtime), so that the CPU time it spends can be told apart from the readers'
//! (the other threads of this process) and counted as the S3 server's.

use anyhow::Context;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Forwards every connection to `listen` to `target`; stops when dropped.
pub struct Forwarder {
    pub addr: SocketAddr,
    /// The forwarding thread's id (`/proc/self/task/TID`).
    pub tid: u32,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `listen` (port 0: any free one) and forwards to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> anyhow::Result<Forwarder> {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen} to forward to {target}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("s3-forward".into())
            .spawn(move || {
                let _ = tid_tx.send(thread_id());
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return eprintln!("granary-bench: no runtime to forward S3: {e}"),
                };
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => return eprintln!("granary-bench: forwarding S3: {e}"),
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = serve(listener, target) => {}
                    }
                });
            })?;
        let tid = tid_rx
            .recv()
            .context("the forwarding thread did not start")??;
        Ok(Forwarder {
            addr,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// This thread's id, from `/proc/thread-self` (a link to `PID/task/TID`).
fn thread_id() -> anyhow::Result<u32> {
    let link = std::fs::read_link("/proc/thread-self")?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("odd /proc/thread-self: {}", link.display()))
}

async fn serve(listener: TcpListener, target: SocketAddr) {
    loop {
        let inbound = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("granary-bench: forwarding S3: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let mut inbound = inbound;
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_go_both_ways_and_the_thread_is_ours() {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = echo.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = echo.accept().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            s.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
        });
        let fwd = Forwarder::start("127.0.0.1:0".parse().unwrap(), target).unwrap();
        let mut c = std::net::TcpStream::connect(fwd.addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"HELLO");
        server.join().unwrap();
        assert!(
            std::path::Path::new(&format!("/proc/self/task/{}", fwd.tid)).exists(),
            "tid {}",
            fwd.tid
        );
        assert!(crate::host::thread_cpu_seconds(fwd.tid).unwrap() >= 0.0);
        drop(fwd);
    }
}
