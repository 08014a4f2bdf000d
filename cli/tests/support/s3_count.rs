//! A TCP proxy in front of an S3 server that notes every request passing through it (method,
//! target, time): what the S3 server was asked, counted where it is asked, whatever Granary's
//! own counters say. For request heads without bodies (GET, HEAD, listings): what a reader sends.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub target: String,
}

pub struct CountingProxy {
    /// `http://127.0.0.1:PORT`: give it as the S3 endpoint.
    pub endpoint: String,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl CountingProxy {
    /// Listens on a free loopback port and forwards each connection to `upstream` (host:port).
    pub fn start(upstream: &str) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let seen: Arc<Mutex<Vec<Request>>> = Arc::default();
        let (upstream, log) = (upstream.to_string(), seen.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let log = log.clone();
                std::thread::spawn(move || copy_requests(client, server, log));
                std::thread::spawn(move || copy(s2, c2));
            }
        });
        CountingProxy { endpoint, seen }
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests so far whose target contains `text`.
    pub fn requests_for(&self, text: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.target.contains(text))
            .collect()
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// Copies the client's bytes to the server, noting each request line: heads end with an empty
/// line and carry no body here, so each head starts where the last one ended.
fn copy_requests(mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<Request>>>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let mut words = head.lines().next().unwrap_or("").split(' ');
            log.lock().unwrap().push(Request {
                at: Instant::now(),
                method: words.next().unwrap_or("").to_string(),
                target: words.next().unwrap_or("").to_string(),
            });
            pending.drain(..end + 4);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
